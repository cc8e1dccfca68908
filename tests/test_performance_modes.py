"""Performance modes keep the math: fused attention, remat, bf16."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codis_jax import state as state_lib
from codis_jax import train
from codis_jax.models import activations
from codis_jax.models import layers
from conftest import make_batch


def _reference_attention(x_q, x_kv, mask, p, heads):
  """softmax(QK^T / sqrt(d) + mask) V in float64 numpy, from the raw weights."""
  x_q, x_kv = np.float64(x_q), np.float64(x_kv)
  proj = lambda x, w: np.einsum('btd,dhk->bthk', x, np.float64(w['kernel'])) + w['bias']
  q, k, v = proj(x_q, p['query']), proj(x_kv, p['key']), proj(x_kv, p['value'])
  logits = np.einsum('bthk,bshk->bhts', q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask[:, None, None, :] > 0, logits, -1e30)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  out = np.einsum('bhts,bshk->bthk', w, v)
  return np.einsum('bthk,hkd->btd', out, np.float64(p['out']['kernel'])) + p['out']['bias']


@pytest.mark.parametrize('cross', [False, True])
def test_attention_equals_softmax_reference_with_padding(cross):
  rs = np.random.RandomState(0)
  b, t, s, d, heads = 3, 7, 5 if cross else 7, 16, 4
  x_q = rs.randn(b, t, d).astype(np.float32)
  x_kv = rs.randn(b, s, 24 if cross else d).astype(np.float32) if cross else x_q
  mask = None if cross else (np.arange(t)[None] < np.array([7, 3, 1])[:, None]).astype(
      np.int32)
  attn = layers.Attention(heads)
  jmask = None if mask is None else layers.padding_mask(jnp.asarray(mask))
  params = nn.meta.unbox(attn.init(jax.random.key(0), x_q, x_kv, jmask)['params'])
  params = jax.tree.map(lambda p: p + 0.1 * rs.randn(*p.shape).astype(np.float32), params)
  got = attn.apply({'params': params}, x_q, x_kv, jmask)
  want = _reference_attention(x_q, x_kv, mask, jax.tree.map(np.asarray, params), heads)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)


def _loss_and_grads(config, batch):
  tx = state_lib.make_optimizer(config.optim, 100)
  st = jax.jit(lambda r: state_lib.create_train_state(config, r, tx))(jax.random.key(0))
  step = train.make_train_step(config, tx, steps_per_epoch=10)
  # Gradient of the step's loss w.r.t. the student params, through the public step.
  loss = lambda p: step(st.replace(params=p), batch, jax.random.key(3))[1]['loss']
  return jax.jit(jax.value_and_grad(loss))(st.params)


@pytest.fixture(scope='module')
def no_remat():
  from configs import pretrain
  config = pretrain.get_config('tiny')
  return _loss_and_grads(config, make_batch(config))


@pytest.mark.parametrize('mode', ['full', 'dots'])
def test_remat_modes_match_none(no_remat, tiny_config, mode):
  batch = make_batch(tiny_config)
  ref_loss, ref_grads = no_remat
  tiny_config.model.remat = mode
  loss, grads = _loss_and_grads(tiny_config, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads, ref_grads)


def _one_sgd_step(config, batch):
  """One train step under SGD with learning rate 1: (metrics, params before - after), the
  second being the gradients (the temperature's up to its clamp)."""
  import optax  # pylint: disable=import-outside-toplevel
  tx = optax.sgd(1.0)
  st = jax.jit(lambda r: state_lib.create_train_state(config, r, tx))(jax.random.key(0))
  new, metrics = jax.jit(train.make_train_step(config, tx, steps_per_epoch=10))(
      st, batch, jax.random.key(3))
  return metrics, jax.tree.map(lambda a, b: a - b, st.params, new.params)


def test_pallas_attention_matches_xla(tiny_config):
  """The whole step with the TPU attention kernel (Pallas's TPU interpreter on the CPU;
  flat projections, the fusion's image keys and values read by index): the loss terms and
  gradients of XLA's attention. (Through one step, not grad-of-step as
  above: the kernel's hand-written backward has no derivative of its own.)"""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  batch = make_batch(tiny_config)
  ref_metrics, ref_grads = _one_sgd_step(tiny_config, batch)
  tiny_config.model.attention_impl = 'pallas'
  with pltpu.force_tpu_interpret_mode():
    metrics, grads = _one_sgd_step(tiny_config, batch)
  keys = [k for k in ref_metrics if k.startswith('loss')] + ['grad_norm']
  assert {'loss_ica', 'loss_code', 'loss_itm', 'loss_mlm'} <= set(keys)
  for key in keys:
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads, ref_grads)


@pytest.mark.parametrize('group', [0, 4])
def test_shared_image_kv_matches_per_row_images(no_remat, tiny_config, group):
  """The step's fusion rows gathering each image's keys/values (share_image_kv) give the
  loss and gradients of feeding every row its own copy of the image tokens."""
  c, batch = tiny_config, make_batch(tiny_config)
  assert c.model.share_image_kv and not c.loss.itm_group_size  # what `no_remat` ran
  c.loss.itm_group_size = group
  results = {}
  for share in (True, False):
    c.model.share_image_kv = share
    results[share] = no_remat if share and not group else _loss_and_grads(c, batch)
  (loss, grads), (ref_loss, ref_grads) = results[True], results[False]
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads, ref_grads)


@pytest.mark.parametrize('features,in_axes,axis', [((3, 4), ('embed',), -1),
                                                    ((5,), ('heads', 'kv'), (-2, -1))])
def test_flat_dense_same_params_and_values(features, in_axes, axis):
  """Dense(flat=True) (the 'pallas' attention's projections): the same parameters, and the
  numpy product over the contracted dims."""
  x = np.random.RandomState(6).randn(2, 7, 3, 4).astype(np.float32)
  make = lambda flat: layers.dense(features, in_axes, ['o'] * len(features),
                                   dtype=jnp.float32, init=nn.initializers.normal(1.0),
                                   name='d', axis=axis, flat=flat)
  x_in = x.reshape(2, 7, 12) if len(in_axes) == 1 else x
  params = make(False).init(jax.random.PRNGKey(0), x_in)
  got = make(True).apply(params, x_in)
  kernel, bias = (np.asarray(nn.unbox(params['params'][k])) for k in ('kernel', 'bias'))
  n_in = len(in_axes)
  want = np.tensordot(x_in, kernel, axes=n_in) + bias
  assert got.shape == want.shape == (2, 7) + features
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  assert jax.tree.map(np.shape, make(True).init(jax.random.PRNGKey(0), x_in)) == \
      jax.tree.map(np.shape, params)


@pytest.mark.parametrize('n,dtype,tol', [(3, jnp.float32, 1e-5), (2, jnp.bfloat16, 3e-2)])
def test_fused_projection_equals_separate_matmuls(n, dtype, tol):
  """n projections of one input as one stacked matmul (self-attention's q, k, v; cross-
  attention's k, v): each Dense keeps its own float32 parameters, and the outputs and the
  gradients of sum_i <c_i, out_i> (input, kernels, biases) equal numpy's n separate
  matmuls."""
  rs = np.random.RandomState(2)
  b, t, c, h, d = 2, 5, 12, 3, 4
  names = ('query', 'key', 'value')[:n]
  x = rs.randn(b, t, c).astype(np.float32)
  cots = [rs.randn(b, t, h, d).astype(np.float32) for _ in names]

  class Fused(nn.Module):
    @nn.compact
    def __call__(self, x):
      return layers.fused_projection(x, [
          layers.dense((h, d), 'embed', ('heads', 'kv'), dtype=dtype,
                       init=nn.initializers.normal(1.0), name=name) for name in names])

  params = nn.meta.unbox(Fused().init(jax.random.key(0), x)['params'])
  assert sorted(params) == sorted(names)
  assert all(params[k]['kernel'].shape == (c, h, d) and params[k]['bias'].shape == (h, d)
             for k in names)
  params = jax.tree.map(lambda p: p + rs.randn(*p.shape).astype(np.float32), params)
  loss = lambda p, x: sum(jnp.vdot(o.astype(jnp.float32), ci)
                          for o, ci in zip(Fused().apply({'params': p}, x), cots))
  outs = Fused().apply({'params': params}, x)
  g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, x)

  # The reference rounds what the kernel rounds (inputs and kernels to dtype).
  rnd = lambda a: np.float64(np.asarray(jnp.asarray(a, dtype).astype(jnp.float32)))
  xr = rnd(x)
  scale = lambda a: tol * max(1.0, np.abs(a).max())
  for name, out, ci in zip(names, outs, cots):
    w, bias = rnd(params[name]['kernel']), np.float64(params[name]['bias'])
    assert out.dtype == dtype and g_params[name]['bias'].dtype == jnp.float32
    want = np.einsum('btc,chd->bthd', xr, w) + bias
    np.testing.assert_allclose(np.float32(out), want, rtol=tol, atol=scale(want))
    want = np.einsum('btc,bthd->chd', xr, ci)
    np.testing.assert_allclose(g_params[name]['kernel'], want, rtol=tol, atol=scale(want))
    want = ci.sum((0, 1))
    np.testing.assert_allclose(g_params[name]['bias'], want, rtol=tol, atol=scale(want))
  want = sum(np.einsum('bthd,chd->btc', ci, rnd(params[k]['kernel']))
             for k, ci in zip(names, cots))
  np.testing.assert_allclose(g_x, want, rtol=tol, atol=scale(want))


def test_take_rows_picks_within_groups():
  x = np.arange(6 * 2).reshape(6, 2)
  index = np.array([[0, 2, 1, 0], [1, 1, 0, 2]])  # 2 groups of 3 rows
  want = np.stack([x[g * 3 + i] for g in range(2) for i in index[g]])
  np.testing.assert_array_equal(layers.take_rows(jnp.asarray(x), jnp.asarray(index)), want)
  with pytest.raises(ValueError, match='do not split into 4 groups'):
    layers.take_rows(jnp.asarray(x), jnp.zeros((4, 2), jnp.int32))


def test_group_index_gathers_within_groups():
  # 8 examples in groups of 4, each picking another row of its group.
  x = np.arange(8 * 3).reshape(8, 3)
  other = np.array([1, 3, 0, 2, 6, 4, 7, 5])  # global row numbers, each in its group
  index = train.group_index(4, jnp.asarray(other))
  np.testing.assert_array_equal(index, [[1, 3, 0, 2], [2, 0, 3, 1]])
  np.testing.assert_array_equal(train.take_in_groups(jnp.asarray(x), jnp.asarray(other), 4),
                                x[other])


def test_cross_attention_with_kv_index_equals_reference():
  # 8 query rows over 4 images in 2 groups: keys/values projected per image, then gathered.
  rs = np.random.RandomState(2)
  t, s, d, dv, heads = 5, 7, 16, 24, 4
  x_q = rs.randn(8, t, d).astype(np.float32)
  images = rs.randn(4, s, dv).astype(np.float32)
  index = np.array([[0, 1, 1, 0], [1, 1, 0, 1]])
  rows = np.array([g * 2 + i for g in range(2) for i in index[g]])
  attn = layers.Attention(heads)
  params = nn.meta.unbox(attn.init(jax.random.key(0), x_q, images[rows])['params'])
  params = jax.tree.map(lambda p: p + 0.1 * rs.randn(*p.shape).astype(np.float32), params)
  run = lambda img, idx: attn.apply({'params': params}, x_q, img, None, idx)
  got = run(images, jnp.asarray(index))
  want = _reference_attention(x_q, images[rows], None, jax.tree.map(np.asarray, params), heads)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)
  # The image gradient sums over the rows that share an image (the gather's transpose).
  cot = jnp.asarray(rs.randn(*got.shape).astype(np.float32))
  shared = jax.grad(lambda img: jnp.sum(run(img, jnp.asarray(index)) * cot))(images)
  per_row = jax.grad(lambda img: jnp.sum(run(img[rows], None) * cot))(images)
  np.testing.assert_allclose(np.asarray(shared), np.asarray(per_row), atol=1e-5, rtol=1e-5)


def test_bfloat16_matches_float32_loss_terms(tiny_config):
  """bf16 compute (f32 params, losses, IPOT, queues) agrees with f32 within 2e-2 relative."""
  c = tiny_config
  batch = make_batch(c)
  results = {}
  for dtype in ('float32', 'bfloat16'):
    c.model.dtype = dtype
    tx = state_lib.make_optimizer(c.optim, 100)
    st = jax.jit(lambda r: state_lib.create_train_state(c, r, tx))(jax.random.key(0))
    _, m = jax.jit(train.make_train_step(c, tx, 10))(st, batch, jax.random.key(3))
    results[dtype] = jax.tree.map(float, m)
  for k in ('loss_i2t', 'loss_t2i', 'loss_i2i', 'loss_t2t', 'loss_ot_img', 'loss_ot_txt',
            'loss_i2p', 'loss_t2p', 'loss_itm', 'loss_mlm', 'loss'):
    assert results['bfloat16'][k] == pytest.approx(results['float32'][k], rel=2e-2), k


def test_bad_remat_name_is_a_clear_error():
  with pytest.raises(ValueError, match='config.model.remat'):
    layers.remat_policy('sometimes')


def _softmax_attention_np(q, k, v, key_mask):
  """float64 numpy softmax(q k^T / sqrt(D)) v; q [B,T,H,D], k/v [B,S,H,D], key_mask [B,S]."""
  q, k, v = (np.float64(x) for x in (q, k, v))
  logits = np.einsum('bthd,bshd->bhts', q, k) / np.sqrt(q.shape[-1])
  if key_mask is not None:
    logits = np.where(key_mask[:, None, None, :] > 0, logits, -1e30)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum('bhts,bshd->bthd', w / w.sum(-1, keepdims=True), v)


@pytest.mark.parametrize('t,s,masked', [(7, 7, True), (7, 7, False), (5, 9, False),
                                         (6, 9, False), (7, 4, True)])
def test_even_length_attention_is_exact(t, s, masked):
  # The cuDNN path pads odd lengths to even (its backward needs them); run that padding
  # through the XLA kernel here: values against numpy, gradients against unpadded JAX.
  rs = np.random.RandomState(t * 10 + s)
  b, h, d = 3, 2, 8
  q, k, v = (jnp.asarray(rs.randn(b, n, h, d).astype(np.float32) * 2) for n in (t, s, s))
  key_mask = (np.arange(s)[None] < np.array([s, 3, 1])[:, None]).astype(np.int32) \
      if masked else None
  mask = None if key_mask is None else layers.padding_mask(jnp.asarray(key_mask))
  got = layers.even_length_attention(q, k, v, mask, 'xla')
  assert got.shape == (b, t, h, d)
  np.testing.assert_allclose(np.asarray(got), _softmax_attention_np(q, k, v, key_mask),
                             atol=1e-5, rtol=1e-5)
  cot = jnp.asarray(rs.randn(b, t, h, d).astype(np.float32))
  grad = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=(0, 1, 2))(q, k, v)
  padded = grad(lambda *a: layers.even_length_attention(*a, mask, 'xla'))
  plain = grad(lambda *a: jax.nn.dot_product_attention(*a, mask=mask))
  for got_g, want_g in zip(padded, plain):
    assert np.isfinite(np.asarray(got_g)).all()
    np.testing.assert_allclose(np.asarray(got_g), np.asarray(want_g), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('cross', [False, True])
def test_cudnn_attention_module_hands_the_kernel_even_lengths(monkeypatch, cross):
  # cuDNN has no CPU kernel: record what the module passes it, run that through XLA, and
  # check the module's output (its projections fused: q, k, v, or k, v) against the
  # float64 reference.
  seen = []
  plain = jax.nn.dot_product_attention

  def recording(q, k, v, **kw):
    seen.append((q.shape[1], k.shape[1], kw['implementation'], kw.get('mask') is None))
    return plain(q, k, v, **{**kw, 'implementation': 'xla'})

  monkeypatch.setattr(jax.nn, 'dot_product_attention', recording)
  rs = np.random.RandomState(1)
  b, t, s, d, heads = 2, 5, 9, 16, 4
  x_q = rs.randn(b, t, d).astype(np.float32)
  x_kv = rs.randn(b, s, d).astype(np.float32) if cross else x_q
  attn = layers.Attention(heads, implementation='cudnn')
  params = nn.meta.unbox(attn.init(jax.random.key(0), x_q, x_kv)['params'])
  params = jax.tree.map(lambda p: p + 0.1 * rs.randn(*p.shape).astype(np.float32), params)
  seen.clear()
  got = attn.apply({'params': params}, x_q, x_kv)
  # Padded to even lengths, passed as sequence lengths instead of a bias.
  assert seen == [(6, 10 if cross else 6, 'cudnn', True)]
  want = _reference_attention(x_q, x_kv, None, jax.tree.map(np.asarray, params), heads)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('group', [0, 4])
def test_finetune_shared_image_kv_matches_per_row_images(group):
  """Retrieval fine-tuning's 3 fusion rows per example: keys/values shared per image give
  the per-row loss and gradients (with captions of one image sharing an id)."""
  from codis_jax.evaluate import finetune_step  # pylint: disable=import-outside-toplevel
  from configs import retrieval_coco  # pylint: disable=import-outside-toplevel
  c = retrieval_coco.get_config('tiny')
  c.loss.itm_group_size = group
  batch = dict(make_batch(c), image_id=np.arange(c.batch_size, dtype=np.int32) // 2)
  tx = state_lib.make_optimizer(c.optim, 100)
  st = jax.jit(lambda r: finetune_step.initial_state(c, tx, r))(jax.random.key(0))
  results = {}
  for share in (True, False):
    c.model.share_image_kv = share
    step = finetune_step.make_finetune_step(c, tx, steps_per_epoch=10)
    loss = lambda p, step=step: step(st.replace(params=p), batch, jax.random.key(3))[1]
    results[share] = jax.jit(jax.value_and_grad(lambda p, loss=loss: loss(p)['loss']))(
        st.params), jax.jit(loss)(st.params)
  ((loss, grads), metrics), ((ref_loss, ref_grads), ref_metrics) = results[True], results[False]
  assert float(ref_metrics['loss_itm']) > 0.1  # the ITM term is in the comparison
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(metrics['loss_itm'], ref_metrics['loss_itm'], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads, ref_grads)


@pytest.mark.parametrize('dtype,tol,value_rtol', [(jnp.float32, 1e-6, 1e-5),
                                                   (jnp.bfloat16, 1e-2, 2.0 ** -8)])
def test_gelu_and_its_recomputed_gradient_equal_the_erf_formula(dtype, tol, value_rtol):
  # Reference: x * Phi(x) and its derivative Phi(x) + x * phi(x), in float64 from math.erfc.
  import math  # pylint: disable=import-outside-toplevel
  x = np.linspace(-6, 6, 241).astype(np.float32)
  xd = np.float64(np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)))
  cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in xd])
  pdf = np.exp(-0.5 * xd ** 2) / math.sqrt(2 * math.pi)
  value, grad = jax.vmap(jax.value_and_grad(activations.gelu))(jnp.asarray(x, dtype))
  assert value.dtype == grad.dtype == dtype
  # The value within its dtype's rounding of the exact one, relative even in the negative
  # tail (-6 * Phi(-6) = -5.9e-9); bf16 rounds to within 2^-8.
  np.testing.assert_allclose(np.float64(value.astype(jnp.float32)), xd * cdf, atol=0,
                             rtol=value_rtol)
  np.testing.assert_allclose(np.float64(grad.astype(jnp.float32)), cdf + xd * pdf,
                             atol=tol, rtol=tol)
