"""attention_impl='pallas': the TPU attention kernel, run by Pallas's TPU interpreter on the
CPU, against float64 numpy (forward) and autodiff of a plain softmax formula (backward).
`tests/test_tpu_aot.py` compiles it for a TPU chip (Mosaic) and counts its HBM traffic."""

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
import numpy as np
import pytest

from codis_jax.models import layers
from codis_jax.models import tpu_attention


def _numpy(q, k, v, keep):
  """float64 softmax(q k^T / sqrt(D)) v over the keys where keep [B, S] is True."""
  q, k, v = (np.float64(x) for x in (q, k, v))
  logits = np.einsum('bthd,bshd->bhts', q, k) / np.sqrt(q.shape[-1])
  logits = np.where(keep[:, None, None, :], logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum('bhts,bshd->bthd', w / w.sum(-1, keepdims=True), v)


def _plain(q, k, v, keep):
  """The same formula in jnp, float32, for its autodiff gradients."""
  logits = jnp.einsum('bthd,bshd->bhts', q, k) / np.sqrt(q.shape[-1])
  logits = jnp.where(keep[:, None, None, :], logits, -jnp.inf)
  return jnp.einsum('bhts,bshd->bthd', jax.nn.softmax(logits, axis=-1), v)


# (B, T, S, H, D): 4 heads of 64 run as two 128-lane groups; 2 heads of 16 (32 lanes,
# the tiny config's) as one group; cross attention with T != S; odd lengths as the paper's.
SHAPES = [(2, 9, 9, 4, 64), (2, 17, 17, 2, 16), (3, 5, 13, 4, 64)]


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('masked', [True, False])
def test_forward_and_gradients_float32(shape, masked):
  b, t, s, h, d = shape
  rs = np.random.RandomState(0)
  q, k, v = (rs.randn(b, n, h, d).astype(np.float32) for n in (t, s, s))
  lengths = np.array([s - 3, s, 1][:b]) if masked else np.full(b, s)
  keep = np.arange(s)[None] < lengths[:, None]
  mask = jnp.asarray(keep)[:, None, None, :] if masked else None
  cot = rs.randn(b, t, h, d).astype(np.float32)  # a cotangent that weights every output
  with pltpu.force_tpu_interpret_mode():
    out = tpu_attention.attention(q, k, v, mask)
    grads = jax.grad(lambda *x: jnp.sum(tpu_attention.attention(*x, mask) * cot),
                     argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(np.asarray(out), _numpy(q, k, v, keep), atol=2e-6, rtol=1e-5)
  want = jax.grad(lambda *x: jnp.sum(_plain(*x, keep) * cot), argnums=(0, 1, 2))(q, k, v)
  for got, ref in zip(grads, want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=1e-4)
  if masked:  # nothing flows into masked keys
    assert not np.asarray(grads[1])[0, s - 3:].any()
    assert not np.asarray(grads[2])[0, s - 3:].any()


def test_bfloat16_within_bfloat16_rounding():
  b, t, s, h, d = 2, 9, 13, 4, 64
  rs = np.random.RandomState(1)
  q, k, v = (rs.randn(b, n, h, d).astype(np.float32) for n in (t, s, s))
  keep = np.ones((b, s), bool)
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  with pltpu.force_tpu_interpret_mode():
    out = tpu_attention.attention(bf(q), bf(k), bf(v))
    dq = jax.grad(lambda x: jnp.sum(tpu_attention.attention(x, bf(k), bf(v))
                                    .astype(jnp.float32) ** 2))(bf(q))
  assert out.dtype == jnp.bfloat16 and dq.dtype == jnp.bfloat16
  rounded = lambda x: np.float32(bf(x))  # the inputs as the kernel sees them
  want = _numpy(rounded(q), rounded(k), rounded(v), keep)
  np.testing.assert_allclose(np.float32(out), want, atol=2e-2, rtol=2e-2)
  dq_want = jax.grad(lambda x: jnp.sum(_plain(x, rounded(k), rounded(v), keep) ** 2))(
      rounded(q))
  scale = np.abs(np.asarray(dq_want)).max()
  assert np.abs(np.float32(dq) - np.asarray(dq_want)).max() < 3e-2 * scale


def test_through_layers_attention_with_kv_length():
  """The module-level entry: kv_length (padded image tokens) becomes a key mask."""
  b, t, s, h, d, n = 2, 7, 12, 2, 64, 9
  rs = np.random.RandomState(2)
  q, k, v = (rs.randn(b, m, h, d).astype(np.float32) for m in (t, s, s))
  with pltpu.force_tpu_interpret_mode():
    got = layers.attention(q, k, v, None, 'pallas', kv_length=n)
  keep = np.broadcast_to(np.arange(s) < n, (b, s))
  np.testing.assert_allclose(np.asarray(got), _numpy(q, k, v, keep), atol=2e-6, rtol=1e-5)


def _gathered(x, kv_index):
  """numpy take_rows: row g*(R/G) + j of the result is x[g*(N/G) + kv_index[g, j]]."""
  g = kv_index.shape[0]
  return x[(kv_index + np.arange(g)[:, None] * (x.shape[0] // g)).reshape(-1)]


# Two groups of 4 query rows over 3 key rows each, as the fusion's (own image three times,
# another once) but with key rows 1 and 5 read by no query row and row 3 by three.
KV_INDEX = np.array([[0, 2, 0, 0], [0, 1, 0, 1]])


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_indexed_keys_read_in_place(dtype):
  """kv_index: each query row's keys and values read from their shared row, against numpy
  on the gathered rows; gradients summed per key row (zero for rows nobody reads)."""
  r, t, s, h, d, n = 8, 5, 13, 4, 64, 6
  rs = np.random.RandomState(4)
  q, k, v = (jnp.asarray(rs.randn(m, l, h, d), dtype) for m, l in ((r, t), (n, s), (n, s)))
  keep = np.arange(s)[None] < np.array([13, 4, 13, 13, 9, 13, 13, 1])[:, None]
  mask = jnp.asarray(keep)[:, None, None, :]
  cot = rs.randn(r, t, h, d).astype(np.float32)
  idx = jnp.asarray(KV_INDEX)
  run = lambda *x: tpu_attention.attention(*x, mask, idx)
  with pltpu.force_tpu_interpret_mode():
    out = run(q, k, v)
    grads = jax.grad(lambda *x: jnp.sum(run(*x).astype(jnp.float32) * cot),
                     argnums=(0, 1, 2))(q, k, v)
  q, k, v = (np.float32(x) for x in (q, k, v))  # the inputs as the kernel saw them
  tol = dict(atol=2e-6, rtol=1e-5) if dtype == jnp.float32 else dict(atol=2e-2, rtol=2e-2)
  want = _numpy(q, _gathered(k, KV_INDEX), _gathered(v, KV_INDEX), keep)
  np.testing.assert_allclose(np.float32(out), want, **tol)
  plain = lambda q, k, v: _plain(q, _gathered(k, KV_INDEX), _gathered(v, KV_INDEX), keep)
  for got, ref in zip(grads, jax.grad(lambda *x: jnp.sum(plain(*x) * cot),
                                      argnums=(0, 1, 2))(q, k, v)):
    assert got.dtype == dtype
    scale = np.abs(np.asarray(ref)).max()
    err = np.abs(np.float32(got) - np.asarray(ref)).max()
    assert err < (2e-5 if dtype == jnp.float32 else 3e-2) * scale
  for g in grads[1:]:
    assert not np.float32(g)[[1, 5]].any()


def test_unsupported_masks_and_head_widths_are_clear_errors():
  q = jnp.zeros((1, 4, 3, 64))
  with pytest.raises(ValueError, match=r'key masks \[B, 1, 1, S\]'):
    tpu_attention.attention(q, q, q, jnp.ones((1, 1, 4, 4), bool))
  with pytest.raises(ValueError, match='3 heads of width 64'):
    tpu_attention.attention(q, q, q)  # 192 lanes: not whole 128-lane groups


def test_sharded_batch_and_heads_run_per_device(tiny_config):
  """Under a data x fsdp x tensor mesh the kernel runs on each device's shard (batch over
  data and fsdp, heads over tensor): the numpy result, and no array gathered whole."""
  from codis_jax import sharding  # pylint: disable=import-outside-toplevel
  tiny_config.mesh.data, tiny_config.mesh.fsdp, tiny_config.mesh.tensor = 2, 2, 2
  mesh = sharding.create_mesh(tiny_config)
  b, t, s, h, d = 4, 9, 13, 4, 64  # two heads of 64 per tensor shard: one 128-lane group
  rs = np.random.RandomState(3)
  q, k, v = (rs.randn(b, n, h, d).astype(np.float32) for n in (t, s, s))
  keep = np.arange(s)[None] < np.array([13, 5, 9, 1])[:, None]
  spec = jax.sharding.PartitionSpec(('data', 'fsdp'), None, 'tensor', None)
  put = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  with sharding.mesh_context(mesh, tiny_config), pltpu.force_tpu_interpret_mode():
    f = jax.jit(tpu_attention.attention)
    args = (put(q), put(k), put(v), jnp.asarray(keep)[:, None, None, :])
    hlo = f.lower(*args).compile().as_text()
    out = f(*args)
  np.testing.assert_allclose(np.asarray(out), _numpy(q, k, v, keep), atol=2e-6, rtol=1e-5)
  assert out.sharding.spec == spec
  assert 'all-gather' not in hlo and 'all-to-all' not in hlo


def test_indexed_keys_sharded_with_groups_per_device(tiny_config):
  """kv_index under a mesh: index groups that align with the batch shards are read in
  place on each device (nothing gathered); groups that straddle devices are gathered by
  layers.attention first (and refused by the kernel's entry with the reason)."""
  from codis_jax import sharding  # pylint: disable=import-outside-toplevel
  tiny_config.mesh.data, tiny_config.mesh.fsdp, tiny_config.mesh.tensor = 2, 2, 2
  mesh = sharding.create_mesh(tiny_config)
  r, t, s, h, d, n = 16, 5, 9, 4, 64, 8
  rs = np.random.RandomState(5)
  q, k, v = (rs.randn(m, l, h, d).astype(np.float32) for m, l in ((r, t), (n, s), (n, s)))
  spec = jax.sharding.PartitionSpec(('data', 'fsdp'), None, 'tensor', None)
  put = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  keep = np.ones((r, s), bool)
  for groups in (4, 2):  # 4 batch shards: one group per device, then two per group
    idx = rs.randint(0, n // groups, (groups, r // groups))
    f = jax.jit(lambda q, k, v, i: layers.attention(q, k, v, None, 'pallas', kv_index=i))
    with sharding.mesh_context(mesh, tiny_config), pltpu.force_tpu_interpret_mode():
      args = (put(q), put(k), put(v), jnp.asarray(idx))
      hlo = f.lower(*args).compile().as_text()
      out = f(*args)
      if groups == 2:
        with pytest.raises(ValueError, match='2 groups, not a multiple of the 4 batch'):
          tpu_attention.attention(*args[:3], None, args[3])
    want = _numpy(q, _gathered(k, idx), _gathered(v, idx), keep)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-6, rtol=1e-5)
    if groups == 4:
      assert 'all-gather' not in hlo and 'all-to-all' not in hlo
