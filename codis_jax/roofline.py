"""Roofline of the train step on a GPU, from the step XLA compiles for it: no GPU needed.

  python -m codis_jax.roofline                                   # paper, batch 64, bf16, H200
  python -m codis_jax.roofline --variant= --variant=model.share_image_kv=false
  python -m codis_jax.roofline --hlo=DUMP.txt --target=h100      # an optimised-HLO dump

The step is compiled for a compile-only GPU device (`jax.experimental.topologies`, with
the target's device description), which needs JAX's CUDA plugin but no GPU or driver:
  pip install jax-cuda12-plugin==$JAX_VERSION jax-cuda12-pjrt==$JAX_VERSION
(`launch/setup.sh --gpu-aot` does it). Without a device XLA cannot autotune, so GEMMs go to
cuBLAS (Triton GEMM fusions are turned off) and the schedule may differ from a real run.

For every kernel of the compiled step `hlo_cost` counts FLOPs and device-memory bytes;
the roofline time of the step is the sum over kernels of max(FLOPs at peak, bytes at peak
bandwidth) plus a launch cost. It is a lower bound on the step time, not a measurement:
it shows how many launches and bytes each part costs and what a change removes.
"""

import dataclasses
import json
import os
import sys

if 'jax' not in sys.modules:  # the GPU is compile-only: JAX itself runs on the CPU
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from codis_jax import bench  # noqa: E402
from codis_jax import hlo_cost  # noqa: E402
from codis_jax import state as state_lib  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags():
  """Defined when run as a program only (as bench's), so that importing this module adds
  no absl flags that clash with another tool's."""
  flags.DEFINE_string('config', 'paper', 'configs/pretrain.py variant.')
  flags.DEFINE_integer('batch', 64, 'Batch per chip.')
  flags.DEFINE_string('dtype', 'bfloat16', "Override config.model.dtype ('' keeps it).")
  flags.DEFINE_multi_string('variant', [''], 'Comma-separated overrides, one compile each.')
  flags.DEFINE_enum('target', 'h200', sorted(hlo_cost.DEVICES), 'GPU to compile for.')
  flags.DEFINE_string('hlo', '', 'Analyse this optimised-HLO text file instead of compiling.')
  flags.DEFINE_float('launch_us', 2.0, 'Fixed cost per kernel launch, microseconds.')
  flags.DEFINE_integer('top', 12, 'Rows of each breakdown table.')
  flags.DEFINE_string('save_hlo', '', "Write each compiled step's HLO to this directory.")
  flags.DEFINE_string('json', '', 'Append one JSON line per variant to this file.')
  flags.DEFINE_bool('guard', True, 'The step inside the non-finite guard, as the loop runs it.')


# Device descriptions for the compile-only client (XLA's GpuDeviceInfoProto fields).
_GPU_INFO = {
    'h100': dict(cc=(9, 0), cores=132, smem_block_optin=232448, smem_core=233472,
                 bandwidth=3.35e12, l2=52428800, clock=1.98, memory=80 * 2**30),
    'h200': dict(cc=(9, 0), cores=132, smem_block_optin=232448, smem_core=233472,
                 bandwidth=4.8e12, l2=52428800, clock=1.98, memory=141 * 2**30),
    'a100': dict(cc=(8, 0), cores=108, smem_block_optin=166912, smem_core=167936,
                 bandwidth=2.039e12, l2=41943040, clock=1.41, memory=80 * 2**30),
}


def target_config(target: str) -> str:
  """The GpuTargetConfigProto text XLA compiles against for `target`."""
  g = _GPU_INFO[target]
  return f"""gpu_device_info {{
  cuda_compute_capability {{ major: {g['cc'][0]} minor: {g['cc'][1]} }}
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_block_optin: {g['smem_block_optin']}
  shared_memory_per_core: {g['smem_core']} threads_per_core_limit: 2048
  core_count: {g['cores']} fpus_per_core: 128 block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(g['bandwidth'])} l2_cache_size: {g['l2']}
  clock_rate_ghz: {g['clock']} device_memory_size: {g['memory']}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{target}"
"""


def compile_only_device(target: str):
  """A compile-only CUDA device for `target` (JAX's CUDA plugin; no GPU needed)."""
  return compile_only_devices(target, 1)[0]


def compile_only_devices(target: str, n: int):
  """n compile-only CUDA devices of `target` on one host (NVLink), for sharded steps."""
  from jax.experimental import topologies
  try:
    topo = topologies.get_topology_desc(platform='cuda', topology_name='',
                                        topology=f'1x1x{n}', target_config=target_config(target))
  except Exception as e:  # the plugin is missing, or too old for deviceless compilation
    raise SystemExit(
        f'roofline: cannot create a compile-only CUDA device ({type(e).__name__}: {e}).\n'
        f'Install JAX\'s CUDA plugin matching jax {jax.__version__}: pip install '
        f'jax-cuda12-plugin=={jax.__version__} jax-cuda12-pjrt=={jax.__version__}') from None
  return topo.devices


def step_args(config):
  """(optimizer, state, batch, rng) of `config`'s train step as shapes: nothing is
  initialised or allocated."""
  tx = bench.make_tx(config)
  state = jax.eval_shape(lambda r: state_lib.create_train_state(config, r, tx),
                         jax.random.key(0))
  batch = jax.eval_shape(lambda: jax.tree.map(
      jnp.asarray, bench.synthetic_batch(config, config.batch_size)))
  return tx, state, batch, jax.eval_shape(lambda: jax.random.key(1))


def compile_step(config, tx, args, device, guarded=True, compiler_options=None):
  """`config`'s train step compiled for `device` (any compile-only device: this GPU's, or
  a TPU's in `tpu_aot`); guarded: inside the non-finite guard, as the training loop runs it
  (`bench.loop_step`). args: (state, batch, rng) as shapes (`step_args`)."""
  state, batch, rng = args
  step, carry = bench.loop_step(config, tx, state, guarded)
  sharding = jax.sharding.SingleDeviceSharding(device)
  args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      (carry, batch, rng))
  return jax.jit(step, donate_argnums=0).lower(*args).compile(
      compiler_options=compiler_options)


def save_hlo(folder: str, name: str, text: str):
  """Writes a compiled program's HLO text to folder/<name or 'default'>.hlo.txt."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, f'{name or "default"}.hlo.txt'.replace('/', '_')), 'w') as f:
    f.write(text)


def part(k: hlo_cost.Kernel) -> str:
  """Which part of the step a kernel belongs to, from its JAX op path."""
  name = k.op_name
  for key, label in (('encode_image', 'vision'), ('encode_text', 'text'),
                     ('fuse', 'fusion'), ('mlm', 'mlm head'), ('itm', 'itm head')):
    if key in name:
      if 'transpose(' in name:
        return f'{label} backward'
      return f'{label} forward' + ('' if 'jvp(' in name else ' (teacher)')
  if 'while' in name:
    return 'IPOT'
  return 'rest (losses, update, EMA, queues)'


def report(name: str, ks: list, device: hlo_cost.Device, model_flops: float, batch: int,
           top: int) -> dict:
  s = hlo_cost.summary(ks, device)
  ms = lambda x: f'{1e3 * x:.2f}'
  print(f'\n## {name}: {s["launches"]} launches, {s["flops"] / 1e12:.2f} TFLOPs executed, '
        f'{s["bytes"] / 1e9:.1f} GB moved; roofline {ms(s["seconds"])} ms = compute-bound '
        f'{ms(s["compute_bound_s"])} + memory-bound {ms(s["memory_bound_s"])} + launches '
        f'{ms(s["launch_s"])}')
  if model_flops:
    mfu = model_flops / s['seconds'] / device.bf16_flops
    print(f'At the roofline: {batch / s["seconds"]:.0f} pairs/s, MFU {100 * mfu:.1f}% '
          f'({model_flops / batch / 1e9:.1f} model GFLOPs per pair) - an upper bound.')
  for title, key in (('part', part), ('kernel kind', lambda k: k.kind)):
    print(f'\n| {title} | launches | TFLOPs | GB | roofline ms | share |\n|---|---|---|---|---|---|')
    for g, n, f, b, t in hlo_cost.group_by(ks, key, device)[:top]:
      print(f'| {g} | {n} | {f / 1e12:.2f} | {b / 1e9:.1f} | {ms(t)} | '
            f'{100 * t / s["seconds"]:.1f}% |')
  return dict(variant=name, model_flops=model_flops, **s)


def main(argv):
  del argv
  device = dataclasses.replace(hlo_cost.DEVICES[FLAGS.target], launch_s=FLAGS.launch_us * 1e-6)
  print(f'# Roofline on {device.name}: {device.bf16_flops / 1e12:.0f} TFLOP/s bf16, '
        f'{device.bandwidth / 1e12:.2f} TB/s, {FLAGS.launch_us:g} us per launch')
  if FLAGS.hlo:
    with open(FLAGS.hlo) as f:
      report(FLAGS.hlo, hlo_cost.kernels(f.read()), device, 0.0, FLAGS.batch, FLAGS.top)
    return
  gpu = compile_only_device(FLAGS.target)
  for variant in FLAGS.variant:
    overrides = [v for v in variant.split(',') if v]
    config = bench.make_config(FLAGS.config, FLAGS.batch, FLAGS.dtype, overrides=overrides)
    tx, *args = step_args(config)
    compiled = compile_step(config, tx, args, gpu, FLAGS.guard,  # no autotuner to pick tiles:
                            compiler_options={'xla_gpu_enable_triton_gemm': False})
    text, mem = compiled.as_text(), compiled.memory_analysis()
    if FLAGS.save_hlo:
      save_hlo(FLAGS.save_hlo, variant, text)
    model = bench.model_flops(config, tx, *args)
    row = report(variant or 'as configured', hlo_cost.kernels(text), device, model,
                 config.batch_size, FLAGS.top)
    print(f'Compiled step: {mem.argument_size_in_bytes / 2**30:.2f} GiB arguments, '
          f'{mem.temp_size_in_bytes / 2**30:.2f} GiB temporaries.')
    sys.stdout.flush()
    if FLAGS.json:
      row.update(config=FLAGS.config, batch=config.batch_size, dtype=config.model.dtype,
                 guard=FLAGS.guard,
                 target=FLAGS.target, launch_us=FLAGS.launch_us, jax=jax.__version__,
                 args_gib=mem.argument_size_in_bytes / 2**30,
                 temp_gib=mem.temp_size_in_bytes / 2**30)
      with open(FLAGS.json, 'a') as f:
        f.write(json.dumps(row) + '\n')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
