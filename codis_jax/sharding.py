"""Device mesh, logical-axis rules -> NamedShardings, and the sharded (jitted) step.

Parallelism is configuration: `config.mesh` sizes the axes ('data', 'fsdp', 'tensor'; -1
takes the remaining devices) and `config.logical_axis_rules` maps the models' logical
names (see codis_jax/models/layers.py) to mesh axes:
  data parallel:  only 'data' > 1; params replicated, batch and queues split.
  FSDP:           'fsdp' > 1; 'embed'-named weight dims and the optimiser state split too.
  tensor:         'tensor' > 1; attention heads, MLP hidden and vocab dims split.
The batch (and the queues, along their length) are split over ('data', 'fsdp').
"""

import contextlib
import math
import os

from flax import traverse_util
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from codis_jax import state as state_lib

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Resolves -1 in {data, fsdp, tensor} against the device count, with clear errors."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.mesh={dict(zip(MESH_AXES, sizes))}: sizes must be positive, '
                     'with at most one -1 (= the remaining devices)')
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f'config.mesh: {num_devices} devices do not divide by the fixed '
                       f'axes product {fixed}')
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(f'config.mesh={dict(zip(MESH_AXES, sizes))} uses '
                     f'{math.prod(sizes)} devices but {num_devices} are available')
  return tuple(sizes)


def create_mesh(config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(config.mesh, len(devices))
  try:
    dev = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # non-physical layouts (e.g. fake CPU devices): plain reshape
    dev = np.asarray(devices).reshape(shape)
  return Mesh(dev, MESH_AXES)


def batch_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(config, mesh: Mesh):
  n = batch_divisor(mesh)
  if config.batch_size % n:
    raise ValueError(f'config.batch_size={config.batch_size} does not divide over the '
                     f'{n} devices of the batch axes {BATCH_AXES} of mesh {dict(mesh.shape)}')
  if config.queue_size % n:
    raise ValueError(f'config.queue_size={config.queue_size} does not divide over the '
                     f'{n} devices of the batch axes {BATCH_AXES}')


def rules(config):
  return tuple((k, v) for k, v in config.logical_axis_rules)


@contextlib.contextmanager
def axis_rules(config):
  """Logical-constraint rules in scope while tracing the models."""
  with nn.logical_axis_rules(rules(config)):
    yield


@contextlib.contextmanager
def mesh_context(mesh: Mesh, config):
  """The mesh AND the rules in scope: what tracing a sharded function needs.

  Both are required: without a mesh set by `jax.set_mesh` (the legacy `with mesh:` is not
  enough), flax turns every logical constraint into a silent no-op.
  """
  with jax.set_mesh(mesh), axis_rules(config):
    yield


def logical_to_sharding(logical_specs, mesh: Mesh, config):
  """A tree of logical PartitionSpecs -> NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules(config))


def state_logical_specs(config, tx):
  """Logical PartitionSpecs of every TrainState leaf (no arrays are allocated)."""
  boxed = jax.eval_shape(lambda r: state_lib.init_params(config, r), jax.random.key(0))
  param_specs = nn.get_partition_spec(boxed)
  abstract = jax.eval_shape(
      lambda r: state_lib.create_train_state(config, r, tx), jax.random.key(0))
  # Optimiser moments mirror the params; scalars (counts) are replicated.
  opt_specs = jax.tree.map(
      lambda leaf: P(), abstract.opt_state)
  opt_specs = _mirror_param_specs(abstract.opt_state, abstract.params, param_specs,
                                  opt_specs)
  # A weight copy is split as the weights it copies.
  flat_specs = traverse_util.flatten_dict(param_specs, sep='/')
  copy_specs = None if abstract.weight_copy is None else {
      k: {p: flat_specs[p] for p in leaves} for k, leaves in abstract.weight_copy.items()}
  return abstract, state_lib.TrainState(
      step=P(), params=param_specs,
      ema_params=state_lib.teacher_subset(param_specs),
      opt_state=opt_specs,
      image_queue=P('queue', None), text_queue=P('queue', None), queue_ptr=P(),
      weight_copy=copy_specs)


def _mirror_param_specs(opt_state, params, param_specs, default):
  """Gives optimiser leaves that are param-shaped trees (mu, nu) the params' specs."""
  param_struct = jax.tree.structure(params)

  def visit(node, dflt):
    if jax.tree.structure(node) == param_struct:
      return param_specs
    if isinstance(node, tuple) and not hasattr(node, '_fields'):
      return tuple(visit(n, d) for n, d in zip(node, dflt))
    if hasattr(node, '_fields'):  # NamedTuple optimiser states
      return type(node)(*(visit(n, d) for n, d in zip(node, dflt)))
    return dflt

  return visit(opt_state, default)


def state_shardings(config, tx, mesh: Mesh):
  abstract, specs = state_logical_specs(config, tx)
  is_spec = lambda x: isinstance(x, P)
  shardings = jax.tree.map(lambda s: nn.logical_to_mesh_sharding(s, mesh, rules(config)),
                           specs, is_leaf=is_spec)
  return abstract, shardings


def create_sharded_state(config, tx, mesh: Mesh, rng):
  """The initial TrainState, created directly in its sharded layout (never whole on one device)."""
  check_batch(config, mesh)
  _, shardings = state_shardings(config, tx, mesh)
  with mesh_context(mesh, config):
    init = jax.jit(lambda r: state_lib.create_train_state(config, r, tx),
                   out_shardings=shardings)
    return init(rng), shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(mesh: Mesh, local_batch):
  """Per-host numpy batch -> global jax.Arrays split along the batch over BATCH_AXES.

  Each process passes its own rows (global_batch / process_count of them).
  """
  sharding = batch_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(put, local_batch)


def jit_train_step(train_step, config, mesh: Mesh, shardings):
  """jit with explicit in/out shardings and the state donated."""
  replicated = NamedSharding(mesh, P())
  jitted = jax.jit(train_step, in_shardings=(shardings, batch_sharding(mesh), replicated),
                   out_shardings=(shardings, replicated), donate_argnums=0)

  def call(state, batch, rng):
    with mesh_context(mesh, config):
      return jitted(state, batch, rng)

  call.lower = lambda *a: _lower(jitted, mesh, config, *a)
  return call


def _lower(jitted, mesh, config, *args):
  with mesh_context(mesh, config):
    return jitted.lower(*args)


def maybe_initialize_distributed():
  """`jax.distributed.initialize()` when launched as one of several processes.

  Cloud TPU VMs and SLURM are detected by JAX itself; for a plain multi-process launch set
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  env = os.environ
  if 'JAX_COORDINATOR_ADDRESS' in env:
    jax.distributed.initialize(env['JAX_COORDINATOR_ADDRESS'],
                               int(env['JAX_NUM_PROCESSES']), int(env['JAX_PROCESS_ID']))
  elif 'SLURM_JOB_ID' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
    jax.distributed.initialize(local_device_ids=slurm_local_device_ids(env))
  elif env.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0:
    jax.distributed.initialize()


def _tasks_on_this_node(env):
  """This node's task count from SLURM_TASKS_PER_NODE ('8(x2),4' = 8, 8, 4 by node)."""
  if env.get('SLURM_NTASKS_PER_NODE'):
    return int(env['SLURM_NTASKS_PER_NODE'])
  counts = []
  for part in env.get('SLURM_TASKS_PER_NODE', '').split(','):
    if part:
      n, _, times = part.partition('(x')
      counts += [int(n)] * int(times.rstrip(')') or 1)
  node = int(env.get('SLURM_NODEID', '0'))
  return counts[node] if node < len(counts) else None


def slurm_local_device_ids(env):
  """local_device_ids for jax.distributed.initialize under SLURM.

  JAX's SLURM default gives each process ONE GPU, its local rank: right for one task per
  GPU, but a single task on a node with several GPUs would silently use only the first.
  That case gets all the GPUs SLURM made visible (CUDA_VISIBLE_DEVICES); otherwise None
  (JAX's default).
  """
  gpus = [d for d in env.get('CUDA_VISIBLE_DEVICES', '').split(',') if d.strip()]
  if len(gpus) > 1 and _tasks_on_this_node(env) == 1:
    return list(range(len(gpus)))
  return None
