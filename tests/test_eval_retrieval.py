"""Two-stage retrieval: ITC top-k, ITM re-ranking of only the top-k, sharding, zero-shot."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codis_jax import sharding
from codis_jax import state as state_lib
from codis_jax.evaluate import metrics
from codis_jax.evaluate import retrieval
from codis_jax.evaluate import zeroshot
from codis_jax.models import codis
from conftest import make_batch
from test_eval_metrics import _reference as reference_recall
from test_eval_metrics import _reference_rank as reference_rank

CAPTIONS = [2, 3, 1, 2, 4, 2, 1, 3, 2, 2, 3, 1, 2, 2, 3, 1]  # 16 images, 34 texts


@pytest.fixture(scope='module')
def setup():
  from configs import pretrain
  c = pretrain.get_config('tiny')
  params = jax.jit(lambda r: nn.meta.unbox(state_lib.init_params(c, r)))(jax.random.key(0))
  params = jax.tree.map(np.asarray, params)
  n_txt = sum(CAPTIONS)
  texts = make_batch(c, seed=1, batch_size=n_txt)
  images = make_batch(c, seed=2, batch_size=len(CAPTIONS))['image']
  img2txt, txt2img = [], []
  for i, n in enumerate(CAPTIONS):
    img2txt.append(list(range(len(txt2img), len(txt2img) + n)))
    txt2img += [i] * n
  rset = retrieval.ArrayRetrievalSet(images, texts['text_ids'], texts['text_mask'],
                                     np.asarray(txt2img), img2txt)
  return c, params, rset


def _direct(c, params, rset):
  """Reference: every feature and every pair's ITM logit, straight from the model."""
  model = codis.build_model(c.model, train=False)
  apply = lambda m, *a: model.apply({'params': params}, *a, method=m)
  img_tok, img = apply(codis.CODIS.encode_image, jnp.asarray(rset.images))
  txt_tok, txt = apply(codis.CODIS.encode_text, rset.text_ids, rset.text_mask)
  n_img, n_txt = len(img), len(txt)
  ii, tt = np.meshgrid(np.arange(n_img), np.arange(n_txt), indexing='ij')
  ii, tt = ii.ravel(), tt.ravel()
  fused = apply(codis.CODIS.fuse, txt_tok[tt], rset.text_mask[tt], img_tok[ii])
  itm = np.asarray(apply(codis.CODIS.itm_logits, fused))[:, 1].reshape(n_img, n_txt)
  return np.asarray(img @ txt.T), itm


@pytest.fixture(scope='module')
def reference(setup):
  return _direct(*setup)


def test_rerank_changes_only_the_topk_and_uses_the_itm_score(setup, reference):
  c, params, rset = setup
  sims, itm = reference
  k = 3
  s = retrieval.compute_scores(c.model, params, rset, k_test=k, batch_size=8,
                               rerank_batch_size=16)
  np.testing.assert_allclose(s.sims, sims, atol=1e-5)
  for scores, ref_sims, ref_itm in ((s.i2t, sims, itm), (s.t2i, sims.T, itm.T)):
    for row in range(len(scores)):
      top = np.argsort(-ref_sims[row], kind='stable')[:k]
      finite = np.flatnonzero(np.isfinite(scores[row]))
      np.testing.assert_array_equal(np.sort(finite), np.sort(top))
      np.testing.assert_allclose(scores[row, top], ref_itm[row, top], atol=1e-5)
  # Ranks: a match outside the top-k keeps its ITC rank; inside, it stays inside.
  itc_tr = metrics.tr_ranks(s.sims, rset.img2txt)
  re_tr = metrics.tr_ranks(s.i2t, rset.img2txt, s.sims)
  itc_ir = metrics.ir_ranks(s.sims.T, rset.txt2img)
  re_ir = metrics.ir_ranks(s.t2i, rset.txt2img, s.sims.T)
  for itc_r, re_r in ((itc_tr, re_tr), (itc_ir, re_ir)):
    outside = itc_r >= k
    np.testing.assert_array_equal(re_r[outside], itc_r[outside])
    assert np.all(re_r[~outside] < k)
  # ... and inside the top-k the order is the ITM one. From the definition
  # (test_eval_metrics.py): ITM scores on the reference ITC top-k, -inf elsewhere, ties
  # broken by the ITC similarity, then counted against the query.
  def reranked(ref_sims, ref_itm):
    out = np.full_like(ref_itm, -np.inf)
    for row, top in enumerate(np.argsort(-ref_sims, axis=1, kind='stable')[:, :k]):
      out[row, top] = ref_itm[row, top]
    return out
  want_i2t, want_t2i = reranked(sims, itm), reranked(sims.T, itm.T)
  want_tr = [reference_rank(want_i2t[i], sims[i], set(rset.img2txt[i]))
             for i in range(len(sims))]
  want_ir = [reference_rank(want_t2i[t], sims.T[t], {rset.txt2img[t]})
             for t in range(len(sims.T))]
  np.testing.assert_array_equal(re_tr, want_tr)
  np.testing.assert_array_equal(re_ir, want_ir)
  assert np.any(re_tr != itc_tr) and np.any(re_ir != itc_ir)  # ITM did reorder
  _check_recall(s, rset, sims, want_i2t, want_t2i)
  # At k=3 the re-ranking leaves R@1/5/10 as ITC's here; with ITM on every pair they
  # differ, and recall_from_scores must report the ITM matrices' recall.
  full = retrieval.Scores(s.sims, itm, itm.T)
  got = _check_recall(full, rset, sims, itm, itm.T)
  assert any(got[key] != got['itc/' + key[4:]] for key in got if key.startswith('itm/'))


def _check_recall(scores, rset, sims, i2t, t2i):
  """recall_from_scores against the reference of test_eval_metrics.py."""
  want = {f'itc/{key}': v for key, v in reference_recall(
      sims, sims.T, rset.img2txt, rset.txt2img).items()}
  want.update({f'itm/{key}': v for key, v in reference_recall(
      i2t, t2i, rset.img2txt, rset.txt2img, sims, sims.T).items()})
  got = retrieval.recall_from_scores(scores, rset)
  assert got.keys() == want.keys()
  for key, value in want.items():
    assert got[key] == pytest.approx(value), key
  return got


def test_k_larger_than_the_set_rescores_everything(setup):
  c, params, rset = setup
  s = retrieval.compute_scores(c.model, params, rset, k_test=1000, batch_size=8,
                               rerank_batch_size=8, itm_score='prob')
  assert np.all(np.isfinite(s.i2t)) and np.all(np.isfinite(s.t2i))
  np.testing.assert_array_equal(s.i2t, s.t2i.T)  # each pair fused once
  # itm_score='prob': the softmax probability of "match" of one pair, recomputed.
  model = codis.build_model(c.model, train=False)
  i, t = 3, rset.img2txt[3][0]
  img_tok, _ = model.apply({'params': params}, rset.images[i:i + 1],
                           method=codis.CODIS.encode_image)
  txt_tok, _ = model.apply({'params': params}, rset.text_ids[t:t + 1],
                           rset.text_mask[t:t + 1], method=codis.CODIS.encode_text)
  logits = model.apply({'params': params}, model.apply(
      {'params': params}, txt_tok, rset.text_mask[t:t + 1], img_tok,
      method=codis.CODIS.fuse), method=codis.CODIS.itm_logits)
  assert s.i2t[i, t] == pytest.approx(float(jax.nn.softmax(logits)[0, 1]), abs=1e-5)
  r = retrieval.recall_from_scores(s, rset)
  assert set(r) == {f'{s}/{k}' for s in ('itc', 'itm') for k in (
      'tr_r1', 'tr_r5', 'tr_r10', 'tr_mean', 'ir_r1', 'ir_r5', 'ir_r10', 'ir_mean', 'r_mean')}


def test_sharded_equals_single_device(setup):
  c, params, rset = setup
  kw = dict(k_test=4, batch_size=8, rerank_batch_size=16)
  single = retrieval.compute_scores(c.model, params, rset, **kw)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  mesh = sharding.create_mesh(c)
  assert mesh.devices.size == 8
  sharded = retrieval.compute_scores(c.model, params, rset, mesh=mesh, **kw)
  np.testing.assert_allclose(sharded.sims, single.sims, atol=1e-5)
  for a, b in ((sharded.i2t, single.i2t), (sharded.t2i, single.t2i)):
    np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
    np.testing.assert_allclose(a[np.isfinite(a)], b[np.isfinite(b)], atol=1e-5)
  assert (retrieval.recall_from_scores(sharded, rset)
          == retrieval.recall_from_scores(single, rset))
  with pytest.raises(ValueError, match='does not divide'):
    retrieval.compute_scores(c.model, params, rset, mesh=mesh, k_test=4, batch_size=6)


def test_zero_shot_predictions(setup, reference):
  c, params, rset = setup
  sims, itm = reference
  classes = [0, 5, 9, 20]  # four of the texts act as class prompts
  pred = zeroshot.predict(c.model, params, rset, rset.text_ids[classes],
                          rset.text_mask[classes], batch_size=8, use_itm=True)
  np.testing.assert_array_equal(pred['itc'], np.argmax(sims[:, classes], axis=1))
  np.testing.assert_array_equal(pred['itm'], np.argmax(itm[:, classes], axis=1))
  assert zeroshot.accuracy([1, 2, 3, 0], [1, 2, 0, 0]) == 75.0
