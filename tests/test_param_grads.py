"""bf16 compute sums parameter gradients in float32: biases, position and type embeddings
(`param_ops.add_param`), embedding rows (`param_ops.take_param`) and matmul weights
(`param_ops.dot_param`, whose sums XLA carries across devices), against float64 numpy."""

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
from codis_jax.models import codis
from codis_jax.models import layers
from codis_jax.models import param_ops
from codis_jax.models import vit

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
  out, vjp = jax.vjp(param_ops.add_param, jnp.asarray(x), jnp.asarray(p))
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
    param_ops.add_param(x, jnp.zeros((5, 1), jnp.bfloat16))
  with pytest.raises(ValueError, match='trailing shape and dtype'):
    param_ops.add_param(x, jnp.zeros((6,), jnp.float32))


def test_take_param_scatter_adds_its_gradient_in_float32():
  """Embedding rows for 64 x 300 tokens, most of them one id (as [CLS], [MASK] or the
  type-0 row): its table row sums ~1.2e4 cotangents."""
  rs = np.random.RandomState(1)
  table = _bf16(rs, (16, 8))
  ids = np.where(rs.rand(64, 300) < 0.6, 3, rs.randint(0, 16, (64, 300))).astype(np.int32)
  ct = _bf16(rs, (64, 300, 8))
  out, vjp = jax.vjp(lambda t: param_ops.take_param(t, jnp.asarray(ids)), jnp.asarray(table))
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
  _, vjp = jax.vjp(param_ops.add_param, jnp.float32(x), jnp.float32(p))
  np.testing.assert_allclose(vjp(jnp.float32(ct))[1], ct.sum(0), rtol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('x_shape,w_shape,n_in', [
    ((6, 40, 24), (24, 3, 5), 1),       # a Dense / fused q,k,v projection
    ((3, 4, 4, 2, 2, 3), (2, 2, 3, 7), 3),  # several contracted dims (as heads x head dim)
])
def test_dot_param_against_float64(dtype, x_shape, w_shape, n_in):
  """Values and both gradients against numpy; w's gradient is the exact sum rounded once
  to w's dtype, in float32 (grad_dtype) or w's own dtype alike on one device."""
  rs = np.random.RandomState(3)
  x, w = rs.randn(*x_shape).astype(dtype), rs.randn(*w_shape).astype(dtype)
  out_shape = x_shape[:len(x_shape) - n_in] + w_shape[n_in:]
  ct = rs.randn(*out_shape).astype(dtype)
  xf, wf, gf = (np.float64(np.float32(a)) for a in (x, w, ct))
  k = int(np.prod(w_shape[:n_in]))
  x2, w2 = xf.reshape(-1, k), wf.reshape(k, -1)
  g2 = gf.reshape(x2.shape[0], -1)
  tol = dict(rtol=2.0**-7, atol=1e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
  for grad_dtype in (None, jnp.float32):
    out, vjp = jax.vjp(lambda a, b, g=grad_dtype: param_ops.dot_param(a, b, n_in, g),
                       jnp.asarray(x), jnp.asarray(w))
    gx, gw = vjp(jnp.asarray(ct))
    assert out.dtype == gx.dtype == gw.dtype == dtype and out.shape == out_shape
    np.testing.assert_allclose(np.float64(out).reshape(g2.shape), x2 @ w2, **tol)
    np.testing.assert_allclose(np.float64(gx).reshape(x2.shape), g2 @ w2.T, **tol)
    np.testing.assert_allclose(np.float64(gw).reshape(w2.shape), x2.T @ g2, **tol)
  # Only the gradients asked for are computed (symbolic zeros): one matmul each way.
  x, w, ct = jnp.asarray(x), jnp.asarray(w), jnp.asarray(ct)
  for fn, arg, want in ((lambda a: param_ops.dot_param(a, w, n_in, jnp.float32), x, gx),
                        (lambda b: param_ops.dot_param(x, b, n_in, jnp.float32), w, gw)):
    grad = lambda a, f=fn: jax.vjp(f, a)[1](ct)[0]
    np.testing.assert_array_equal(np.float32(grad(arg)), np.float32(want))
    assert _count_dots(jax.make_jaxpr(grad)(arg).jaxpr, {'batched': 0, 'plain': 0})['plain'] == 2


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_patch_conv_against_float64(dtype):
  """The ViT's stride-p convolution and both gradients against numpy's patch matmul."""
  rs = np.random.RandomState(4)
  images, kernel = rs.randn(3, 8, 12, 3).astype(dtype), rs.randn(4, 4, 3, 5).astype(dtype)
  ct = rs.randn(3, 2, 3, 5).astype(dtype)
  out, vjp = jax.vjp(lambda x, k: param_ops.patch_conv(x, k, jnp.float32),
                     jnp.asarray(images), jnp.asarray(kernel))
  g_images, g_kernel = vjp(jnp.asarray(ct))
  assert out.dtype == g_images.dtype == g_kernel.dtype == dtype
  xf, kf, gf = (np.float64(np.float32(a)) for a in (images, kernel, ct))
  patches = xf.reshape(3, 2, 4, 3, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(18, 48)
  tol = dict(rtol=2.0**-7, atol=1e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.float64(out).reshape(18, 5), patches @ kf.reshape(48, 5), **tol)
  np.testing.assert_allclose(np.float64(g_kernel).reshape(48, 5), patches.T @ gf.reshape(18, 5),
                             **tol)
  d_patches = (gf.reshape(18, 5) @ kf.reshape(48, 5).T).reshape(3, 2, 3, 4, 4, 3)
  np.testing.assert_allclose(np.float64(g_images),
                             d_patches.transpose(0, 1, 3, 2, 4, 5).reshape(3, 8, 12, 3), **tol)
  with pytest.raises(ValueError, match='does not match the kernel'):
    param_ops.patch_conv(jnp.asarray(images), jnp.asarray(kernel, jnp.float16))


def test_dot_param_refuses_mismatched_operands():
  with pytest.raises(ValueError, match='cannot contract the last 1 dims'):
    param_ops.dot_param(jnp.zeros((2, 3)), jnp.zeros((4, 5)), 1)
  with pytest.raises(ValueError, match='cannot contract'):
    param_ops.dot_param(jnp.zeros((2, 3)), jnp.zeros((3, 5), jnp.bfloat16), 1)


def test_weight_grad_dtype_names_its_config_key():
  from configs import pretrain  # pylint: disable=import-outside-toplevel
  config = pretrain.get_config('tiny').model
  assert codis.weight_grad_dtype(config) == jnp.float32
  config.weight_grad_dtype = 'bfloat16'  # only with bf16 compute
  with pytest.raises(ValueError, match=r"config.model.weight_grad_dtype='bfloat16'"):
    codis.weight_grad_dtype(config)
  config.dtype = 'bfloat16'
  assert codis.weight_grad_dtype(config) == jnp.bfloat16


def _count_dots(jaxpr, counts):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      batch_dims = eqn.params['dimension_numbers'][1][0]
      counts['batched' if batch_dims else 'plain'] += 1
    for sub in jex_core.jaxprs_in_params(eqn.params):
      _count_dots(sub, counts)
  return counts


def test_remat_dots_still_saves_the_dense_matmuls():
  """`dot_param`'s custom VJP hides its matmul from `dots_with_no_batch_dims_saveable`:
  remat='dots' saves it by name, so its backward recomputes no Dense (as 'none'), while
  'full' recomputes them (and both recompute attention's batched matmuls)."""
  x = jnp.ones((2, 9, 32), jnp.bfloat16)
  counts = {}
  for mode in ('none', 'dots', 'full'):
    block = layers.maybe_remat(vit.ViTBlock, mode)(2, 64, 1e-6, jnp.bfloat16, 'xla')
    params = block.init(jax.random.key(0), x)
    loss = lambda p, b=block: jnp.sum(b.apply(p, x).astype(jnp.float32))
    counts[mode] = _count_dots(jax.make_jaxpr(jax.grad(loss))(params).jaxpr,
                               {'batched': 0, 'plain': 0})
  assert counts['dots']['plain'] == counts['none']['plain'] < counts['full']['plain'], counts
  assert counts['none']['batched'] < counts['dots']['batched'] == counts['full']['batched']


def _bf16_parameter_sums(jaxpr, param_shapes):
  """(primitive, shape) of each reduce_sum / scatter-add / dot_general in jaxpr (and the
  jaxprs it calls) that yields a bf16 array of a parameter's shape: a parameter gradient
  summed in bf16 (for a matmul: a weight gradient that XLA would sum across devices in
  bf16)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('reduce_sum', 'scatter-add', 'dot_general'):
      out = eqn.outvars[0].aval
      # Up to the order of dims: the tied decoder's weight gradient is the table's transpose.
      if out.dtype == jnp.bfloat16 and sorted(out.shape) in map(sorted, param_shapes):
        found.append((eqn.primitive.name, out.shape))
    for sub in jex_core.jaxprs_in_params(eqn.params):
      found += _bf16_parameter_sums(sub, param_shapes)
  return found


def _bf16_step_jaxpr(*overrides):
  """The tiny bf16 step's jaxpr at batch 8, and its parameters' shapes."""
  config = bench.make_config('tiny', 8, overrides=['model.dtype=bfloat16', *overrides])
  tx, state = bench.init_state(config)
  step = train.make_train_step(config, tx, steps_per_epoch=10)
  batch = jax.tree.map(jnp.asarray, bench.synthetic_batch(config, 8))
  jaxpr = jax.make_jaxpr(step)(state, batch, jax.random.key(0)).jaxpr
  return jaxpr, {x.shape for x in state_lib._flat(state.params).values()}


@pytest.mark.parametrize('copy,attention', [(False, 'xla'), (True, 'cudnn'), (False, 'pallas')])
def test_the_bf16_step_sums_no_parameter_gradient_in_bf16(copy, attention, cudnn_via_xla):
  """The step's gradients of all parameters (Dense biases, fused q/k/v biases, the patch
  embedding, ViT and BERT position embeddings, word and type embeddings, the MLM bias,
  every matmul's weights) are summed in float32. (Activation gradients, e.g. an image's
  keys summed over the texts that attend to it, stay in bf16: a few terms each.)"""
  jaxpr, shapes = _bf16_step_jaxpr(f'model.weight_copy={str(copy).lower()}',
                                   f'model.attention_impl={attention}')
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


def test_weight_grad_dtype_bfloat16_leaves_weight_gradients_in_bf16():
  """model.weight_grad_dtype=bfloat16 (half the cross-device traffic): the kernels'
  gradients leave their matmuls in bf16, the other sums stay float32."""
  jaxpr, shapes = _bf16_step_jaxpr('model.weight_grad_dtype=bfloat16')
  found = _bf16_parameter_sums(jaxpr, shapes)
  assert found and {p for p, _ in found} == {'dot_general'}, found
  # Every matmul weight: the patch embedding, the vocabulary-sized tied decoder, q/k/v.
  assert {(8, 8, 3, 32), (32, 512), (32, 2, 16)} <= {s for _, s in found}, found


def _conv_dilations(jaxpr):
  """lhs_dilation of every convolution in jaxpr and the jaxprs it calls."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated':
      found.append(eqn.params['lhs_dilation'])
    for sub in jex_core.jaxprs_in_params(eqn.params):
      found += _conv_dilations(sub)
  return found


def test_the_step_takes_no_gradient_of_the_images():
  """The custom VJPs compute only the gradients asked for (symbolic zeros): the step holds
  the student's and the teacher's patch convolutions and no transposed one (the images'
  gradient, which `codis_jax.flops` would count: 77 GFLOPs per pair at the paper's size)."""
  jaxpr, _ = _bf16_step_jaxpr()
  assert _conv_dilations(jaxpr) == [(1, 1), (1, 1)]
  # Asked for, the images' gradient is there (a transposed, lhs-dilated convolution).
  x, k = jnp.ones((1, 8, 8, 3)), jnp.ones((4, 4, 3, 2))
  both = jax.make_jaxpr(jax.grad(lambda x, k: param_ops.patch_conv(x, k).sum(), (0, 1)))(x, k)
  assert sorted(_conv_dilations(both.jaxpr)) == [(1, 1), (4, 4)]


def _dots_2d_after_barrier(jaxpr):
  """(plain dots, of which 2-D x 2-D fed by an optimization barrier) in jaxpr alone."""
  barrier_outs, reshaped, dots, fed = set(), set(), 0, 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'optimization_barrier':
      barrier_outs.update(map(id, eqn.outvars))
    if eqn.primitive.name == 'reshape' and id(eqn.invars[0]) in barrier_outs:
      reshaped.add(id(eqn.outvars[0]))
    if eqn.primitive.name == 'dot_general':
      dots += 1
      fed += all(v.aval.ndim == 2 and id(v) in reshaped for v in eqn.invars)
  return dots, fed


def test_dense_group_runs_a_matmul_per_layer_forward_and_one_of_each_backward():
  """The forward's n matmuls stay apart (each 2-D, its operands behind their own barrier,
  so XLA neither merges them nor needs a kernel to split a merged result); the backward
  runs one input-gradient and one weight-gradient matmul for all n. Values and gradients
  against numpy: `test_fused_projection_equals_separate_matmuls`."""
  x = jnp.ones((2, 5, 12), jnp.bfloat16)
  ks = [jnp.full((12, 3, 4), i, jnp.bfloat16) for i in range(3)]
  bs = [jnp.full((3, 4), i, jnp.bfloat16) for i in range(3)]
  group = lambda x, ks, bs: param_ops.dense_group(x, ks, bs, jnp.float32)
  (call,) = [e for e in jax.make_jaxpr(group)(x, ks, bs).eqns
             if e.primitive.name == 'custom_vjp_call']
  assert _dots_2d_after_barrier(call.params['call_jaxpr'].jaxpr) == (3, 3)

  loss = lambda *a: sum(jnp.sum(o.astype(jnp.float32)) for o in group(*a))
  grad = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, ks, bs).jaxpr
  backward = _count_dots(grad, {'batched': 0, 'plain': 0})['plain'] - 3
  assert backward == 2
  assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(
      jax.grad(loss, argnums=(0, 1, 2))(x, ks, bs)))


def test_dense_group_refuses_mismatched_operands():
  x = jnp.ones((2, 5, 12), jnp.bfloat16)
  k, b = jnp.ones((12, 3, 4), jnp.bfloat16), jnp.ones((3, 4), jnp.bfloat16)
  for ks, bs in (([k, k], [b]), ([k, k.astype(jnp.float32)], [b, b]),
                 ([k, jnp.ones((11, 3, 4), jnp.bfloat16)], [b, b]),
                 ([k, k], [b, jnp.ones((4, 3), jnp.bfloat16)])):
    with pytest.raises(ValueError, match='dense_group'):
      param_ops.dense_group(x, ks, bs)
