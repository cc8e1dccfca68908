"""One process of a multi-process CPU run (used by test_multihost.py).

argv: process_id num_processes port devices_per_process. Prints the first step's metrics
as one JSON line. Each process loads only its own rows of the global batch.
"""

import json
import os
import sys

pid, nproc, port, ndev = (int(a) for a in sys.argv[1:5])
# The test flags of conftest.py (which this process does not import before JAX).
os.environ['XLA_FLAGS'] = (f'--xla_force_host_platform_device_count={ndev} '
                           '--xla_backend_optimization_level=0 '
                           '--xla_llvm_disable_expensive_passes=true '
                           '--xla_cpu_enable_concurrency_optimized_scheduler=false')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
if nproc > 1:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=nproc, process_id=pid)

from codis_jax import sharding  # noqa: E402
from codis_jax import state as state_lib  # noqa: E402
from codis_jax import train  # noqa: E402
from configs import pretrain  # noqa: E402
from batches import make_batch  # noqa: E402

config = pretrain.get_config('tiny')
config.mesh.update(data=-1, fsdp=2, tensor=1)
mesh = sharding.create_mesh(config)
tx = state_lib.make_optimizer(config.optim, config.total_steps)
state, shardings = sharding.create_sharded_state(config, tx, mesh, jax.random.key(0))
step = sharding.jit_train_step(train.make_train_step(config, tx, 10), config, mesh,
                               shardings)
full = make_batch(config)
rows = config.batch_size // jax.process_count()
local = {k: v[pid * rows:(pid + 1) * rows] for k, v in full.items()}
batch, rng = sharding.shard_batch(mesh, local), jax.random.key(3)
compiled = step.lower(state, batch, rng).compile()
if nproc > 1:
  # Compile times differ between processes on a loaded machine, and gloo gives the first
  # collective only 30 s to find every process: meet at the coordinator's barrier first.
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  distributed.global_state.client.wait_at_barrier('codis_compiled', 600_000)
state, metrics = compiled(state, batch, rng)
print(json.dumps({k: float(v) for k, v in jax.device_get(metrics).items()}), flush=True)
if nproc > 1:
  jax.distributed.shutdown()
