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

Cross-attention with `kv_index` (the fusion encoder's rows sharing their image's keys and
values) reads each row's keys and values in place, by index (scalar prefetch), instead of
from a per-row gathered copy. The rows run sorted by their key row, so each image's keys
and values are fetched once per head group, and their gradients are summed in VMEM and
written once per image.

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


def _head_grads(q, k, v, bias, do, scale):
  """One head's (dq, dk, dv), float32: q, do [T, D]; k, v [S, D]; bias [1, S]."""
  nt = lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)  # a b^T
  tn = lambda a, b: jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)  # a^T b
  p = _probs(q, k, bias, scale)                                         # [T, S]
  dp = nt(do, v)                                                        # [T, S]
  ds = p * (dp - jnp.sum(p * dp, axis=1, keepdims=True))                # softmax VJP
  dq = jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32) * scale
  return dq, tn(ds.astype(q.dtype), q) * scale, tn(p.astype(do.dtype), do)


def _bwd_kernel(q_ref, k_ref, v_ref, bias_ref, do_ref, dq_ref, dk_ref, dv_ref, *, heads,
                d, scale):
  for h in range(heads):
    cols = slice(h * d, (h + 1) * d)
    q, k, v, do = (r[0, :, cols] for r in (q_ref, k_ref, v_ref, do_ref))
    for ref, g in zip((dq_ref, dk_ref, dv_ref), _head_grads(q, k, v, bias_ref[0], do, scale)):
      ref[0, :, cols] = g.astype(ref.dtype)


def _indexed_fwd_kernel(order_ref, kv_ref, *refs, **kw):
  del order_ref, kv_ref  # used by the BlockSpecs only
  _fwd_kernel(*refs, **kw)


def _indexed_bwd_kernel(order_ref, kv_ref, q_ref, k_ref, v_ref, bias_ref, do_ref, dk0, dv0,
                        dq_ref, dk_ref, dv_ref, dk_acc, dv_acc, *, heads, d, scale):
  """Rows arrive sorted by key row: dk, dv sum over a key row's run of query rows in
  float32 scratch, and the output block (written back when its key row changes) holds it."""
  del order_ref, dk0, dv0  # dk0, dv0: the zeros behind key rows no query row uses
  r = pl.program_id(1)

  @pl.when((r == 0) | (kv_ref[jnp.maximum(r - 1, 0)] != kv_ref[r]))
  def _():
    dk_acc[...] = jnp.zeros_like(dk_acc)
    dv_acc[...] = jnp.zeros_like(dv_acc)

  for h in range(heads):
    cols = slice(h * d, (h + 1) * d)
    q, k, v, do = (ref[0, :, cols] for ref in (q_ref, k_ref, v_ref, do_ref))
    dq, dk, dv = _head_grads(q, k, v, bias_ref[0], do, scale)
    dq_ref[0, :, cols] = dq.astype(dq_ref.dtype)
    dk_acc[:, cols] += dk
    dv_acc[:, cols] += dv
  dk_ref[0] = dk_acc[...].astype(dk_ref.dtype)
  dv_ref[0] = dv_acc[...].astype(dv_ref.dtype)


def _blocks(q, k, heads, indexed):
  """(head width, heads per step, grid, q / kv / bias BlockSpecs) for q [R, T, H * D] and
  k [N, S, H * D]. Plain: grid (example, head group). Indexed: grid (head group, sorted
  row), the index maps reading the scalar-prefetched (order [R], key row [R])."""
  (r, t, width), s = q.shape, k.shape[1]
  d = width // heads
  group = _group(heads, d)
  if not indexed:
    seq = lambda n: pl.BlockSpec((1, n, group * d), lambda i, j: (i, 0, j))
    bias = pl.BlockSpec((1, 1, s), lambda i, j: (i, 0, 0))
    return d, group, (r, heads // group), seq(t), seq(s), bias
  q_spec = pl.BlockSpec((1, t, group * d), lambda j, i, order, kv: (order[i], 0, j))
  kv_spec = pl.BlockSpec((1, s, group * d), lambda j, i, order, kv: (kv[i], 0, j))
  bias = pl.BlockSpec((1, 1, s), lambda j, i, order, kv: (order[i], 0, 0))
  return d, group, (heads // group, r), q_spec, kv_spec, bias


def _nbytes(*xs):
  return sum(x.size * x.dtype.itemsize for x in xs)


def _params(*semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _forward(q, k, v, bias, index, heads, scale):
  """index: None, or (order [R], key row [R]) with key row sorted."""
  d, group, grid, q_spec, kv_spec, bias_spec = _blocks(q, k, heads, index is not None)
  r, t, s = q.shape[0], q.shape[1], k.shape[1]
  specs = dict(grid=grid, in_specs=[q_spec, kv_spec, kv_spec, bias_spec], out_specs=q_spec)
  kernel, grid_spec = ((_fwd_kernel, pl.GridSpec(**specs)) if index is None else
                       (_indexed_fwd_kernel,
                        pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, **specs)))
  return pl.pallas_call(
      functools.partial(kernel, heads=group, d=d, scale=scale),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), grid_spec=grid_spec,
      compiler_params=_params('parallel', 'parallel'), name='codis_attention_fwd',
      cost_estimate=pl.CostEstimate(  # 2 matmuls
          flops=4 * r * heads * t * s * d, transcendentals=r * heads * t * s,
          bytes_accessed=_nbytes(q, k, v, bias, q)),
  )(*(index or ()), q, k, v, bias)


def _backward(q, k, v, bias, do, index, heads, scale):
  d, group, grid, q_spec, kv_spec, bias_spec = _blocks(q, k, heads, index is not None)
  r, t, s = q.shape[0], q.shape[1], k.shape[1]
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
  cost = pl.CostEstimate(  # the scores again, then 4 more matmuls
      flops=10 * r * heads * t * s * d, transcendentals=r * heads * t * s,
      bytes_accessed=2 * _nbytes(q, k, v) + _nbytes(do, bias))
  kw = dict(heads=group, d=d, scale=scale)
  in_specs = [q_spec, kv_spec, kv_spec, bias_spec, q_spec]
  out_specs = [q_spec, kv_spec, kv_spec]
  if index is None:
    return pl.pallas_call(
        functools.partial(_bwd_kernel, **kw), out_shape=out_shape, grid=grid,
        in_specs=in_specs, out_specs=out_specs, compiler_params=_params('parallel', 'parallel'),
        name='codis_attention_bwd', cost_estimate=cost)(q, k, v, bias, do)
  # Key rows that no query row reads are never visited: their gradient is the zeros the
  # outputs alias (operands 7 and 8, after the 2 prefetched index arrays).
  zeros = [jnp.zeros_like(k), jnp.zeros_like(v)]
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=grid, in_specs=in_specs + [any_spec, any_spec],
      out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((s, group * d), jnp.float32)] * 2)
  return pl.pallas_call(
      functools.partial(_indexed_bwd_kernel, **kw), out_shape=out_shape,
      grid_spec=grid_spec, input_output_aliases={7: 1, 8: 2},
      # The sorted-row axis accumulates, so it runs in order.
      compiler_params=_params('parallel', 'arbitrary'), name='codis_attention_bwd',
      cost_estimate=cost)(*index, q, k, v, bias, do, *zeros)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, bias, index, heads, scale):
  return _forward(q, k, v, bias, index, heads, scale)


def _attention_fwd(q, k, v, bias, index, heads, scale):
  return _forward(q, k, v, bias, index, heads, scale), (q, k, v, bias, index)


def _attention_bwd(heads, scale, residuals, do):
  q, k, v, bias, index = residuals
  dq, dk, dv = _backward(q, k, v, bias, do, index, heads, scale)
  # Neither the mask nor the integer index takes a gradient.
  return dq, dk, dv, jnp.zeros_like(bias), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _local(q, k, v, bias, kv_index=None):
  """attention on one device's arrays: q [r, T, h, D], k, v [n, S, h, D], a float32 key
  bias [r, 1, S] and kv_index int [g, r/g] (as `layers.take_rows`'s) or None (n = r)."""
  r, t, heads, d = q.shape
  flat = lambda x: x.reshape(x.shape[0], x.shape[1], heads * d)
  index = None
  if kv_index is not None:
    g = kv_index.shape[0]
    rows = (kv_index + jnp.arange(g)[:, None] * (k.shape[0] // g)).reshape(-1)
    order = jnp.argsort(rows, stable=True).astype(jnp.int32)
    index = (order, rows[order].astype(jnp.int32))
  out = _attention(flat(q), flat(k), flat(v), bias, index, heads, float(1.0 / np.sqrt(d)))
  return out.reshape(r, t, heads, d)


def _batch_shards() -> int:
  """How many devices the current mesh splits 'act_batch' over (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  axes = nn.logical_to_mesh_axes(('act_batch',))[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return int(np.prod([mesh.shape[a] for a in axes]))


def reads_in_place(kv_index) -> bool:
  """Whether `attention` can take kv_index int [G, R/G] here: its groups must not straddle
  devices (G a multiple of the batch shards). Otherwise gather with `layers.take_rows`."""
  return kv_index.shape[0] % _batch_shards() == 0


def attention(q, k, v, mask=None, kv_index=None):
  """softmax(q k^T / sqrt(D) over unmasked keys) v, float32 inside the kernel.

  q: [R, T, H, D]; k, v: [R, S, H, D] (same dtype), or [N, S, H, D] with kv_index int
  [G, R/G]: query row g*(R/G) + j attends to key row g*(N/G) + kv_index[g, j] (the rows of
  `layers.take_rows(k, kv_index)`, read in place); mask: a key mask, bool broadcastable to
  [R, 1, 1, S] (padded text, padded image tokens), or None.
  Returns [R, T, H, D] in q's dtype. Under a mesh (`jax.set_mesh`) the kernel runs per
  device on its shard, batch and heads split as the logical rules split 'act_batch' and
  'act_heads' (a Pallas call is opaque to XLA's partitioner, which would gather it whole).
  """
  r, t, heads, d = q.shape
  s = k.shape[1]
  if kv_index is not None and not reads_in_place(kv_index):
    raise ValueError(f'tpu_attention: kv_index has {kv_index.shape[0]} groups, not a '
                     f'multiple of the {_batch_shards()} batch shards; gather the keys and '
                     'values first (layers.take_rows)')
  if mask is None:
    bias = jnp.zeros((r, 1, s), jnp.float32)
  else:
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
      raise ValueError(f"attention_impl='pallas' takes key masks [B, 1, 1, S]; got "
                       f'{mask.shape}')
    keep = jnp.broadcast_to(mask, (r, 1, 1, s))[:, 0]
    bias = jnp.where(keep, 0.0, _MASKED).astype(jnp.float32)
  if jax.sharding.get_abstract_mesh().empty:
    return _local(q, k, v, bias, kv_index)
  spec = nn.logical_to_mesh_axes(('act_batch', None, 'act_heads', None))
  args, in_specs = (q, k, v, bias), (spec, spec, spec, P(spec[0], None, None))
  if kv_index is not None:
    args, in_specs = args + (kv_index,), in_specs + (P(spec[0], None),)
  # check_vma off: a pallas_call's out_shape carries no varying-axes type.
  return jax.shard_map(_local, in_specs=in_specs, out_specs=spec, check_vma=False)(*args)
