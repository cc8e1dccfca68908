"""load_retrieval_set: an image-text retrieval test set, as ALBEF's re_eval_dataset.

Images are numbered in file order; each image's captions (cleaned by pre_caption, kept
even when empty, as ALBEF does) get consecutive text numbers. txt2img[t] is the image of
text t and img2txt[i] the texts of image i: the ground truth of TR and IR recall.
"""

import dataclasses
from typing import List

import numpy as np
import tensorflow as tf

from codis_jax.data import records
from codis_jax.data import spec as spec_lib
from codis_jax.data import tokenize
from codis_jax.data import transforms
from codis_jax.data.errors import BadRecords, DataError
from codis_jax.data.iterate import NumpyIterator
from codis_jax.data.sources import IndexedSource, read_file


@dataclasses.dataclass
class RetrievalSet:
  images: list                 # per image: a path (str) or encoded bytes
  image_ids: np.ndarray        # int32 [num_images], dataset ids (file order if none)
  captions: List[List[str]]    # per image, cleaned
  text_ids: np.ndarray         # int32 [num_texts, L]
  text_mask: np.ndarray        # int32 [num_texts, L]
  txt2img: np.ndarray          # int32 [num_texts]
  img2txt: List[List[int]]
  image_size: int
  bad: BadRecords

  @property
  def num_images(self):
    return len(self.images)

  @property
  def num_texts(self):
    return len(self.txt2img)

  def stats(self):
    return self.bad.stats()

  def image_batches(self, batch_size):
    """Yields {'image': uint8 [b, S, S, 3], 'valid': bool [b]} in image order; the
    last batch is padded, and an image that cannot be read is zeros with valid=False."""
    size = self.image_size

    def load(i):
      item = self.images[int(i)]
      try:
        data = read_file(item) if isinstance(item, str) else item
      except (OSError, tf.errors.OpError):
        self.bad.bad('missing_image', str(item))
        return np.zeros((size, size, 3), np.uint8), False
      try:
        pixels = transforms.load_pixels(data, size)
      except Exception:  # pylint: disable=broad-except
        self.bad.bad('corrupt_image', str(item)[:200])
        return np.zeros((size, size, 3), np.uint8), False
      self.bad.good()
      return pixels, True

    def fn(i):
      pixels, ok = tf.numpy_function(load, [i], [tf.uint8, tf.bool], stateful=False)
      return {'image': tf.ensure_shape(pixels, [size, size, 3]),
              'valid': tf.ensure_shape(ok, [])}

    ds = tf.data.Dataset.range(self.num_images).map(
        fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    it = NumpyIterator(ds.batch(batch_size).prefetch(2))
    try:
      for batch in it:
        n = len(batch['valid'])
        if n < batch_size:
          batch = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
                   for k, v in batch.items()}
        yield batch
    finally:
      it.close()
    self.bad.maybe_log(final=True)


def _entries_from_spec(spec, data_dir, bad):
  """-> list of (image path or bytes, [raw captions], image id)."""
  specs = spec_lib.parse_spec(spec, data_dir)
  if len(specs) != 1 or specs[0].kind not in ('json', 'prepared'):
    raise DataError(f'retrieval set {spec!r}: expected one json: or prepared: source')
  s = specs[0]
  if s.kind == 'json':
    src = IndexedSource(s, bad)
    caps = [[] for _ in src.image_paths]
    for i, image in enumerate(src.pair_image):
      caps[image].append(src.captions[i])
    return [(p, c, int(i)) for p, c, i in zip(src.image_paths, caps, src.image_ids)]
  info = records.read_info(s.location)
  split = s.option('split', 'test')
  if split not in info['splits']:
    raise DataError(f'{s.location} has no split {split!r}')
  files = [f'{s.location}/{f}' for f in info['splits'][split]['shards']]
  # Round-robin over the shards restores the order prepare wrote (records.write_split).
  ds = tf.data.Dataset.from_tensor_slices(files).interleave(
      tf.data.TFRecordDataset, cycle_length=len(files), block_length=1)
  out = []
  for r in ds.map(records.parse_example).as_numpy_iterator():
    caps = [c.decode('utf-8', 'surrogateescape') for c in r['captions']]
    out.append((bytes(r['image']), caps, int(r['image_id'])))
  return out


def load_retrieval_set(data_config_or_path, image_size, text_len, tokenizer_dir='',
                       text_sep=None):
  """Reads a retrieval test set from a data config (its `retrieval` spec, else `test`),
  a spec string ('json:FILE@ROOT' or 'prepared:NAME?split=test'), or an ALBEF JSON path.
  tokenizer_dir and text_sep (None: the data config's, else False) say how captions are
  encoded (tokenize.TextEncoder)."""
  data_dir, max_words = '', 30
  if isinstance(data_config_or_path, str):
    spec = data_config_or_path
    if ':' not in spec.split('/')[0] or spec.startswith('gs://'):
      spec = 'json:' + spec  # a bare path to an ALBEF JSON file
  else:
    cfg = data_config_or_path
    spec = cfg.get('retrieval') or cfg.get('test')
    data_dir, max_words = cfg.get('data_dir', ''), cfg.get('max_words', 30)
    tokenizer_dir = tokenizer_dir or cfg.get('tokenizer', '')
    text_sep = cfg.get('text_sep') if text_sep is None else text_sep
  bad = BadRecords()
  entries = _entries_from_spec(spec, data_dir, bad)
  if not entries:
    raise DataError(f'retrieval set {spec!r} has no images')
  captions, txt2img, img2txt = [], [], []
  for i, (_, caps, _) in enumerate(entries):
    img2txt.append(list(range(len(txt2img), len(txt2img) + len(caps))))
    for c in caps:
      captions.append(tokenize.pre_caption(c, max_words))
      txt2img.append(i)
  ids, mask = tokenize.TextEncoder(text_len, tokenizer_dir, sep=bool(text_sep)).batch(captions)
  per_image = [[captions[t] for t in ts] for ts in img2txt]
  return RetrievalSet(
      images=[e[0] for e in entries], image_ids=np.asarray([e[2] for e in entries], np.int32),
      captions=per_image, text_ids=ids, text_mask=mask,
      txt2img=np.asarray(txt2img, np.int32), img2txt=img2txt, image_size=image_size, bad=bad)

