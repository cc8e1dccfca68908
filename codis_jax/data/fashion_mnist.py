"""Fashion-MNIST from the Debian package dataset-fashion-mnist, with class-name captions."""

import concurrent.futures
import gzip
import io
import os

import numpy as np

from codis_jax.data.errors import DataError

SOURCE_DIR = '/usr/share/datasets/fashion-mnist'
CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
               'Sneaker', 'Bag', 'Ankle boot')
# Caption per class: a natural phrase for the zero-shot prompt "a photo of a {}".
PROMPT_NAMES = ('t-shirt', 'pair of trousers', 'pullover', 'dress', 'coat', 'sandal',
                'shirt', 'sneaker', 'bag', 'ankle boot')
TEMPLATE = 'a photo of a {}'
_FILES = {'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
          'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}


def _read_idx(path, magic):
  with gzip.open(path, 'rb') as f:
    data = f.read()
  got, n = int.from_bytes(data[0:4], 'big'), int.from_bytes(data[4:8], 'big')
  if got != magic:
    raise DataError(f'{path}: not an IDX file (magic {got})')
  if magic == 2051:
    rows, cols = int.from_bytes(data[8:12], 'big'), int.from_bytes(data[12:16], 'big')
    return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)
  return np.frombuffer(data, np.uint8, offset=8).reshape(n)


def load(split, source_dir=SOURCE_DIR):
  """-> (images uint8 [n, 28, 28], labels uint8 [n])."""
  images, labels = (os.path.join(source_dir, f) for f in _FILES[split])
  for p in (images, labels):
    if not os.path.exists(p):
      raise DataError(f'Fashion-MNIST file not found: {p} '
                      '(Debian package dataset-fashion-mnist)')
  return _read_idx(images, 2051), _read_idx(labels, 2049)


def _png(image):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  out = io.BytesIO()
  Image.fromarray(image).save(out, format='PNG', compress_level=1)
  return out.getvalue()


def examples(split, id_offset=0, source_dir=SOURCE_DIR):
  """-> (png bytes, [caption], image_id, label) for records.py."""
  images, labels = load(split, source_dir)
  # PIL's PNG encoder releases the GIL: a few threads use every core.
  with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
    for i, (png, label) in enumerate(zip(pool.map(_png, images, chunksize=256), labels)):
      yield png, [TEMPLATE.format(PROMPT_NAMES[label])], id_offset + i, int(label)
