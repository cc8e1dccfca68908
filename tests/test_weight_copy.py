"""model.weight_copy: the bf16 copy of the weights in the train state computes what the
step computes without it, and leaves no float32 weight to convert in the step."""

import os
import subprocess
import sys

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from codis_jax import bench
from codis_jax import sharding
from codis_jax import state as state_lib
from codis_jax import train
from codis_jax.models import codis
from batches import make_batch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(weight_copy, dropout=0.1):
  return bench.make_config('tiny', 8, overrides=[
      'model.dtype=bfloat16', f'model.weight_copy={str(weight_copy).lower()}',
      f'model.dropout={dropout}'])


def _state(config, seed=0):
  """A fresh state whose weights are not bf16 numbers (the init's LayerNorm ones and zeros
  are), with a teacher that differs from the student."""
  tx, state = bench.init_state(config)
  leaves, tree = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.01 * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])
  ema = jax.tree.map(lambda x: 0.9 * x, state_lib.teacher_subset(params))
  return tx, state_lib.refresh_weight_copy(state.replace(params=params, ema_params=ema),
                                           config.model)


def _flat(tree):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _compare_steps():
  """Two steps (dropout on) with and without the copy: every metric, weight, teacher
  weight and AdamW moment agree, and the copy after each step is the new weights rounded
  to bf16 (numpy's rounding)."""
  runs = {}
  for copy in (False, True):
    config = _config(copy)
    tx, state = _state(config)
    step = jax.jit(train.make_train_step(config, tx, steps_per_epoch=10))
    batch = jax.tree.map(jnp.asarray, bench.synthetic_batch(config, 8))
    metrics = []
    for i in range(2):
      state, m = step(state, batch, jax.random.key(i))
      metrics.append(jax.device_get(m))
      if copy:
        check_copy(state)
    runs[copy] = metrics, jax.device_get(state.replace(weight_copy=None))
  (want_m, want), (got_m, got) = runs[False], runs[True]
  for w, g in zip(want_m, got_m):
    for k in w:  # the loss terms, the gradient norm (every gradient), accuracies
      np.testing.assert_allclose(g[k], w[k], rtol=1e-6, err_msg=k)
  for (path, w), g in zip(_flat(want).items(), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-9, err_msg=path)
  print('steps agree')


def check_copy(state, shardings=None):
  """The state's weight copy holds the leaves `cast_param_paths` names, each numpy's bf16
  rounding of the weight it copies and, given the state's shardings, split as it.
  (tests/test_checkpoint.py uses it too.)"""
  student, teacher = state.weight_copy['student'], state.weight_copy['teacher']
  params = jax.device_get(state_lib._flat(state.params))
  ema = jax.device_get(state_lib._flat(state.ema_params))
  assert set(student) == set(codis.cast_param_paths(params)) and set(teacher) <= set(ema)
  assert teacher
  split = None if shardings is None else state_lib._flat(shardings.params)
  for copies, weights in ((student, params), (teacher, ema)):
    for path, leaf in copies.items():
      assert leaf.dtype == jnp.bfloat16, path
      np.testing.assert_array_equal(np.asarray(jax.device_get(leaf)),
                                    weights[path].astype(ml_dtypes.bfloat16), path)
      if split is not None:
        assert leaf.sharding.is_equivalent_to(split[path], leaf.ndim), path
  if split is not None:
    assert any(not s.is_fully_replicated for s in split.values())


def test_steps_with_the_copy_equal_the_steps_without():
  """Run in a process of its own at XLA:CPU's default optimisation level: at the level 0
  the suite compiles with (conftest.py), XLA:CPU computes the step that casts its float32
  weights differently (loss terms 1e-5 apart), at the default level they agree bit for bit."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_backend_optimization_level')]
  out = subprocess.run([sys.executable, __file__], capture_output=True, text=True,
                       env={**os.environ, 'XLA_FLAGS': ' '.join(flags), 'PYTHONPATH': _ROOT},
                       timeout=600,
                       check=False)
  assert out.returncode == 0 and 'steps agree' in out.stdout, out.stdout + out.stderr[-4000:]


def _converted_invars(jaxpr, names):
  """Names of the invars that a convert_element_type to bfloat16 reads, in jaxpr and in
  the jaxprs it calls (pjit, custom_vjp/jvp, remat). names: {invar: name}."""
  found = set()
  for eqn in jaxpr.eqns:
    if (eqn.primitive.name == 'convert_element_type'
        and eqn.params['new_dtype'] == jnp.bfloat16 and eqn.invars[0] in names):
      found.add(names[eqn.invars[0]])
    for sub in jex_core.jaxprs_in_params(eqn.params):
      inner = {v: names[o] for o, v in zip(eqn.invars, sub.invars)
               if isinstance(o, jex_core.Var) and o in names}
      found |= _converted_invars(sub, inner)
  return found


def _weights_converted_by_the_step(config):
  tx, state = _state(config)
  step = train.make_train_step(config, tx, steps_per_epoch=10)
  batch = jax.tree.map(jnp.asarray, bench.synthetic_batch(config, 8))
  closed = jax.make_jaxpr(step)(state, batch, jax.random.key(0))
  paths = [p for p, _ in jax.tree_util.tree_leaves_with_path((state, batch, 0))]
  names = {}
  for var, path in zip(closed.jaxpr.invars, paths):
    name = jax.tree_util.keystr(path[1:])  # drop the (state, batch, rng) index
    for field, who in (('.params', 'student'), ('.ema_params', 'teacher')):
      if name.startswith(field + '['):
        names[var] = who + '/' + '/'.join(k.key for k in path[2:])
  return _converted_invars(closed.jaxpr, names)


def test_the_copy_leaves_no_weight_to_convert():
  """Without the copy the step converts exactly the weights `codis.cast_param_paths`
  names (so the rule matches the model), for the student and the teacher; with it, none."""
  _, state = _state(_config(False))
  params = state_lib._flat(state.params)
  ema = state_lib._flat(state.ema_params)
  want = ({f'student/{p}' for p in codis.cast_param_paths(params)}
          | {f'teacher/{p}' for p in codis.cast_param_paths(params) if p in ema})
  assert 'student/visual_encoder/blocks_0/norm1/scale' not in want
  assert _weights_converted_by_the_step(_config(False)) == want
  assert _weights_converted_by_the_step(_config(True)) == set()


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_no_copy_unless_on_and_not_float32(dtype):
  config = bench.make_config('tiny', 8, overrides=[f'model.dtype={dtype}'])
  assert bench.init_state(config)[1].weight_copy is None
  config.model.weight_copy = True
  copy = bench.init_state(config)[1].weight_copy
  assert (copy is None) == (dtype == 'float32')


def test_sharded_step_keeps_the_copy_split_as_the_weights(tiny_config):
  """On a data x fsdp x tensor mesh the step takes and returns the copy split as the
  weights it copies, returns it equal to the new weights in bf16, and computes what the
  single-device step computes (the reference, as in test_sharding.py)."""
  c = tiny_config
  c.model.dtype, c.model.weight_copy = 'bfloat16', True
  tx = state_lib.make_optimizer(c.optim, c.total_steps)
  batch, rng = make_batch(c, seed=0), jax.random.key(1)
  init = jax.jit(lambda r: state_lib.create_train_state(c, r, tx))(jax.random.key(0))
  want = jax.device_get(jax.jit(train.make_train_step(c, tx, steps_per_epoch=10))(
      init, batch, rng))
  c.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.create_mesh(c)
  state, shardings = sharding.create_sharded_state(c, tx, mesh, jax.random.key(0))
  step = sharding.jit_train_step(train.make_train_step(c, tx, steps_per_epoch=10), c, mesh,
                                 shardings)
  state, metrics = step(state, sharding.shard_batch(mesh, batch), rng)
  check_copy(state, shardings)
  assert_step_matches((jax.device_get(state), jax.device_get(metrics)), want,
                      jax.device_get(init.params), c.optim.warmup_lr)


def assert_step_matches(got, want, init_params, lr):
  """got/want: (state, metrics) of one step from the same state. bf16 matmuls split over
  the mesh round differently: measured 4e-4 relative at most on the loss terms, 1.6e-3
  on the gradients (global norm); the tolerances are ~5x that, under one bf16 ulp (8e-3)."""
  (state, metrics), (ref_state, ref_metrics) = got, want
  for k in ref_metrics:
    if not k.startswith('codebook_'):  # code counts: a near-tie code flips under bf16
      np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=2e-3, atol=1e-6, err_msg=k)
  # AdamW's first moment after one step is 0.1 x the gradients: compare them as a whole
  # (a key bias's gradient is ~0 in exact arithmetic, so leaf by leaf is bf16 noise).
  mu, ref_mu = (_vector(s.opt_state[0].mu) for s in (state, ref_state))
  rel = np.linalg.norm(mu - ref_mu) / np.linalg.norm(ref_mu)
  assert rel < 1e-2, f'gradients: relative error {rel:.3g}'
  # The first step moves each weight by about -lr * sign(gradient), so a weight whose
  # gradient is ~0 may move the other way: allow that for 1% of them (measured 0.27%).
  delta, ref_delta = (_vector(s.params) - _vector(init_params) for s in (state, ref_state))
  assert np.abs(ref_delta).max() > 0.5 * lr  # the weights did move
  other_way = np.mean(np.abs(delta - ref_delta) > 0.5 * lr)
  assert other_way < 0.01, f'{other_way:.2%} of the weights moved otherwise'


def _vector(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def test_finetune_state_takes_the_copy_of_its_weights_and_rewrites_it():
  """Retrieval fine-tuning: the state built from given weights holds their copy (not the
  random init's), and its step reads the copy (loss as without it) and rewrites it."""
  from codis_jax.evaluate import finetune_step  # pylint: disable=import-outside-toplevel
  from configs import retrieval_coco  # pylint: disable=import-outside-toplevel
  out, pre = {}, None
  for copy in (False, True):
    c = retrieval_coco.get_config('tiny')
    c.model.dtype, c.model.weight_copy = 'bfloat16', copy
    pre = pre or _state(c)[1]  # weights that are not the init's
    batch = dict(make_batch(c), image_id=np.arange(c.batch_size, dtype=np.int32) // 2)
    tx = state_lib.make_optimizer(c.optim, 100)
    st = jax.jit(lambda r, p, e, c=c, tx=tx: finetune_step.initial_state(c, tx, r, p, e))(
        jax.random.key(0), pre.params, pre.ema_params)
    if copy:
      check_copy(st)
    st, metrics = jax.jit(finetune_step.make_finetune_step(c, tx, steps_per_epoch=10))(
        st, batch, jax.random.key(3))
    if copy:
      check_copy(st)
    out[copy] = jax.device_get(metrics)
  for k in ('loss', 'loss_ita', 'loss_itm'):  # the suite's XLA:CPU level 0: not bit-equal
    np.testing.assert_allclose(out[True][k], out[False][k], rtol=1e-4, err_msg=k)


if __name__ == '__main__':
  jax.config.update('jax_default_matmul_precision', 'highest')  # as conftest.py
  _compare_steps()
