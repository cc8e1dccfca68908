"""Tests for codis_jax.losses against float64 numpy references written from method-notes.md."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import stats

from codis_jax import losses as L

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


def np_ipot(cost, beta=0.5, num_iters=50, num_inner=1):
    n, k = cost.shape
    a, t, sigma = np.exp(-cost / beta), np.ones((n, k)), np.ones(k) / k
    for _ in range(num_iters):
        q = a * t
        for _ in range(num_inner):
            delta = (1.0 / n) / (q @ sigma)
            sigma = (1.0 / k) / (q.T @ delta)
        t = delta[:, None] * q * sigma[None, :]
    return t


def np_codebook(img, txt, img_src, txt_src, codebook, temp, pairing, **ipot_kw):
    cn = codebook / np.linalg.norm(codebook, axis=1, keepdims=True)
    d = {"img": 1 - img_src @ cn.T, "txt": 1 - txt_src @ cn.T}
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
    assert np.any(np.asarray(grads[0]))
    for g in grads[1:4]:
        assert not np.any(np.asarray(g))
    # temp gets gradient through the student logits only (the target is a constant):
    # dL/dtemp = mean_i sum_j (target_ij - p_ij) * s_ij / temp^2, s = query @ all^T.
    q, k, qu, qm = (f64(a) for a in args)
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
    if n < 2:
        pytest.skip("needs several devices (tests/conftest.py sets 8 CPU devices)")
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


def test_codebook_bad_pairing(feats):
    with pytest.raises(ValueError, match="pairing"):
        L.codebook_loss(*(feats[n] for n in CB_ARGS), TEMP, pairing="both")


# ----------------------------------------------------------------- hard negatives

# One compiled sampler per group size, shared by the tests (threefry compiles slowly).
@functools.partial(jax.jit, static_argnames="group_size")
def _sample_vmapped(keys, sim_i2t, sim_t2i, group_size):
    return jax.vmap(lambda k: L.sample_hard_negatives(k, sim_i2t, sim_t2i,
                                                      group_size=group_size))(keys)


def _sample_many(sim_i2t, sim_t2i, n, group_size=None, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    txt, img = _sample_vmapped(keys, jnp.asarray(sim_i2t), jnp.asarray(sim_t2i),
                               group_size=group_size)
    return np.asarray(txt), np.asarray(img)


def _assert_follows(samples, probs):
    """Chi-square goodness of fit per row (p < 1e-6 fails), ignoring zero-prob columns."""
    n, b = samples.shape
    for i in range(b):
        counts = np.bincount(samples[:, i], minlength=probs.shape[1])
        assert np.all(counts[probs[i] == 0] == 0), (i, counts)
        nz = probs[i] > 0
        stat = np.sum((counts[nz] - n * probs[i, nz]) ** 2 / (n * probs[i, nz]))
        assert stat < stats.chi2.ppf(1 - 1e-6, nz.sum() - 1), (i, counts, probs[i] * n)


@pytest.mark.parametrize("group_size", [None, 3])
def test_hard_negatives_follow_softmax(group_size):
    rng = np.random.default_rng(3)
    s1 = (rng.normal(size=(B, B)) * 2).astype(np.float32)
    s2 = (rng.normal(size=(B, B)) * 2).astype(np.float32)
    txt, img = _sample_many(s1, s2, 20000, group_size)
    assert txt.dtype == np.int32 and img.dtype == np.int32
    g = group_size or B
    _assert_follows(txt, np_negative_probs(f64(s1), g))
    _assert_follows(img, np_negative_probs(f64(s2), g))
    rows = np.arange(B)
    assert not np.any(txt == rows) and not np.any(img == rows)
    assert np.all(txt // g == rows // g) and np.all(img // g == rows // g)


def test_hard_negatives_deterministic_and_dominant_diagonal():
    # A huge diagonal underflows ALBEF's softmax weights; sampling must still follow
    # the renormalised off-diagonal distribution.
    s = np.tile(np.arange(B, dtype=np.float32), (B, 1)) + np.eye(B, dtype=np.float32) * 1e4
    txt, _ = _sample_many(s, s, 20000)
    p = np.zeros((B, B))
    for i in range(B):
        off = [j for j in range(B) if j != i]
        p[i, off] = np_softmax(np.arange(float(B))[off])
    _assert_follows(txt, p)
    again, _ = _sample_many(s, s, 20000)
    other, _ = _sample_many(s, s, 20000, seed=1)
    np.testing.assert_array_equal(again, txt)
    assert not np.array_equal(other, txt)


def test_hard_negatives_fallback_uniform():
    rng = np.random.default_rng(4)
    s = rng.normal(size=(B, B)).astype(np.float32)
    s[0, :] = -np.inf
    s[0, 0] = 5.0                     # only the (forbidden) diagonal has weight
    s[1, 2] = np.nan
    s[2, 0] = np.inf
    s[3, 0] = np.nan                  # outside row 3's group {3, 4, 5}: irrelevant
    s[4, 4] = np.nan                  # the diagonal is never a candidate
    txt, _ = _sample_many(s, s, 20000, group_size=3)
    _assert_follows(txt[:, :3], np_negative_probs(np.zeros((B, B)), 3)[:3])
    clean = np.where(np.isfinite(s), s, 0.0)
    _assert_follows(txt[:, 3:], np_negative_probs(f64(clean), 3)[3:])


@pytest.mark.parametrize("shape,group,msg", [((1, 1), None, "at least 2"),
                                             ((6, 6), 1, "at least 2"),
                                             ((6, 6), 4, "divide"),
                                             ((6, 5), None, r"\[B, B\]")])
def test_hard_negatives_bad_arguments(shape, group, msg):
    s = jnp.zeros(shape)
    with pytest.raises(ValueError, match=msg):
        L.sample_hard_negatives(jax.random.PRNGKey(0), s, s, group_size=group)


# ------------------------------------------------------------------------ ITM, MLM

def test_itm_loss():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3 * 32, 2)).astype(np.float32) * 3
    loss, acc = L.itm_loss(jnp.asarray(logits))
    labels = np.array([1] * 32 + [0] * 64)
    logp = np_log_softmax(f64(logits))
    np.testing.assert_allclose(float(loss), -np.mean(logp[np.arange(96), labels]), **TOL)
    np.testing.assert_allclose(float(acc), np.mean(logits.argmax(1) == labels), **TOL)
    with pytest.raises(ValueError, match=r"\[3B, 2\]"):
        L.itm_loss(jnp.zeros((10, 2)))


VOCAB, MASK, CLS, PAD = 1000, 3, 1, 0


def _token_batch(seed, b=4096, length=48):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, size=(b, length))
    lengths = rng.integers(2, length + 1, size=b)
    attn = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    ids[:, 0] = CLS
    ids[attn == 0] = PAD
    return ids.astype(np.int32), attn


def test_mask_tokens_statistics():
    ids, attn = _token_batch(6)
    attn[:5, 2] = 0                   # masked-out but non-PAD ids: never selected either
    kw = dict(vocab_size=VOCAB, mask_id=MASK, cls_id=CLS, pad_id=PAD)
    key = jax.random.PRNGKey(0)
    mask = jax.jit(functools.partial(L.mask_tokens, **kw))
    masked, targets, w = (np.asarray(x) for x in mask(key, ids, attn))
    assert masked.dtype == np.int32 and targets.dtype == np.int32 and w.dtype == np.float32
    np.testing.assert_array_equal(targets, ids)
    sel = w == 1
    assert np.all((w == 0) | sel)
    eligible = (attn == 1) & (ids != CLS) & (ids != PAD)
    assert not np.any(sel & ~eligible)
    np.testing.assert_array_equal(masked[~sel], ids[~sel])
    n_el, n_sel = eligible.sum(), sel.sum()            # ~98k eligible, ~15k selected
    assert abs(n_sel / n_el - 0.15) < 5 * np.sqrt(0.15 * 0.85 / n_el)
    is_mask = masked[sel] == MASK
    is_same = masked[sel] == ids[sel]
    is_rand = ~is_mask & ~is_same
    for frac, p in ((is_mask.mean(), 0.8), (is_same.mean(), 0.1), (is_rand.mean(), 0.1)):
        assert abs(frac - p) < 5 * np.sqrt(p * (1 - p) / n_sel), (frac, p)
    rand = masked[sel][is_rand]
    assert rand.min() >= 0 and rand.max() < VOCAB and len(np.unique(rand)) > 500
    again = mask(key, ids, attn)[0]
    np.testing.assert_array_equal(np.asarray(again), masked)
    other = mask(jax.random.PRNGKey(1), ids, attn)[0]
    assert not np.array_equal(np.asarray(other), masked)
    with pytest.raises(ValueError, match="prob"):
        L.mask_tokens(key, ids, attn, prob=1.5, **kw)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        L.mask_tokens(key, ids, attn[:, :3], **kw)


def np_mlm(logits, teacher, targets, weights, alpha):
    logp = np_log_softmax(logits)
    denom = max(weights.sum(), 1.0)
    ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    loss = np.sum(ce * weights) / denom
    if teacher is None:
        return loss
    kd = np.sum(-np.sum(np_softmax(teacher) * logp, -1) * weights) / denom
    return (1 - alpha) * loss + alpha * kd


@pytest.mark.parametrize("use_teacher", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mlm_loss_matches_reference(use_teacher, dtype):
    rng = np.random.default_rng(8)
    logits = jnp.asarray(rng.normal(size=(3, 7, 11)) * 3, dtype)
    teacher = jnp.asarray(rng.normal(size=(3, 7, 11)) * 3, dtype) if use_teacher else None
    targets = rng.integers(0, 11, size=(3, 7)).astype(np.int32)
    weights = (rng.uniform(size=(3, 7)) < 0.4).astype(np.float32)
    got = L.mlm_loss(logits, teacher, jnp.asarray(targets), jnp.asarray(weights), 0.4)
    assert got.dtype == jnp.float32
    ref = np_mlm(f64(logits.astype(jnp.float32)),
                 None if teacher is None else f64(teacher.astype(jnp.float32)),
                 targets, f64(weights), 0.4)
    np.testing.assert_allclose(float(got), ref, **TOL)
    # Ignore-style labels on unselected tokens do not change the loss.
    targets_ign = np.where(weights > 0, targets, -100).astype(np.int32)
    got_ign = L.mlm_loss(logits, teacher, jnp.asarray(targets_ign), jnp.asarray(weights), 0.4)
    np.testing.assert_allclose(float(got_ign), float(got), rtol=1e-7)


def test_mlm_loss_zero_selected_and_teacher_gradient():
    rng = np.random.default_rng(9)
    logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    teacher = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    targets = jnp.zeros((2, 5), jnp.int32)
    zero = jnp.zeros((2, 5), jnp.float32)
    vg = jax.jit(jax.value_and_grad(L.mlm_loss, argnums=(0, 1)))
    loss, grads = vg(logits, teacher, targets, zero, 0.4)
    assert float(loss) == 0.0 and all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    _, grads = vg(logits, teacher, targets, zero + 1, 0.4)
    assert np.any(np.asarray(grads[0])) and not np.any(np.asarray(grads[1]))
    with pytest.raises(ValueError, match="teacher_logits"):
        L.mlm_loss(logits, teacher[:, :3], targets, zero, 0.4)
    with pytest.raises(ValueError, match=r"\[B, L, V\]"):
        L.mlm_loss(logits, None, targets[:, :3], zero, 0.4)
