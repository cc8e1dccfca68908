"""The train state, its creation, the optimiser and the EMA teacher update."""

from typing import Any

import flax
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from codis_jax import queue as queue_lib
from codis_jax.models import codis

# Parameters with no teacher copy (ALBEF has no itm_head_m); the teacher borrows the
# student's temperature and codebook.
STUDENT_ONLY = ('itm_head', 'temp', 'codebook')


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 scalar: optimiser steps taken
  params: Any                # student parameters
  ema_params: Any            # teacher: EMA of the student (all but STUDENT_ONLY)
  opt_state: Any             # AdamW state
  image_queue: jax.Array     # [Q, E] teacher image features
  text_queue: jax.Array      # [Q, E] teacher text features
  queue_ptr: jax.Array       # int32 scalar, shared by both queues
  # model.weight_copy: {'student': {path: leaf}, 'teacher': {...}}, the weights the model
  # computes with in model.dtype (`codis.cast_param_paths`), kept in that dtype and
  # rewritten from the float32 weights by every update, so that the forward passes read
  # them as they are instead of converting each one every step. None when off. Derived
  # state: checkpoints leave it out and `refresh_weight_copy` rebuilds it, as it must
  # wherever params or ema_params are replaced (the step reads the copy, not them).
  weight_copy: Any = None


def teacher_subset(params):
  return {k: v for k, v in params.items() if k not in STUDENT_ONLY}


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


@jax.custom_vjp
def _read_copy(master, copy):
  """copy (master in a compute dtype, rewritten by every update) forward; the gradient
  goes to master in master's dtype, as autodiff of the model's own cast would send it."""
  del master
  return copy


def _read_copy_fwd(master, copy):
  return copy, jnp.zeros((), master.dtype)


def _read_copy_bwd(like, g):
  return g.astype(like.dtype), None


_read_copy.defvjp(_read_copy_fwd, _read_copy_bwd)


def read_weight_copy(params, state, which='student'):
  """params, with the state's weight copy of `which` ('student' | 'teacher') read in place
  of the leaves it copies (`TrainState.weight_copy`; params unchanged without one).
  Gradients still come to every leaf of params, in its own dtype."""
  copy = getattr(state, 'weight_copy', None)
  if copy is None:
    return params
  flat = _flat(params)
  flat.update({p: _read_copy(flat[p], leaf) for p, leaf in copy[which].items()})
  return traverse_util.unflatten_dict(flat, sep='/')


def teacher_params(state):
  """The full tree the teacher model applies: EMA weights + the student-only leaves (with a
  weight copy, the copy's leaves in their place)."""
  return read_weight_copy({**state.params, **state.ema_params}, state, 'teacher')


def weight_copy_dtype(model_config):
  """The dtype of model.weight_copy's copies; None where there is none (off, or float32)."""
  dtype = jnp.dtype(model_config.dtype)
  return dtype if model_config.get('weight_copy', False) and dtype != jnp.float32 else None


def make_weight_copy(params, ema_params, dtype):
  """`TrainState.weight_copy` of these weights: the leaves `codis.cast_param_paths` names,
  in dtype, for the student and the teacher."""
  trees = {'student': _flat(params), 'teacher': _flat(ema_params)}
  names = codis.cast_param_paths(trees['student'])
  return {k: {p: t[p].astype(dtype) for p in names if p in t} for k, t in trees.items()}


def refresh_weight_copy(state, model_config):
  """state with its weight copy rebuilt from its float32 weights for `model_config` (or
  dropped when that has none): after creating, restoring or replacing the weights."""
  dtype = weight_copy_dtype(model_config)
  copy = None if dtype is None else make_weight_copy(state.params, state.ema_params, dtype)
  return state.replace(weight_copy=copy)


def ema_update(teacher, student, momentum):
  """teacher <- m * teacher + (1 - m) * student, leaf by leaf (same tree structure)."""
  return jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s, teacher, student)


SCHEDULES = ('cosine', 'albef_epochs')
ALBEF_WARMUP_STAIR = 100  # ALBEF steps its warm-up every step_size = 100 iterations


def learning_rate_schedule(optim_config, total_steps: int, steps_per_epoch: int = 0):
  """step -> learning rate, by optim.schedule:

  'cosine' (the paper's): linear warm-up warmup_lr -> lr over warmup_steps, then a per-step
  cosine to min_lr at total_steps.
  'albef_epochs' (ALBEF's code: timm's CosineLRScheduler with a warm-up prefix, stepped
  each epoch): in epoch 0, stairs every 100 steps from warmup_lr towards lr over
  warmup_steps, then lr; epoch e >= 1 has min_lr + (lr - min_lr)(1 + cos(pi e / E)) / 2,
  E = total_steps / steps_per_epoch, and min_lr from epoch E on. steps_per_epoch=0 (tools
  that never train: bench, the scaling report) takes the run as one epoch; the training
  and fine-tuning programs pass the data's.
  """
  c = optim_config
  schedule = c.get('schedule', 'cosine')
  if schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=c.warmup_lr, peak_value=c.lr, warmup_steps=c.warmup_steps,
        decay_steps=max(total_steps, c.warmup_steps + 1), end_value=c.min_lr)
  if schedule != 'albef_epochs':
    raise ValueError(f'config.optim.schedule={schedule!r}: choose from {SCHEDULES}')
  steps_per_epoch = steps_per_epoch if steps_per_epoch > 0 else max(total_steps, 1)
  stairs = c.warmup_steps // ALBEF_WARMUP_STAIR
  epochs = max(total_steps / steps_per_epoch, 1.0)

  def lr(step):
    epoch, stair = step // steps_per_epoch, step // ALBEF_WARMUP_STAIR
    warm = c.warmup_lr + stair * (c.lr - c.warmup_lr) / max(stairs, 1)
    first = jnp.where(stair < stairs, warm, c.lr)
    t = jnp.minimum(epoch, epochs)
    later = c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + jnp.cos(jnp.pi * t / epochs))
    return jnp.where(epoch == 0, first, later)
  return lr


def _decays(path, leaf) -> bool:
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return leaf.ndim != 1 and not (names and str(names[-1]).endswith('bias'))


def make_optimizer(optim_config, total_steps: int, steps_per_epoch: int = 0):
  """AdamW with ALBEF's weight-decay groups (timm's add_weight_decay): no decay on 1-D
  leaves (LayerNorm scales, biases) and on anything named bias (the per-head [H, D] q/k/v
  biases too); the rest decays, the 0-D temperature included, as in ALBEF."""
  c = optim_config
  mu_dtype = c.get('mu_dtype', 'float32')
  if mu_dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"config.optim.mu_dtype={mu_dtype!r}: choose 'float32' or 'bfloat16'")
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(_decays, params)
  # mu_dtype='bfloat16' stores the first moment in bf16, 2 bytes less per parameter read
  # and written each step (as big_vision's and MaxText's option). optax computes
  # b1 * mu + (1 - b1) * g and updates with it before storing it rounded; b1 goes in as a
  # float32 scalar, since a Python float times a bf16 moment is a bf16 product, with b1
  # itself rounded to bf16 (0.9 -> 0.8984: a moment 1.6% short of the gradients' mean).
  b1 = np.float32(c.b1) if mu_dtype == 'bfloat16' else c.b1
  adamw = optax.adamw(learning_rate_schedule(c, total_steps, steps_per_epoch), b1=b1,
                      b2=c.b2, eps=c.eps,
                      weight_decay=c.weight_decay, mask=decay_mask, mu_dtype=jnp.dtype(mu_dtype))
  if c.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), adamw)
  return adamw


def init_params(config, rng):
  """Boxed (logically partitioned) student parameters of the config's model."""
  m = config.model
  model = codis.build_model(m, train=False)
  images = jnp.zeros((1, m.image_size, m.image_size, 3), jnp.float32)
  ids = jnp.zeros((1, config.text_len), jnp.int32)
  return model.init(rng, images, ids, jnp.ones_like(ids))['params']


def create_train_state(config, rng, tx) -> TrainState:
  """A fresh state: student init, teacher = copy of the student, random unit queues."""
  queue_lib.check_queue_size(config.queue_size, config.batch_size)
  r_params, r_img, r_txt = jax.random.split(rng, 3)
  params = nn.meta.unbox(init_params(config, r_params))
  e = config.model.embed_dim
  return refresh_weight_copy(TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=jax.tree.map(jnp.copy, teacher_subset(params)),
      opt_state=tx.init(params),
      image_queue=queue_lib.init_queue(r_img, config.queue_size, e),
      text_queue=queue_lib.init_queue(r_txt, config.queue_size, e),
      queue_ptr=jnp.zeros((), jnp.int32)), config.model)
