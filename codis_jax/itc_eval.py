"""Zero-shot ITC retrieval recall (TR/IR R@1/5/10) on a held-out retrieval set.

ITC only: cosine similarity of the projected image and text features, no ITM re-ranking
(that is codis_jax/evaluate's job). An image's TR rank is the best rank among its
captions; ties count in the query's favour (they do not happen with float features).
"""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from codis_jax import sharding
from codis_jax import state as state_lib
from codis_jax.models import codis

KS = (1, 5, 10)


def recall(sim, img2txt, txt2img, ks=KS) -> dict:
  """sim: [num_images, num_texts]. -> {'tr_r1': %, ..., 'ir_r10': %, 'r_mean': %}."""
  sim = np.asarray(sim, np.float64)
  tr_rank = np.array([min(np.sum(sim[i] > sim[i, t]) for t in ts) if ts else sim.shape[1]
                      for i, ts in enumerate(img2txt)])
  pos = sim[np.asarray(txt2img), np.arange(sim.shape[1])]
  ir_rank = np.sum(sim > pos[None, :], axis=0)
  out = {f'tr_r{k}': 100.0 * np.mean(tr_rank < k) for k in ks}
  out.update({f'ir_r{k}': 100.0 * np.mean(ir_rank < k) for k in ks})
  out['r_mean'] = float(np.mean(list(out.values())))
  return {k: float(v) for k, v in out.items()}


_SETS = {}  # loaded retrieval sets, kept for periodic evaluation


def _retrieval_set(config):
  from codis_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from codis_jax import loop  # pylint: disable=import-outside-toplevel
  key = (config.eval.data, config.data.to_json_best_effort(), config.model.image_size,
         config.text_len)
  if key not in _SETS:
    _SETS[key] = data_lib.load_retrieval_set(config.eval.data or loop.data_config(config),
                                             config.model.image_size, config.text_len)
  return _SETS[key]


def features(config, params, mesh, rset):
  """L2-normalised image and text features [N, E] of the whole retrieval set."""
  model = codis.build_model(config.model, train=False)
  b = config.eval.batch_size
  replicated = NamedSharding(mesh, P())
  img = jax.jit(lambda p, x: model.apply({'params': p}, x,
                                         method=codis.CODIS.encode_image)[1])
  txt = jax.jit(lambda p, i, m: model.apply({'params': p}, i, m,
                                            method=codis.CODIS.encode_text)[1])
  put = lambda x: jax.device_put(x, replicated)
  with mesh, sharding.axis_rules(config):
    image_feats = [np.asarray(img(params, put(batch['image'])))
                   for batch in rset.image_batches(b)]
    ids, mask = rset.text_ids, rset.text_mask
    pad = -len(ids) % b
    ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)])
    mask = np.concatenate([mask, np.ones((pad, mask.shape[1]), mask.dtype)])
    text_feats = [np.asarray(txt(params, put(ids[i:i + b]), put(mask[i:i + b])))
                  for i in range(0, len(ids), b)]
  return (np.concatenate(image_feats)[:rset.num_images],
          np.concatenate(text_feats)[:rset.num_texts])


def evaluate(config, state, mesh, both=False):
  """-> ({'itc/<params>/tr_r1': ..., ...}, printable lines). `params` is config.eval.params
  ('ema': the teacher's weights, 'student'); both=True reports the two."""
  rset = _retrieval_set(config)
  which = [config.eval.params] + ([p for p in ('ema', 'student')
                                   if p != config.eval.params] if both else [])
  scalars, lines = {}, []
  for name in which:
    if name not in ('ema', 'student'):
      raise ValueError(f"config.eval.params={name!r}: choose 'ema' or 'student'")
    params = state_lib.teacher_params(state) if name == 'ema' else state.params
    image_feat, text_feat = features(config, params, mesh, rset)
    r = recall(image_feat @ text_feat.T, rset.img2txt, rset.txt2img)
    scalars.update({f'itc/{name}/{k}': v for k, v in r.items()})
    lines.append(
        f'zero-shot ITC retrieval ({name} weights; {rset.num_images} images, '
        f'{rset.num_texts} texts, chance R@1 {100 / rset.num_images:.2f}%): '
        + '  '.join(f'TR@{k} {r[f"tr_r{k}"]:.1f}' for k in KS) + ' | '
        + '  '.join(f'IR@{k} {r[f"ir_r{k}"]:.1f}' for k in KS))
  return scalars, lines
