"""The train step compiled for a TPU chip on a machine without one: memory per chip, the
step's HBM traffic kernel by kernel, and the floor on the step time they give.

  PYTHONPATH=.tpu_aot python -m codis_jax.tpu_aot                      # paper, batch 64, v5e
  PYTHONPATH=.tpu_aot python -m codis_jax.tpu_aot --target=v6e --variant= \
      --variant=model.attention_impl=pallas

libtpu compiles for a compile-only TPU topology (as MaxText's train_compile does); it lives
in .tpu_aot (put there by `launch/setup.sh`), not in .venv, where every JAX program would
try to start a TPU. For each target and variant this reports:
- the compiled step's memory on one chip: arguments (params, AdamW moments, EMA teacher,
  queues, batch) and temporaries, against the chip's HBM;
- XLA:TPU's `cost_analysis()`: FLOPs, and "bytes accessed", which counts the accesses of
  buffers XLA keeps in on-chip VMEM too (a dense matmul: 1.8x its operands and result);
- the bytes the compiled kernels move through HBM (`hlo_cost`: tiled layouts, VMEM
  buffers left out, HBM<->VMEM copies counted once), part by part. All FLOPs at peak or
  those bytes at the HBM bandwidth, whichever is longer, is a floor on the step time, so
  a ceiling on MFU; each kernel at its own bound, summed, is the roofline estimate.
Bounds, not measurements. (XLA:TPU's `optimal_seconds` estimate is not used: libtpu
0.0.42 returns negative values for this step, -1,211 s for the paper config on v5e.)
"""

import dataclasses
import json
import os
import sys

if 'jax' not in sys.modules:  # the TPU is compile-only: JAX itself runs on the CPU
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')  # no GCE metadata server to ask
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # several compiling processes

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402

from codis_jax import bench  # noqa: E402
from codis_jax import hlo_cost  # noqa: E402
from codis_jax import roofline  # noqa: E402

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Chip:
  topology: str      # a libtpu topology name; its first chip is the compile target
  hbm_bytes: float
  bandwidth: float   # HBM bytes/s; the peak FLOP/s is bench.PEAK_FLOPS's


# Vendor datasheet figures (Cloud TPU system architecture pages).
CHIPS = {
    'v4': Chip('v4:2x2x1', 32 * 2**30, 1228e9),
    'v5e': Chip('v5e:2x2', 16 * 2**30, 819e9),
    'v5p': Chip('v5p:2x2x1', 95 * 2**30, 2765e9),
    'v6e': Chip('v6e:2x2', 32 * 2**30, 1640e9),
}


def compile_only_device(target: str):
  """The first chip of a compile-only topology of `target` (needs libtpu, no TPU)."""
  from jax.experimental import topologies
  try:
    topo = topologies.get_topology_desc(topology_name=CHIPS[target].topology,
                                        platform='tpu')
  except Exception as e:  # libtpu missing, or not the one this jax was built against
    raise SystemExit(
        f'tpu_aot: cannot create a compile-only TPU topology ({type(e).__name__}: {e}).\n'
        f'Install the libtpu of jax[tpu]=={jax.__version__} into .tpu_aot (bash '
        f'launch/setup.sh does) and run with PYTHONPATH=.tpu_aot') from None
  return topo.devices[0]


def floor_seconds(flops: float, nbytes: float, peak: float, chip: Chip) -> float:
  """A lower bound on the step time: all FLOPs at peak, or all device-memory bytes at the
  datasheet HBM bandwidth, whichever is longer."""
  return max(flops / peak, nbytes / chip.bandwidth)


def report(target: str, variant: str, config, compiled, hlo_text: str, model_flops: float,
           peak: float, top: int = 12) -> dict:
  chip = CHIPS[target]
  mem = compiled.memory_analysis()
  used = mem.argument_size_in_bytes + mem.temp_size_in_bytes
  gib = lambda b: b / 2**30
  c = bench.xla_cost(compiled)
  flops, nbytes = float(c.get('flops', 0)), float(c.get('bytes accessed', 0))
  # HBM traffic kernel by kernel (hlo_cost): tiled sizes, on-chip VMEM buffers left out.
  # XLA:TPU's own "bytes accessed" counts VMEM accesses too, so it bounds nothing.
  ks = hlo_cost.kernels(hlo_text)
  device = hlo_cost.Device(f'TPU {target}', peak, peak, chip.bandwidth, launch_s=0.0)
  hbm = hlo_cost.summary(ks, device)
  floor = floor_seconds(flops, hbm['bytes'], peak, chip)
  row = dict(target=target, variant=variant or 'as configured', batch=config.batch_size,
             dtype=config.model.dtype, remat=config.model.remat, jax=jax.__version__,
             args_gib=gib(mem.argument_size_in_bytes), temp_gib=gib(mem.temp_size_in_bytes),
             hbm_gib=gib(chip.hbm_bytes), fits=used <= chip.hbm_bytes, peak_flops=peak,
             model_flops=model_flops, xla_flops=flops, xla_bytes=nbytes,
             hbm_bytes=hbm['bytes'], matmul_flops=hbm['flops'], floor_s=floor,
             mfu_ceiling=model_flops / floor / peak, roofline_s=hbm['seconds'],
             mfu_roofline=model_flops / hbm['seconds'] / peak)
  print(f'\n## TPU {target}, {row["variant"]}: batch {config.batch_size} per chip, '
        f'{config.model.dtype}, remat {config.model.remat}')
  print(f'Memory: {row["args_gib"]:.2f} GiB arguments + {row["temp_gib"]:.2f} GiB '
        f'temporaries = {gib(used):.2f} of {row["hbm_gib"]:.0f} GiB HBM: '
        f'{"fits" if row["fits"] else "DOES NOT FIT"}.')
  print(f'XLA counts {flops / 1e12:.2f} TFLOPs and {nbytes / 1e9:.1f} GB accessed (VMEM '
        f'included); the kernels move {hbm["bytes"] / 1e9:.1f} GB through HBM.')
  print(f'Floor: {1e3 * flops / peak:.1f} ms at peak FLOP/s, '
        f'{1e3 * hbm["bytes"] / chip.bandwidth:.1f} ms at HBM bandwidth: MFU <= '
        f'{100 * row["mfu_ceiling"]:.1f}% ({model_flops / config.batch_size / 1e9:.1f} '
        f'model GFLOPs per pair).')
  roofline.report(f'TPU {target} kernels, each at its own bound', ks, device, model_flops,
                  config.batch_size, top)
  return row


def _define_flags():
  """Defined when run as a program only, as bench's and roofline's."""
  flags.DEFINE_string('config', 'paper', 'configs/pretrain.py variant.')
  flags.DEFINE_integer('batch', 64, 'Batch per chip.')
  flags.DEFINE_string('dtype', 'bfloat16', "Override config.model.dtype ('' keeps it).")
  flags.DEFINE_multi_string('variant', [''], 'Comma-separated overrides, one compile each.')
  flags.DEFINE_multi_enum('target', ['v5e'], sorted(CHIPS), 'TPU generation(s).')
  flags.DEFINE_string('json', '', 'Append one JSON line per target and variant to this file.')
  flags.DEFINE_integer('top', 12, 'Rows of the per-part and per-kernel-kind tables.')
  flags.DEFINE_string('save_hlo', '', 'Write each compiled step\'s HLO text into this folder.')


def main(argv):
  del argv
  for target in FLAGS.target:
    device = compile_only_device(target)
    peak, chip = bench.device_peak_flops(device), CHIPS[target]
    print(f'# TPU {target} ({device.device_kind}): {peak / 1e12:.0f} TFLOP/s bf16, '
          f'{chip.bandwidth / 1e9:.0f} GB/s, {chip.hbm_bytes / 2**30:.0f} GiB HBM')
    for variant in FLAGS.variant:
      overrides = [v for v in variant.split(',') if v]
      config = bench.make_config(FLAGS.config, FLAGS.batch, FLAGS.dtype, overrides=overrides)
      tx, *args = roofline.step_args(config)
      compiled = roofline.compile_step(config, tx, args, device)
      text = compiled.as_text()
      if FLAGS.save_hlo:
        roofline.save_hlo(FLAGS.save_hlo, f'{target}-{variant or "default"}', text)
      row = report(target, variant, config, compiled, text,
                   bench.model_flops(config, tx, *args), peak, FLAGS.top)
      sys.stdout.flush()
      if FLAGS.json:
        with open(FLAGS.json, 'a') as f:
          f.write(json.dumps(row) + '\n')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
