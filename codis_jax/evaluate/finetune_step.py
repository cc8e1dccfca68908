"""The retrieval fine-tuning step (paper Table 2; ALBEF's model_retrieval.py), pure.

    step(state, batch, rng) -> (state, metrics); batch: image, text_ids, text_mask, image_id

Differences from pretraining (train.py), as ALBEF's retrieval model:
  * ITC only across modalities, (i2t + t2i) / 2, no codebook, no MLM;
  * the queues also hold the image id of every queued feature, and every caption of the
    same image is a positive: target = alpha * teacher softmax + (1 - alpha) * (id
    equality over [batch ; queue], normalised per row);
  * ITM hard negatives never pick a caption or image of the same image id;
  * loss = ITC + ITM.
The teacher is the EMA of the student (updated after each step, as train.py), the
temperature is clamped after each update, alpha is ramped over the first epoch.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp

from codis_jax import losses
from codis_jax import queue as queue_lib
from codis_jax import state as state_lib
from codis_jax import train as train_lib
from codis_jax.models import codis
from codis_jax.models import layers

NO_ID = -1  # image id of the random initial queue entries: never a positive


@flax.struct.dataclass
class FinetuneState:
  """TrainState's fields plus the id queue (checkpoints read like pretraining ones)."""
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  image_queue: jax.Array   # [Q, E] teacher image features
  text_queue: jax.Array    # [Q, E] teacher text features
  idx_queue: jax.Array     # [Q] int32 image id of each queued pair
  queue_ptr: jax.Array
  weight_copy: Any = None  # as TrainState's (model.weight_copy)


def from_train_state(base: state_lib.TrainState, idx_queue) -> FinetuneState:
  return FinetuneState(step=base.step, params=base.params, ema_params=base.ema_params,
                       opt_state=base.opt_state, image_queue=base.image_queue,
                       text_queue=base.text_queue, idx_queue=idx_queue,
                       queue_ptr=base.queue_ptr, weight_copy=base.weight_copy)


def initial_state(config, tx, rng, params=None, ema_params=None,
                  queues=None) -> FinetuneState:
  """params (and teacher) from a checkpoint when given, else a random init; the teacher
  defaults to a copy of the student. queues: (image [Q, E], text [Q, E], pointer, ids [Q])
  from the checkpoint, as ALBEF's load_state_dict(strict=False) takes them, else random
  unit queues; ids NO_ID where none were saved (pretraining's features are no positives)."""
  base = state_lib.create_train_state(config, rng, tx)
  if params is not None:
    ema = ema_params if ema_params is not None else state_lib.teacher_subset(params)
    base = state_lib.refresh_weight_copy(
        base.replace(params=params, ema_params=ema, opt_state=tx.init(params)), config.model)
  ids = jnp.full((config.queue_size,), NO_ID, jnp.int32)
  if queues is not None:
    image_queue, text_queue, ptr, saved_ids = queues
    base = base.replace(image_queue=jnp.asarray(image_queue, jnp.float32),
                        text_queue=jnp.asarray(text_queue, jnp.float32),
                        queue_ptr=jnp.asarray(ptr, base.queue_ptr.dtype))
    ids = ids if saved_ids is None else jnp.asarray(saved_ids, jnp.int32)
  return from_train_state(base, ids)


def itc_with_ids(img, txt, img_m, txt_m, img_queue, txt_queue, ids, id_queue, temp, alpha):
  """ALBEF's retrieval ITA. img/txt: [B, E] student features; *_m: [B, E] teacher
  features; *_queue: [Q, E]; ids: [B] int image ids; id_queue: [Q].

  -> (loss, sim_i2t [B, B], sim_t2i [B, B]): the student's logits against the batch's
  teacher features (for hard negatives).
  """
  f32 = jnp.float32
  sg = jax.lax.stop_gradient
  keys_txt = sg(jnp.concatenate([txt_m, txt_queue]).astype(f32))
  keys_img = sg(jnp.concatenate([img_m, img_queue]).astype(f32))
  ids_all = jnp.concatenate([ids, id_queue])
  positive = (ids[:, None] == ids_all[None, :]).astype(f32)
  sim_targets = positive / jnp.sum(positive, axis=1, keepdims=True)  # the diagonal is one
  alpha = sg(jnp.asarray(alpha, f32))
  temp_m = sg(temp)
  tgt_i2t = alpha * jax.nn.softmax(sg(img_m) @ keys_txt.T / temp_m) + (1 - alpha) * sim_targets
  tgt_t2i = alpha * jax.nn.softmax(sg(txt_m) @ keys_img.T / temp_m) + (1 - alpha) * sim_targets
  sim_i2t = img.astype(f32) @ keys_txt.T / temp
  sim_t2i = txt.astype(f32) @ keys_img.T / temp
  loss = (losses.soft_cross_entropy(sim_i2t, tgt_i2t)
          + losses.soft_cross_entropy(sim_t2i, tgt_t2i)) / 2
  b = img.shape[0]
  return loss, sim_i2t[:, :b], sim_t2i[:, :b]


def make_finetune_step(config, tx, steps_per_epoch: int, lr_schedule=None):
  """The pure fine-tuning step for `config` (jit it once with the state donated)."""
  lc, mc = config.loss, config.model
  queue_lib.check_queue_size(config.queue_size, config.batch_size)
  if config.batch_size < 2:
    raise ValueError('config.batch_size must be >= 2: ITM needs an in-batch negative')
  student = codis.build_model(mc, train=True)
  teacher = codis.build_model(mc, train=False)

  def teacher_forward(params, images, ids, mask):
    apply = lambda method, *a: teacher.apply({'params': params}, *a, method=method)
    _, image_feat = apply(codis.CODIS.encode_image, images)
    _, text_feat = apply(codis.CODIS.encode_text, ids, mask)
    return jax.lax.stop_gradient((image_feat, text_feat))

  def loss_fn(params, state, batch, teacher_out, alpha, rngs):
    images, ids, mask = batch['image'], batch['text_ids'], batch['text_mask']
    image_ids = batch['image_id'].astype(jnp.int32)
    r_drop, r_neg = rngs
    params = state_lib.read_weight_copy(params, state)
    apply = lambda method, *a: student.apply({'params': params}, *a, method=method,
                                             rngs={'dropout': r_drop})
    image_tokens, image_feat = apply(codis.CODIS.encode_image, images)
    text_tokens, text_feat = apply(codis.CODIS.encode_text, ids, mask)
    temp = apply(codis.CODIS.temperature)
    gathered = lambda x: layers.constrain(x, (None, None))
    ita, sim_i2t, sim_t2i = itc_with_ids(
        gathered(image_feat), gathered(text_feat), *map(gathered, teacher_out),
        layers.constrain(state.image_queue, ('queue', None)),
        layers.constrain(state.text_queue, ('queue', None)),
        image_ids, state.idx_queue, temp, alpha)

    # Hard negatives: captions/images of the same image are not negatives (ALBEF masks
    # them); the sampler already excludes the diagonal.
    same = image_ids[:, None] == image_ids[None, :]
    group = lc.itm_group_size or ids.shape[0]
    neg_txt, neg_img = losses.sample_hard_negatives(
        r_neg, jnp.where(same, -jnp.inf, sim_i2t), jnp.where(same, -jnp.inf, sim_t2i),
        group_size=group)
    # Per example, interleaved (as train.py): [positive; negative image; negative text].
    take = lambda x, idx: train_lib.take_in_groups(x, idx, group)
    text = (train_lib.interleave(text_tokens, text_tokens, take(text_tokens, neg_txt)),
            train_lib.interleave(mask, mask, take(mask, neg_txt)))
    if mc.share_image_kv:  # two of the three rows see the example's own image
      index = (None, train_lib.group_index(group, neg_img), None)
      fused = apply(codis.CODIS.fuse, *text, image_tokens, index)
    else:
      fused = apply(codis.CODIS.fuse, *text, train_lib.interleave(
          image_tokens, take(image_tokens, neg_img), image_tokens))
    itm, itm_acc = losses.itm_loss(apply(codis.CODIS.itm_logits, jnp.concatenate(
        train_lib.deinterleave(fused[:, :1], 3))))
    total = ita + itm
    return total, dict(loss=total, loss_ita=ita, loss_itm=itm, itm_acc=itm_acc, temp=temp)

  def step(state: FinetuneState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    r_drop, r_neg = jax.random.split(rng)
    teacher_out = teacher_forward(state_lib.teacher_params(state), batch['image'],
                                  batch['text_ids'], batch['text_mask'])
    alpha = train_lib.alpha_at(lc, state.step, steps_per_epoch)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(
        state.params, state, batch, teacher_out, alpha, (r_drop, r_neg))
    # The id queue advances with the feature queues (same pointer, before the update).
    idx_queue, _ = queue_lib.enqueue(state.idx_queue[:, None], state.queue_ptr,
                                     batch['image_id'].astype(jnp.int32)[:, None])
    metrics['alpha'] = alpha
    if lr_schedule is not None:
      metrics['lr'] = lr_schedule(state.step)
    new = train_lib.apply_update(state, grads, tx, config, teacher_out[0], teacher_out[1])
    return new.replace(idx_queue=idx_queue[:, 0]), metrics

  return step
