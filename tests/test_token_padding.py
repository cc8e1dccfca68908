"""model.pad_image_tokens / pad_text_tokens: encoders on padded tokens (masked keys) equal
the unpadded ones, and so does the whole step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codis_jax import state as state_lib
from codis_jax import train
from codis_jax.models import bert
from codis_jax.models import layers
from codis_jax.models import vit
from conftest import make_batch


def _attention_np(q, k, v, kv_length):
  """float64 numpy softmax(q k^T / sqrt(D)) v over the first kv_length keys."""
  q, k, v = (np.float64(x) for x in (q, k, v))
  logits = np.einsum('bthd,bshd->bhts', q, k)[..., :kv_length] / np.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum('bhts,bshd->bthd', w / w.sum(-1, keepdims=True), v[:, :kv_length])


@pytest.mark.parametrize('impl', [None, 'cudnn'])
@pytest.mark.parametrize('masked', [False, True])
def test_attention_kv_length_ignores_the_padded_keys(impl, masked, request):
  if impl == 'cudnn':
    request.getfixturevalue('cudnn_via_xla')
  rs = np.random.RandomState(0)
  b, t, s, h, d, n = 2, 7, 8, 2, 4, 5
  q, k, v = (rs.randn(b, m, h, d).astype(np.float32) for m in (t, s, s))
  mask = jnp.ones((b, 1, 1, s), bool) if masked else None
  got = layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask, impl,
                         kv_length=n)
  np.testing.assert_allclose(np.asarray(got), _attention_np(q, k, v, n), atol=1e-5,
                             rtol=1e-5)
  # Whatever the padded keys hold, the result is the same.
  k2, v2 = k.copy(), v.copy()
  k2[:, n:], v2[:, n:] = 100.0, -50.0
  got2 = layers.attention(jnp.asarray(q), jnp.asarray(k2), jnp.asarray(v2), mask, impl,
                          kv_length=n)
  np.testing.assert_allclose(np.asarray(got2), np.asarray(got), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('impl', [None, 'cudnn'])
def test_vit_on_padded_tokens_equals_unpadded(impl, request):
  if impl == 'cudnn':
    request.getfixturevalue('cudnn_via_xla')
  images = jnp.asarray(np.random.RandomState(1).randn(2, 24, 24, 3).astype(np.float32))
  make = lambda pad: vit.ViT(patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64,
                             attention_impl=impl, pad_tokens_to=pad)
  params = nn.meta.unbox(make(0).init(jax.random.key(0), images)['params'])
  out = {pad: make(pad).apply({'params': params}, images) for pad in (0, 8)}
  assert out[8].shape == out[0].shape == (2, 10, 32)  # 1 + 3 * 3 tokens, padded to 16 inside
  np.testing.assert_allclose(np.asarray(out[8]), np.asarray(out[0]), atol=1e-5, rtol=1e-5)
  cot = jnp.asarray(np.random.RandomState(2).randn(*out[0].shape).astype(np.float32))
  grads = {pad: jax.grad(lambda p, pad=pad: jnp.sum(
      make(pad).apply({'params': p}, images) * cot))(params) for pad in (0, 8)}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       atol=1e-5, rtol=1e-4),
               grads[8], grads[0])


def _close(got, want, rtol=1e-5):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       atol=1e-6, rtol=rtol), got, want)


@pytest.mark.parametrize('impl', [None, 'cudnn'])
def test_fusion_stack_on_padded_text_equals_unpadded(impl, request):
  """BertStack with pad_tokens_to (text 5 -> 8, masked), cross-attending to images gathered
  per row: outputs and all gradients equal the unpadded stack's."""
  if impl == 'cudnn':
    request.getfixturevalue('cudnn_via_xla')
  rs = np.random.RandomState(3)
  b, t, s, d = 4, 5, 7, 16
  x = jnp.asarray(rs.randn(b, t, d).astype(np.float32))
  text_mask = jnp.asarray((np.arange(t)[None] < np.array([[5], [3], [1], [4]])).astype(np.int32))
  image = jnp.asarray(rs.randn(2, s, d).astype(np.float32))
  index = jnp.asarray([[0, 1], [1, 1]])  # rows 0, 1 of group 0 and 1, 1 of group 1
  make = lambda pad: bert.BertStack(2, 0, num_heads=2, mlp_dim=32, eps=1e-12, dropout=0.0,
                                    deterministic=True, cross=True, attention_impl=impl,
                                    pad_tokens_to=pad)
  params = nn.meta.unbox(make(0).init(jax.random.key(0), x, text_mask, image,
                                      index)['params'])
  cot = jnp.asarray(rs.randn(b, t, d).astype(np.float32))

  def loss(p, x, img, pad):
    out = make(pad).apply({'params': p}, x, text_mask, img, index)
    assert out.shape == (b, t, d)
    return jnp.sum(out * cot)

  want, got = (jax.value_and_grad(loss, argnums=(0, 1, 2))(params, x, image, pad)
               for pad in (0, 8))
  _close(got[0], want[0])
  _close(got[1], want[1], rtol=1e-4)


@pytest.mark.parametrize('slots', [False, True])
def test_cudnn_fusion_stack_pads_an_odd_image_once(slots, cudnn_via_xla, monkeypatch):
  """With cuDNN's path the fusion stack pads an odd image (7 tokens) to 8 once, masked as
  keys, so no layer's cross-attention pads its keys and values again; outputs and
  gradients (parameters, text, image) equal XLA's unpadded stack."""
  del cudnn_via_xla
  rs = np.random.RandomState(4)
  b, t, s, d = 4, 6, 7, 16
  x = jnp.asarray(rs.randn(b, t, d).astype(np.float32))
  text_mask = jnp.asarray((np.arange(t)[None] < np.array([[6], [3], [1], [4]])).astype(np.int32))
  image = jnp.asarray(rs.randn(2, s, d).astype(np.float32))
  # Slots: 2 rows per image, its own then the other's; else a row index per text row.
  index = (None, jnp.asarray([[1, 0]])) if slots else jnp.asarray([[0, 1], [1, 1]])
  make = lambda impl: bert.BertStack(2, 0, num_heads=2, mlp_dim=32, eps=1e-12, dropout=0.0,
                                     deterministic=True, cross=True, attention_impl=impl)
  params = nn.meta.unbox(make(None).init(jax.random.key(0), x, text_mask, image,
                                         index)['params'])
  cot = jnp.asarray(rs.randn(b, t, d).astype(np.float32))
  key_lengths = []
  plain = layers.even_length_attention

  def counted(q, k, *args, **kwargs):
    key_lengths.append(k.shape[1])
    return plain(q, k, *args, **kwargs)

  monkeypatch.setattr(layers, 'even_length_attention', counted)

  def loss(p, x, img, impl):
    return jnp.sum(make(impl).apply({'params': p}, x, text_mask, img, index) * cot)

  want, got = (jax.value_and_grad(loss, argnums=(0, 1, 2))(params, x, image, impl)
               for impl in (None, 'cudnn'))
  cross = [n for n in key_lengths if n in (s, s + 1)]  # (the text's are 6)
  assert cross and all(n == s + 1 for n in cross), key_lengths
  _close(got[0], want[0])
  _close(got[1], want[1], rtol=1e-4)


def test_step_with_padded_tokens_equals_unpadded(tiny_config):
  """The tiny train step (no dropout) with both knobs on: same loss and gradients."""
  c = tiny_config
  assert c.model.dropout == 0.0 and c.text_len % 8 and (1 + (c.model.image_size //
                                                             c.model.patch_size) ** 2) % 8
  batch = make_batch(c)
  tx = state_lib.make_optimizer(c.optim, 100)
  st = jax.jit(lambda r: state_lib.create_train_state(c, r, tx))(jax.random.key(0))

  def loss_and_grads(pad):
    c.model.pad_image_tokens = c.model.pad_text_tokens = pad
    step = train.make_train_step(c, tx, steps_per_epoch=10)
    loss = lambda p: step(st.replace(params=p), batch, jax.random.key(3))[1]['loss']
    # The knobs take effect: the text and fusion layers (2B and 4B rows) run at 16 tokens
    # (not 12), the ViT at 24 (not 1 + 16).
    jaxpr = str(jax.make_jaxpr(loss)(st.params))
    b, w = c.batch_size, c.model.text_width
    for shape in (f'[{2 * b},16,{w}]', f'[{4 * b},16,{w}]', f'[{b},24,{c.model.vit_width}]'):
      assert (shape in jaxpr) == (pad == 8), shape
    return jax.jit(jax.value_and_grad(loss))(st.params)

  (loss, grads), (ref_loss, ref_grads) = loss_and_grads(8), loss_and_grads(0)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  # Sums over more (masked) rows round differently: float32 noise, as in the ViT test.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads, ref_grads)
