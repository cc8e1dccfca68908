"""Learning-rate schedules: the paper's per-step cosine, and ALBEF's code replayed."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from codis_jax import state as state_lib


def optim(**kw):
  c = dict(lr=1e-4, warmup_lr=1e-5, min_lr=1e-5, warmup_steps=0, weight_decay=0.02, b1=0.9,
           b2=0.999, eps=1e-8, grad_clip_norm=0.0, schedule='cosine')
  return ml_collections.ConfigDict({**c, **kw})


def values(schedule, steps):
  return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(steps)), np.float64)


class TimmCosine:
  """timm's CosineLRScheduler._get_lr as ALBEF builds it (scheduler/cosine_lr.py:
  t_mul 1, decay_rate 1, cycle_limit 1, warmup_prefix=True)."""

  def __init__(self, lr, min_lr, warmup_lr, warmup_t, t_initial):
    self.lr, self.min_lr, self.warmup_lr, self.warmup_t = lr, min_lr, warmup_lr, warmup_t
    self.t_initial = t_initial
    self.warmup_step = (lr - warmup_lr) / warmup_t if warmup_t else 0.0
    self.current = warmup_lr if warmup_t else lr  # set at construction

  def step(self, t):
    if t < self.warmup_t:
      self.current = self.warmup_lr + t * self.warmup_step
      return
    t -= self.warmup_t
    if t // self.t_initial >= 1:  # past the one cycle
      self.current = self.min_lr
    else:
      self.current = self.min_lr + 0.5 * (self.lr - self.min_lr) * (
          1 + math.cos(math.pi * t / self.t_initial))


def albef_lrs(c, epochs, steps_per_epoch):
  """The lr of every iteration of ALBEF's Pretrain.py / Retrieval.py loop: warm-up stairs
  in epoch 0 (step_size 100, warmup_epochs = warmup_steps / 100), then one scheduler step
  per epoch, `lr_scheduler.step(epoch + warmup_steps + 1)`."""
  warmup = c.warmup_steps // 100
  sched = TimmCosine(c.lr, c.min_lr, c.warmup_lr, warmup, epochs)
  out = []
  for epoch in range(epochs):
    for i in range(steps_per_epoch):
      if epoch == 0 and i % 100 == 0 and i <= warmup * 100:
        sched.step(i // 100)
      out.append(sched.current)
    sched.step(epoch + warmup + 1)
  return np.asarray(out)


def test_cosine_is_warmup_then_per_step_cosine():
  c = optim(warmup_steps=10)
  got = values(state_lib.learning_rate_schedule(c, 110), 120)
  s = np.arange(120)
  t = np.clip(s - 10, 0, 100) / 100
  want = np.where(s < 10, 1e-5 + s * (1e-4 - 1e-5) / 10,
                  1e-5 + 0.5 * (1e-4 - 1e-5) * (1 + np.cos(np.pi * t)))
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize('warmup_steps,warmup_lr,epochs,spe', [
    (300, 1e-5, 3, 450),  # pretraining's form: warm-up stairs, then lr to the end of epoch 0
    (0, 1e-4, 5, 200),    # fine-tuning's (Retrieval_coco.yaml: warmup_lr = lr)
    (500, 1e-5, 2, 300),  # a warm-up longer than epoch 0 is cut there, as in ALBEF's loop
])
def test_albef_epochs_replays_albefs_loop(warmup_steps, warmup_lr, epochs, spe):
  c = optim(schedule='albef_epochs', warmup_steps=warmup_steps, warmup_lr=warmup_lr)
  got = values(state_lib.learning_rate_schedule(c, epochs * spe, spe), epochs * spe)
  np.testing.assert_allclose(got, albef_lrs(c, epochs, spe), rtol=1e-5)


def test_albef_epochs_gives_albefs_coco_finetuning_rates():
  # Retrieval_coco.yaml: lr 1e-5, min_lr 1e-6, 5 epochs, warm-up lr = lr: per epoch
  # 1e-5, then 1e-6 + 4.5e-6 (1 + cos(pi e / 5)) for e = 1..4.
  c = optim(schedule='albef_epochs', lr=1e-5, warmup_lr=1e-5, min_lr=1e-6)
  got = values(state_lib.learning_rate_schedule(c, 5 * 10, 10), 50)[::10]
  want = [1e-5] + [1e-6 + 4.5e-6 * (1 + math.cos(math.pi * e / 5)) for e in range(1, 5)]
  np.testing.assert_allclose(got, want, rtol=1e-5)  # 9.14e-6, 6.89e-6, 4.11e-6, 1.86e-6


def test_a_bad_schedule_names_the_key_and_no_epochs_is_one_epoch():
  with pytest.raises(ValueError, match="config.optim.schedule='step'"):
    state_lib.learning_rate_schedule(optim(schedule='step'), 100, 10)
  # Without the data's steps per epoch (bench, scaling report) the run is one epoch: lr.
  c = optim(schedule='albef_epochs', warmup_lr=1e-4)
  np.testing.assert_allclose(values(state_lib.learning_rate_schedule(c, 100), 100), 1e-4)
