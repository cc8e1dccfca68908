"""Tests for the alignment losses of codis_jax.losses (soft CE, ICA, codebook) against
float64 numpy references written from method-notes.md (ITM/MLM: test_losses_itm_mlm.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from codis_jax import losses as L
from test_ot import np_ipot

B, E, Q, K = 6, 16, 10, 12
TEMP, ALPHA = 0.07, 0.4
TOL = dict(rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ numpy references

def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_softmax(x):
  return np.exp(np_log_softmax(x))


def np_soft_ce(logits, targets):
  return -np.mean(np.sum(targets * np_log_softmax(logits), -1))


def np_ica_term(query, keys, queue, query_m, temp, alpha):
  allk = np.concatenate([keys, queue], 0)           # [B + Q, E], positive = column i
  logits = query @ allk.T / temp
  onehot = np.eye(query.shape[0], allk.shape[0])
  target = alpha * np_softmax(query_m @ allk.T / temp) + (1 - alpha) * onehot
  return np_soft_ce(logits, target), logits[:, :query.shape[0]]


def np_codebook(img, txt, img_src, txt_src, codebook, temp, pairing, plans=None,
                **ipot_kw):
  """plans: {img, txt} [B, K] held fixed (the method's plans carry no gradient)."""
  cn = codebook / np.linalg.norm(codebook, axis=1, keepdims=True)
  d = {"img": 1 - img_src @ cn.T, "txt": 1 - txt_src @ cn.T}
  if plans is None:
    plans = {m: np_ipot(d[m], **ipot_kw) for m in d}
  tgt = {m: plans[m] / plans[m].sum(1, keepdims=True) for m in d}
  src_for_img, src_for_txt = ("txt", "img") if pairing == "cross" else ("img", "txt")
  out = {"ot_img": np.sum(plans["img"] * d["img"]), "ot_txt": np.sum(plans["txt"] * d["txt"]),
         "i2p": np_soft_ce(img @ cn.T / temp, tgt[src_for_img]),
         "t2p": np_soft_ce(txt @ cn.T / temp, tgt[src_for_txt])}
  return sum(out.values()), out, plans


def np_negative_probs(sim, group):
  """ALBEF: softmax over the row, zero the diagonal (and other groups), renormalise."""
  p = np_softmax(sim)
  idx = np.arange(sim.shape[0])
  p[(idx[:, None] // group) != (idx[None, :] // group)] = 0
  np.fill_diagonal(p, 0)
  return p / p.sum(1, keepdims=True)


def central_diff(f, x, h=1e-6):
  """d f / d x by central differences; f maps a float64 array like x to {name: scalar}."""
  out = {}
  for i in np.ndindex(*x.shape):
    e = np.zeros_like(x)
    e[i] = h
    hi, lo = f(x + e), f(x - e)
    for name in hi:
      out.setdefault(name, np.zeros_like(x))[i] = (hi[name] - lo[name]) / (2 * h)
  return out


def unit(rng, *shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def feats():
  rng = np.random.default_rng(0)
  names = ["img", "txt", "img_m", "txt_m"]
  f = {n: unit(rng, B, E) for n in names}
  f["img_queue"], f["txt_queue"] = unit(rng, Q, E), unit(rng, Q, E)
  f["codebook"] = (rng.normal(size=(K, E)) * 3).astype(np.float32)  # not normalised
  return f


def f64(x):
  return np.asarray(x, np.float64)


# ------------------------------------------------------------------ soft CE and ICA

def test_soft_cross_entropy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(5, 7)).astype(np.float32) * 4
  targets = np_softmax(rng.normal(size=(5, 7))).astype(np.float32)
  got = L.soft_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  np.testing.assert_allclose(float(got), np_soft_ce(f64(logits), f64(targets)), **TOL)
  with pytest.raises(ValueError, match="differ"):
    L.soft_cross_entropy(jnp.ones((2, 3)), jnp.ones((2, 4)))


ICA_SPEC = {"i2t": ("img", "txt_m", "txt_queue", "img_m"),
            "t2i": ("txt", "img_m", "img_queue", "txt_m"),
            "i2i": ("img", "img_m", "img_queue", "img_m"),
            "t2t": ("txt", "txt_m", "txt_queue", "txt_m")}


@pytest.mark.parametrize("term", list(ICA_SPEC))
@pytest.mark.parametrize("queue_len", [Q, 0])
def test_ica_term_matches_reference(feats, term, queue_len):
  q, k, qu, qm = (feats[n] for n in ICA_SPEC[term])
  qu = qu[:queue_len]
  loss, logits = jax.jit(L.ica_term)(q, k, qu, qm, TEMP, ALPHA)
  ref_loss, ref_logits = np_ica_term(f64(q), f64(k), f64(qu), f64(qm), TEMP, ALPHA)
  np.testing.assert_allclose(float(loss), ref_loss, **TOL)
  np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=1e-5, atol=1e-5)


def test_ica_term_never_concatenates_and_stops_gradients(feats):
  args = [jnp.asarray(feats[n]) for n in ICA_SPEC["i2t"]]
  jaxpr = str(jax.make_jaxpr(lambda *a: L.ica_term(*a, TEMP, ALPHA))(*args))
  assert "concatenate" not in jaxpr
  grads = jax.jit(jax.grad(lambda *a: L.ica_term(*a[:4], a[4], ALPHA)[0],
                           argnums=(0, 1, 2, 3, 4)))(*args, jnp.float32(TEMP))
  for g in grads[1:4]:
    assert not np.any(np.asarray(g))
  # The student gradient against central differences of the float64 reference. JAX runs
  # in float32 (no x64 in the tests): logits up to 1/temp ~ 14 round at ~1e-6, the
  # entries are up to 1.3 (measured error 6e-7); a 1% error would be ~1e-2.
  q, k, qu, qm = (f64(a) for a in args)
  want = central_diff(lambda x: {"l": np_ica_term(x, k, qu, qm, TEMP, ALPHA)[0]}, q)["l"]
  np.testing.assert_allclose(np.asarray(grads[0]), want, rtol=0, atol=1e-5)
  # temp gets gradient through the student logits only (the target is a constant):
  # dL/dtemp = mean_i sum_j (target_ij - p_ij) * s_ij / temp^2, s = query @ all^T.
  allk = np.concatenate([k, qu], 0)
  s, s_m = q @ allk.T, qm @ allk.T
  target = ALPHA * np_softmax(s_m / TEMP) + (1 - ALPHA) * np.eye(B, B + Q)
  ref = np.mean(np.sum((target - np_softmax(s / TEMP)) * s, -1)) / TEMP ** 2
  np.testing.assert_allclose(float(grads[4]), ref, rtol=1e-4)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("terms", [("i2t", "t2i", "i2i", "t2t"), ("t2i", "i2t"),
                                   ("i2t", "t2i", "t2t")])
def test_ica_loss_matches_reference(feats, reduction, terms):
  names = ["img", "txt", "img_m", "txt_m", "img_queue", "txt_queue"]
  total, parts, s_i2t, s_t2i = L.ica_loss(*(feats[n] for n in names), TEMP, ALPHA,
                                          terms=terms, reduction=reduction)
  ref = {t: np_ica_term(*(f64(feats[n]) for n in ICA_SPEC[t]), TEMP, ALPHA) for t in terms}
  assert sorted(parts) == sorted(terms)
  for t in terms:
    np.testing.assert_allclose(float(parts[t]), ref[t][0], **TOL)
  ref_total = sum(r[0] for r in ref.values()) / (len(terms) if reduction == "mean" else 1)
  np.testing.assert_allclose(float(total), ref_total, **TOL)
  np.testing.assert_allclose(np.asarray(s_i2t), ref["i2t"][1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(s_t2i), ref["t2i"][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw,msg", [(dict(terms=("i2t", "i2i")), "'t2i'"),
                                    (dict(terms=("i2t", "t2i", "x2y")), "unknown"),
                                    (dict(terms=("i2t", "t2i", "t2i")), "duplicate"),
                                    (dict(reduction="max"), "reduction")])
def test_ica_loss_bad_arguments(feats, kw, msg):
  names = ["img", "txt", "img_m", "txt_m", "img_queue", "txt_queue"]
  with pytest.raises(ValueError, match=msg):
    L.ica_loss(*(feats[n] for n in names), TEMP, ALPHA, **kw)


def test_ica_queue_sharded_over_devices(feats):
  # tests/conftest.py provides 8 fake CPU devices; shard the queue along Q.
  n = len(jax.devices())
  assert n >= 2, "needs several devices: tests/conftest.py sets 8 CPU devices"
  rng = np.random.default_rng(10)
  queue = unit(rng, 4 * n, E)
  mesh = Mesh(np.array(jax.devices()), ("d",))
  sharded = jax.device_put(queue, NamedSharding(mesh, P("d", None)))
  q, k, _, qm = (feats[name] for name in ICA_SPEC["i2t"])
  loss, _ = jax.jit(L.ica_term)(q, k, sharded, qm, TEMP, ALPHA)
  ref, _ = np_ica_term(f64(q), f64(k), f64(queue), f64(qm), TEMP, ALPHA)
  np.testing.assert_allclose(float(loss), ref, **TOL)


# ------------------------------------------------------------------------ codebook

CB_ARGS = ["img", "txt", "img_m", "txt_m", "codebook"]


@pytest.mark.parametrize("pairing", ["cross", "same"])
def test_codebook_loss_matches_reference(feats, pairing):
  f = jax.jit(lambda *a: L.codebook_loss(*a, TEMP, pairing=pairing, num_iters=60,
                                         num_inner=2))
  total, parts, plans = f(*(feats[n] for n in CB_ARGS))
  ref_total, ref, ref_plans = np_codebook(*(f64(feats[n]) for n in CB_ARGS), TEMP,
                                          pairing, num_iters=60, num_inner=2)
  for m in ("img", "txt"):
    np.testing.assert_allclose(np.asarray(plans[m]) * B, ref_plans[m] * B, atol=1e-5)
  for name in ("ot_img", "ot_txt", "i2p", "t2p"):
    np.testing.assert_allclose(float(parts[name]), ref[name], **TOL)
  np.testing.assert_allclose(float(total), ref_total, **TOL)
  # The pairings must differ on this data, or the test could not tell them apart.
  other = np_codebook(*(f64(feats[n]) for n in CB_ARGS), TEMP,
                      "same" if pairing == "cross" else "cross", num_iters=60,
                      num_inner=2)[1]
  assert abs(other["i2p"] - ref["i2p"]) > 1e-3


def test_codebook_gradients(feats):
  args = [jnp.asarray(feats[n]) for n in CB_ARGS]

  @jax.jit
  def all_grads(*a):
    return {name: jax.grad(lambda *x: L.codebook_loss(*x, TEMP)[1][name],
                           argnums=tuple(range(5)))(*a)
            for name in ("ot_img", "ot_txt", "i2p", "t2p")}

  grads = all_grads(*args)
  for name in ("ot_img", "ot_txt"):
    g = grads[name]
    assert np.any(np.asarray(g[4])), name                 # the codebook
    for gi in g[:4]:                                      # students, sources
      assert not np.any(np.asarray(gi)), name
  for name, student in (("i2p", 0), ("t2p", 1)):
    g = grads[name]
    assert np.any(np.asarray(g[student])) and np.any(np.asarray(g[4]))
    assert not np.any(np.asarray(g[2])) and not np.any(np.asarray(g[3]))
  # Values: central differences of the float64 reference with its own plans held fixed
  # (IPOT's plan, hence the targets, are constants in the method), w.r.t. the students
  # and the raw codebook (through its L2 normalisation). Measured errors: <= 4e-7 on
  # students (entries ~1.8), <= 4e-8 on the codebook (entries 0.007 to 0.16).
  x = [f64(a) for a in args]
  plans = np_codebook(*x, TEMP, "cross")[2]
  for i, atol in ((0, 1e-5), (1, 1e-5), (4, 1e-6)):
    def parts(v, i=i):
      return np_codebook(*x[:i], v, *x[i + 1:], TEMP, "cross", plans=plans)[1]
    want = central_diff(parts, x[i])
    for name in want:
      np.testing.assert_allclose(np.asarray(grads[name][i]), want[name], rtol=0,
                                 atol=atol, err_msg=f"{name}, argument {i}")


def test_codebook_bad_pairing(feats):
  with pytest.raises(ValueError, match="pairing"):
    L.codebook_loss(*(feats[n] for n in CB_ARGS), TEMP, pairing="both")
