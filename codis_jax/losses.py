"""CODIS losses: intra/cross-modal alignment (ICA), codebook/OT, ITM and MLM.

Pure functions of arrays; the math follows ``method-notes.md`` (paper sections 3.1-3.3
and ALBEF's public code for what the paper leaves open). All L2-normalised features are
float32 [B, E]; losses are computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from codis_jax.ot import ipot

__all__ = [
    "soft_cross_entropy", "ica_term", "ica_loss", "codebook_loss",
    "sample_hard_negatives", "itm_loss", "mask_tokens", "mlm_loss",
]

ICA_TERMS = ("i2t", "t2i", "i2i", "t2t")
_f32 = jnp.float32


def _check_2d(name: str, x: jax.Array) -> None:
  if x.ndim != 2:
    raise ValueError(f"{name} must be 2-D, got shape {x.shape}")


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over rows of -sum(targets * log_softmax(logits)).

  logits, targets: [B, C]. Returns a float32 scalar.
  """
  if logits.shape != targets.shape:
    raise ValueError(
        f"soft_cross_entropy: logits {logits.shape} and targets {targets.shape} differ")
  logp = jax.nn.log_softmax(logits.astype(_f32), axis=-1)
  return -jnp.mean(jnp.sum(targets.astype(_f32) * logp, axis=-1))


# ----------------------------------------------------------------------------- ICA

def ica_term(query: jax.Array, keys: jax.Array, queue: jax.Array, query_m: jax.Array,
             temp, alpha) -> tuple[jax.Array, jax.Array]:
  """One distilled contrastive term, e.g. i2t (paper eq. 4-5, ALBEF ITC).

  logits = query @ [keys ; queue]^T / temp; the target mixes the teacher softmax
  (alpha) with the one-hot positive (column i for row i).

  Args:
    query: [B, E] student features of the query modality.
    keys: [B, E] teacher features of the key modality for this batch.
    queue: [Q, E] queue of teacher features of the key modality (Q may be 0).
    query_m: [B, E] teacher features of the query modality.
    temp: scalar temperature (already clamped); gets gradient via the student only.
    alpha: scalar distillation weight.

  Returns:
    (loss scalar, student batch-block logits [B, B]).
  """
  for name, x in (("query", query), ("keys", keys), ("queue", queue),
                  ("query_m", query_m)):
    _check_2d(f"ica_term: {name}", x)
  b = query.shape[0]
  if keys.shape[0] != b or query_m.shape != query.shape:
    raise ValueError(
        f"ica_term: query {query.shape}, keys {keys.shape}, query_m {query_m.shape}"
        " must share the batch size (and query_m the shape of query)")
  if keys.shape[1] != query.shape[1] or queue.shape[1] != query.shape[1]:
    raise ValueError(
        f"ica_term: feature sizes differ: query {query.shape}, keys {keys.shape},"
        f" queue {queue.shape}")
  keys, queue, query_m = (jax.lax.stop_gradient(x.astype(_f32))
                          for x in (keys, queue, query_m))
  query = query.astype(_f32)
  temp = jnp.asarray(temp, _f32)

  # The batch block and the queue block are kept apart (never concatenated) so the
  # queue can be sharded along Q; the softmax normaliser combines both blocks. The
  # barrier keeps XLA's DotMerger from joining the queue's matmul with the other
  # matmuls of feat (the other queue's, the codebook's) by concatenating their
  # operands, a copy of the queue every step (H100 roofline: 0.25 ms of the step).
  def log_probs(feat, t):
    lb = feat @ keys.T / t                          # [B, B]
    fq, q = jax.lax.optimization_barrier((feat, queue))
    lq = fq @ q.T / t                               # [B, Q]
    lse = jnp.logaddexp(jax.nn.logsumexp(lb, axis=-1),
                        jax.nn.logsumexp(lq, axis=-1))[:, None]
    return lb, lb - lse, lq - lse

  logits_b, logp_b, logp_q = log_probs(query, temp)
  # Targets carry no gradient (ALBEF computes them under no_grad, temp included).
  _, tlogp_b, tlogp_q = log_probs(query_m, jax.lax.stop_gradient(temp))
  alpha = jax.lax.stop_gradient(jnp.asarray(alpha, _f32))
  target_b = alpha * jnp.exp(tlogp_b) + (1.0 - alpha) * jnp.eye(b, dtype=_f32)
  target_q = alpha * jnp.exp(tlogp_q)
  per_row = (jnp.sum(target_b * logp_b, axis=-1)
             + jnp.sum(target_q * logp_q, axis=-1))
  return -jnp.mean(per_row), logits_b


def ica_loss(img, txt, img_m, txt_m, img_queue, txt_queue, temp, alpha, *,
             terms: Sequence[str] = ICA_TERMS, reduction: str = "sum"):
  """L_ica (paper eq. 5): the enabled terms of i2t, t2i, i2i, t2t.

  Args:
    img, txt: [B, E] student features; img_m, txt_m: [B, E] teacher features.
    img_queue, txt_queue: [Q, E] teacher feature queues.
    temp, alpha: scalars (see ``ica_term``).
    terms: subset of ("i2t", "t2i", "i2i", "t2t"); must contain i2t and t2i.
    reduction: "sum" (paper eq. 5) or "mean" over the enabled terms.

  Returns:
    (total scalar, {term: loss}, sim_i2t [B, B], sim_t2i [B, B]) where the sims are
    the student batch-block logits (for ITM hard-negative sampling).
  """
  terms = tuple(terms)
  unknown = [t for t in terms if t not in ICA_TERMS]
  if unknown:
    raise ValueError(f"ica_loss: unknown terms {unknown}; valid are {ICA_TERMS}")
  if len(set(terms)) != len(terms):
    raise ValueError(f"ica_loss: duplicate terms in {terms}")
  if "i2t" not in terms or "t2i" not in terms:
    raise ValueError(
        f"ica_loss: terms must include 'i2t' and 't2i' (their similarities feed ITM "
        f"hard-negative sampling), got {terms}")
  if reduction not in ("sum", "mean"):
    raise ValueError(f"ica_loss: reduction must be 'sum' or 'mean', got {reduction!r}")

  # term -> (query, keys, queue, query_m)
  spec = {
      "i2t": (img, txt_m, txt_queue, img_m),
      "t2i": (txt, img_m, img_queue, txt_m),
      "i2i": (img, img_m, img_queue, img_m),
      "t2t": (txt, txt_m, txt_queue, txt_m),
  }
  losses, sims = {}, {}
  for name in terms:
    losses[name], sims[name] = ica_term(*spec[name], temp, alpha)
  total = sum(losses.values())
  if reduction == "mean":
    total = total / len(terms)
  return total, losses, sims["i2t"], sims["t2i"]


# ------------------------------------------------------------------------ codebook

def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  # As torch.nn.functional.normalize: divide by max(||x||, eps).
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def codebook_loss(img, txt, img_src, txt_src, codebook, temp, *, pairing: str = "cross",
                  beta: float = 0.5, num_iters: int = 50, num_inner: int = 1):
  """L_code (paper eq. 1-3): OT terms plus prototype prediction from the plans.

  Args:
    img, txt: [B, E] student features (receive gradient via i2p / t2p).
    img_src, txt_src: [B, E] features the plans are computed from (teacher features
      by default); no gradient.
    codebook: [K, E] raw codebook; rows are L2-normalised here (Cn).
    temp: scalar temperature for the prototype logits.
    pairing: "cross" (eq. 2 / Fig. 3: image student predicts the TEXT plan and vice
      versa) or "same" (Algorithm 1 / eq. 3: each modality its own plan).
    beta, num_iters, num_inner: IPOT settings (``codis_jax.ot.ipot``).

  Returns:
    (total, {ot_img, ot_txt, i2p, t2p}, {img: plan [B, K], txt: plan [B, K]}).
  """
  if pairing not in ("cross", "same"):
    raise ValueError(f"codebook_loss: pairing must be 'cross' or 'same', got {pairing!r}")
  for name, x in (("img", img), ("txt", txt), ("img_src", img_src),
                  ("txt_src", txt_src), ("codebook", codebook)):
    _check_2d(f"codebook_loss: {name}", x)
  e = codebook.shape[1]
  for name, x in (("img", img), ("txt", txt), ("img_src", img_src), ("txt_src", txt_src)):
    if x.shape[1] != e:
      raise ValueError(
          f"codebook_loss: {name} has feature size {x.shape[1]}, codebook has {e}")
  cn = _l2_normalize(codebook.astype(_f32))
  temp = jnp.asarray(temp, _f32)

  costs, plans, ot_terms, targets = {}, {}, {}, {}
  for m, src in (("img", img_src), ("txt", txt_src)):
    costs[m] = 1.0 - jax.lax.stop_gradient(src.astype(_f32)) @ cn.T   # [B, K]
  # Both plans in one batched IPOT loop: half the kernel launches of two loops.
  solve = functools.partial(ipot, beta=beta, num_iters=num_iters, num_inner=num_inner)
  plans["img"], plans["txt"] = jax.vmap(solve)(jnp.stack([costs["img"], costs["txt"]]))
  for m in ("img", "txt"):
    # Gradient reaches the codebook only: src and the plan are constants.
    ot_terms[m] = jnp.sum(plans[m] * costs[m])
    row = jnp.sum(plans[m], axis=1, keepdims=True)
    targets[m] = plans[m] / jnp.maximum(row, jnp.finfo(_f32).tiny)

  other = {"img": "txt", "txt": "img"}
  tgt_for = (other if pairing == "cross" else {"img": "img", "txt": "txt"})
  i2p = soft_cross_entropy(img.astype(_f32) @ cn.T / temp, targets[tgt_for["img"]])
  t2p = soft_cross_entropy(txt.astype(_f32) @ cn.T / temp, targets[tgt_for["txt"]])
  losses = {"ot_img": ot_terms["img"], "ot_txt": ot_terms["txt"], "i2p": i2p, "t2p": t2p}
  total = losses["ot_img"] + losses["ot_txt"] + i2p + t2p
  return total, losses, plans


# ----------------------------------------------------------------------------- ITM

def _sample_off_diagonal(key, sim: jax.Array, group: int) -> jax.Array:
  """For each row i of sim [B, B], one column j != i in i's group, p ∝ exp(sim[i, j])."""
  b = sim.shape[0]
  rows = jnp.arange(b)
  same_group = (rows[:, None] // group) == (rows[None, :] // group)
  allowed = same_group & (rows[:, None] != rows[None, :])
  sim = jax.lax.stop_gradient(sim).astype(_f32)
  # ALBEF: softmax over the row, diagonal zeroed, renormalised. That equals a softmax
  # over the allowed columns only, which we sample directly from the masked logits
  # (no underflow when the diagonal dominates). `where` keeps NaNs outside the
  # allowed set from leaking into a row.
  logits = jnp.where(allowed, sim, -jnp.inf)
  has_nan_or_posinf = jnp.any(allowed & (jnp.isnan(sim) | (sim == jnp.inf)), axis=1)
  all_zero = ~jnp.any(allowed & (logits > -jnp.inf), axis=1)
  invalid = has_nan_or_posinf | all_zero
  uniform = jnp.where(allowed, 0.0, -jnp.inf)
  logits = jnp.where(invalid[:, None], uniform, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sample_hard_negatives(rng, sim_i2t: jax.Array, sim_t2i: jax.Array, *,
                          group_size: Optional[int] = None):
  """ITM hard negatives (ALBEF): one text per image and one image per text.

  Args:
    rng: PRNG key.
    sim_i2t, sim_t2i: [B, B] image->text and text->image similarity logits.
    group_size: if set (must divide B), candidates are restricted to the same
      contiguous group of rows, so the result does not depend on device count.

  Returns:
    (neg_txt_idx [B] int32, neg_img_idx [B] int32); never the diagonal. Rows whose
    weights are all zero or non-finite fall back to uniform over allowed candidates.
  """
  for name, s in (("sim_i2t", sim_i2t), ("sim_t2i", sim_t2i)):
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
      raise ValueError(f"sample_hard_negatives: {name} must be [B, B], got {s.shape}")
  if sim_i2t.shape != sim_t2i.shape:
    raise ValueError(
        f"sample_hard_negatives: shapes differ: {sim_i2t.shape} vs {sim_t2i.shape}")
  b = sim_i2t.shape[0]
  group = b if group_size is None else int(group_size)
  if group < 2:
    raise ValueError(
        f"sample_hard_negatives: need at least 2 candidates per group (batch {b}, "
        f"group_size {group_size}) to sample a negative other than the positive")
  if b % group:
    raise ValueError(
        f"sample_hard_negatives: group_size {group} does not divide batch size {b}")
  k_txt, k_img = jax.random.split(rng)
  return (_sample_off_diagonal(k_txt, sim_i2t, group),
          _sample_off_diagonal(k_img, sim_t2i, group))


def itm_loss(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """ITM cross-entropy and accuracy.

  logits: [3B, 2] for [positives; negatives for images; negatives for texts];
  labels are [1]*B + [0]*2B. Returns (mean CE, accuracy), float32 scalars.
  """
  if logits.ndim != 2 or logits.shape[1] != 2 or logits.shape[0] % 3:
    raise ValueError(f"itm_loss: logits must be [3B, 2], got {logits.shape}")
  b = logits.shape[0] // 3
  labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
  logp = jax.nn.log_softmax(logits.astype(_f32), axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))
  acc = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(_f32))
  return loss, acc


# ----------------------------------------------------------------------------- MLM

def mask_tokens(rng, ids, attention_mask, *, vocab_size: int, mask_id: int, cls_id: int,
                pad_id: int, prob: float = 0.15):
  """BERT/ALBEF masking for MLM.

  Each token is selected with probability ``prob`` (never [CLS], never padding);
  of the selected, 80% become mask_id, 10% a uniform random token in
  [0, vocab_size), 10% stay unchanged.

  Args:
    rng: PRNG key. ids, attention_mask: [B, L] integer arrays.

  Returns:
    (masked_ids [B, L] int32, targets [B, L] int32 = original ids,
     weights [B, L] float32 = 1 where a token was selected).
  """
  if ids.ndim != 2 or ids.shape != attention_mask.shape:
    raise ValueError(
        f"mask_tokens: ids {ids.shape} and attention_mask {attention_mask.shape} "
        "must both be [B, L]")
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f"mask_tokens: prob must be in [0, 1], got {prob}")
  if vocab_size < 1:
    raise ValueError(f"mask_tokens: vocab_size must be >= 1, got {vocab_size}")
  ids = ids.astype(jnp.int32)
  k_sel, k_mask, k_rand, k_tok = jax.random.split(rng, 4)
  eligible = (attention_mask != 0) & (ids != pad_id) & (ids != cls_id)
  selected = jax.random.bernoulli(k_sel, prob, ids.shape) & eligible
  to_mask = selected & jax.random.bernoulli(k_mask, 0.8, ids.shape)
  # Half of the remaining 20% -> random token (10% overall), the rest unchanged.
  to_rand = selected & ~to_mask & jax.random.bernoulli(k_rand, 0.5, ids.shape)
  rand_tok = jax.random.randint(k_tok, ids.shape, 0, vocab_size, dtype=jnp.int32)
  masked = jnp.where(to_mask, jnp.int32(mask_id), jnp.where(to_rand, rand_tok, ids))
  return masked, ids, selected.astype(_f32)


def mlm_loss(logits, teacher_logits, targets, weights, alpha) -> jax.Array:
  """(1 - alpha) * CE(targets) + alpha * CE(softmax(teacher_logits)) over selected tokens.

  Args:
    logits: [B, L, V] student logits. teacher_logits: [B, L, V] or None (plain CE,
      alpha ignored). targets: [B, L] int token ids. weights: [B, L], 1 on selected.
    alpha: scalar distillation weight.

  Returns:
    float32 scalar; each term averaged over selected tokens (count floored at 1, so
    no selected token gives 0).
  """
  if logits.ndim != 3 or targets.shape != logits.shape[:2] or weights.shape != targets.shape:
    raise ValueError(
        f"mlm_loss: expected logits [B, L, V] and targets/weights [B, L], got "
        f"{logits.shape}, {targets.shape}, {weights.shape}")
  if teacher_logits is not None and teacher_logits.shape != logits.shape:
    raise ValueError(
        f"mlm_loss: teacher_logits {teacher_logits.shape} != logits {logits.shape}")
  w = weights.astype(_f32)
  sel = w > 0
  denom = jnp.maximum(jnp.sum(w), 1.0)
  # Clip so ignore-style labels (e.g. -100) on unselected tokens gather safely; `where`
  # keeps anything non-finite on unselected positions out of the sum.
  tgt = jnp.clip(targets.astype(jnp.int32), 0, logits.shape[-1] - 1)
  alpha = jnp.asarray(0.0 if teacher_logits is None else alpha, _f32)
  ce = _token_ce(logits, teacher_logits, tgt, alpha)
  return jnp.sum(jnp.where(sel, ce * w, 0.0)) / denom


@jax.custom_vjp
def _token_ce(logits, teacher_logits, targets, alpha):
  """Per token (1 - alpha) * -log p[target] + alpha * -sum(p_t * log p), p = softmax(logits),
  p_t = softmax(teacher_logits) (None: alpha must be 0). logits, teacher_logits [B, L, V];
  targets int [B, L]; alpha scalar -> float32 [B, L].

  A custom VJP so that the logits' gradient, g * ((1 - alpha) * (p - onehot) +
  alpha * (p * sum(p_t) - p_t)), is one elementwise pass over the [B, L, V] logits:
  autodiff of log_softmax and take_along_axis scattered the target terms into a float32
  [B, L, V] array and reduced it again (paper step, H100 roofline: 2.04 GB moved).
  """
  return _token_ce_fwd(logits, teacher_logits, targets, alpha)[0]


def _token_ce_fwd(logits, teacher_logits, targets, alpha):
  x = logits.astype(_f32)
  lse = jax.nn.logsumexp(x, axis=-1)
  ce = lse - jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
  if teacher_logits is None:
    return ce, (logits, None, targets, alpha, lse, None, None)
  xt = teacher_logits.astype(_f32)
  lse_t = jax.nn.logsumexp(xt, axis=-1)
  p_t = jnp.exp(xt - lse_t[..., None])
  # -sum(p_t * (x - lse)) with sum(p_t) kept (not assumed 1): the plain formula's value.
  mass = jnp.sum(p_t, axis=-1)
  kd = lse * mass - jnp.sum(p_t * x, axis=-1)
  return (1.0 - alpha) * ce + alpha * kd, (logits, teacher_logits, targets, alpha, lse,
                                            lse_t, mass)


def _token_ce_bwd(res, g):
  logits, teacher_logits, targets, alpha, lse, lse_t, mass = res
  x = logits.astype(_f32)
  p = jnp.exp(x - lse[..., None])
  onehot = jnp.arange(x.shape[-1]) == targets[..., None]
  d = (1.0 - alpha) * (p - onehot)
  if teacher_logits is not None:
    p_t = jnp.exp(teacher_logits.astype(_f32) - lse_t[..., None])
    d = d + alpha * (p * mass[..., None] - p_t)
  # The teacher is a fixed target (no gradient), as stop_gradient made it before.
  return (g[..., None] * d).astype(logits.dtype), None, None, None


_token_ce.defvjp(_token_ce_fwd, _token_ce_bwd)
