"""LayerNorm whose forward XLA:GPU runs as one kernel and whose backward reads x once.

flax's LayerNorm computes the variance in one pass, E[x^2] - E[x]^2: XLA:GPU ran that as a
statistics reduction, an rsqrt kernel and a normalisation kernel (x read twice, three
launches). With two-pass statistics (the mean, then the mean of the squared deviations)
XLA:GPU's Triton normalisation fusion runs the whole forward as one kernel: x read once, y
written once. Autodiff of the two-pass form gave a costlier backward, so the backward is
written out: it recomputes the statistics from x in one pass, as flax does (so it shares
flax's cancellation when a row's mean dwarfs its spread; the forward does not), and all its
row sums (of x, x^2, the cotangent and its product with x) are independent, so XLA computes
them in one reduction kernel over x and the cotangent. Only x is saved. Measured on
compile-only rooflines in docs/performance.md.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x, scale, bias, eps, dtype):
  """x: [..., C] (any float dtype); scale, bias: [C] float32 -> [..., C] in `dtype`.

  Statistics in float32 over the last axis; the gradient is the exact LayerNorm gradient,
  computed as the module docstring says."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, -1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
  return ((xf - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias).astype(dtype)


def _layer_norm_fwd(x, scale, bias, eps, dtype):
  return layer_norm(x, scale, bias, eps, dtype), (x, scale)


def _layer_norm_bwd(eps, dtype, res, g):
  x, scale = res
  # Behind the barrier the row sums of x join those of g in one reduction kernel;
  # without it XLA computes them in the forward, one more pass over x.
  x, g = jax.lax.optimization_barrier((x, g))
  # One-pass statistics, E[x^2] - E[x]^2 as flax's default computes them: two-pass ones
  # would be a second reduction over x, waiting on the first.
  xf, gf = x.astype(jnp.float32), g.astype(jnp.float32)
  gs = gf * scale
  n = x.shape[-1]
  mean = jnp.sum(xf, -1, keepdims=True) / n
  var = jnp.maximum(0.0, jnp.sum(jnp.square(xf), -1, keepdims=True) / n - jnp.square(mean))
  r = jax.lax.rsqrt(var + eps)
  gs_mean = jnp.sum(gs, -1, keepdims=True) / n
  # mean(gs * xhat) from raw sums, so that no reduction waits for another
  gs_xhat_mean = r * (jnp.sum(gs * xf, -1, keepdims=True) / n - mean * gs_mean)
  xhat = (xf - mean) * r
  dx = r * (gs - gs_mean - xhat * gs_xhat_mean)
  axes = tuple(range(x.ndim - 1))
  return dx.astype(x.dtype), jnp.sum(gf * xhat, axes), jnp.sum(gf, axes)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """`layer_norm` with flax's parameter names ('scale', 'bias'; float32, [C]) and their
  logical axis ('embed'), so checkpoints and the PyTorch export are unchanged."""
  eps: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                       (c,), jnp.float32)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
                      (c,), jnp.float32)
    return layer_norm(x, scale, bias, self.eps, self.dtype)
