"""Model FLOPs of a JAX function, counted from its jaxpr (the same on every backend).

XLA's `cost_analysis()` is backend specific: on GPU it leaves out the FLOPs of library
calls (cuBLAS GEMMs, cuDNN attention); on an H200 it reported 41 of the paper step's ~290
GFLOPs per pair. MFU needs the FLOPs the model defines, so count them from the traced
program: 2 * (output elements) * (contracted size) per `dot_general` and per convolution,
nothing for elementwise ops (the usual MFU convention, e.g. PaLM's appendix B). Loops
(`scan`, `fori_loop` with static bounds) count their body `length` times; `cond` counts its
costliest branch; a `while` with a dynamic trip count counts its body once.
"""

import math

import jax
from jax.extend import core as jex_core


def _dot_general(eqn) -> int:
  lhs = eqn.invars[0].aval.shape
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  out = eqn.outvars[0].aval.shape
  return 2 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _conv(eqn) -> int:
  rhs = eqn.invars[1].aval.shape
  out_feature_dim = eqn.params['dimension_numbers'].rhs_spec[0]
  per_output = math.prod(rhs) // rhs[out_feature_dim]  # in-features x window
  return 2 * math.prod(eqn.outvars[0].aval.shape) * per_output


def _sub_jaxprs(value):
  if isinstance(value, jex_core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jex_core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def jaxpr_flops(jaxpr) -> int:
  """Matmul + convolution FLOPs of a (Closed)Jaxpr, sub-computations included."""
  if isinstance(jaxpr, jex_core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      total += _dot_general(eqn)
    elif name == 'conv_general_dilated':
      total += _conv(eqn)
    elif name == 'cond':
      total += max(jaxpr_flops(b) for b in eqn.params['branches'])
    else:
      inner = sum(jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
      total += inner * (eqn.params['length'] if name == 'scan' else 1)
  return total


def count(fn, *args, **kwargs) -> int:
  """Model FLOPs of one call `fn(*args, **kwargs)` (args may be arrays or ShapeDtypeStructs)."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))
