"""model.pad_image_tokens: the ViT on padded tokens (masked keys) equals the unpadded ViT."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codis_jax.models import layers
from codis_jax.models import vit


def _attention_np(q, k, v, kv_length):
  """float64 numpy softmax(q k^T / sqrt(D)) v over the first kv_length keys."""
  q, k, v = (np.float64(x) for x in (q, k, v))
  logits = np.einsum('bthd,bshd->bhts', q, k)[..., :kv_length] / np.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum('bhts,bshd->bthd', w / w.sum(-1, keepdims=True), v[:, :kv_length])


def _xla_for_cudnn(monkeypatch):
  """cuDNN has no CPU kernel: run what the module hands it through XLA instead."""
  plain = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, 'dot_product_attention',
                      lambda *a, **kw: plain(*a, **{**kw, 'implementation': 'xla'}))


@pytest.mark.parametrize('impl', [None, 'cudnn'])
@pytest.mark.parametrize('masked', [False, True])
def test_attention_kv_length_ignores_the_padded_keys(impl, masked, monkeypatch):
  if impl == 'cudnn':
    _xla_for_cudnn(monkeypatch)
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
def test_vit_on_padded_tokens_equals_unpadded(impl, monkeypatch):
  if impl == 'cudnn':
    _xla_for_cudnn(monkeypatch)
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
