"""The CODIS train step: one pure function `train_step(state, batch, rng) -> (state, metrics)`.

Order inside the step (paper Alg. 1 + ALBEF):
  1. mask the text for MLM (on device, from the step's rng);
  2. teacher forward only (EMA weights): image tokens/features, text features, MLM logits;
  3. student forward + losses: L_ica (queues), L_code (IPOT plans), ITM (hard negatives),
     MLM (with teacher distillation); total = eq. 9 with config weights;
  4. AdamW update; temperature clamped; EMA teacher update with the new student; the
     weight copy (model.weight_copy) rewritten;
  5. the teacher features of the batch are enqueued (after the losses used the old queue).
Work is shared: the text encoder runs once on [clean; masked] text, the fusion encoder
once on [ITM positives; ITM negatives x2; MLM] for the student and once (MLM) for the teacher.
"""

import jax
import jax.numpy as jnp

from codis_jax import losses
from codis_jax import queue as queue_lib
from codis_jax import state as state_lib
from codis_jax.models import codis
from codis_jax.models import layers

_ICA_TERMS = ('i2t', 't2i', 'i2i', 't2t')


def alpha_at(loss_config, step, steps_per_epoch: int):
  """Distillation weight, ramped linearly from 0 over the first epoch(s) (ALBEF)."""
  ramp = loss_config.alpha_warmup_epochs * steps_per_epoch
  if ramp <= 0:
    return jnp.float32(loss_config.alpha)
  return loss_config.alpha * jnp.minimum(1.0, step.astype(jnp.float32) / ramp)


def codebook_usage(plan):
  """How many codewords the plan's row-wise argmax uses, and that histogram's perplexity.

  plan: [N, K]. A collapsing codebook shows as few used codewords / low perplexity.
  """
  k = plan.shape[1]
  counts = jnp.zeros((k,), jnp.float32).at[jnp.argmax(plan, axis=1)].add(1.0)
  p = counts / plan.shape[0]
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return jnp.sum(counts > 0).astype(jnp.float32), jnp.exp(entropy)


def _check_config(config):
  terms = tuple(t for t in config.loss.ica_terms.split(',') if t)
  unknown = set(terms) - set(_ICA_TERMS)
  if unknown:
    raise ValueError(f'config.loss.ica_terms has unknown terms {sorted(unknown)}; '
                     f'choose from {_ICA_TERMS}')
  if config.loss.codebook_features not in ('teacher', 'student'):
    raise ValueError(f'config.loss.codebook_features={config.loss.codebook_features!r}: '
                     "choose 'teacher' or 'student'")
  if config.batch_size < 2:
    raise ValueError('config.batch_size must be >= 2: ITM needs an in-batch negative')
  queue_lib.check_queue_size(config.queue_size, config.batch_size)
  return terms


def make_train_step(config, tx, steps_per_epoch: int, lr_schedule=None):
  """Builds the pure step for `config` and optimiser `tx` (jit it once, donate the state).

  `lr_schedule` (step -> lr), if given, only feeds the `lr` metric.
  """
  terms = _check_config(config)
  lc, mc = config.loss, config.model
  student = codis.build_model(mc, train=True)
  teacher = codis.build_model(mc, train=False)

  def teacher_forward(params, images, ids, mask, masked_ids):
    """Forward only: (image feat [B,E], text feat [B,E], MLM logits [B,L,V]), no gradient."""
    apply = lambda method, *a: teacher.apply({'params': params}, *a, method=method)
    image_tokens, image_feat = apply(codis.CODIS.encode_image, images)
    text_tokens, text_feat = apply(codis.CODIS.encode_text, interleave(ids, masked_ids),
                                   interleave(mask, mask))
    (_, masked_tokens), (text_feat, _) = deinterleave(text_tokens, 2), deinterleave(
        text_feat, 2)
    fused = apply(codis.CODIS.fuse, masked_tokens, mask, image_tokens)
    mlm_logits = apply(codis.CODIS.mlm_logits, fused)
    return jax.lax.stop_gradient((image_feat, text_feat, mlm_logits))

  def loss_fn(params, state, batch, masked, teacher_out, alpha, rngs):
    images, ids, mask = batch['image'], batch['text_ids'], batch['text_mask']
    masked_ids, mlm_targets, mlm_weights = masked
    image_feat_m, text_feat_m, mlm_logits_m = teacher_out
    r_drop, r_neg = rngs
    params = state_lib.read_weight_copy(params, state)  # the weight copy, if any, read instead
    apply = lambda method, *a: student.apply({'params': params}, *a, method=method,
                                             rngs={'dropout': r_drop})
    image_tokens, image_feat = apply(codis.CODIS.encode_image, images)
    text_tokens, text_feat = apply(codis.CODIS.encode_text, interleave(ids, masked_ids),
                                   interleave(mask, mask))
    (text_tokens, masked_tokens), (text_feat, _) = (deinterleave(text_tokens, 2),
                                                    deinterleave(text_feat, 2))
    temp = apply(codis.CODIS.temperature)

    # Sharding (no-ops without a mesh): the queues stay split along their length and the
    # small [B, E] feature batches are gathered instead, so the [B, Q] similarities are
    # split along Q and only the softmax normalisers are reduced across devices.
    gathered = lambda x: layers.constrain(x, (None, None))
    queues = [layers.constrain(q, ('queue', None))
              for q in (state.image_queue, state.text_queue)]
    ica, ica_parts, sim_i2t, sim_t2i = losses.ica_loss(
        gathered(image_feat), gathered(text_feat), gathered(image_feat_m),
        gathered(text_feat_m), *queues, temp, alpha, terms=terms,
        reduction=lc.ica_reduction)
    metrics = {f'loss_{k}': v for k, v in ica_parts.items()}

    code = jnp.float32(0.0)
    if lc.use_codebook:
      if lc.codebook_features == 'teacher':
        src_img, src_txt = image_feat_m, text_feat_m
      else:
        src_img, src_txt = image_feat, text_feat  # stop-gradient inside the loss
      # IPOT over the global batch with its rows split over the batch axes; XLA reduces
      # the column sums across devices.
      rows = lambda x: layers.constrain(x, ('act_batch', None))
      code, code_parts, plans = losses.codebook_loss(
          rows(image_feat), rows(text_feat), rows(src_img), rows(src_txt),
          apply(codis.CODIS.codebook), temp,
          pairing=lc.codebook_pairing, beta=lc.ipot_beta, num_iters=lc.ipot_iters,
          num_inner=lc.ipot_inner)
      metrics.update({f'loss_{k}': v for k, v in code_parts.items()})
      for name, plan in plans.items():
        used, ppl = codebook_usage(plan)
        metrics[f'codebook_used_{name}'], metrics[f'codebook_ppl_{name}'] = used, ppl

    # ITM over [positives; image + hard-negative text; hard-negative image + text] and
    # MLM in ONE fusion call of 4B rows.
    group = lc.itm_group_size or ids.shape[0]
    neg_txt, neg_img = losses.sample_hard_negatives(r_neg, sim_i2t, sim_t2i,
                                                    group_size=group)
    neg_text_tokens, neg_mask = (take_in_groups(x, neg_txt, group) for x in (text_tokens,
                                                                              mask))
    fusion_text = (interleave(text_tokens, neg_text_tokens, text_tokens, masked_tokens),
                   interleave(mask, neg_mask, mask, mask))
    if mc.share_image_kv:
      # Each image's cross-attention keys/values are projected once (~1/9 of the paper
      # step's FLOPs): 3 of an example's 4 rows read its own image's (None), the third
      # its negative image's, indexed within each ITM group as take_in_groups'.
      index = (None, None, group_index(group, neg_img), None)
      fused = apply(codis.CODIS.fuse, *fusion_text, image_tokens, index)
    else:
      neg_image_tokens = take_in_groups(image_tokens, neg_img, group)
      fused = apply(codis.CODIS.fuse, *fusion_text,
                    interleave(image_tokens, image_tokens, neg_image_tokens, image_tokens))
    pos, neg_t, neg_i, mlm_fused = deinterleave(fused, 4)
    itm, itm_acc = losses.itm_loss(apply(codis.CODIS.itm_logits,
                                         jnp.concatenate([pos, neg_t, neg_i])[:, :1]))
    mlm = losses.mlm_loss(apply(codis.CODIS.mlm_logits, mlm_fused), mlm_logits_m,
                          mlm_targets, mlm_weights, alpha)

    total = lc.w_ica * ica + lc.w_code * code + lc.w_itm * itm + lc.w_mlm * mlm
    metrics.update(loss=total, loss_ica=ica, loss_code=code, loss_itm=itm, loss_mlm=mlm,
                   itm_acc=itm_acc, temp=temp)
    return total, metrics

  def train_step(state: state_lib.TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    r_mask, r_drop, r_neg = jax.random.split(rng, 3)
    ids, mask = batch['text_ids'], batch['text_mask']
    masked = losses.mask_tokens(r_mask, ids, mask, vocab_size=mc.vocab_size,
                                mask_id=mc.mask_id, cls_id=mc.cls_id, pad_id=mc.pad_id,
                                prob=lc.mlm_prob)
    teacher_out = teacher_forward(state_lib.teacher_params(state), batch['image'], ids,
                                  mask, masked[0])
    alpha = alpha_at(lc, state.step, steps_per_epoch)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(
        state.params, state, batch, masked, teacher_out, alpha, (r_drop, r_neg))

    metrics.update(alpha=alpha, grad_norm=global_norm(grads),
                   mlm_tokens=jnp.sum(masked[2]))
    if lr_schedule is not None:
      metrics['lr'] = lr_schedule(state.step)
    return apply_update(state, grads, tx, config, teacher_out[0], teacher_out[1]), metrics

  return train_step


def apply_update(state, grads, tx, config, image_feat_m, text_feat_m):
  """What every step does after its gradients: AdamW, the temperature clamp, the EMA
  teacher, the teacher's features [B, E] into the queues; step + 1; the weight copy (if
  any) from the new weights. -> the new state."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree.map(lambda p, u: p + u, state.params, updates)
  # ALBEF clamps the stored temperature in place; the forward clamps it too.
  params['temp'] = jnp.clip(params['temp'], config.model.temp_min, config.model.temp_max)
  ema = state_lib.ema_update(state.ema_params, state_lib.teacher_subset(params),
                             config.momentum)
  copy = getattr(state, 'weight_copy', None)
  if copy is not None:  # written by the same kernels as the weights (XLA fuses the cast)
    dtype = jax.tree.leaves(copy)[0].dtype
    state = state.replace(weight_copy=state_lib.make_weight_copy(params, ema, dtype))
  image_queue, ptr = queue_lib.enqueue(state.image_queue, state.queue_ptr, image_feat_m)
  text_queue, _ = queue_lib.enqueue(state.text_queue, state.queue_ptr, text_feat_m)
  return state.replace(step=state.step + 1, params=params, ema_params=ema,
                       opt_state=opt_state, image_queue=image_queue, text_queue=text_queue,
                       queue_ptr=ptr)


def interleave(*xs):
  """k arrays [B, ...] -> [k*B, ...] with row b*k + j = xs[j][b].

  Unlike concatenation, this keeps every example's rows on the device that holds the
  example when the batch is sharded, so batching several passes into one call moves no
  data between devices.
  """
  return jnp.stack(xs, axis=1).reshape((-1,) + xs[0].shape[1:])


def deinterleave(x, k: int):
  """Inverse of `interleave`: [k*B, ...] -> k arrays [B, ...]."""
  x = x.reshape((-1, k) + x.shape[1:])
  return [x[:, j] for j in range(k)]


def group_index(group: int, idx):
  """`layers.take_rows` index: idx int [B] of row numbers of x, each within its example's
  group of `group` consecutive rows -> int [B/group, group]. (Several rows per example:
  a tuple of these, `layers.slot_attention`.)"""
  return (idx % group).reshape(-1, group)


def take_in_groups(x, idx, group: int):
  """x[idx] where every idx[i] lies in i's group of `group` consecutive rows.

  x: [B, ...]; idx: [B] int. Gathering per group (a batched gather) lets XLA keep each
  group on its devices instead of gathering all of x everywhere.
  """
  return layers.take_rows(x, group_index(group, idx))


def global_norm(tree):
  """sqrt of the sum of squares of every leaf (float32) -> scalar.

  Same-shaped leaves (the layers' weights) are stacked into one reduction per shape:
  reduced leaf by leaf, XLA:GPU launched two kernels per leaf, ~600 for the paper model.
  The stack fuses into the reduction (no copy). Under FSDP a shape can mix shardings (the
  paper model has one replicated [768] bias among 169 sharded [768] leaves); XLA then
  all-gathers a few small vectors (4 of [32] on the tiny model, 8-way FSDP).
  """
  groups = {}
  for x in jax.tree.leaves(tree):
    groups.setdefault(x.shape, []).append(x.astype(jnp.float32))
  return jnp.sqrt(sum(jnp.sum(jnp.square(jnp.stack(g))) for g in groups.values()))
