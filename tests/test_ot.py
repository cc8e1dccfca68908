"""Tests for codis_jax.ot.ipot against an independent float64 numpy IPOT and POT's exact OT."""

import os

# POT otherwise imports every installed backend (TensorFlow, PyTorch: ~10 s); the
# tests only hand it numpy arrays.
for _name in ("PYTORCH", "JAX", "CUPY", "TENSORFLOW"):
  os.environ.setdefault(f"POT_BACKEND_DISABLE_{_name}", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import ot as pot  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from codis_jax.ot import ipot  # noqa: E402


@jax.jit
def _ipot_traced(cost, beta, num_iters, num_inner):
  return ipot(cost, beta=beta, num_iters=num_iters, num_inner=num_inner)


def _ipot(cost, beta=0.5, num_iters=50, num_inner=1):
  # Traced settings (fori_loop -> while_loop): one compilation per shape keeps the
  # test suite fast; the static path is covered by the other tests.
  return _ipot_traced(cost, beta, num_iters, num_inner)


def np_ipot(cost, beta=0.5, num_iters=50, num_inner=1):
  """IPOT exactly as written in method-notes.md (Algorithm 2), float64."""
  n, k = cost.shape
  a = np.exp(-cost / beta)
  t = np.ones((n, k))
  sigma = np.ones(k) / k
  for _ in range(num_iters):
    q = a * t
    for _ in range(num_inner):
      delta = (1.0 / n) / (q @ sigma)
      sigma = (1.0 / k) / (q.T @ delta)
    t = delta[:, None] * q * sigma[None, :]
  return t


def cosine_cost(seed, n, k, e=8):
  """1 - cos of random unit vectors: [n, k], values in [0, 2]."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, e))
  c = rng.normal(size=(k, e))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  c /= np.linalg.norm(c, axis=1, keepdims=True)
  return 1.0 - x @ c.T


SHAPES = [(16, 8), (32, 32), (24, 128), (64, 48)]


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("beta,num_iters,num_inner", [(0.5, 50, 1), (0.1, 30, 3)])
def test_matches_numpy_reference(n, k, beta, num_iters, num_inner):
  d = cosine_cost(n * 1000 + k, n, k)
  ref = np_ipot(d, beta, num_iters, num_inner)
  plan = _ipot(jnp.asarray(d, jnp.float32), beta=beta, num_iters=num_iters,
               num_inner=num_inner)
  assert plan.shape == (n, k) and plan.dtype == jnp.float32
  # Compare row-normalised plans (entries are probabilities <= 1); measured < 1e-6.
  np.testing.assert_allclose(np.asarray(plan) * n, ref * n, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n,k", SHAPES)
def test_marginals(n, k):
  d = cosine_cost(7 + n + k, n, k)
  for num_iters, row_tol in ((50, 1e-2), (1000, 1e-4)):
    plan = np.asarray(_ipot(jnp.asarray(d, jnp.float32), num_iters=num_iters),
                      np.float64)
    assert np.all(plan >= 0)
    # Columns are exact after the last sigma update (measured ~1e-7); rows converge
    # with the outer iterations (measured < 4e-3 at 50, < 3e-5 at 1000).
    np.testing.assert_allclose(plan.sum(0) * k, 1.0, atol=2e-6)
    np.testing.assert_allclose(plan.sum(1) * n, 1.0, atol=row_tol)


@pytest.mark.parametrize("n,k", SHAPES + [(5, 9), (9, 5)])
def test_transport_cost_matches_exact_ot(n, k):
  d = cosine_cost(100 + n * k, n, k)
  exact = pot.emd2(np.full(n, 1.0 / n), np.full(k, 1.0 / k), d)
  plan = np.asarray(_ipot(jnp.asarray(d, jnp.float32), num_iters=500), np.float64)
  rel = (np.sum(plan * d) - exact) / exact
  # Measured |rel| < 1e-4 at 500 iterations; a feasible plan cannot beat the optimum
  # (beyond the tiny marginal error).
  assert -1e-4 < rel < 5e-3, rel
  # The plan concentrates on the exact optimal support: mass outside it is small.
  exact_plan = pot.emd(np.full(n, 1.0 / n), np.full(k, 1.0 / k), d)
  off_support = plan[exact_plan < 1e-12].sum()
  assert off_support < 0.05, off_support


def test_default_iterations_close_to_exact():
  d = cosine_cost(3, 32, 64)
  exact = pot.emd2(np.full(32, 1 / 32), np.full(64, 1 / 64), d)
  plan = np.asarray(_ipot(jnp.asarray(d, jnp.float32)), np.float64)
  assert abs(np.sum(plan * d) - exact) / exact < 1e-2


@pytest.mark.parametrize("n,k", [(7, 3), (16, 128), (128, 16)])
def test_finite_for_many_iterations(n, k):
  rng = np.random.default_rng(n + k)
  costs = [rng.uniform(0, 2, (n, k)), 2.0 * (rng.uniform(size=(n, k)) > 0.5),
           2.0 - 2.0 * np.eye(n, k), np.ones((n, k)), cosine_cost(n, n, k, e=3)]
  stacked = jnp.asarray(np.stack(costs), jnp.float32)
  for beta in (0.5, 0.2):
    f = jax.jit(jax.vmap(lambda c: ipot(c, beta=beta, num_iters=3000)))
    plans = np.asarray(f(stacked), np.float64)
    assert np.all(np.isfinite(plans))
    np.testing.assert_allclose(plans.sum(2) * n, 1.0, atol=1e-2)
    np.testing.assert_allclose(plans.sum(1) * k, 1.0, atol=1e-4)


def test_tiny_beta_stays_finite():
  # exp(-cost/beta) underflows here: marginals may degrade, but no NaN/inf.
  d = jnp.asarray(cosine_cost(11, 64, 64, e=16), jnp.float32)
  plan = np.asarray(_ipot(d, beta=0.002, num_iters=200), np.float64)
  assert np.all(np.isfinite(plan)) and np.all(plan >= 0)
  # A column whose Q underflows entirely stays exactly 0 (its denominator is floored);
  # every other column is exact after the last sigma update. Measured: 4 of 64 columns
  # lost (the float64 reference loses none), the rest with |sum * K - 1| < 9e-8.
  col = plan.sum(0) * 64
  lost = col == 0
  np.testing.assert_allclose(col[~lost], 1.0, rtol=0, atol=1e-6)
  # Total mass is (64 - lost) / 64: > 0.9 allows at most 6 lost columns (measured
  # 0.9375), and rules out an all-zero plan.
  assert plan.sum() > 0.9, plan.sum()


def test_row_offsets_do_not_change_plan():
  # IPOT is invariant to adding a constant to each row of the cost (delta absorbs it).
  # Large offsets with a small beta would underflow whole rows of exp(-cost/beta) in
  # float32; the plan must still match the float64 reference.
  rng = np.random.default_rng(12)
  d = 0.2 * cosine_cost(12, 16, 24) + rng.uniform(0, 1.8, size=(16, 1))
  plan = np.asarray(_ipot(jnp.asarray(d, jnp.float32), beta=0.02, num_iters=50))
  ref = np_ipot(d, beta=0.02, num_iters=50)
  np.testing.assert_allclose(plan * 16, ref * 16, atol=1e-5)


def test_bfloat16_input_computes_in_float32():
  d = jnp.asarray(cosine_cost(5, 16, 24), jnp.bfloat16)
  plan = _ipot(d)
  assert plan.dtype == jnp.float32
  ref = np_ipot(np.asarray(d.astype(jnp.float32), np.float64))
  np.testing.assert_allclose(np.asarray(plan) * 16, ref * 16, atol=1e-5)


def test_no_gradient_through_plan():
  d = jnp.asarray(cosine_cost(9, 12, 20), jnp.float32)
  g, g0, plan = jax.jit(lambda c: (jax.grad(lambda x: jnp.sum(ipot(x) * x))(c),
                                   jax.grad(lambda x: jnp.sum(ipot(x) ** 2))(c),
                                   ipot(c)))(d)
  # Only the explicit cost factor contributes: d/dc sum(T * c) = T.
  np.testing.assert_allclose(np.asarray(g), np.asarray(plan), rtol=1e-6, atol=1e-9)
  assert not np.any(np.asarray(g0))
  assert np.any(np.asarray(plan) > 0)


def test_fori_loop_does_not_grow_with_iterations():
  d = jnp.zeros((6, 4), jnp.float32)

  def size(**kw):
    return len(str(jax.make_jaxpr(lambda c: ipot(c, **kw))(d)))

  # Only the printed trip counts may differ (a few characters); unrolling would add
  # hundreds of equations.
  assert abs(size(num_iters=5) - size(num_iters=500)) < 10
  assert abs(size(num_inner=1) - size(num_inner=100)) < 10


def test_jit_vmap_eager_agree():
  costs = np.stack([cosine_cost(s, 10, 14) for s in range(3)])
  batched = jax.jit(jax.vmap(lambda c: ipot(c, num_iters=40)))(
      jnp.asarray(costs, jnp.float32))
  single = jax.jit(lambda c: ipot(c, num_iters=40))
  eager = ipot(jnp.asarray(costs[0], jnp.float32), num_iters=40)
  np.testing.assert_allclose(np.asarray(batched[0]), np.asarray(eager), atol=1e-7)
  for i in range(3):
    ref = np_ipot(costs[i], num_iters=40)
    np.testing.assert_allclose(np.asarray(batched[i]),
                               np.asarray(single(jnp.asarray(costs[i], jnp.float32))),
                               atol=1e-7)
    np.testing.assert_allclose(np.asarray(batched[i]) * 10, ref * 10, atol=1e-5)


def test_bad_arguments():
  for kwargs in (dict(beta=0.0), dict(beta=-1), dict(num_iters=0),
                 dict(num_inner=np.int64(0))):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
      ipot(jnp.ones((3, 4)), **kwargs)
  with pytest.raises(ValueError, match=r"\[N, K\]"):
    ipot(jnp.ones((3, 4, 5)))


def test_rows_sharded_over_devices():
  # tests/conftest.py provides 8 fake CPU devices; shard the cost's rows over them.
  n = len(jax.devices())
  assert n >= 2, "needs several devices: tests/conftest.py sets 8 CPU devices"
  d = cosine_cost(13, 4 * n, 24)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.device_put(jnp.asarray(d, jnp.float32), NamedSharding(mesh, P("data")))
  plan = jax.jit(lambda c: ipot(c, num_iters=60))(sharded)
  np.testing.assert_allclose(np.asarray(plan) * 4 * n, np_ipot(d, num_iters=60) * 4 * n,
                             atol=1e-5)
