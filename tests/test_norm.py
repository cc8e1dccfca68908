"""models/norm.py: the LayerNorm against float64 numpy, flax's LayerNorm, and its GPU kernels."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codis_jax.models import norm
import compile_only


def _reference(x, scale, bias, eps, g):
  """float64 LayerNorm over the last axis and its vjp with cotangent g, from the definition:
  y = xhat * scale + bias, xhat = (x - mean) / sqrt(var + eps);
  dx = r * (gs - mean(gs) - xhat * mean(gs * xhat)), gs = g * scale, r = 1 / sqrt(var + eps)."""
  x, scale, bias, g = (np.asarray(a, np.float64) for a in (x, scale, bias, g))
  mean = x.mean(-1, keepdims=True)
  r = 1.0 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
  xhat = (x - mean) * r
  gs = g * scale
  dx = r * (gs - gs.mean(-1, keepdims=True) - xhat * (gs * xhat).mean(-1, keepdims=True))
  axes = tuple(range(x.ndim - 1))
  return xhat * scale + bias, dx, (g * xhat).sum(axes), g.sum(axes)


def _inputs(shape, offset=0.0, seed=0):
  rng = np.random.default_rng(seed)
  c = shape[-1]
  x = (offset + rng.normal(size=shape) * rng.uniform(0.5, 2.0, shape[:-1] + (1,)))
  return (x.astype(np.float32), rng.normal(1.0, 0.3, c).astype(np.float32),
          rng.normal(0.0, 0.3, c).astype(np.float32), rng.normal(size=shape).astype(np.float32))


@pytest.mark.parametrize('eps', [1e-6, 1e-12])
def test_values_and_gradients_equal_float64_reference(eps):
  x, scale, bias, g = _inputs((3, 7, 48))
  y, vjp = jax.vjp(lambda *a: norm.layer_norm(*a, eps, jnp.float32), x, scale, bias)
  dx, dscale, dbias = vjp(jnp.asarray(g))
  ref_y, ref_dx, ref_dscale, ref_dbias = _reference(x, scale, bias, eps, g)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dscale, ref_dscale, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dbias, ref_dbias, rtol=1e-5, atol=1e-5)


def test_forward_is_accurate_when_the_mean_dwarfs_the_spread():
  # Rows with mean 300 and std ~1: E[x^2] - E[x]^2 in float32 loses ~1e-3 of the variance
  # (flax's default); the two-pass forward stays at float32's rounding.
  x, scale, bias, g = _inputs((4, 5, 64), offset=300.0, seed=1)
  ref_y = _reference(x, scale, bias, 1e-6, g)[0]
  y = norm.layer_norm(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), 1e-6, jnp.float32)
  np.testing.assert_allclose(y, ref_y, rtol=0, atol=2e-4)


def test_bfloat16_compute_rounds_once():
  x, scale, bias, g = _inputs((2, 9, 32), seed=2)
  xb = jnp.asarray(x, jnp.bfloat16)
  y, vjp = jax.vjp(lambda a: norm.layer_norm(a, scale, bias, 1e-6, jnp.bfloat16), xb)
  (dx,) = vjp(jnp.asarray(g, jnp.bfloat16))
  assert y.dtype == dx.dtype == jnp.bfloat16
  ref_y, ref_dx, _, _ = _reference(np.float32(xb.astype(jnp.float32)), scale, bias, 1e-6,
                                   np.float32(jnp.asarray(g, jnp.bfloat16).astype(jnp.float32)))
  np.testing.assert_allclose(np.float32(y.astype(jnp.float32)), ref_y, rtol=2 ** -7, atol=2e-2)
  np.testing.assert_allclose(np.float32(dx.astype(jnp.float32)), ref_dx, rtol=2 ** -7,
                             atol=3e-2)


def test_module_has_flax_layernorm_params_and_values():
  x, _, _, g = _inputs((2, 5, 24), seed=3)
  ours = norm.LayerNorm(1e-12, jnp.float32)
  theirs = nn.LayerNorm(epsilon=1e-12, param_dtype=jnp.float32)
  params = ours.init(jax.random.key(0), x)
  ref_params = theirs.init(jax.random.key(0), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), nn.unbox(params)) == jax.tree.map(
      lambda a: (a.shape, a.dtype), ref_params)
  assert nn.get_partition_spec(params)['params']['scale'] == jax.sharding.PartitionSpec(
      'embed')
  rng = np.random.default_rng(4)
  p = {'params': {'scale': jnp.asarray(rng.normal(1, 0.3, 24), jnp.float32),
                  'bias': jnp.asarray(rng.normal(0, 0.3, 24), jnp.float32)}}
  loss = lambda module: lambda p, x: jnp.sum(module.apply(p, x) * g)
  np.testing.assert_allclose(ours.apply(p, x), theirs.apply(p, x), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.grad(loss(ours), (0, 1))(p, x), jax.grad(loss(theirs), (0, 1))(p, x)):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5), a, b)


_COMPILE_ONLY = r"""
import flax.linen as nn, jax, jax.numpy as jnp
from codis_jax import hlo_cost, roofline
from codis_jax.models import norm
s = jax.sharding.SingleDeviceSharding(roofline.compile_only_device('h100'))
x, g = (jax.ShapeDtypeStruct((64, 264, 768), jnp.bfloat16, sharding=s) for _ in range(2))
p = jax.ShapeDtypeStruct((768,), jnp.float32, sharding=s)
flax_ln = nn.LayerNorm(epsilon=1e-6, dtype=jnp.bfloat16)
fns = {'ours': lambda x, a, b: norm.layer_norm(x, a, b, 1e-6, jnp.bfloat16),
       'flax': lambda x, a, b: flax_ln.apply({'params': {'scale': a, 'bias': b}}, x)}
for name, f in fns.items():
  grad = lambda x, a, b, g, f=f: jax.vjp(f, x, a, b)[1](g)
  for mode, fn, args in (('fwd', f, (x, p, p)), ('grad', grad, (x, p, p, g))):
    ks = hlo_cost.kernels(jax.jit(fn).lower(*args).compile().as_text())
    print(name, mode, sum(k.count for k in ks), sum(k.count * k.bytes for k in ks))
"""


@compile_only.needs_cuda_plugin
def test_compile_only_gpu_forward_is_one_kernel():
  # The claim behind norm.py: on an H100 (compile-only) the forward is one kernel that
  # reads x and writes y, and forward + backward move fewer bytes than flax's LayerNorm.
  rows = compile_only.table(_COMPILE_ONLY, 4)
  size = 64 * 264 * 768 * 2
  launches, nbytes = rows[('ours', 'fwd')]
  assert launches == 1 and nbytes < 2.01 * size
  assert rows[('ours', 'grad')][1] < rows[('flax', 'grad')][1]
  assert rows[('ours', 'fwd')][1] < rows[('flax', 'fwd')][1]
