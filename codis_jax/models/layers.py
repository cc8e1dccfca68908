"""Shared transformer pieces with logical axis annotations.

Every weight is created through `nn.with_logical_partitioning`, and the main activations
pass through `nn.with_logical_constraint`, so a rules table (see `codis_jax.sharding`) maps
them to mesh axes. Without rules in scope both are no-ops: single-device code is unchanged.

Logical names. Weights: 'embed' (a model width), 'mlp', 'heads', 'kv' (head dim),
'vocab', 'proj' (the 256-d joint space), 'codebook' (K). Activations: 'act_batch',
'act_len', 'act_embed', 'act_mlp', 'act_heads', 'act_kv', 'act_vocab'.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codis_jax.models import activations
from codis_jax.models import norm
from codis_jax.models import param_ops
from codis_jax.models import tpu_attention

Dtype = Any


def logical_init(init, axes):
  return nn.with_logical_partitioning(init, axes)


def constrain(x, axes):
  return nn.with_logical_constraint(x, axes)


QKV_AXES = ('act_batch', 'act_len', 'act_heads', 'act_kv')  # attention's [B, T, H, D]


class Dense(nn.Module):
  """y = x . kernel + bias over the trailing `len(in_axes)` dims of x.

  kernel: in_dims + features, named `in_axes + out_axes`; bias: features, named
  `out_axes`. (flax's DenseGeneral builds its kernel flat and reshapes it, which clashes
  with logical constraints on the multi-dim kernel, hence this small module.) Params are
  float32; the matmul runs in `dtype`, and the kernel's gradient leaves it in `grad_dtype`
  (None: `dtype`; see `param_ops.dot_param`). `flat`: multiply as one 2-D matmul over the
  flattened dims, same params and values (see `Attention`).
  """
  features: tuple[int, ...]
  in_axes: tuple[str | None, ...]
  out_axes: tuple[str | None, ...]
  dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.normal(0.02)
  flat: bool = False
  grad_dtype: Dtype | None = None

  @nn.compact
  def weights(self, in_dims):
    """(kernel, bias) as float32 parameters, created on first use."""
    kernel = self.param('kernel', logical_init(self.kernel_init, self.in_axes + self.out_axes),
                        in_dims + self.features, jnp.float32)
    bias = self.param('bias', logical_init(nn.initializers.zeros, self.out_axes),
                      self.features, jnp.float32)
    return kernel, bias

  def __call__(self, x):
    n_in = len(self.in_axes)
    in_dims = x.shape[x.ndim - n_in:]
    kernel, bias = (w.astype(self.dtype) for w in self.weights(in_dims))
    x = x.astype(self.dtype)
    if self.flat:
      lead = x.shape[:x.ndim - n_in]
      y = param_ops.dot_param(x.reshape(lead + (-1,)), kernel.reshape(np.prod(in_dims), -1),
                              1, self.grad_dtype)
      return param_ops.add_param(y, bias.reshape(-1)).reshape(lead + self.features)
    y = param_ops.dot_param(x, kernel, n_in, self.grad_dtype)
    return param_ops.add_param(y, bias)


def dense(features, in_axis, out_axes, *, dtype, init, name, axis=-1, flat=False,
          grad_dtype=None):
  """A Dense whose kernel and bias carry logical axis names.

  `in_axis` names the contracted input dim(s) (a tuple when `axis` is a tuple);
  `out_axes` names the output feature dims (one name per entry of `features`).
  """
  in_axes = in_axis if isinstance(in_axis, tuple) else (in_axis,)
  n_in = len(axis) if isinstance(axis, tuple) else 1
  if len(in_axes) != n_in:
    raise ValueError(f'dense {name}: {len(in_axes)} input axis names for {n_in} dims')
  features = features if isinstance(features, tuple) else (features,)
  return Dense(features, in_axes, tuple(out_axes), dtype, init, flat, grad_dtype, name=name)


def layer_norm(eps, dtype, name):
  return norm.LayerNorm(eps, dtype, name=name)


def padding_to(n: int, multiple: int) -> int:
  """How many tokens pad n up to a multiple of `multiple` (0 when multiple <= 1)."""
  return -n % multiple if multiple > 1 else 0


def padding_mask(text_mask):
  """[B, L] 1/0 key mask -> boolean [B, 1, 1, L] for dot_product_attention."""
  return (text_mask > 0)[:, None, None, :]


def attention(q, k, v, mask, implementation, kv_length=None, kv_index=None):
  """softmax(q k^T / sqrt(D), masked) v through `jax.nn.dot_product_attention`.

  q: [B, T, H, D]; k, v: [B, S, H, D], or [N, S, H, D] with kv_index int [G, B/G]: query
  row b attends to row b of `take_rows(k, kv_index)`, or with kv_index a tuple of slots
  (`slot_attention`); mask: bool broadcastable to [B, H, T, S], or None; kv_length: only
  the first kv_length keys count (static; None = all).
  Returns [B, T, H, D]. cuDNN goes through `even_length_attention` (a no-op padding at
  even lengths), so that it has one way of masking; 'pallas' is the TPU kernel of
  `tpu_attention`, which reads indexed keys and values in place instead of gathering them.
  """
  if isinstance(kv_index, tuple):
    # Slots join queries along T, which a per-row mask would not survive: with one (or
    # for 'pallas', which reads rows in place) they become a per-row index.
    if mask is None and implementation != 'pallas':
      return slot_attention(q, k, v, kv_index, functools.partial(
          attention, mask=None, implementation=implementation, kv_length=kv_length))
    kv_index = flat_index(kv_index)
  if kv_index is not None and not (implementation == 'pallas'
                                   and tpu_attention.reads_in_place(kv_index)):
    # Gathered per query row, and sharded as the query rows are.
    k, v = (constrain(take_rows(x, kv_index), QKV_AXES) for x in (k, v))
    kv_index = None
  if kv_length is not None and (mask is not None or implementation != 'cudnn'):
    # A [1, 1, 1, S] mask: nothing per batch or head to store. (cuDNN without a mask
    # takes kv_length as sequence lengths instead, in even_length_attention.)
    valid = (jnp.arange(k.shape[1]) < kv_length)[None, None, None]
    mask, kv_length = (valid if mask is None else mask & valid), None
  if implementation == 'cudnn':
    return even_length_attention(q, k, v, mask, implementation, kv_length)
  if implementation == 'pallas':
    return tpu_attention.attention(q, k, v, mask, kv_index)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def even_length_attention(q, k, v, mask, implementation, kv_length=None):
  """`attention` with T and S padded to even lengths; same shapes and values.
  kv_length (only without a mask): the keys after it are padding, as sequence lengths.

  JAX's cuDNN kernel has no backward at odd lengths, and the paper's 257 image tokens and
  25 text tokens are odd. The padded keys are masked out and the padded query row is
  dropped, so the result is exact. Without a mask the padding goes in as sequence lengths,
  which cuDNN applies without materialising a [B, 1, T, S] bias (nor its gradient).
  """
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  pad_len = lambda x, n: jnp.pad(x, ((0, 0), (0, n % 2), (0, 0), (0, 0)))
  q, k, v = pad_len(q, t), pad_len(k, s), pad_len(v, s)
  if mask is None:
    lengths = lambda n: jnp.full((b,), n, jnp.int32)
    out = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths(t),
                                       key_value_seq_lengths=lengths(kv_length or s),
                                       implementation=implementation)
  else:
    # cuDNN takes the mask as a bias and needs every dim spelled out. The padded query row
    # sees every key (a fully masked row would be degenerate); the padded key is masked.
    mask = jnp.broadcast_to(mask, (b, 1, t, s))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, s % 2)), constant_values=False)
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, t % 2), (0, 0)), constant_values=True)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
  return out[:, :t]


def take_rows(x, index):
  """Rows of x picked per group: x [N, ...], index int [G, R/G] -> [R, ...].

  x splits into G groups of N/G consecutive rows; output row g*(R/G) + j is
  x[g*(N/G) + index[g, j]] (entries are row numbers within the group). One gather per
  group (a batched gather), so a batch-sharded x whose groups align with its shards stays
  on its devices; G = 1 is a plain x[index[0]].
  """
  g = index.shape[0]
  if x.shape[0] % g:
    raise ValueError(f'take_rows: {x.shape[0]} rows do not split into {g} groups')
  xg = x.reshape((g, x.shape[0] // g) + x.shape[1:])
  idx = index.reshape(index.shape + (1,) * (x.ndim - 1))
  return jnp.take_along_axis(xg, idx, axis=1).reshape((-1,) + x.shape[1:])


def flat_index(slots):
  """A tuple of slots (`slot_attention`) -> the same rows as a `take_rows` index int
  [G, k*B/G]."""
  given = [s for s in slots if s is not None]
  if not given:
    raise ValueError('flat_index: every slot is None; the rows are the kv rows themselves')
  g, per = given[0].shape
  own = jnp.broadcast_to(jnp.arange(per, dtype=given[0].dtype), (g, per))
  return jnp.stack([own if s is None else s for s in slots], -1).reshape(g, -1)


def slot_attention(q, k, v, slots, attend):
  """Attention of query rows that come k per example, interleaved, over one key/value row
  per example. q: [k*B, T, H, D] (row b*k + j is slot j of example b); k, v: [B, S, H, D];
  slots: k entries, None where slot j reads its own example's row b, else an int
  [G, B/G] `take_rows` index of the row it reads; attend(q, k, v) -> q's shape, the
  attention with one key/value row per query row. Returns [k*B, T, H, D].

  The own slots' queries are joined along T ([B, n*T, H, D]: a query's softmax runs over
  keys alone, so rows that read the same keys can share a call), and each other slot
  gathers B rows. Gathering k*B rows instead wrote k copies of every image's keys and
  values per layer (the paper step's fusion: 256 x 258 x 768 each) and scatter-added
  their gradients back.
  """
  n, b = len(slots), k.shape[0]
  if q.shape[0] != n * b:
    raise ValueError(f'slot_attention: {q.shape[0]} query rows are not {n} slots x {b} '
                     'key/value rows')
  qs = q.reshape((b, n) + q.shape[1:])
  t = q.shape[1]
  outs = [None] * n
  own = [j for j, s in enumerate(slots) if s is None]
  others = [(j, s) for j, s in enumerate(slots) if s is not None]
  # The other slots' key/value gradients go into the own slots' in place (a scatter-add):
  # autodiff scattered them into zeros and added the two (H100 roofline: -0.2 ms).
  (k, k_rows), (v, v_rows) = (_self_and_rows(x, tuple(s for _, s in others)) for x in (k, v))
  if own:
    q_own = constrain(qs[:, own].reshape((b, len(own) * t) + q.shape[2:]), QKV_AXES)
    o = attend(q_own, k, v).reshape((b, len(own), t) + q.shape[2:])
    for i, j in enumerate(own):
      outs[j] = o[:, i]
  for (j, _), kj, vj in zip(others, k_rows, v_rows):
    outs[j] = attend(qs[:, j], constrain(kj, QKV_AXES), constrain(vj, QKV_AXES))
  return jnp.stack(outs, 1).reshape(q.shape)


@jax.custom_vjp
def _self_and_rows(x, indices):
  """(x, tuple of `take_rows(x, index)` per index); the gradient adds each rows' cotangent
  into x's own in place (a scatter-add per index), not into zeros (x's own cotangent is
  zeros only where x itself is unused)."""
  return x, tuple(take_rows(x, i) for i in indices)


def _self_and_rows_fwd(x, indices):
  return _self_and_rows(x, indices), indices


def _self_and_rows_bwd(indices, cts):
  ct, ct_rows = cts
  for index, ct_r in zip(indices, ct_rows):
    g = index.shape[0]
    ctg = ct.reshape((g, ct.shape[0] // g) + ct.shape[1:])
    ct = ctg.at[jnp.arange(g)[:, None], index].add(
        ct_r.reshape(index.shape + ct.shape[1:])).reshape(ct.shape)
  return ct, None


_self_and_rows.defvjp(_self_and_rows_fwd, _self_and_rows_bwd)


def fused_projection(x, denses):
  """Dense layers [C] -> [H, D] of one input: x [B, T, C] -> a tuple of [B, T, H, D], one
  per Dense, with each Dense's own parameters (so checkpoints and the PyTorch layout do
  not change), through `param_ops.dense_group`: n matmuls forward, but one input-gradient
  matmul, one weight-gradient matmul and one bias reduction backward, where autodiff of
  separate projections ran n of each and added the input gradients (H200 roofline of the
  paper step: 3,280 -> 2,909 launches, 37.56 -> 36.52 ms with cuDNN attention and both
  paddings).
  """
  ws = [d.weights(x.shape[-1:]) for d in denses]
  dtype = denses[0].dtype
  return param_ops.dense_group(x.astype(dtype), [w.astype(dtype) for w, _ in ws],
                               [b.astype(dtype) for _, b in ws], denses[0].grad_dtype)


class Attention(nn.Module):
  """Multi-head attention (self when `kv` is `q`, cross otherwise).

  q_in: [B, T, Dq]; kv_in: [B, S, Dkv], or [N, S, Dkv] with `kv_index` int [G, B/G], where
  query row b attends to row b of `take_rows(kv_in, kv_index)`, or a tuple of slots
  (`slot_attention`); mask: bool broadcastable to [B, H, T, S]; kv_length: only the first
  kv_length keys count (static; None = all). Returns [B, T, Dq]. With `kv_index` the keys
  and values are projected once per kv_in row and then gathered, joined per slot (or read
  in place by 'pallas'), so query rows that share an image share that work. With 'cudnn'
  the projections of one input share one backward (`fused_projection`: q, k and v when
  `kv_in is q_in`, else k and v). Softmax runs in float32 inside the attention kernels.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.normal(0.02)
  implementation: str | None = None
  grad_dtype: Dtype | None = None  # the kernels' gradients (Dense.grad_dtype)

  @nn.compact
  def __call__(self, q_in, kv_in, mask=None, kv_index=None, kv_length=None):
    width = q_in.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads {self.num_heads}')
    head = (self.num_heads, width // self.num_heads)
    # The Pallas kernel reads [B, T, H * D] row-major. Projected as [B, T, H, D], XLA:TPU
    # lays the result out as [B, H, D, T] and copies it to row-major before every kernel
    # call (and back after the backward); as a 2-D matmul with the bias added before the
    # reshape it writes row-major directly.
    flat = self.implementation == 'pallas'
    proj = functools.partial(dense, head, 'embed', ('heads', 'kv'), dtype=self.dtype,
                             init=self.kernel_init, flat=flat, grad_dtype=self.grad_dtype)
    if self.implementation != 'cudnn':
      # 'pallas' keeps its 2-D projections (above). With XLA's attention fusing did not
      # pay: the same H200 roofline (54.63 -> 54.57 ms), and 10% more HBM traffic on a
      # v6e (127.0 -> 140.1 GB), its batched matmuls reading the split q, k, v at a
      # costlier layout.
      q, k, v = (proj(name=n)(x) for n, x in (('query', q_in), ('key', kv_in),
                                              ('value', kv_in)))
    elif kv_in is q_in:
      q, k, v = fused_projection(q_in, [proj(name=n) for n in ('query', 'key', 'value')])
    else:
      q = proj(name='query')(q_in)
      k, v = fused_projection(kv_in, [proj(name=n) for n in ('key', 'value')])
    q, k, v = (constrain(t, QKV_AXES) for t in (q, k, v))
    out = attention(q, k, v, mask, self.implementation or None, kv_length, kv_index)
    out = dense(width, ('heads', 'kv'), ('embed',), dtype=self.dtype, init=self.kernel_init,
                name='out', axis=(-2, -1), flat=flat, grad_dtype=self.grad_dtype)(out)
    return constrain(out, ('act_batch', 'act_len', 'act_embed'))


class Mlp(nn.Module):
  """Two-layer GELU MLP: [B, T, D] -> [B, T, D]."""
  hidden: int
  dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.normal(0.02)
  grad_dtype: Dtype | None = None  # the kernels' gradients (Dense.grad_dtype)
  gelu: str = 'erf'  # activations.activation

  @nn.compact
  def __call__(self, x):
    h = dense(self.hidden, 'embed', ('mlp',), dtype=self.dtype, init=self.kernel_init,
              name='fc1', grad_dtype=self.grad_dtype)(x)
    h = constrain(activations.activation(self.gelu)(h), ('act_batch', 'act_len', 'act_mlp'))
    return dense(x.shape[-1], 'mlp', ('embed',), dtype=self.dtype, init=self.kernel_init,
                 name='fc2', grad_dtype=self.grad_dtype)(h)


def remat_policy(name: str):
  """Config name -> (use remat, checkpoint policy)."""
  policies = {
      'none': (False, None),
      'full': (True, None),  # save nothing inside a layer
      # The Dense matmuls sit inside `param_ops.dot_param`'s custom VJP, where this policy
      # cannot see them: their outputs are saved by name.
      'dots': (True, jax.checkpoint_policies.save_from_both_policies(
          jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
          jax.checkpoint_policies.save_only_these_names(param_ops.DOT_NAME))),
  }
  if name not in policies:
    raise ValueError(f'config.model.remat={name!r}: choose from {sorted(policies)}')
  return policies[name]


def maybe_remat(cls, name: str):
  use, policy = remat_policy(name)
  return nn.remat(cls, policy=policy) if use else cls
