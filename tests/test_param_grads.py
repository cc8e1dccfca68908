"""bf16 compute sums parameter gradients in float32: biases, position and type embeddings
(`layers.add_param`) and embedding rows (`layers.take_param`), against float64 numpy."""

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from codis_jax import bench
from codis_jax import grad_precision
from codis_jax import state as state_lib
from codis_jax import train
from codis_jax.models import layers

_BF16 = ml_dtypes.bfloat16


def _bf16(rs, shape):
  return rs.randn(*shape).astype(_BF16)


def _assert_rounded_sum(got, exact):
  """got is float64 `exact` summed in float32 and rounded once to bf16: within half a bf16
  step of it (2**-9 relative) plus float32's error on ~2e4 terms of size ~3."""
  np.testing.assert_allclose(np.float64(got), exact, rtol=2.0**-8, atol=1e-2)


def test_add_param_sums_its_gradient_in_float32():
  """A bias over the paper's ViT tokens (64 x 257 rows): a bf16 running sum is off by
  whole units here (it stops growing at 256x its addends)."""
  rs = np.random.RandomState(0)
  x, p, ct = _bf16(rs, (64, 257, 8)), _bf16(rs, (8,)), _bf16(rs, (64, 257, 8))
  out, vjp = jax.vjp(layers.add_param, jnp.asarray(x), jnp.asarray(p))
  gx, gp = vjp(jnp.asarray(ct))
  assert out.dtype == gp.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.float32(out), np.float32((np.float32(x) + p).astype(_BF16)))
  np.testing.assert_array_equal(np.float32(gx), np.float32(ct))
  _assert_rounded_sum(gp, np.float64(ct).sum((0, 1)))
  # The same shapes through autodiff of `x + p` sum in bf16: the test above can tell.
  _, plain = jax.vjp(lambda x, p: x + p, jnp.asarray(x), jnp.asarray(p))
  with pytest.raises(AssertionError):
    _assert_rounded_sum(plain(jnp.asarray(ct))[1], np.float64(ct).sum((0, 1)))


def test_add_param_broadcasts_only_leading_dims():
  x = jnp.zeros((4, 5, 6), jnp.bfloat16)
  with pytest.raises(ValueError, match='trailing shape and dtype'):
    layers.add_param(x, jnp.zeros((5, 1), jnp.bfloat16))
  with pytest.raises(ValueError, match='trailing shape and dtype'):
    layers.add_param(x, jnp.zeros((6,), jnp.float32))


def test_take_param_scatter_adds_its_gradient_in_float32():
  """Embedding rows for 64 x 300 tokens, most of them one id (as [CLS], [MASK] or the
  type-0 row): its table row sums ~1.2e4 cotangents."""
  rs = np.random.RandomState(1)
  table = _bf16(rs, (16, 8))
  ids = np.where(rs.rand(64, 300) < 0.6, 3, rs.randint(0, 16, (64, 300))).astype(np.int32)
  ct = _bf16(rs, (64, 300, 8))
  out, vjp = jax.vjp(lambda t: layers.take_param(t, jnp.asarray(ids)), jnp.asarray(table))
  (grad,) = vjp(jnp.asarray(ct))
  np.testing.assert_array_equal(np.float32(out), np.float32(table)[ids])
  want = np.zeros((16, 8))
  np.add.at(want, ids, np.float64(ct))
  assert grad.dtype == jnp.bfloat16
  _assert_rounded_sum(grad, want)
  _, plain = jax.vjp(lambda t: jnp.take(t, jnp.asarray(ids), axis=0), jnp.asarray(table))
  with pytest.raises(AssertionError):
    _assert_rounded_sum(plain(jnp.asarray(ct))[0], want)


def test_float32_params_are_not_rounded():
  """In float32 compute nothing is rounded: the sums equal numpy's to float32 precision."""
  rs = np.random.RandomState(2)
  x, p, ct = rs.randn(300, 4), rs.randn(4), rs.randn(300, 4)
  _, vjp = jax.vjp(layers.add_param, jnp.float32(x), jnp.float32(p))
  np.testing.assert_allclose(vjp(jnp.float32(ct))[1], ct.sum(0), rtol=1e-5)


def _bf16_parameter_sums(jaxpr, param_shapes):
  """(primitive, shape) of each reduce_sum / scatter-add in jaxpr (and the jaxprs it
  calls) that yields a bf16 array of a parameter's shape."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('reduce_sum', 'scatter-add'):
      out = eqn.outvars[0].aval
      if out.dtype == jnp.bfloat16 and out.shape in param_shapes:
        found.append((eqn.primitive.name, out.shape))
    for sub in jex_core.jaxprs_in_params(eqn.params):
      found += _bf16_parameter_sums(sub, param_shapes)
  return found


@pytest.mark.parametrize('copy,attention', [(False, 'xla'), (True, 'cudnn'), (False, 'pallas')])
def test_the_bf16_step_sums_no_parameter_gradient_in_bf16(copy, attention, cudnn_via_xla):
  """The step's gradients of all parameters (Dense biases, fused q/k/v biases, the patch
  embedding, ViT and BERT position embeddings, word and type embeddings, the MLM bias)
  reduce in float32. (Activation gradients, e.g. an image's keys summed over the texts
  that attend to it, stay in bf16: a few terms each.)"""
  config = bench.make_config('tiny', 8, overrides=[
      'model.dtype=bfloat16', f'model.weight_copy={str(copy).lower()}',
      f'model.attention_impl={attention}'])
  tx, state = bench.init_state(config)
  step = train.make_train_step(config, tx, steps_per_epoch=10)
  batch = jax.tree.map(jnp.asarray, bench.synthetic_batch(config, 8))
  jaxpr = jax.make_jaxpr(step)(state, batch, jax.random.key(0)).jaxpr
  shapes = {x.shape for x in state_lib._flat(state.params).values()}
  assert _bf16_parameter_sums(jaxpr, shapes) == []
  # The check can fail: a parameter added the plain way sums in bf16.
  plain = jax.make_jaxpr(jax.grad(lambda p, x: jnp.sum(
      (x + p.astype(jnp.bfloat16)).astype(jnp.float32))))(jnp.zeros((32,)),
                                                          jnp.ones((8, 17, 32), jnp.bfloat16))
  assert ('reduce_sum', (32,)) in _bf16_parameter_sums(plain.jaxpr, {(32,)})


def test_no_bf16_gradient_is_further_from_float32_than_the_kernels():
  """The tiny step at batch 16, bf16 against float32 (`codis_jax.grad_precision`): every
  group of parameters is within 1.5x of the kernels' worst relative error, the floor the
  bf16 forward sets. With bf16 sums the worst Dense bias was 10.0% off, the patch
  embedding's bias 6.1%, against the kernels' 1.9%."""
  rows = grad_precision.report(grad_precision.step_grads('tiny', 16, 'float32'),
                               grad_precision.step_grads('tiny', 16, 'bfloat16'))
  floor = rows['kernels'][2]
  assert 0.001 < floor < 0.05, rows
  assert {g: w for g, (_, _, w) in rows.items() if w > 1.5 * floor} == {}, rows
  assert {'Dense biases', 'patch_embed/bias', 'mlm_head/bias', 'pos_embed', 'word_embeddings',
          'position_embeddings', 'token_type_embeddings'} <= set(rows)
