"""How parameters enter compute, with their gradients summed in float32.

Under bf16 compute a parameter's gradient is a sum over the batch, and autodiff forms it in
bf16 in three places:
- `x + p.astype(bf16)`: a bf16 `reduce_sum` (a running bf16 sum of B*T terms, 16,448 per
  ViT bias at the paper's batch, stops growing once it is 256 times its addends);
- a gather of table rows: a bf16 `scatter-add`;
- a bf16 matmul `x . w`: the weight-gradient matmul sums in float32 inside but writes bf16,
  and XLA reduces a data-parallel gradient across devices where that matmul leaves it (an
  all-reduce or reduce-scatter), so the cross-device sum is bf16.
Here each sum runs in float32 (for a matmul: in `grad_dtype`, float32 unless the config asks
for bf16) and is rounded once to the parameter's compute dtype, as one device's bf16 matmul
rounds its weight gradient. Forward values are unchanged. The parameter comes in already in
the compute dtype (cast by the caller, or read from the weight copy), so the step computes
the same with and without `model.weight_copy`.
"""

import functools

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

# The name `dot_param`'s outputs carry for remat policies: a custom VJP hides its matmul
# from `dots_with_no_batch_dims_saveable`, so `layers.remat_policy('dots')` saves this name.
DOT_NAME = 'param_dot'


@jax.custom_vjp
def add_param(x, p):
  """x [*lead, *P] + p [*P] (same dtype) -> [*lead, *P]; p's gradient sums `lead` in
  float32."""
  if x.shape[x.ndim - p.ndim:] != p.shape or x.dtype != p.dtype:
    raise ValueError(f'add_param: {p.dtype}{list(p.shape)} is not the trailing shape and '
                     f'dtype of {x.dtype}{list(x.shape)}')
  return x + p


def _add_param_fwd(x, p):
  return add_param(x, p), jnp.zeros((0,) + p.shape, p.dtype)  # p's type, no bytes


def _add_param_bwd(like, g):
  return g, sum_to_param(g, like.ndim - 1, like.dtype)


def sum_to_param(g, ndim, dtype):
  """g [*lead, *P] (P: the last ndim dims) -> [*P], summed over lead in float32 and
  rounded once to dtype."""
  return jnp.sum(g, tuple(range(g.ndim - ndim)), dtype=jnp.float32).astype(dtype)


add_param.defvjp(_add_param_fwd, _add_param_bwd)


@jax.custom_vjp
def take_param(table, ids):
  """Rows of table [V, *E] at ids int [*I] -> [*I, *E]; the table's gradient is
  scatter-added in float32 (a frequent token's row sums thousands of cotangents)."""
  return jnp.take(table, ids, axis=0)


def _take_param_fwd(table, ids):
  return take_param(table, ids), (jnp.zeros((0,) + table.shape, table.dtype), ids)


def _take_param_bwd(residuals, g):
  like, ids = residuals
  rows = jnp.zeros(like.shape[1:], jnp.float32).at[ids].add(g.astype(jnp.float32))
  return rows.astype(like.dtype), None


take_param.defvjp(_take_param_fwd, _take_param_bwd)


def dot_param(x, w, n_in: int, grad_dtype=None):
  """x [*L, *K] . w [*K, *F] -> [*L, *F]: K is the last n_in dims of x and the first n_in of
  w; x and w share a dtype, the result's. w's gradient leaves its matmul in `grad_dtype`
  (None: w's dtype, as autodiff) and is rounded to w's dtype after that: with float32, XLA's
  data-parallel sum of it across devices (placed where the matmul leaves it) runs in
  float32, as PyTorch's DDP sums autocast's float32 gradients. x's gradient is autodiff's.
  """
  if x.dtype != w.dtype or x.shape[x.ndim - n_in:] != w.shape[:n_in]:
    raise ValueError(f'dot_param: cannot contract the last {n_in} dims of '
                     f'{x.dtype}{list(x.shape)} with the first of {w.dtype}{list(w.shape)}')
  grad_dtype = jnp.dtype(w.dtype if grad_dtype is None else grad_dtype)
  return checkpoint_name(_dot_param(x, w, n_in, grad_dtype), DOT_NAME)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dot_param(x, w, n_in, grad_dtype):
  del grad_dtype
  return jax.lax.dot_general(x, w, _contract_k(x.ndim, n_in))


def _contract_k(x_ndim, n_in):
  """dot_general dims contracting x's last n_in dims with w's first n_in."""
  return (tuple(range(x_ndim - n_in, x_ndim)), tuple(range(n_in))), ((), ())


def _residuals(a, b):
  """(a's value where b's gradient needs it, b's where a's does): None for a gradient
  nobody asks for (symbolic zeros), so neither its matmul nor its residual exists."""
  return (a.value if b.perturbed else None), (b.value if a.perturbed else None)


def _dot_param_fwd(x, w, n_in, grad_dtype):
  return _dot_param(x.value, w.value, n_in, grad_dtype), _residuals(x, w)


def _dot_param_bwd(n_in, grad_dtype, residuals, g):
  x, w = residuals  # x: for w's gradient; w: for x's
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    return None, None
  lead = x.ndim - n_in if x is not None else g.ndim - (w.ndim - n_in)  # L's rank
  # dx [*L, *K] = g [*L, *F] . w [*K, *F] over F; dw [*K, *F] = x [*L, *K] . g over L.
  dx = None if w is None else jax.lax.dot_general(
      g, w, ((tuple(range(lead, g.ndim)), tuple(range(n_in, w.ndim))), ((), ())))
  dw = None if x is None else jax.lax.dot_general(
      x, g, ((tuple(range(lead)), tuple(range(lead))), ((), ())),
      preferred_element_type=grad_dtype).astype(x.dtype)
  return dx, dw


_dot_param.defvjp(_dot_param_fwd, _dot_param_bwd, symbolic_zeros=True)


def patch_conv(images, kernel, grad_dtype=None):
  """images [B, H, W, C] * kernel [p, p, C, D] (same dtype) -> [B, H/p, W/p, D]: the
  stride-p convolution of a ViT's patch embedding, with the kernel's gradient as
  `dot_param`'s. The forward stays a convolution: written as a matmul over
  [B, H/p, W/p, p, p, C] patches, XLA:GPU laid out the whole vision stream differently
  (H200 roofline of the `gpu` variant 39.07 against 36.36 ms); only the backward's kernel
  gradient is that matmul."""
  p = kernel.shape[0]
  if (images.dtype != kernel.dtype or images.shape[-1] != kernel.shape[2]
      or kernel.shape[1] != p or images.shape[1] % p or images.shape[2] % p):
    raise ValueError(f'patch_conv: {images.dtype}{list(images.shape)} does not match the '
                     f'kernel {kernel.dtype}{list(kernel.shape)}')
  grad_dtype = jnp.dtype(kernel.dtype if grad_dtype is None else grad_dtype)
  return _patch_conv(images, kernel, grad_dtype)


def _conv(images, kernel):
  p = kernel.shape[0]
  return jax.lax.conv_general_dilated(images, kernel, (p, p), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _patch_conv(images, kernel, grad_dtype):
  del grad_dtype
  return _conv(images, kernel)


def _patch_conv_fwd(images, kernel, grad_dtype):
  return _patch_conv(images.value, kernel.value, grad_dtype), _residuals(images, kernel)


def _patch_conv_bwd(grad_dtype, residuals, g):
  images, kernel = residuals  # images: for the kernel's gradient; kernel: for theirs
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    return None, None
  d_images = d_kernel = None
  if kernel is not None:  # the images' gradient: the convolution's transpose
    p = kernel.shape[0]
    shape = (g.shape[0], g.shape[1] * p, g.shape[2] * p, kernel.shape[2])
    (d_images,) = jax.linear_transpose(lambda x: _conv(x, kernel),
                                       jax.ShapeDtypeStruct(shape, g.dtype))(g)
  if images is not None:
    b, h, w, c = images.shape
    p = h // g.shape[1]
    patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    d_kernel = jax.lax.dot_general(patches, g, (((0, 1, 2), (0, 1, 2)), ((), ())),
                                   preferred_element_type=grad_dtype).astype(images.dtype)
  return d_images, d_kernel


_patch_conv.defvjp(_patch_conv_fwd, _patch_conv_bwd, symbolic_zeros=True)


def dense_group(x, kernels, biases, grad_dtype=None):
  """n Dense layers of one input: x [*L, C], kernels n x [C, *F], biases n x [*F] (all in
  x's dtype) -> n arrays [*L, *F], x . kernel_i + bias_i (self-attention's q, k and v;
  cross-attention's k and v).

  Forward: n matmuls of [prod L, C] x [C, prod F], each adding its bias in cuBLAS's
  epilogue and writing its own buffer. Each matmul's operands pass an optimization
  barrier of their own: XLA's DotMerger would otherwise merge matmuls that share x into
  one, whose result a separate kernel splits and adds the biases to (155.7 MB per ViT
  layer at batch 64). Backward: the n cotangents stacked once, then one input-gradient
  matmul, one weight-gradient matmul (leaving it in `grad_dtype`, as `dot_param`) and one
  float32 bias reduction (as `add_param`). Outputs are named `DOT_NAME` for remat.
  """
  kernels, biases = tuple(kernels), tuple(biases)
  shapes = {(k.shape[1:], k.dtype) for k in kernels} | {(b.shape, b.dtype) for b in biases}
  if (len(kernels) != len(biases) or len(shapes) != 1 or kernels[0].dtype != x.dtype
      or any(k.shape[0] != x.shape[-1] for k in kernels)):
    raise ValueError(f'dense_group: {x.dtype}{list(x.shape)} with kernels '
                     f'{[f"{k.dtype}{list(k.shape)}" for k in kernels]} and biases '
                     f'{[f"{b.dtype}{list(b.shape)}" for b in biases]}')
  grad_dtype = jnp.dtype(x.dtype if grad_dtype is None else grad_dtype)
  return tuple(checkpoint_name(y, DOT_NAME)
               for y in _dense_group(x, kernels, biases, grad_dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dense_group(x, kernels, biases, grad_dtype):
  del grad_dtype
  outs = []
  for kernel, bias in zip(kernels, biases):
    xi, kernel = jax.lax.optimization_barrier((x, kernel)) if len(kernels) > 1 else (x, kernel)
    c, features = kernel.shape[0], kernel.shape[1:]
    y = xi.reshape(-1, c) @ kernel.reshape(c, -1) + bias.reshape(-1)
    outs.append(y.reshape(x.shape[:-1] + features))
  return tuple(outs)


def _dense_group_fwd(x, kernels, biases, grad_dtype):
  outs = _dense_group(x.value, tuple(k.value for k in kernels),
                      tuple(b.value for b in biases), grad_dtype)
  want_w = any(k.perturbed for k in kernels)
  bias = biases[0].value
  return outs, (x.value if want_w else None,  # for the kernels' gradients
                tuple(k.value for k in kernels) if x.perturbed else None,  # for x's
                jnp.zeros((0,) + outs[0].shape, bias.dtype),  # shapes only, no bytes
                jnp.zeros((0,) + bias.shape, bias.dtype))


def _dense_group_bwd(grad_dtype, residuals, gs):
  x, kernels, out_like, bias_like = residuals
  zero = jax.custom_derivatives.SymbolicZero
  n = len(gs)
  if all(isinstance(g, zero) for g in gs):
    return None, (None,) * n, (None,) * n
  out_shape, n_features = out_like.shape[1:], bias_like.ndim - 1
  axis = len(out_shape) - n_features  # dy: [*L, n, *F]
  dy = jnp.stack([jnp.zeros(out_shape, out_like.dtype) if isinstance(g, zero) else g
                  for g in gs], axis)
  lead, grouped = tuple(range(axis)), tuple(range(axis, dy.ndim))
  dx = None if kernels is None else jax.lax.dot_general(  # [*L, C]
      dy, jnp.stack(kernels, 1), ((grouped, tuple(range(1, 2 + n_features))), ((), ())))
  dws = (None,) * n
  if x is not None:
    dw = jax.lax.dot_general(x, dy, ((lead, lead), ((), ())),  # [C, n, *F]
                             preferred_element_type=grad_dtype).astype(x.dtype)
    dws = tuple(dw[:, i] for i in range(n))
  db = sum_to_param(dy, n_features + 1, out_like.dtype)  # [n, *F]
  return dx, dws, tuple(db[i] for i in range(n))


_dense_group.defvjp(_dense_group_fwd, _dense_group_bwd, symbolic_zeros=True)
