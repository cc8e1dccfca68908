"""Attention as one Pallas TPU kernel per (example, head group), the whole sequence in VMEM.

`model.attention_impl='pallas'`. XLA:TPU compiles softmax(q k^T) v for this model as
separate passes over float32 [B, H, T, S] scores in HBM; in the paper step those passes are
about half of all HBM traffic (`python -m codis_jax.tpu_aot`). The sequences here are short
(257 image tokens, 25 text tokens), so one grid step holds a whole [T, S] score tile in
VMEM (265 KB in float32 at 257 x 257) and nothing of size T x S reaches HBM. No online
softmax is needed, and the backward needs no saved statistics: it recomputes the scores
from q and k, as flash attention does.

Heads are taken straight from the [B, T, H * D] layout the projections write, 128 lanes
(two 64-wide heads) per grid step, so no transpose and no padding of D=64 to 128 lanes.
jax's own Pallas flash attention (`jax.experimental.pallas.ops.tpu`) needs [B, H, T, D],
sequences padded to multiples of 128 and [B, H, T, 128] statistics; at these shapes it
moved more HBM bytes than XLA's attention.

Runs on TPUs; elsewhere only under `pltpu.force_tpu_interpret_mode()` (the tests).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import numpy as np

P = jax.sharding.PartitionSpec
_LANES = 128
_MASKED = -1e30  # a finite "minus infinity": exp underflows to 0, no inf - inf = nan


def _group(heads: int, head_dim: int) -> int:
  """Heads per grid step: enough to fill 128 lanes, or all of them when H * D < 128."""
  if heads * head_dim <= _LANES:
    return heads
  per = max(_LANES // head_dim, 1)
  if heads % per or (per * head_dim) % _LANES:
    raise ValueError(f"attention_impl='pallas': {heads} heads of width {head_dim} do not "
                     f'split into {_LANES}-lane groups')
  return per


def _probs(q, k, bias, scale):
  """q [T, D], k [S, D], bias [1, S] -> softmax(q k^T * scale + bias) [T, S] float32."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32) * scale + bias
  p = jnp.exp(s - jnp.max(s, axis=1, keepdims=True))
  return p / jnp.sum(p, axis=1, keepdims=True)


def _fwd_kernel(q_ref, k_ref, v_ref, bias_ref, o_ref, *, heads, d, scale):
  bias = bias_ref[0]
  for h in range(heads):
    cols = slice(h * d, (h + 1) * d)
    p = _probs(q_ref[0, :, cols], k_ref[0, :, cols], bias, scale)
    o = jnp.dot(p.astype(v_ref.dtype), v_ref[0, :, cols], preferred_element_type=jnp.float32)
    o_ref[0, :, cols] = o.astype(o_ref.dtype)


def _bwd_kernel(q_ref, k_ref, v_ref, bias_ref, do_ref, dq_ref, dk_ref, dv_ref, *, heads,
                d, scale):
  bias = bias_ref[0]
  nt = lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)  # a b^T
  tn = lambda a, b: jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)  # a^T b
  for h in range(heads):
    cols = slice(h * d, (h + 1) * d)
    q, k, v, do = (r[0, :, cols] for r in (q_ref, k_ref, v_ref, do_ref))
    p = _probs(q, k, bias, scale)                                       # [T, S]
    dp = nt(do, v)                                                      # [T, S]
    ds = p * (dp - jnp.sum(p * dp, axis=1, keepdims=True))              # softmax VJP
    dq_ref[0, :, cols] = (jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
                          * scale).astype(dq_ref.dtype)
    dk_ref[0, :, cols] = (tn(ds.astype(q.dtype), q) * scale).astype(dk_ref.dtype)
    dv_ref[0, :, cols] = tn(p.astype(do.dtype), do).astype(dv_ref.dtype)


def _blocks(q, k, heads):
  """(head width, heads per grid step, grid, q / kv / bias BlockSpecs) for q [B, T, H * D],
  k [B, S, H * D]: one grid step per (example, 128-lane head group)."""
  (b, t, width), s = q.shape, k.shape[1]
  d = width // heads
  group = _group(heads, d)
  seq = lambda n: pl.BlockSpec((1, n, group * d), lambda i, j: (i, 0, j))
  bias = pl.BlockSpec((1, 1, s), lambda i, j: (i, 0, 0))
  return d, group, (b, heads // group), seq(t), seq(s), bias


def _nbytes(*xs):
  return sum(x.size * x.dtype.itemsize for x in xs)


_PARAMS = pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel'))


def _forward(q, k, v, bias, heads, scale):
  d, group, grid, q_spec, kv_spec, bias_spec = _blocks(q, k, heads)
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  return pl.pallas_call(
      functools.partial(_fwd_kernel, heads=group, d=d, scale=scale),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), grid=grid,
      in_specs=[q_spec, kv_spec, kv_spec, bias_spec], out_specs=q_spec,
      compiler_params=_PARAMS, name='codis_attention_fwd',
      cost_estimate=pl.CostEstimate(  # 2 matmuls
          flops=4 * b * heads * t * s * d, transcendentals=b * heads * t * s,
          bytes_accessed=_nbytes(q, k, v, bias, q)),
  )(q, k, v, bias)


def _backward(q, k, v, bias, do, heads, scale):
  d, group, grid, q_spec, kv_spec, bias_spec = _blocks(q, k, heads)
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  return pl.pallas_call(
      functools.partial(_bwd_kernel, heads=group, d=d, scale=scale),
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)], grid=grid,
      in_specs=[q_spec, kv_spec, kv_spec, bias_spec, q_spec],
      out_specs=[q_spec, kv_spec, kv_spec], compiler_params=_PARAMS,
      name='codis_attention_bwd',
      cost_estimate=pl.CostEstimate(  # the scores again, then 4 more matmuls
          flops=10 * b * heads * t * s * d, transcendentals=b * heads * t * s,
          bytes_accessed=2 * _nbytes(q, k, v) + _nbytes(do, bias)),
  )(q, k, v, bias, do)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, bias, heads, scale):
  return _forward(q, k, v, bias, heads, scale)


def _attention_fwd(q, k, v, bias, heads, scale):
  return _forward(q, k, v, bias, heads, scale), (q, k, v, bias)


def _attention_bwd(heads, scale, residuals, do):
  q, k, v, bias = residuals
  dq, dk, dv = _backward(q, k, v, bias, do, heads, scale)
  return dq, dk, dv, jnp.zeros_like(bias)  # the mask takes no gradient


_attention.defvjp(_attention_fwd, _attention_bwd)


def _local(q, k, v, bias):
  """attention on one device's arrays: [b, T, h, D] x2 + [b, 1, S] float32 key bias."""
  b, t, heads, d = q.shape
  flat = lambda x: x.reshape(x.shape[0], x.shape[1], heads * d)
  out = _attention(flat(q), flat(k), flat(v), bias, heads, float(1.0 / np.sqrt(d)))
  return out.reshape(b, t, heads, d)


def attention(q, k, v, mask=None):
  """softmax(q k^T / sqrt(D) over unmasked keys) v, float32 inside the kernel.

  q: [B, T, H, D]; k, v: [B, S, H, D] (same dtype); mask: a key mask, bool
  broadcastable to [B, 1, 1, S] (padded text, padded image tokens), or None.
  Returns [B, T, H, D] in q's dtype. Under a mesh (`jax.set_mesh`) the kernel runs per
  device on its shard, batch and heads split as the logical rules split 'act_batch' and
  'act_heads' (a Pallas call is opaque to XLA's partitioner, which would gather it whole).
  """
  b, t, heads, d = q.shape
  s = k.shape[1]
  if mask is None:
    bias = jnp.zeros((b, 1, s), jnp.float32)
  else:
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
      raise ValueError(f"attention_impl='pallas' takes key masks [B, 1, 1, S]; got "
                       f'{mask.shape}')
    keep = jnp.broadcast_to(mask, (b, 1, 1, s))[:, 0]
    bias = jnp.where(keep, 0.0, _MASKED).astype(jnp.float32)
  if jax.sharding.get_abstract_mesh().empty:
    return _local(q, k, v, bias)
  spec = nn.logical_to_mesh_axes(('act_batch', None, 'act_heads', None))
  # check_vma off: a pallas_call's out_shape carries no varying-axes type.
  return jax.shard_map(_local, in_specs=(spec, spec, spec, P(spec[0], None, None)),
                       out_specs=spec, check_vma=False)(q, k, v, bias)
