"""Loader: chunks of record handles -> (pixels, ids, mask, image_id, reason), in tf.data.

The parent's part of a record, run in tf.numpy_function on tf.data's threads: find the
caption and image (JSON index lookup, or the bytes a shard carried), clean the caption,
read remote files, count bad records by name. The image and text work itself is
workers.RecordWork.chunk, which `run` calls right here (data.workers = 0) or in a worker
process (WorkerPool.run). A record's output depends only on the record and its (epoch,
position), so both give the same batches.
"""

import numpy as np
import tensorflow as tf

from codis_jax.data import sources as sources_lib
from codis_jax.data import tokenize
from codis_jax.data.errors import REASON_CODE, REASONS

_ID_BITS = 27  # with several sources, image_id = source << 27 | id within the source


def _as_bytes(x):
  return x.item() if isinstance(x, np.ndarray) else x


class Loader:
  """A bad record yields a reason code (and a blank image) instead of raising, so the
  pipeline never dies on one; `bad` counts it.

  Args:
    indexed: the JSON sources (IndexedSource), looked up by (src, idx).
    num_sources: all sources; with several, image ids get the source in their top bits.
    bad: errors.BadRecords.
    work: workers.RecordWork.
    max_words: ALBEF's pre_caption truncation.
  """

  def __init__(self, indexed, num_sources, bad, work, max_words):
    self.indexed, self.num_sources, self.bad = indexed, num_sources, bad
    self.work, self.max_words = work, max_words

  def _fetch(self, src, idx, image, caption, image_id, name):
    """-> ((path, data, text), name, image_id), or (None, name, failure reason)."""
    src, idx = int(src), int(idx)
    if src < len(self.indexed):
      path, text, image_id = self.indexed[src].lookup(idx)
      name, data = path, b''
    else:
      name = _as_bytes(name).decode('utf-8', 'replace')
      try:
        text = _as_bytes(caption).decode('utf-8')
      except UnicodeDecodeError:
        return None, name, 'bad_utf8'
      path, data = '', _as_bytes(image)
    try:
      text.encode('utf-8')  # JSON captions keep bad bytes as surrogates
    except UnicodeEncodeError:
      return None, name, 'bad_utf8'
    text = tokenize.pre_caption(text, self.max_words)
    if not text:
      return None, name, 'empty_caption'
    if '://' in path:  # remote (tf.io.gfile) files are read here; local ones by the work
      try:
        data, path = sources_lib.read_file(path), ''
      except (OSError, tf.errors.OpError, UnicodeEncodeError):
        return None, name, 'missing_image'
    image_id = int(image_id)
    if self.num_sources > 1:
      image_id = (src << _ID_BITS) | (image_id & ((1 << _ID_BITS) - 1))
    return (path, data, text), name, image_id & 0x7FFFFFFF

  def _count(self, reason_code, name):
    if reason_code:
      self.bad.bad(REASONS[reason_code - 1], name)
    else:
      self.bad.good()

  def chunk(self, run, src, idx, image, caption, image_id, name, epoch, pos):
    """n records (arrays [n]) -> pixels uint8 [n, S, S, 3], ids int32 [n, L], mask int32
    [n, L], image_id int32 [n], reason int32 [n] (0 = good). `run`: RecordWork.chunk or
    WorkerPool.run, given the records that passed the lookup."""
    n = len(src)
    fetched = [self._fetch(*r) for r in zip(src, idx, image, caption, image_id, name)]
    todo = [i for i, f in enumerate(fetched) if f[0] is not None]
    s, length = self.work.image_size, self.work.encoder.text_len
    pixels = np.zeros((n, s, s, 3), np.uint8)
    ids, mask = np.zeros((n, length), np.int32), np.zeros((n, length), np.int32)
    codes = np.asarray([0 if f[0] is not None else REASON_CODE[f[2]] for f in fetched],
                       np.int32)
    if todo:
      out = run([fetched[i][0] + (int(epoch[i]), int(pos[i])) for i in todo])
      pixels[todo], ids[todo], mask[todo], codes[todo] = out
    image_ids = np.asarray([f[2] if c == 0 else -1 for f, c in zip(fetched, codes)],
                           np.int32)
    for f, c in zip(fetched, codes):
      self._count(int(c), f[1])
    return pixels, ids, mask, image_ids, codes
