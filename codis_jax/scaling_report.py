"""Scaling report: AOT-compile the paper config's step for fake CPU meshes, allocate nothing.

  python -m codis_jax.scaling_report                    # 1, 2, 4, 8 devices, FSDP
  python -m codis_jax.scaling_report --devices=8 --layout=data

For each mesh: per-device argument and temp bytes (`memory_analysis()`), FLOPs
(`cost_analysis()`), and the collectives in the compiled HLO with their sizes.
"""

import collections
import os
import re
import sys

if 'jax' not in sys.modules:  # fake CPU devices must be requested before JAX starts
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                             + ' --xla_force_host_platform_device_count=8')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402

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

_COLLECTIVE = re.compile(
    r'= (\(?[^=]*?\)?) (all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)'
    r'(?:-start)?\(')


def collectives(hlo_text: str):
  """[(kind, result bytes, result shapes)] for every collective in compiled HLO text."""
  found = []
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    arrays = hlo_cost.arrays(m.group(1))
    found.append((m.group(2), sum(a.bytes for a in arrays), [a.shape for a in arrays]))
  return found


def compile_step(config, num_devices: int, layout: str = 'fsdp'):
  """AOT-compiles the step on a (data|fsdp)=num_devices mesh; returns the Compiled."""
  config.mesh.update(data=1, fsdp=1, tensor=1)
  config.mesh[layout] = num_devices
  mesh = sharding.create_mesh(config, jax.devices()[:num_devices])
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
  return step.lower(state, batch, rng).compile()


def state_bytes(config) -> int:
  """Bytes of the whole TrainState (= per-device bytes on one device)."""
  tx = state_lib.make_optimizer(config.optim, 100_000)
  abstract = jax.eval_shape(lambda r: state_lib.create_train_state(config, r, tx),
                            jax.random.key(0))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))


def report_row(config, n: int, layout: str) -> dict:
  compiled = compile_step(config, n, layout)
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  by_kind = collections.defaultdict(lambda: [0, 0, 0])  # count, total bytes, max bytes
  for kind, size, _ in collectives(compiled.as_text()):
    entry = by_kind[kind]
    entry[0] += 1
    entry[1] += size
    entry[2] = max(entry[2], size)
  return dict(devices=n, args=mem.argument_size_in_bytes, temp=mem.temp_size_in_bytes,
              flops=float(cost.get('flops', 0.0)), collectives=dict(by_kind))


def _config():
  config = pretrain.get_config(FLAGS.variant)
  config.model.dtype = FLAGS.dtype or config.model.dtype
  config.model.remat = FLAGS.remat or config.model.remat
  return config


def main(argv):
  del argv
  gib = lambda x: f'{x / 2**30:.2f}'
  c = _config()
  print(f'{FLAGS.variant} config (batch {c.batch_size}, dtype {c.model.dtype}, remat '
        f'{c.model.remat}), layout={FLAGS.layout}; state {gib(state_bytes(c))} GiB in all')
  print('| devices | args GiB/device | temp GiB/device | TFLOPs/device | collectives: count, '
        'total MiB, largest MiB |')
  print('|---|---|---|---|---|')
  for n in map(int, FLAGS.devices):
    r = report_row(_config(), n, FLAGS.layout)
    coll = '; '.join(f'{k} {c}, {t / 2**20:.1f}, {mx / 2**20:.1f}'
                     for k, (c, t, mx) in sorted(r['collectives'].items())) or 'none'
    print(f"| {n} | {gib(r['args'])} | {gib(r['temp'])} | {r['flops'] / 1e12:.2f} | "
          f'{coll} |', flush=True)


if __name__ == '__main__':
  app.run(main)
