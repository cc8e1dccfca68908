"""The training loop: data, sharded state, the guarded jitted step, checkpoints, logs.

    result = loop.train(config, workdir, evaluate=None)

Resumes from the newest checkpoint in WORKDIR/checkpoints when there is one. The host
never waits for the device except at log steps, checkpoint steps and the end. The step
is wrapped in a guard that refuses non-finite updates (`guard.guard_step`), so the state
the loop holds, and therefore every checkpoint, is always finite.
"""

import dataclasses
import logging
import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from codis_jax import checkpoint as ckpt_lib
from codis_jax import demo_vocab
from codis_jax import guard as guard_lib
from codis_jax import metrics_log
from codis_jax import sharding
from codis_jax import state as state_lib
from codis_jax import train as train_lib

log = logging.getLogger('codis_jax')


class RunError(RuntimeError):
  """A run that must stop, with a message for the user (main prints it, no traceback)."""


class NonFiniteError(RunError):
  pass


# --------------------------------------------------------------------------- data

class SyntheticData:
  """Random but learnable in-memory pairs (image i <-> caption i) with the pipeline's
  interface; for tests and the `tiny` config. Deterministic in (seed, epoch, position)."""

  def __init__(self, config, *, global_batch_size, seed, num_examples=64, state=None):
    m, self.text_len, self.seed = config.model, config.text_len, seed
    rs = np.random.RandomState(seed)
    n, length = num_examples, config.text_len
    self.images = rs.randn(n, m.image_size, m.image_size, 3).astype(np.float32)
    lengths = rs.randint(4, length + 1, size=n)
    ids = rs.randint(5, m.vocab_size, size=(n, length)).astype(np.int32)
    ids[:, 0], ids[np.arange(n), lengths - 1] = m.cls_id, m.sep_id
    self.mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    self.ids = np.where(self.mask > 0, ids, m.pad_id).astype(np.int32)
    self.batch_size = global_batch_size // jax.process_count()
    self.num_examples, self.steps_per_epoch = n, n // global_batch_size
    self._epoch, self._position = 0, 0
    if state:
      self._epoch, self._position = int(state['epoch']), int(state['position'])

  def __iter__(self):
    return self

  def __next__(self):
    if self._position + self.batch_size > self.num_examples:
      self._epoch, self._position = self._epoch + 1, 0
    order = np.random.RandomState([self.seed, self._epoch]).permutation(self.num_examples)
    idx = order[self._position:self._position + self.batch_size]
    self._position += self.batch_size
    return {'image': self.images[idx], 'text_ids': self.ids[idx],
            'text_mask': self.mask[idx], 'image_id': idx.astype(np.int32)}

  def get_state(self):
    return {'epoch': self._epoch, 'position': self._position, 'batches': 0}

  def stats(self):
    return {'ok': 0}


def data_config(config):
  """config.data.name's data config with the fields set in config.data applied."""
  from codis_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  dc = data_lib.get_data_config(config.data.name)
  for k, v in config.data.items():
    if k != 'name' and v is not None:
      dc[k] = v
  if dc.get('tokenizer') == demo_vocab.NAME:  # the demo's train-caption vocabulary
    dc.tokenizer = demo_vocab.ensure(dc.get('data_dir') or None)
  return dc


def make_data(config, state=None):
  if config.data.name == 'synthetic':
    return SyntheticData(config, global_batch_size=config.batch_size, seed=config.seed,
                         state=state)
  from codis_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  return data_lib.create_pipeline(
      data_config(config), split='train', global_batch_size=config.batch_size,
      image_size=config.model.image_size, text_len=config.text_len, train=True,
      seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), state=state)


def data_states(data) -> list:
  """Every host's iterator position (the checkpoint is written by one host only)."""
  mine = data.get_state()
  if jax.process_count() == 1:
    return [mine]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  keys = ('epoch', 'position', 'batches')
  rows = multihost_utils.process_allgather(np.asarray([mine[k] for k in keys], np.int64))
  return [{**mine, **dict(zip(keys, map(int, r))), 'process_index': i}
          for i, r in enumerate(np.asarray(rows))]


# --------------------------------------------------------------------------- the run

@dataclasses.dataclass
class Result:
  state: state_lib.TrainState
  step: int
  metrics: dict
  mesh: jax.sharding.Mesh
  preempted: bool = False


class _Preemption:
  """SIGTERM sets a flag; the loop saves at the next step boundary and returns."""

  def __init__(self):
    self.flag, self._old = False, None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _state_shardings(config, tx, mesh):
  try:
    return sharding.state_shardings(config, tx, mesh)
  except ValueError as e:
    if 'occur more than once' not in str(e):
      raise
  # Stop-gap while a parameter names one logical axis twice (models/bert.py MlmHead's
  # transform kernel is ('embed', 'embed')): such a dimension repeats -> unsharded.
  abstract, specs = sharding.state_logical_specs(config, tx)
  dedupe = lambda s: P(*(a if a not in s[:i] else None for i, a in enumerate(s)))
  is_spec = lambda x: isinstance(x, P)
  return abstract, jax.tree.map(
      lambda s: nn.logical_to_mesh_sharding(dedupe(s), mesh, sharding.rules(config)),
      specs, is_leaf=is_spec)


def _initial_state(config, tx, mesh, ckpt, start, rng_init):
  abstract, shardings = _state_shardings(config, tx, mesh)
  if start:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    state = ckpt.restore_state(start, target, config)
  else:
    with sharding.mesh_context(mesh, config):
      state = jax.jit(lambda r: state_lib.create_train_state(config, r, tx),
                      out_shardings=shardings)(rng_init)
    warn_random_init(config)
    if not (config.init.bert or config.init.vit):
      return state, shardings
    from codis_jax.interop import pretrained  # pylint: disable=import-outside-toplevel
    params = pretrained.apply_pretrained(state.params, config)
    state = state.replace(params=params, ema_params=jax.tree.map(
        jnp.copy, state_lib.teacher_subset(params)))
  return rebuild_weight_copy(state, config, shardings), shardings


def warn_random_init(config):
  """ALBEF (and so the paper) starts the paper's architecture from DeiT-B/16 and
  bert-base-uncased; say so when a run of that size starts a tower from random weights."""
  m = config.model
  missing = [k for k in ('vit', 'bert') if not config.init.get(k)]
  if missing and m.vit_width == 768 and m.text_width == 768:
    towers = ' and the '.join({'vit': 'image encoder', 'bert': 'text encoder'}[k]
                              for k in missing)
    log.warning('config.init.%s is empty: the %s start%s from RANDOM weights, where ALBEF '
                'and the paper initialise from DeiT-B/16 and bert-base-uncased '
                '(README "Initialise from pretrained weights")', '/'.join(missing), towers,
                '' if len(missing) > 1 else 's')


def rebuild_weight_copy(state, config, shardings):
  """The state with its weight copy (never saved, stale once the weights change) made from
  the weights it holds, placed as shardings.weight_copy; as it is without one."""
  dtype = state_lib.weight_copy_dtype(config.model)
  if dtype is None:
    return state
  copy = jax.jit(lambda p, e: state_lib.make_weight_copy(p, e, dtype),
                 out_shardings=shardings.weight_copy)(state.params, state.ema_params)
  return state.replace(weight_copy=copy)


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(x).item() if np.ndim(x) == 0 else np.asarray(x),
                      jax.device_get(tree))


def open_run(config, workdir, data_fn):
  """What a training run (pretraining or fine-tuning) opens with: the mesh, the
  checkpointer, the step to resume from (0: none) and that checkpoint's extras, the data
  iterator at its saved position (data_fn(config, state)), the total number of steps."""
  mesh = sharding.create_mesh(config)
  sharding.check_batch(config, mesh)
  c = config.checkpoint
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=c.keep,
                               async_save=c.async_save)
  start = ckpt.latest_step() or 0
  extra = ckpt.restore_extra(start) if start else None
  data = data_fn(config, extra['data'][jax.process_index()] if extra else None)
  total = int(config.total_steps or config.num_epochs * data.steps_per_epoch)
  return mesh, ckpt, start, extra, data, total


def train(config, workdir, evaluate=None) -> Result:
  """Trains to config.total_steps (or num_epochs) from the newest checkpoint, if any.

  evaluate: optional (state, mesh) -> ({name: float}, [lines to print]), run every
  config.eval.every_steps.
  """
  primary = jax.process_index() == 0
  if config.jax_cache_dir and not jax.config.jax_compilation_cache_dir:
    # Persistent XLA cache: a restarted (preempted) run skips the step's compile.
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(config.jax_cache_dir))
  mesh, ckpt, start, extra, data, total = open_run(config, workdir, make_data)
  spe = data.steps_per_epoch
  tx = state_lib.make_optimizer(config.optim, total, spe)
  lr_schedule = state_lib.learning_rate_schedule(config.optim, total, spe)
  rng_init, rng = jax.random.split(jax.random.key(config.seed))
  if extra:
    rng = jax.random.wrap_key_data(np.asarray(extra['rng'], np.uint32))
    log.info('resuming from %s/%d', ckpt.directory, start)
  state, shardings = _initial_state(config, tx, mesh, ckpt, start, rng_init)
  replicated = NamedSharding(mesh, P())
  guard = {**guard_lib.init_guard(), **(extra['guard'] if extra else {}),
           'skip': int(config.skip_nonfinite)}
  guard = jax.device_put({k: np.int32(v) for k, v in guard.items()}, replicated)
  rng = jax.device_put(rng, replicated)
  elapsed0 = extra['elapsed_s'] if extra else 0.0

  step_fn = guard_lib.guard_step(train_lib.make_train_step(config, tx, spe, lr_schedule))
  jitted = sharding.jit_train_step(step_fn, config, mesh,
                                   (shardings, jax.tree.map(lambda _: replicated, guard)))
  writer = metrics_log.MetricsWriter(workdir, enabled=primary,
                                     tensorboard=config.log.tensorboard, resume_step=start)
  carry, metrics, step = (state, guard), {}, start

  def save(step):
    g = _host(carry[1])
    check_guard(g)
    ckpt.save(step, carry[0], {
        'rng': np.asarray(jax.random.key_data(rng)).tolist(), 'data': data_states(data),
        'guard': {k: int(v) for k, v in g.items()},
        'elapsed_s': elapsed0 + time.time() - t_start}, config)

  def check_guard(g):
    if g['bad_step'] >= 0 and not config.skip_nonfinite:
      terms = ', '.join(guard_lib.bad_terms(step_fn.names, g['bad_terms']))
      raise NonFiniteError(
          f'non-finite {terms} at step {g["bad_step"]}: the update was not applied and '
          f'the run stops (last checkpoint: step {ckpt.latest_step() or "none"}); '
          'set --config.skip_nonfinite=True to skip such updates instead')

  t_start = time.time()
  try:
    with _Preemption() as preempt:
      compiled, flops, mfu_peak = None, 0.0, None
      t_last, step_last, skipped = time.time(), start, int(guard['skipped'])
      for step in range(start + 1, total + 1):
        batch = next(data)
        if step == config.debug.nan_step:
          if not np.issubdtype(batch['image'].dtype, np.floating):
            raise ValueError('debug.nan_step needs float images (the synthetic data); this '
                             f"source gives {batch['image'].dtype} pixels, which hold no NaN")
          batch = {**batch, 'image': np.full_like(batch['image'], np.nan)}
        batch = sharding.shard_batch(mesh, batch)
        if compiled is None:  # compiled once, ahead of time
          t0 = time.time()
          compiled = jitted.lower(carry, batch, rng).compile()
          compile_s = time.time() - t0
          flops, mfu_peak = _flops_and_peak(config, tx, carry[0], batch, rng)
          log.info('step compiled in %.1fs (%.3g GFLOP/step/device)', compile_s, flops / 1e9)
          t_last = time.time()
        carry, metrics = compiled(carry, batch, rng)
        last = step == total
        if step % config.log.every_steps == 0 or last:
          m, g = _host((metrics, carry[1]))
          check_guard(g)
          now = time.time()
          step_s = (now - t_last) / max(step - step_last, 1)
          t_last, step_last = now, step
          m.update({f'data_bad/{k}': v for k, v in data.stats().items() if k != 'ok'})
          m.update(pairs_per_s=config.batch_size / step_s, epoch=step / spe,
                   elapsed_s=elapsed0 + now - t_start)
          if mfu_peak:
            m['mfu'] = flops / step_s / mfu_peak
          writer.write(step, m)
          if primary:
            print(metrics_log.progress_line(step, total, step / spe, m, m['pairs_per_s'],
                                            (total - step) * step_s, m.get('mfu')),
                  flush=True)
          if g['skipped'] > skipped:
            skipped = g['skipped']
            log.warning('%d non-finite updates skipped so far (last: step %d: %s)',
                        g['skipped'], g['bad_step'],
                        guard_lib.bad_terms(step_fn.names, g['bad_terms']))
        # Several hosts must stop at the same step: JAX's preemption sync point decides.
        stop = (ckpt.reached_preemption(step) if jax.process_count() > 1
                else preempt.flag)
        if stop or last or step % config.checkpoint.every_steps == 0:
          save(step)
        if stop:
          log.warning('preempted: checkpoint written at step %d, exiting', step)
          return Result(carry[0], step, _host(metrics), mesh, preempted=True)
        if evaluate and config.eval.every_steps and step % config.eval.every_steps == 0:
          scalars, lines = evaluate(carry[0], mesh)
          writer.write(step, scalars)
          if primary:
            for line in lines:
              print(f'step {step}: {line}', flush=True)
        if step == config.debug.kill_step:
          ckpt.wait()
          os.kill(os.getpid(), signal.SIGKILL)
      if step == start and start:  # nothing left to do: a finished run
        log.info('step %d already reached; nothing to train', start)
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
  return Result(carry[0], step, _host(metrics) if metrics else {}, mesh)


def _flops_and_peak(config, tx, state, batch, rng):
  """The step's model FLOPs per device (bench.model_flops: the jaxpr's matmuls with remat
  off; XLA's GPU cost_analysis() omits library GEMMs) and the device's peak FLOP/s (None
  on CPU or an unknown chip; then no MFU is reported)."""
  from codis_jax import bench  # pylint: disable=import-outside-toplevel
  flops = bench.model_flops(config, tx, state, batch, rng) / jax.device_count()
  device = jax.devices()[0]
  return flops, None if device.platform == 'cpu' else bench.device_peak_flops(device)
