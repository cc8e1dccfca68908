"""The pure train step: it learns, is deterministic, and routes gradients correctly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codis_jax import state as state_lib
from codis_jax import train
from codis_jax.models import codis
from conftest import make_batch


def _setup(config, seed=0):
  tx = state_lib.make_optimizer(config.optim, config.total_steps)
  st = jax.jit(lambda r: state_lib.create_train_state(config, r, tx))(jax.random.key(seed))
  step = train.make_train_step(config, tx, steps_per_epoch=10)
  return st, step


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def test_learns_on_a_fixed_batch(tiny_config):
  c = tiny_config
  c.optim.update(lr=1e-3, warmup_lr=1e-3, min_lr=1e-3, warmup_steps=0)
  c.total_steps = 300
  st, step = _setup(c)
  step = jax.jit(step, donate_argnums=0)
  batch = make_batch(c)
  rng = jax.random.key(1)
  first = last = None
  for i in range(c.total_steps):
    st, m = step(st, batch, rng)
    m = _np(m)
    for k in ('loss', 'loss_ica', 'loss_code', 'loss_itm', 'loss_mlm'):
      assert np.isfinite(m[k]), (i, k, m[k])
    if i == 0:
      first = m
    last = m
  assert last['loss'] < 0.5 * first['loss'], (first['loss'], last['loss'])
  assert last['itm_acc'] > 0.9


def test_same_seed_same_numbers(tiny_config):
  c = tiny_config
  batch = make_batch(c)
  runs = []
  for _ in range(2):
    st, step = _setup(c)
    step = jax.jit(step)
    for i in range(3):
      st, m = step(st, make_batch(c, seed=i), jax.random.key(7))
    runs.append((_np(st.params), _np(m), np.asarray(st.image_queue)))
  (p0, m0, q0), (p1, m1, q1) = runs
  jax.tree.map(np.testing.assert_array_equal, p0, p1)
  jax.tree.map(np.testing.assert_array_equal, m0, m1)
  np.testing.assert_array_equal(q0, q1)
  del batch


def test_no_gradient_into_the_teacher(tiny_config):
  c = tiny_config
  st, step = _setup(c)
  batch = make_batch(c)
  # Warm up so teacher != student, then differentiate the loss w.r.t. the teacher.
  st, _ = jax.jit(step)(st, batch, jax.random.key(0))
  loss_of_teacher = lambda ema: step(st.replace(ema_params=ema), batch,
                                     jax.random.key(1))[1]['loss']
  value_and_grad = jax.jit(jax.value_and_grad(loss_of_teacher))
  loss, grads = value_and_grad(st.ema_params)
  for g in jax.tree.leaves(grads):
    assert np.all(np.asarray(g) == 0)
  # ...while the teacher does change the loss (its features are the targets).
  bumped, _ = value_and_grad(jax.tree.map(lambda x: x * 1.5, st.ema_params))
  assert bumped != loss


def test_ema_and_queue_after_one_step(tiny_config):
  c = tiny_config
  st, step = _setup(c)
  st, _ = jax.jit(step)(st, make_batch(c, seed=1), jax.random.key(0))  # teacher != student
  before = _np(st)
  after, _ = jax.jit(step)(st, make_batch(c, seed=2), jax.random.key(0))
  after = _np(after)
  m = c.momentum
  for path, t_old in jax.tree_util.tree_leaves_with_path(before.ema_params):
    s_new = _get(after.params, path)
    expected = m * t_old.astype(np.float64) + (1 - m) * s_new.astype(np.float64)
    np.testing.assert_allclose(_get(after.ema_params, path), expected, rtol=1e-6,
                               atol=1e-7)
  assert set(after.ema_params) == set(after.params) - set(state_lib.STUDENT_ONLY)
  b, ptr = c.batch_size, int(before.queue_ptr)
  assert int(after.queue_ptr) == (ptr + b) % c.queue_size
  # Rows [ptr, ptr+B) of each queue are the batch's features from the teacher as it was
  # before this step's EMA update (ALBEF's momentum model), the unmasked text's; the other
  # rows are untouched.
  teacher = codis.build_model(c.model, train=False)
  variables = {'params': {**before.params, **before.ema_params}}
  batch = make_batch(c, seed=2)
  want = {
      'image_queue': teacher.apply(variables, batch['image'],
                                   method=codis.CODIS.encode_image)[1],
      'text_queue': teacher.apply(variables, batch['text_ids'], batch['text_mask'],
                                  method=codis.CODIS.encode_text)[1]}
  untouched = np.ones(c.queue_size, bool)
  untouched[ptr:ptr + b] = False
  for name, feats in want.items():
    old, new = getattr(before, name), getattr(after, name)
    np.testing.assert_array_equal(new[untouched], old[untouched])
    np.testing.assert_allclose(new[ptr:ptr + b], feats, atol=2e-6)  # after-EMA: 8e-5 off


def _get(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def test_temperature_clamp_holds(tiny_config):
  c = tiny_config
  st, step = _setup(c)
  params = dict(st.params, temp=jnp.float32(3.0))
  st = st.replace(params=params)
  st2, m = jax.jit(step)(st, make_batch(c), jax.random.key(0))
  assert float(m['temp']) == pytest.approx(c.model.temp_max)
  assert float(st2.params['temp']) <= c.model.temp_max
  # As ALBEF's in-place clamp before use: beyond and at the bound the temperature gets the
  # clamped value's gradient, in full (jnp.clip gives 0 beyond, half at the bound).
  loss_of_temp = lambda t: step(st.replace(params=dict(st.params, temp=t)),
                                make_batch(c), jax.random.key(0))[1]['loss']
  grad, loss = jax.jit(jax.grad(loss_of_temp)), jax.jit(loss_of_temp)
  at_bound, beyond = float(grad(jnp.float32(c.model.temp_max))), float(grad(jnp.float32(3.0)))
  assert at_bound != 0.0 and beyond == at_bound
  h = 1e-3  # the loss's slope just inside the bound, by a one-sided difference
  slope = (float(loss(jnp.float32(c.model.temp_max))) -
           float(loss(jnp.float32(c.model.temp_max - h)))) / h
  assert at_bound == pytest.approx(slope, rel=0.05)
  low = dict(st.params, temp=jnp.float32(1e-5))
  _, m = jax.jit(step)(st.replace(params=low), make_batch(c), jax.random.key(0))
  assert float(m['temp']) == pytest.approx(c.model.temp_min)


def test_bad_queue_size_is_a_clear_error(tiny_config):
  c = tiny_config
  c.queue_size = 30  # not a multiple of the batch (8)
  with pytest.raises(ValueError, match='queue_size=30 is not a multiple'):
    _setup(c)


def test_bad_attention_impl_is_a_clear_error(tiny_config):
  tiny_config.model.attention_impl = 'flash'
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    _setup(tiny_config)


def test_global_norm_equals_numpy_over_mixed_leaves():
  """Leaves of repeated and unique shapes, one bfloat16: the float64 norm of them all."""
  rs = np.random.RandomState(0)
  tree = {'a': [rs.randn(3, 4) for _ in range(3)], 'b': rs.randn(5), 'c': rs.randn(3, 4) * 10,
          'd': rs.randn(2, 2).astype(jnp.bfloat16), 'e': np.float32(2.0)}
  leaves = [np.float64(np.asarray(x, np.float32)).ravel() for x in jax.tree.leaves(tree)]
  want = np.sqrt(sum(np.sum(x ** 2) for x in leaves))
  tree = jax.tree.map(jnp.asarray, tree)
  np.testing.assert_allclose(float(jax.jit(train.global_norm)(tree)), want, rtol=1e-6)
  tree['b'] = tree['b'].at[2].set(jnp.nan)
  assert np.isnan(float(train.global_norm(tree)))


@pytest.mark.parametrize('mu_dtype', ['float32', 'bfloat16'])
def test_adamw_against_numpy_with_the_first_moment_stored_in_mu_dtype(tiny_config, mu_dtype):
  """Three AdamW updates against float64 numpy. Decay groups as ALBEF's (timm's
  add_weight_decay: none for 1-D leaves or names ending in bias): the kernel and the 0-D
  temperature decay, the bias and a per-head [H, D] attention bias do not. With
  mu_dtype='bfloat16' each update uses b1 * mu + (1 - b1) * g in float32, from the stored
  moment, and stores it rounded to bf16 (not b1 rounded to bf16, as a Python-float b1 would
  give); the reference rounds the same."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  c = tiny_config.optim
  c.lr = c.warmup_lr = c.min_lr = 1e-2  # a constant schedule
  c.mu_dtype = mu_dtype
  tx = state_lib.make_optimizer(c, 100)
  rs = np.random.RandomState(1)
  params = {'kernel': rs.randn(3, 4).astype(np.float32), 'bias': rs.randn(4).astype(np.float32),
            'query': {'bias': rs.randn(2, 3).astype(np.float32)},
            'temp': np.float32(rs.rand() + 0.5)}
  grads = [jax.tree.map(lambda v: np.float32(rs.randn(*np.shape(v))), params)
           for _ in range(3)]
  p, state = jax.tree.map(jnp.asarray, params), tx.init(params)
  for g in grads:
    updates, state = jax.jit(tx.update)(jax.tree.map(jnp.asarray, g), state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)

  rnd = ((lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float64))
         if mu_dtype == 'bfloat16' else (lambda a: a))
  leaf = lambda tree, name: tree[name[0]][name[1]] if isinstance(name, tuple) else tree[name]
  for name, decay in (('kernel', True), ('bias', False), (('query', 'bias'), False),
                      ('temp', True)):
    w = np.float64(leaf(params, name))
    mu, nu = np.zeros(w.shape), 0.0
    for t, g in enumerate(grads, 1):
      g = np.float64(leaf(g, name))
      mu, nu = c.b1 * mu + (1 - c.b1) * g, c.b2 * nu + (1 - c.b2) * g * g
      step = (mu / (1 - c.b1 ** t)) / (np.sqrt(nu / (1 - c.b2 ** t)) + c.eps)
      w = w - c.lr * (step + (c.weight_decay * w if decay else 0.0))
      mu = rnd(mu)
    adam = state[0]
    m_, v_ = leaf(adam.mu, name), leaf(adam.nu, name)
    assert m_.dtype == jnp.dtype(mu_dtype) and v_.dtype == jnp.float32
    np.testing.assert_allclose(np.float64(m_.astype(jnp.float32)), mu, rtol=1e-6)
    # float32 rounding of three updates ~2e-7; one decay step moves w by lr * wd * |w| ~ 1e-4
    np.testing.assert_allclose(leaf(p, name), w, rtol=2e-6, atol=5e-7, err_msg=str(name))
  c.mu_dtype = 'float16'
  with pytest.raises(ValueError, match="config.optim.mu_dtype='float16'"):
    state_lib.make_optimizer(c, 100)
