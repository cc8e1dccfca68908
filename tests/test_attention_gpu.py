"""cuDNN flash attention (`model.attention_impl=cudnn`) equals the softmax reference.

The cuDNN cases need a GPU (cuDNN has no CPU kernel) and are skipped elsewhere; the
XLA cases of the forward test run on any backend. Run on a GPU with
`python -m pytest tests/test_attention_gpu.py`. Shapes are the paper model's: ViT-B/16 at
256 px (257 tokens), BERT text of 25 or 30 tokens with right padding, cross-attention of
text over image tokens; 12 heads of 64. The odd lengths go through the padding of
`layers.even_length_attention`, whose exactness CPU tests check with the XLA kernel.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codis_jax.models import layers
from test_performance_modes import _reference_attention

needs_gpu = pytest.mark.skipif(jax.default_backend() != 'gpu',
                               reason='cuDNN attention needs a GPU')

CASES = {  # name: (batch, query tokens, key tokens, key lengths or None)
    'vit_self': (4, 257, 257, None),
    'text_self_padded': (4, 30, 30, [30, 17, 5, 1]),
    'fusion_cross': (4, 30, 257, None),
}


@pytest.mark.parametrize('impl', [pytest.param('cudnn', marks=needs_gpu), 'xla'])
@pytest.mark.parametrize('case', sorted(CASES))
def test_bf16_attention_equals_reference(case, impl):
  b, t, s, lengths = CASES[case]
  d, heads = 768, 12
  rs = np.random.RandomState(len(case))
  x_q = rs.randn(b, t, d).astype(np.float32)
  x_kv = x_q if s == t else rs.randn(b, s, d).astype(np.float32)
  mask = None if lengths is None else (
      np.arange(s)[None] < np.array(lengths)[:, None]).astype(np.int32)
  jmask = None if mask is None else layers.padding_mask(jnp.asarray(mask))
  attn = layers.Attention(heads, dtype=jnp.bfloat16, implementation=impl)
  params = nn.meta.unbox(attn.init(jax.random.key(0), x_q, x_kv, jmask)['params'])
  # Scale the projections up so the softmax is peaked, not uniform: a wrong mask or
  # scale then moves the output by far more than bf16 rounding.
  params = jax.tree.map(lambda p: p * 2.0, params)
  got = np.asarray(jax.jit(attn.apply)({'params': params}, x_q, x_kv, jmask), np.float64)
  want = _reference_attention(x_q, x_kv, mask, jax.tree.map(np.asarray, params), heads)
  rel = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert np.isfinite(got).all()
  assert rel < 2e-2, f'{case}/{impl}: relative error {rel:.3g} (bf16 operands: ~1e-2)'


GRAD_CASES = {  # the paper's training shapes, odd lengths included
    'vit_self_257': (4, 257, 257, None),
    'text_self_25_padded': (4, 25, 25, [25, 17, 5, 1]),
    'fusion_cross_25x257': (4, 25, 257, None),
}


@needs_gpu
@pytest.mark.parametrize('case', sorted(GRAD_CASES))
def test_bf16_cudnn_gradients_equal_xla(case):
  b, t, s, lengths = GRAD_CASES[case]
  heads, d = 12, 64
  rs = np.random.RandomState(len(case))
  q, k, v = (jnp.asarray(rs.randn(b, n, heads, d) * 2, jnp.bfloat16) for n in (t, s, s))
  cot = jnp.asarray(rs.randn(b, t, heads, d), jnp.float32)
  mask = None if lengths is None else layers.padding_mask(
      jnp.asarray(np.arange(s)[None] < np.array(lengths)[:, None]))

  _assert_cudnn_gradients_equal_xla(case, lambda impl, *a: layers.attention(*a, mask, impl),
                                    (q, k, v), cot)


def _assert_cudnn_gradients_equal_xla(case, attend, qkv, cot):
  """attend(impl, q, k, v): the gradients of sum(out * cot) through cuDNN and XLA agree."""
  def grads(impl):
    loss = lambda *a: jnp.sum(attend(impl, *a).astype(jnp.float32) * cot)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*qkv)

  for name, got, want in zip('qkv', grads('cudnn'), grads('xla')):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert np.isfinite(got).all()
    assert rel < 3e-2, f'{case} d{name}: relative error {rel:.3g} vs XLA (bf16: ~1e-2)'


@needs_gpu
def test_bf16_cudnn_slot_gradients_equal_xla():
  # The fusion's cross-attention with share_image_kv (layers.slot_attention): 4 rows per
  # image, 3 joined along the query axis (75 queries, padded to 76), 1 gathered.
  b, t, s, heads, d = 4, 25, 257, 12, 64
  rs = np.random.RandomState(7)
  q = jnp.asarray(rs.randn(4 * b, t, heads, d) * 2, jnp.bfloat16)
  k, v = (jnp.asarray(rs.randn(b, s, heads, d) * 2, jnp.bfloat16) for _ in range(2))
  slots = (None, None, jnp.asarray([[1, 0, 3, 1]], jnp.int32), None)
  cot = jnp.asarray(rs.randn(4 * b, t, heads, d), jnp.float32)

  _assert_cudnn_gradients_equal_xla(
      'slots', lambda impl, *a: layers.attention(*a, None, impl, kv_index=slots), (q, k, v),
      cot)
