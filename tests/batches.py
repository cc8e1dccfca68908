"""Random but valid batches for tests (no side effects: safe to import anywhere)."""

import numpy as np


def make_batch(config, seed=0, batch_size=None):
  """A random but valid batch for `config`: images, ids with [CLS] ... [SEP] and padding."""
  rs = np.random.RandomState(seed)
  b = batch_size or config.batch_size
  m, length = config.model, config.text_len
  ids = rs.randint(5, m.vocab_size, size=(b, length)).astype(np.int32)
  lengths = rs.randint(4, length + 1, size=b)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids[:, 0] = m.cls_id
  ids[np.arange(b), lengths - 1] = m.sep_id
  ids = np.where(mask > 0, ids, m.pad_id).astype(np.int32)
  image = rs.randn(b, m.image_size, m.image_size, 3).astype(np.float32)
  return {'image': image, 'text_ids': ids, 'text_mask': mask,
          'image_id': np.arange(b, dtype=np.int32)}
