"""Retrieval recall from score matrices (ALBEF's `itm_eval`), with an explicit tie rule.

TR (image -> text): an image's rank is the number of texts that are NOT its captions and
score at least as high as its best caption (several captions per image: the best one
counts, as ALBEF's min over its captions' positions).
IR (text -> image): a text's rank is the number of other images that score at least as
high as its image.
R@K = percentage of queries with rank < K; tr_mean / ir_mean average R@1/5/10 and
r_mean averages the two (ALBEF's txt_r_mean, img_r_mean, r_mean).

Ties count AGAINST the query (ALBEF's argsort leaves them to the sort's whims): a metric
then never overstates, and a collapsed model that scores everything alike gets 0, not 100.
An optional second key breaks ties of the first lexicographically; the re-ranked scores
use it so that the candidates outside the re-scored top-k (score -inf) keep their ITC
order behind the top-k.
"""

import numpy as np

KS = (1, 5, 10)
_CHUNK = 512  # query rows compared at once: bounds the [rows, candidates] temporaries


def _check(scores, tiebreak, name):
  scores = np.asarray(scores)
  if scores.ndim != 2:
    raise ValueError(f'{name}: scores must be a 2-D [queries, candidates] matrix, got '
                     f'shape {scores.shape}')
  if np.isnan(scores).any():
    raise ValueError(f'{name}: scores contain NaN')
  if tiebreak is None:
    tiebreak = np.zeros((1, 1), scores.dtype)  # no second key (see _rows)
  else:
    tiebreak = np.asarray(tiebreak)
    if tiebreak.shape != scores.shape:
      raise ValueError(f'{name}: tiebreak {tiebreak.shape} != scores {scores.shape}')
  return scores, tiebreak


def _rows(tiebreak, lo, hi, shape):
  """Rows lo:hi of the tiebreak, or the broadcast zeros that stand for none."""
  return np.broadcast_to(tiebreak if tiebreak.shape == (1, 1) else tiebreak[lo:hi], shape)


def _at_least(s, t, ref_s, ref_t):
  """Candidates ranked at or above the reference: (s, t) >= (ref_s, ref_t) lexicographically."""
  return (s > ref_s) | ((s == ref_s) & (t >= ref_t))


def tr_ranks(scores_i2t, img2txt, tiebreak=None):
  """scores_i2t: [num_images, num_texts]; img2txt[i]: the text indices of image i.

  -> int64 [num_images] ranks (0 = a caption is first). An image without captions gets
  num_texts (a miss at every K).
  """
  scores, tiebreak = _check(scores_i2t, tiebreak, 'tr_ranks')
  n_img, n_txt = scores.shape
  if len(img2txt) != n_img:
    raise ValueError(f'tr_ranks: {len(img2txt)} images in img2txt, {n_img} score rows')
  ranks = np.full(n_img, n_txt, np.int64)
  for lo in range(0, n_img, _CHUNK):
    rows = range(lo, min(lo + _CHUNK, n_img))
    s = scores[lo:rows.stop]
    t = _rows(tiebreak, lo, rows.stop, s.shape)
    gt = np.zeros(s.shape, bool)
    for r, i in enumerate(rows):
      gt[r, np.asarray(img2txt[i], np.int64)] = True
    has = gt.any(axis=1)
    # The best caption, lexicographically on (score, tiebreak).
    best_s = np.where(gt, s, -np.inf).max(axis=1, keepdims=True)
    top = gt & (s == best_s)
    best_t = np.where(top, t, -np.inf).max(axis=1, keepdims=True)
    r = np.sum(~gt & _at_least(s, t, best_s, best_t), axis=1)
    ranks[lo:rows.stop] = np.where(has, r, n_txt)
  return ranks


def ir_ranks(scores_t2i, txt2img, tiebreak=None):
  """scores_t2i: [num_texts, num_images]; txt2img[t]: the image of text t. -> int64 [num_texts]."""
  scores, tiebreak = _check(scores_t2i, tiebreak, 'ir_ranks')
  n_txt, n_img = scores.shape
  txt2img = np.asarray(txt2img, np.int64)
  if txt2img.shape != (n_txt,):
    raise ValueError(f'ir_ranks: txt2img has shape {txt2img.shape}, expected ({n_txt},)')
  if n_txt and (txt2img.min() < 0 or txt2img.max() >= n_img):
    raise ValueError(f'ir_ranks: txt2img holds an image index outside [0, {n_img})')
  ranks = np.empty(n_txt, np.int64)
  for lo in range(0, n_txt, _CHUNK):
    hi = min(lo + _CHUNK, n_txt)
    s = scores[lo:hi]
    t = _rows(tiebreak, lo, hi, s.shape)
    g = txt2img[lo:hi]
    rows = np.arange(hi - lo)
    ref_s, ref_t = s[rows, g][:, None], t[rows, g][:, None]
    at_least = _at_least(s, t, ref_s, ref_t)
    at_least[rows, g] = False  # the image itself
    ranks[lo:hi] = at_least.sum(axis=1)
  return ranks


def recall_at(ranks, ks=KS):
  ranks = np.asarray(ranks)
  if not len(ranks):
    raise ValueError('recall_at: no queries')
  return {k: 100.0 * float(np.mean(ranks < k)) for k in ks}


def retrieval_recall(scores_i2t, scores_t2i, img2txt, txt2img, *, tiebreak_i2t=None,
                     tiebreak_t2i=None, ks=KS) -> dict:
  """-> {'tr_r1', 'tr_r5', 'tr_r10', 'tr_mean', 'ir_r1', ..., 'ir_mean', 'r_mean'} in %.

  scores_i2t: [num_images, num_texts] (higher = better); scores_t2i: [num_texts,
  num_images]; the tiebreaks, when given, have the same shapes.
  """
  tr = recall_at(tr_ranks(scores_i2t, img2txt, tiebreak_i2t), ks)
  ir = recall_at(ir_ranks(scores_t2i, txt2img, tiebreak_t2i), ks)
  out = {f'tr_r{k}': v for k, v in tr.items()}
  out['tr_mean'] = float(np.mean(list(tr.values())))
  out.update({f'ir_r{k}': v for k, v in ir.items()})
  out['ir_mean'] = float(np.mean(list(ir.values())))
  out['r_mean'] = (out['tr_mean'] + out['ir_mean']) / 2
  return out


def format_recall(r: dict, ks=KS) -> str:
  """One line: 'TR@1 71.5 TR@5 ... | IR@1 ... | mean ...'."""
  tr = '  '.join(f'TR@{k} {r[f"tr_r{k}"]:.2f}' for k in ks)
  ir = '  '.join(f'IR@{k} {r[f"ir_r{k}"]:.2f}' for k in ks)
  return f'{tr} | {ir} | mean {r["r_mean"]:.2f}'
