"""The guard around the train step: non-finite updates are refused, never applied.

    step = guard_step(train.make_train_step(...))
    (state, guard), metrics = step((state, init_guard()), batch, rng)

The training loop runs the guarded step, so the benchmark and the roofline time it too.
"""

import jax
import jax.numpy as jnp
import numpy as np


def init_guard(skip_nonfinite=False):
  # skipped: updates refused; bad_step/bad_terms: the first refused update (the last one,
  # when skipping) and a bitmask of the metrics that were non-finite in it (names:
  # guard_step(...).names). `skip` is data, not a Python constant, so that both policies
  # share one compiled step.
  return {'skipped': np.int32(0), 'bad_step': np.int32(-1), 'bad_terms': np.int32(0),
          'skip': np.int32(bool(skip_nonfinite))}


def guard_step(train_step):
  """(state, guard), batch, rng -> (state, guard), metrics.

  A step whose loss terms or gradient norm are not all finite is not applied. When
  skipping (guard['skip']), the step counter still advances: it counts batches
  consumed, so the schedule and the data position stay in step. Otherwise the state
  freezes entirely and the loop stops at its next sync, naming the step and the terms.
  """
  names = []

  def step(carry, batch, rng):
    state, guard = carry
    new, metrics = train_step(state, batch, rng)
    keys = sorted(k for k in metrics if k.startswith('loss') or k == 'grad_norm')
    names[:] = keys
    bad = jnp.stack([~jnp.isfinite(metrics[k]) for k in keys])
    skip, halted = guard['skip'] > 0, guard['bad_step'] >= 0
    finite = ~jnp.any(bad)
    ok = finite & (skip | ~halted)  # when stopping: frozen after the first bad update
    record = ~finite & (skip | ~halted)
    bits = jnp.sum(jnp.where(bad, 2 ** jnp.arange(len(keys), dtype=jnp.int32), 0))
    out = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    out = out.replace(step=jnp.where(ok | skip, state.step + 1, state.step))
    guard = {'skipped': guard['skipped'] + (~ok).astype(jnp.int32),
             'bad_step': jnp.where(record, state.step + 1, guard['bad_step']),
             'bad_terms': jnp.where(record, bits, guard['bad_terms']), 'skip': guard['skip']}
    metrics['skipped'] = guard['skipped']
    return (out, guard), metrics

  step.names = names
  return step


def bad_terms(names, bits) -> list:
  """The metric names whose bit is set in a guard's `bad_terms`."""
  return [n for i, n in enumerate(names) if int(bits) >> i & 1]
