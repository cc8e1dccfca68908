"""Tests for the ITM and MLM parts of codis_jax.losses (hard-negative sampling, ITM, token
masking, MLM with distillation) against float64 numpy references from method-notes.md."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from codis_jax import losses as L
from test_losses import B, TOL, f64, np_log_softmax, np_negative_probs, np_softmax

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
  # The logits' gradient (a custom VJP) against central differences of numpy's loss.
  grad = jax.grad(L.mlm_loss)(logits, teacher, jnp.asarray(targets_ign),
                              jnp.asarray(weights), 0.4)
  assert grad.dtype == dtype
  x0 = f64(logits.astype(jnp.float32))
  t64 = None if teacher is None else f64(teacher.astype(jnp.float32))
  want = np.zeros_like(x0)
  for i in np.ndindex(*x0.shape):
    e = np.zeros_like(x0)
    e[i] = 1e-6
    want[i] = (np_mlm(x0 + e, t64, targets, f64(weights), 0.4)
               - np_mlm(x0 - e, t64, targets, f64(weights), 0.4)) / 2e-6
  f32 = dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(grad.astype(jnp.float32)), want,
                             atol=1e-6 if f32 else 2e-3, rtol=1e-4 if f32 else 1e-2)
  assert not np.any(np.asarray(grad.astype(jnp.float32))[weights == 0])


def test_mlm_loss_zero_selected_and_teacher_gradient():
  rng = np.random.default_rng(9)
  logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
  targets = jnp.zeros((2, 5), jnp.int32)
  zero = jnp.zeros((2, 5), jnp.float32)
  vg = jax.jit(jax.value_and_grad(L.mlm_loss, argnums=(0, 1)))
  loss, grads = vg(logits, teacher, targets, zero, 0.4)
  # No token selected: the loss is the constant 0, so every gradient is exactly 0.
  assert float(loss) == 0.0 and not any(np.any(np.asarray(g)) for g in grads)
  _, grads = vg(logits, teacher, targets, zero + 1, 0.4)
  assert np.any(np.asarray(grads[0])) and not np.any(np.asarray(grads[1]))
  with pytest.raises(ValueError, match="teacher_logits"):
    L.mlm_loss(logits, teacher[:, :3], targets, zero, 0.4)
  with pytest.raises(ValueError, match=r"\[B, L, V\]"):
    L.mlm_loss(logits, None, targets[:, :3], zero, 0.4)
