"""Recall@K of TR/IR against a reference written from the definition (hand-made scores)."""

import numpy as np
import pytest

from codis_jax.evaluate import metrics


def _reference_rank(scores, tiebreak, positives):
  """Rank from the definition: sort the candidates best first, breaking ties of (score,
  tiebreak) AGAINST the query (non-matching candidates first); the rank is the position
  of the first matching candidate (len if there is none)."""
  order = sorted(range(len(scores)),
                 key=lambda j: (-scores[j], -tiebreak[j], j in positives))
  for pos, j in enumerate(order):
    if j in positives:
      return pos
  return len(scores)


def _reference(i2t, t2i, img2txt, txt2img, tb_i2t=None, tb_t2i=None, ks=(1, 5, 10)):
  tb_i2t = np.zeros_like(i2t) if tb_i2t is None else tb_i2t
  tb_t2i = np.zeros_like(t2i) if tb_t2i is None else tb_t2i
  tr = [_reference_rank(i2t[i], tb_i2t[i], set(img2txt[i])) for i in range(len(i2t))]
  ir = [_reference_rank(t2i[t], tb_t2i[t], {txt2img[t]}) for t in range(len(t2i))]
  out = {}
  for name, ranks in (('tr', tr), ('ir', ir)):
    for k in ks:
      out[f'{name}_r{k}'] = 100.0 * sum(r < k for r in ranks) / len(ranks)
    out[f'{name}_mean'] = sum(out[f'{name}_r{k}'] for k in ks) / len(ks)
  out['r_mean'] = (out['tr_mean'] + out['ir_mean']) / 2
  return out


def _layout(caps_per_image):
  img2txt, txt2img = [], []
  for i, n in enumerate(caps_per_image):
    img2txt.append(list(range(len(txt2img), len(txt2img) + n)))
    txt2img += [i] * n
  return img2txt, np.asarray(txt2img)


def _check(i2t, t2i, img2txt, txt2img, **kw):
  got = metrics.retrieval_recall(i2t, t2i, img2txt, txt2img, **kw)
  want = _reference(i2t, t2i, img2txt, txt2img, kw.get('tiebreak_i2t'),
                    kw.get('tiebreak_t2i'))
  assert got.keys() == want.keys()
  for k in want:
    assert got[k] == pytest.approx(want[k]), k
  return got


def test_perfect_and_worst_with_several_captions():
  img2txt, txt2img = _layout([5, 3, 5, 1, 2, 5, 4, 5, 5, 3, 5, 5])  # 12 images, 48 texts
  match = (np.arange(12)[:, None] == txt2img[None, :]).astype(np.float64)
  rs = np.random.RandomState(0)
  noise = rs.uniform(0, 0.5, match.shape)
  perfect = _check(match + noise, (match + noise).T, img2txt, txt2img)
  assert all(v == 100.0 for v in perfect.values())
  worst = _check(noise - match, (noise - match).T, img2txt, txt2img)
  # Every non-matching candidate outranks the match: ranks >= 10 everywhere here.
  assert all(v == 0.0 for v in worst.values())


def test_best_caption_counts_for_tr():
  img2txt = [[0, 1], [2, 3]]
  i2t = np.asarray([[0.1, 0.9, 0.5, 0.4],    # its 2nd caption is first -> rank 0
                    [0.9, 0.8, 0.1, 0.7]])   # its captions come 4th and 3rd -> rank 2
  r = metrics.tr_ranks(i2t, img2txt)
  np.testing.assert_array_equal(r, [0, 2])


def test_ties_count_against_the_query():
  img2txt, txt2img = _layout([2, 2, 2])
  flat = np.zeros((3, 6))
  got = _check(flat, flat.T, img2txt, txt2img)
  # Everything tied: TR rank = the 4 other texts, IR rank = the 2 other images.
  np.testing.assert_array_equal(metrics.tr_ranks(flat, img2txt), [4, 4, 4])
  np.testing.assert_array_equal(metrics.ir_ranks(flat.T, txt2img), [2] * 6)
  assert got['tr_r1'] == 0 and got['tr_r5'] == 100 and got['ir_r1'] == 0
  assert got['ir_r5'] == 100


def test_random_integer_scores_with_ties_and_a_captionless_image():
  rs = np.random.RandomState(1)
  img2txt, txt2img = _layout([3, 5, 0, 2, 4, 5, 1, 5, 3, 5, 2, 4, 5, 3, 1])
  n_img, n_txt = len(img2txt), len(txt2img)
  for _ in range(5):
    i2t = rs.randint(0, 4, (n_img, n_txt)).astype(np.float32)  # many ties
    t2i = rs.randint(0, 4, (n_txt, n_img)).astype(np.float32)
    got = _check(i2t, t2i, img2txt, txt2img)
    assert got['tr_r10'] < 100  # the image without captions is always a miss


def test_tiebreak_is_lexicographic():
  rs = np.random.RandomState(2)
  img2txt, txt2img = _layout([2, 3, 1, 4, 2, 3, 5, 2, 1, 3, 2, 4])
  n_img, n_txt = len(img2txt), len(txt2img)
  primary = np.full((n_img, n_txt), -np.inf)
  for i in range(n_img):  # a re-ranked matrix: 4 finite entries per row, -inf elsewhere
    primary[i, rs.choice(n_txt, 4, replace=False)] = rs.randint(0, 3, 4)
  second = rs.randint(0, 5, (n_img, n_txt)).astype(np.float64)
  primary_t = np.full((n_txt, n_img), -np.inf)
  for t in range(n_txt):
    primary_t[t, rs.choice(n_img, 3, replace=False)] = rs.randint(0, 3, 3)
  second_t = rs.randint(0, 5, (n_txt, n_img)).astype(np.float64)
  _check(primary, primary_t, img2txt, txt2img, tiebreak_i2t=second, tiebreak_t2i=second_t)


def test_clear_errors():
  with pytest.raises(ValueError, match='NaN'):
    metrics.tr_ranks(np.full((2, 2), np.nan), [[0], [1]])
  with pytest.raises(ValueError, match='txt2img'):
    metrics.ir_ranks(np.zeros((3, 2)), [0, 1])
  with pytest.raises(ValueError, match='img2txt'):
    metrics.tr_ranks(np.zeros((3, 2)), [[0], [1]])
