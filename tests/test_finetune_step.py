"""The fine-tuning ITC (ALBEF's model_retrieval.py) against float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np

from codis_jax.evaluate import finetune_step

B, Q, E, TEMP, ALPHA = 6, 12, 8, 0.07, 0.4


def unit(rng, *shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def log_softmax(x):
  x = x - x.max(1, keepdims=True)
  return x - np.log(np.exp(x).sum(1, keepdims=True))


def np_ita(img, txt, img_m, txt_m, img_queue, txt_queue, ids, id_queue, temp, alpha):
  """ALBEF model_retrieval.forward's ITA: positives are every key with the same image id
  ([batch ; queue]), targets mixed with the teacher's softmax, loss (i2t + t2i) / 2."""
  ids_all = np.concatenate([ids, id_queue])
  pos = (ids[:, None] == ids_all[None, :]).astype(np.float64)
  sim_targets = pos / pos.sum(1, keepdims=True)
  txt_all, img_all = np.concatenate([txt_m, txt_queue]), np.concatenate([img_m, img_queue])
  soft = lambda x: np.exp(log_softmax(x))
  tgt_i2t = alpha * soft(img_m @ txt_all.T / temp) + (1 - alpha) * sim_targets
  tgt_t2i = alpha * soft(txt_m @ img_all.T / temp) + (1 - alpha) * sim_targets
  sim_i2t, sim_t2i = img @ txt_all.T / temp, txt @ img_all.T / temp
  loss_i2t = -np.mean(np.sum(log_softmax(sim_i2t) * tgt_i2t, 1))
  loss_t2i = -np.mean(np.sum(log_softmax(sim_t2i) * tgt_t2i, 1))
  return (loss_i2t + loss_t2i) / 2, sim_i2t[:, :len(ids)], sim_t2i[:, :len(ids)]


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  feats = [unit(rng, B, E) for _ in range(4)] + [unit(rng, Q, E), unit(rng, Q, E)]
  ids = np.array([3, 5, 3, 7, 9, 5], np.int32)  # two images with two captions each
  id_queue = np.full(Q, finetune_step.NO_ID, np.int32)
  id_queue[[2, 7]] = [7, 3]  # queued captions of images in the batch: positives too
  return feats, ids, id_queue


def test_itc_with_ids_equals_albefs():
  feats, ids, id_queue = inputs()
  got = finetune_step.itc_with_ids(*[jnp.float32(f) for f in feats], jnp.asarray(ids),
                                   jnp.asarray(id_queue), jnp.float32(TEMP), ALPHA)
  want = np_ita(*feats, ids, id_queue, TEMP, ALPHA)
  np.testing.assert_allclose(float(got[0]), want[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-5)
  # Without the shared ids (each caption its own image) the loss differs: the ids count.
  alone = np_ita(*feats, np.arange(B), np.full(Q, -1), TEMP, ALPHA)[0]
  assert abs(alone - want[0]) > 1e-3


def test_itc_with_ids_gradients_reach_the_students_only():
  feats, ids, id_queue = inputs(1)
  args = [jnp.float32(f) for f in feats]
  loss = lambda *a: finetune_step.itc_with_ids(*a, jnp.asarray(ids), jnp.asarray(id_queue),
                                               jnp.float32(TEMP), ALPHA)[0]
  grads = jax.grad(loss, argnums=tuple(range(6)))(*args)
  for g in grads[2:]:  # teacher features and queues are constants
    assert not np.any(np.asarray(g))
  # The image student's gradient against central differences of the float64 reference.
  h, img = 1e-6, feats[0]
  want = np.zeros_like(img)
  for i in np.ndindex(*img.shape):
    e = np.zeros_like(img)
    e[i] = h
    hi = np_ita(img + e, *feats[1:], ids, id_queue, TEMP, ALPHA)[0]
    lo = np_ita(img - e, *feats[1:], ids, id_queue, TEMP, ALPHA)[0]
    want[i] = (hi - lo) / (2 * h)
  np.testing.assert_allclose(np.asarray(grads[0]), want, rtol=0, atol=1e-5)
