"""GELU in two forms, each with a backward that recomputes its derivative from the input:
the exact (erf) one ALBEF uses, and its tanh approximation, which XLA:GPU computes inside
the matmul before it (config.model.gelu). x [...] -> x's shape and dtype."""

import jax
import jax.numpy as jnp
import numpy as np


@jax.custom_vjp
def gelu(x):
  """Exact (erf) GELU, x * Phi(x), as timm's ViT and HF BERT use. Its derivative
  Phi(x) + x * phi(x) is recomputed from x in the backward pass, in float32: autodiff of
  jax.nn.gelu would keep two activation-sized residuals per MLP instead of x alone.
  Computed in float32 (erfc: accurate in the negative tail) and rounded once: `jax.nn.gelu`
  of bf16 scaled x by a bf16 1/sqrt(2) (relative errors up to 12% in the negative tail),
  and XLA:GPU wrote that product to memory in a kernel of its own in the text and fusion
  encoders."""
  xf = x.astype(jnp.float32)
  return (xf * 0.5 * jax.lax.erfc(xf * (-1.0 / np.sqrt(2.0)))).astype(x.dtype)


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, g):
  xf = x.astype(jnp.float32)
  cdf = 0.5 * (1.0 + jax.lax.erf(xf * (1.0 / np.sqrt(2.0))))
  pdf = jnp.exp(-0.5 * xf * xf) * (1.0 / np.sqrt(2.0 * np.pi))
  return ((g.astype(jnp.float32) * (cdf + xf * pdf)).astype(g.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)

_TANH_C = float(np.sqrt(2.0 / np.pi))


@jax.custom_vjp
def gelu_tanh(x):
  """GELU's tanh approximation, x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as Google's
  BERT, GPT-2 and flax's `nn.gelu` compute it; within 4.8e-4 of the erf GELU everywhere
  (bf16 rounds values near 1 in steps of 7.8e-3).
  Written as `jax.nn.gelu` in x's dtype: that is the form XLA:GPU's GEMM rewriter folds
  into the cuBLASLt epilogue of the matmul before it (computed in float32 on the
  accumulator, with the pre-activation as a second output where the backward needs it),
  so the activation costs no kernel of its own. Unfused (CPU, TPU) it runs op by op in
  x's dtype, as flax's does. The derivative is recomputed from x in float32 through a
  sigmoid (tanh(u) = 2 sigmoid(2u) - 1), whose s (1 - s) keeps its precision in the
  negative tail, where 1 - tanh(u)^2 cancels."""
  return jax.nn.gelu(x, approximate=True)


def _gelu_tanh_fwd(x):
  return gelu_tanh(x), x


def _gelu_tanh_bwd(x, g):
  xf = x.astype(jnp.float32)
  s = jax.nn.sigmoid(2.0 * _TANH_C * (xf + 0.044715 * xf * xf * xf))
  d = s + 2.0 * _TANH_C * xf * s * (1.0 - s) * (1.0 + 3 * 0.044715 * xf * xf)
  # The barrier makes this one kernel that writes the gradient in bf16, which the bias
  # gradient's reduction then reads. Without it XLA:GPU's cost model fused it into that
  # reduction on an H100 (35.69 ms roofline, 36.06 with the barrier) but on an H200 wrote
  # the float32 product in a kernel of its own (32.41 ms, 31.40 with the barrier).
  return (jax.lax.optimization_barrier((g.astype(jnp.float32) * d).astype(g.dtype)),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)

GELUS = {'erf': gelu, 'tanh': gelu_tanh}


def activation(name: str):
  """config.model.gelu -> the GELU to use ('erf' exact, 'tanh' its approximation)."""
  if name not in GELUS:
    raise ValueError(f"config.model.gelu={name!r}: choose 'erf' (exact, as ALBEF) or 'tanh' "
                     '(its tanh approximation, fused into the matmul on GPUs)')
  return GELUS[name]
