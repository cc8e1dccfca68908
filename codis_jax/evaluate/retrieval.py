"""Image-text retrieval as ALBEF's Retrieval.py: ITC similarities, then ITM re-ranking.

Stage 1 (ITC): L2-normalised features of every image and text; sims = image @ text^T.
Stage 2 (ITM): each image's k_test most similar texts and each text's k_test most similar
images are scored with the ITM head through the fusion encoder. The re-ranked score of
those pairs is the ITM "match" logit (ALBEF: itm_head(...)[:, 1]; or its softmax
probability); every other pair scores -inf (ALBEF: -100) and keeps its ITC order behind
the top-k (the metrics' tiebreak).

Memory, sized for COCO-5K (5,000 images, 25,000 captions, 577 image tokens at 384 px):
  * the text tokens of the whole set stay on the devices ([Nt, L, D]: 2.3 GB in float32
    at L=30), the image tokens never do: the pairs to re-score are grouped by image and
    the images are encoded again block by block (a second ViT pass, cheap next to the
    fusion passes), so only `batch_size` images' tokens exist at a time;
  * pairs are fused in chunks of `rerank_batch_size`, split over the mesh's batch axes;
  * a pair in both an image's and a text's top-k is fused once.
Every jitted call takes its batch split over the batch axes ('data', 'fsdp') and returns
replicated results, so every process of a multi-host run gets the same numbers.
"""

import dataclasses
import functools
import logging
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from codis_jax import sharding
from codis_jax.evaluate import metrics
from codis_jax.models import codis

log = logging.getLogger('codis_jax.evaluate')


@dataclasses.dataclass
class ArrayRetrievalSet:
  """An in-memory retrieval set with the data package's RetrievalSet interface.

  images: [Ni, S, S, 3] uint8 pixels or float32 already normalised; text_ids/text_mask:
  int32 [Nt, L];
  txt2img: [Nt]; img2txt: per image, its text indices.
  """
  images: np.ndarray
  text_ids: np.ndarray
  text_mask: np.ndarray
  txt2img: np.ndarray
  img2txt: list

  @property
  def num_images(self):
    return len(self.images)

  @property
  def num_texts(self):
    return len(self.text_ids)

  def image_batches(self, batch_size):
    for lo in range(0, self.num_images, batch_size):
      x = self.images[lo:lo + batch_size]
      n = len(x)
      yield {'image': _pad(x, batch_size), 'valid': np.arange(batch_size) < n}


def subset(rset, num_images):
  """The first `num_images` images of a retrieval set with their texts (CI-sized runs)."""
  if num_images is None or num_images >= rset.num_images:
    return rset
  keep = [list(ts) for ts in rset.img2txt[:num_images]]
  texts = np.asarray([t for ts in keep for t in ts], np.int64)
  new_index = {int(t): j for j, t in enumerate(texts)}
  fields = dict(images=rset.images[:num_images], text_ids=rset.text_ids[texts],
                text_mask=rset.text_mask[texts],
                txt2img=np.asarray(rset.txt2img)[texts],
                img2txt=[[new_index[int(t)] for t in ts] for ts in keep])
  for name, n in (('captions', num_images), ('image_ids', num_images)):
    if hasattr(rset, name):
      fields[name] = getattr(rset, name)[:n]
  return dataclasses.replace(rset, **fields)


def _pad(x, n):
  x = np.asarray(x)
  if len(x) == n:
    return x
  return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)])


def single_device_mesh():
  return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)


def put(x, sharding_):
  """Host array (the same on every process) -> a global array with `sharding_`."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding_, lambda idx: x[idx])


def put_params(params, mesh):
  """Host (numpy) leaves are replicated over the mesh; device arrays are kept as placed."""
  replicated = NamedSharding(mesh, P())
  return jax.tree.map(lambda p: p if isinstance(p, jax.Array) else put(p, replicated),
                      params)


class Runner:
  """The jitted pieces of an evaluation for one model config and mesh (cached: periodic
  evaluation during training compiles once)."""

  def __init__(self, model_config, mesh, rules):
    self.mesh, self.rules = mesh, rules
    self.batch = NamedSharding(mesh, P(sharding.BATCH_AXES))
    self.replicated = NamedSharding(mesh, P())
    self.num_shards = sharding.batch_divisor(mesh)
    model = codis.build_model(model_config, train=False)
    apply = lambda p, method, *a: model.apply({'params': p}, *a, method=method)
    split = lambda x: jax.lax.with_sharding_constraint(x, self.batch)
    out = lambda f: jax.jit(f, out_shardings=self.replicated)

    self._image_feats = out(lambda p, x: apply(p, codis.CODIS.encode_image, x)[1])
    self._image_tokens = out(lambda p, x: apply(p, codis.CODIS.encode_image, x)[0])
    self._text = out(lambda p, ids, m: apply(p, codis.CODIS.encode_text, ids, m))

    def rescore(p, block_tokens, text_tokens, text_mask, pair_img, pair_txt, prob):
      # Gathers from replicated banks with batch-split indices: each device fuses its
      # share of the pairs and only that share's tokens are materialised.
      image = split(block_tokens[pair_img])
      text, mask = split(text_tokens[pair_txt]), split(text_mask[pair_txt])
      logits = apply(p, codis.CODIS.itm_logits, apply(p, codis.CODIS.fuse, text, mask, image))
      return jax.nn.softmax(logits)[:, 1] if prob else logits[:, 1]

    self._rescore = jax.jit(rescore, static_argnums=6, out_shardings=self.replicated)

  def _call(self, fn, *args):
    if not self.rules:  # no rules: only the explicit batch split (an unmapped logical
      return fn(*args)  # constraint under a set mesh would mean "replicate")
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return fn(*args)

  def check_batch(self, n, what):
    if n % self.num_shards:
      raise ValueError(f'{what}={n} does not divide over the {self.num_shards} devices of '
                       f'the mesh batch axes {sharding.BATCH_AXES}')

  def image_feats(self, params, images):
    return np.asarray(self._call(self._image_feats, params, put(images, self.batch)))

  def image_tokens(self, params, images):
    return self._call(self._image_tokens, params, put(images, self.batch))

  def text(self, params, ids, mask):
    """-> (tokens [B, L, D] on the devices, replicated; feats np [B, E])."""
    tokens, feats = self._call(self._text, params, put(ids, self.batch), put(mask, self.batch))
    return tokens, np.asarray(feats)

  def rescore(self, params, block_tokens, text_tokens, text_mask, pair_img, pair_txt, prob):
    return np.asarray(self._call(self._rescore, params, block_tokens, text_tokens, text_mask,
                                 put(pair_img, self.batch), put(pair_txt, self.batch), prob))


@functools.lru_cache(maxsize=8)
def _runner(model_config, mesh, rules):
  return Runner(model_config, mesh, rules)


def get_runner(model_config, mesh=None, axis_rules=None) -> Runner:
  """axis_rules: the config's logical_axis_rules, for params sharded by them; None = no
  activation constraints beyond the batch split (data parallel)."""
  frozen = ml_collections.FrozenConfigDict(model_config)
  rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in (axis_rules or ()))
  return _runner(frozen, mesh or single_device_mesh(), rules)


def topk_indices(scores, k):
  """Row-wise indices of the k largest scores, best first; ties go to the lower index."""
  scores = np.asarray(scores)
  out = np.empty((scores.shape[0], k), np.int64)
  for lo in range(0, scores.shape[0], 1024):
    out[lo:lo + 1024] = np.argsort(-scores[lo:lo + 1024], axis=1, kind='stable')[:, :k]
  return out


@dataclasses.dataclass
class Scores:
  sims: np.ndarray               # [Ni, Nt] ITC cosine similarities
  i2t: np.ndarray | None = None  # [Ni, Nt] re-ranked: ITM score on each image's top-k
  t2i: np.ndarray | None = None  # [Nt, Ni] re-ranked: ITM score on each text's top-k


def itc_features(runner, params, rset, batch_size):
  """-> (image feats [Ni, E], text feats [Nt, E], text tokens [Nt_pad, L, D] (device),
  text mask [Nt_pad, L]); the text bank is padded to a whole number of batches."""
  n_txt = rset.num_texts
  ids = _pad(rset.text_ids, -(-n_txt // batch_size) * batch_size)
  mask = _pad(rset.text_mask, len(ids))
  tokens, text_feats = [], []
  for lo in range(0, len(ids), batch_size):
    t, f = runner.text(params, ids[lo:lo + batch_size], mask[lo:lo + batch_size])
    tokens.append(t)
    text_feats.append(f)
  image_feats = [runner.image_feats(params, b['image']) for b in rset.image_batches(batch_size)]
  bank = jax.device_put(jnp.concatenate(tokens), runner.replicated)
  return (np.concatenate(image_feats)[:rset.num_images],
          np.concatenate(text_feats)[:n_txt], bank, put(mask, runner.replicated))


def compute_scores(model_config, params, rset, *, k_test, mesh=None, batch_size=64,
                   rerank_batch_size=None, itm_score='logit', rerank=True,
                   axis_rules=None) -> Scores:
  """ITC similarities and (rerank=True) the ITM re-ranked score matrices of `rset`.

  k_test larger than the set re-scores every candidate. Batch sizes are global and must
  divide over the mesh's batch axes.
  """
  if itm_score not in ('logit', 'prob'):
    raise ValueError(f"itm_score={itm_score!r}: choose 'logit' (ALBEF) or 'prob'")
  if k_test < 1:
    raise ValueError(f'k_test={k_test} must be >= 1')
  runner = get_runner(model_config, mesh, axis_rules)
  pair_batch = rerank_batch_size or batch_size
  runner.check_batch(batch_size, 'batch_size')
  runner.check_batch(pair_batch, 'rerank_batch_size')
  params = put_params(params, runner.mesh)
  t0 = time.time()
  img, txt, bank, bank_mask = itc_features(runner, params, rset, batch_size)
  sims = img @ txt.T
  log.info('ITC features of %d images, %d texts: %.1fs', len(img), len(txt), time.time() - t0)
  if not rerank:
    return Scores(sims)
  n_img, n_txt = sims.shape
  top_i2t = topk_indices(sims, min(k_test, n_txt))      # [Ni, k] text indices
  top_t2i = topk_indices(sims.T, min(k_test, n_img))    # [Nt, k] image indices
  # One key per (image, text) pair; sorted keys group the pairs by image.
  keys = np.unique(np.concatenate([
      (np.arange(n_img)[:, None] * n_txt + top_i2t).ravel(),
      (top_t2i * n_txt + np.arange(n_txt)[:, None]).ravel()]))
  pair_img, pair_txt = keys // n_txt, keys % n_txt
  pair_score = np.empty(len(keys), np.float32)
  prob = itm_score == 'prob'
  t0 = time.time()
  for b, batch in enumerate(rset.image_batches(batch_size)):
    first = b * batch_size
    lo, hi = np.searchsorted(pair_img, [first, first + batch_size])
    if lo == hi:
      continue
    block = runner.image_tokens(params, batch['image'])
    for c in range(lo, hi, pair_batch):
      n = min(pair_batch, hi - c)
      scores = runner.rescore(params, block, bank, bank_mask,
                              _pad(pair_img[c:c + n] - first, pair_batch),
                              _pad(pair_txt[c:c + n], pair_batch), prob)
      pair_score[c:c + n] = scores[:n]
  log.info('ITM re-ranking of %d pairs: %.1fs', len(keys), time.time() - t0)

  def scatter(rows, cols, shape, transpose):
    out = np.full(shape, -np.inf, np.float32)
    k = (cols * n_txt + rows) if transpose else (rows * n_txt + cols)
    out[rows, cols] = pair_score[np.searchsorted(keys, k)]
    return out

  rows_i = np.repeat(np.arange(n_img), top_i2t.shape[1])
  rows_t = np.repeat(np.arange(n_txt), top_t2i.shape[1])
  return Scores(sims, scatter(rows_i, top_i2t.ravel(), (n_img, n_txt), False),
                scatter(rows_t, top_t2i.ravel(), (n_txt, n_img), True))


def recall_from_scores(scores: Scores, rset) -> dict:
  """-> {'itc/tr_r1': ..., 'itm/tr_r1': ...} (the itm/ keys only when re-ranked)."""
  out = {f'itc/{k}': v for k, v in metrics.retrieval_recall(
      scores.sims, scores.sims.T, rset.img2txt, rset.txt2img).items()}
  if scores.i2t is not None:
    out.update({f'itm/{k}': v for k, v in metrics.retrieval_recall(
        scores.i2t, scores.t2i, rset.img2txt, rset.txt2img,
        tiebreak_i2t=scores.sims, tiebreak_t2i=scores.sims.T).items()})
  return out


def retrieval_metrics(model_config, params, retrieval_set, *, k_test, mesh=None,
                      batch_size=64, rerank_batch_size=None, itm_score='logit', rerank=True,
                      axis_rules=None) -> dict:
  """Zero-shot or fine-tuned retrieval recall of `params` on `retrieval_set`.

  model_config: the config's `model` section; params: a full parameter tree (student, or
  the teacher's with the student-only leaves: state.teacher_params); retrieval_set: the
  data package's RetrievalSet or an ArrayRetrievalSet. Returns percentages:
  {'itc/tr_r1', ..., 'itc/r_mean', 'itm/tr_r1', ..., 'itm/r_mean'}.
  """
  scores = compute_scores(model_config, params, retrieval_set, k_test=k_test, mesh=mesh,
                          batch_size=batch_size, rerank_batch_size=rerank_batch_size,
                          itm_score=itm_score, rerank=rerank, axis_rules=axis_rules)
  return recall_from_scores(scores, retrieval_set)
