"""Scaling report: AOT-compile the paper config's step for fake CPU meshes, allocate nothing.

  python -m codis_jax.scaling_report                    # 1, 2, 4, 8 devices, FSDP
  python -m codis_jax.scaling_report --devices=8 --layout=data
  python -m codis_jax.scaling_report --devices=8 --layout=data --dtype=bfloat16 --gpu=h100

For each mesh: per-device argument and temp bytes (`memory_analysis()`), FLOPs
(`cost_analysis()`), and the collectives in the compiled HLO with their sizes, per dtype.
`--gpu` compiles for compile-only GPUs of one host instead (JAX's CUDA plugin, see
`roofline`): XLA:CPU computes bf16 matmuls in float32, so only a GPU compile shows the
dtypes a GPU's collectives run in.
"""

import collections
import os
import re
import sys

if 'jax' not in sys.modules:  # fake CPU devices must be requested before JAX starts
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                             + ' --xla_force_host_platform_device_count=8')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # compile-only GPUs need a CPU JAX

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402

from codis_jax import bench  # noqa: E402
from codis_jax import hlo_cost  # noqa: E402
from codis_jax import sharding  # noqa: E402
from codis_jax import state as state_lib  # noqa: E402
from codis_jax import train  # noqa: E402
from configs import pretrain  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list('devices', ['1', '2', '4', '8'], 'Mesh sizes to compile for.')
flags.DEFINE_enum('layout', 'fsdp', ['fsdp', 'data'], 'Which mesh axis takes the devices.')
flags.DEFINE_string('variant', 'paper', 'configs/pretrain.py variant.')
flags.DEFINE_string('dtype', '', 'Override config.model.dtype (float32 | bfloat16).')
flags.DEFINE_string('remat', '', 'Override config.model.remat (none | full | dots).')
flags.DEFINE_list('set', [], 'More config overrides, e.g. model.weight_grad_dtype=bfloat16.')
flags.DEFINE_enum('gpu', '', ['', 'h100', 'h200', 'a100'],
                  'Compile for compile-only GPUs of this kind instead of CPU devices.')

_COLLECTIVE = re.compile(
    r'= (\(?[^=]*?\)?) (all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)'
    r'(?:-start)?\(')
_COMMENT = re.compile(r'/\*.*?\*/')  # XLA numbers long tuples: /*index=5*/


def collectives(hlo_text: str):
  """[(kind, result arrays as `hlo_cost.Array`s)] for every collective in compiled HLO
  text (a combined collective yields a tuple of arrays)."""
  found = []
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(_COMMENT.sub('', line))
    if m:
      found.append((m.group(2), hlo_cost.arrays(m.group(1))))
  return found


def compile_step(config, num_devices: int, layout: str = 'fsdp', gpu: str = ''):
  """AOT-compiles the step on a (data|fsdp)=num_devices mesh of CPU devices, or of
  compile-only `gpu` devices; returns the Compiled."""
  config.mesh.update(data=1, fsdp=1, tensor=1)
  config.mesh[layout] = num_devices
  if gpu:
    from codis_jax import roofline  # pylint: disable=import-outside-toplevel
    devices = roofline.compile_only_devices(gpu, num_devices)
  else:
    devices = jax.devices()[:num_devices]
  mesh = sharding.create_mesh(config, devices)
  sharding.check_batch(config, mesh)
  tx = state_lib.make_optimizer(config.optim, 100_000)
  abstract, shardings = sharding.state_shardings(config, tx, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract, shardings)
  b, m = config.batch_size, config.model
  bs = sharding.batch_sharding(mesh)
  batch = {
      'image': jax.ShapeDtypeStruct((b, m.image_size, m.image_size, 3), 'uint8',
                                    sharding=bs),
      'text_ids': jax.ShapeDtypeStruct((b, config.text_len), 'int32', sharding=bs),
      'text_mask': jax.ShapeDtypeStruct((b, config.text_len), 'int32', sharding=bs),
      'image_id': jax.ShapeDtypeStruct((b,), 'int32', sharding=bs),
  }
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  step = sharding.jit_train_step(train.make_train_step(config, tx, 1000), config, mesh,
                                 shardings)
  # No autotuner without a GPU: GEMMs go to cuBLAS, as in `roofline`.
  options = {'xla_gpu_enable_triton_gemm': False} if gpu else None
  return step.lower(state, batch, rng).compile(compiler_options=options)


def state_bytes(config) -> int:
  """Bytes of the whole TrainState (= per-device bytes on one device)."""
  tx = state_lib.make_optimizer(config.optim, 100_000)
  abstract = jax.eval_shape(lambda r: state_lib.create_train_state(config, r, tx),
                            jax.random.key(0))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))


def by_kind_and_dtype(found) -> dict:
  """collectives() -> {'all-reduce bf16': [count, total bytes, largest bytes]}: a tuple
  collective counts once under each dtype it carries, with that dtype's bytes."""
  rows = collections.defaultdict(lambda: [0, 0, 0])
  for kind, arrays in found:
    sizes = collections.Counter()
    for a in arrays:
      sizes[a.dtype] += a.bytes
    for dtype, size in sizes.items():
      row = rows[f'{kind} {dtype}']
      row[0] += 1
      row[1] += size
      row[2] = max(row[2], size)
  return dict(rows)


def report_row(config, n: int, layout: str, gpu: str = '') -> dict:
  compiled = compile_step(config, n, layout, gpu)
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}  # None for a compile-only GPU
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(devices=n, args=mem.argument_size_in_bytes, temp=mem.temp_size_in_bytes,
              flops=float(cost.get('flops', 0.0)),
              collectives=by_kind_and_dtype(collectives(compiled.as_text())))


def _config():
  config = pretrain.get_config(FLAGS.variant)
  config.model.dtype = FLAGS.dtype or config.model.dtype
  config.model.remat = FLAGS.remat or config.model.remat
  return bench.apply_overrides(config, FLAGS.set)


def main(argv):
  del argv
  gib = lambda x: f'{x / 2**30:.2f}'
  c = _config()
  print(f'{FLAGS.variant} config (batch {c.batch_size}, dtype {c.model.dtype}, remat '
        f'{c.model.remat}{"".join(", " + s for s in FLAGS.set)}), layout={FLAGS.layout}, '
        f'{FLAGS.gpu or "CPU"} devices; state {gib(state_bytes(c))} GiB in all')
  print('| devices | args GiB/device | temp GiB/device | TFLOPs/device | collectives: count, '
        'total MiB, largest MiB |')
  print('|---|---|---|---|---|')
  for n in map(int, FLAGS.devices):
    r = report_row(_config(), n, FLAGS.layout, FLAGS.gpu)
    coll = '; '.join(f'{k} {c}, {t / 2**20:.1f}, {mx / 2**20:.1f}'
                     for k, (c, t, mx) in sorted(r['collectives'].items())) or 'none'
    print(f"| {n} | {gib(r['args'])} | {gib(r['temp'])} | {r['flops'] / 1e12:.2f} | "
          f'{coll} |', flush=True)


if __name__ == '__main__':
  app.run(main)
