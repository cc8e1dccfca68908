"""Shared fixtures for the data tests: tiny data sets written into tmp folders.

Imported by the other test_data_*.py modules; holds no tests of its own.
"""

import atexit
import functools
import io
import json
import os
import shutil
import tarfile
import tempfile

import numpy as np
from PIL import Image
import pytest

from codis_jax.data import config as config_lib
from codis_jax.data import records


def image_bytes(i, fmt='PNG', size=(40, 30), mode='RGB'):
  """A small distinct image: a flat colour from i plus a gradient."""
  rng = np.random.default_rng(i)
  base = rng.integers(0, 256, 3)
  grad = np.linspace(0, 60, size[0])[None, :, None]
  arr = np.clip(base + grad + np.zeros((size[1], size[0], 3)), 0, 255).astype(np.uint8)
  img = Image.fromarray(arr).convert(mode)
  out = io.BytesIO()
  img.save(out, format=fmt)
  return out.getvalue()


def caption(i):
  return f'Caption number {i}: a small test picture!'


def write_json_set(folder, n_images=20, caps_per_image=2, name='ann.json', offset=0):
  """ALBEF JSON + PNG files; pair k has a unique caption. Returns the spec string."""
  os.makedirs(os.path.join(folder, 'img'), exist_ok=True)
  entries = []
  for i in range(offset, offset + n_images):
    with open(os.path.join(folder, 'img', f'{i}.png'), 'wb') as f:
      f.write(image_bytes(i))
    caps = [caption(i * 10 + j) for j in range(caps_per_image)]
    entries.append({'image': f'{i}.png', 'caption': caps if caps_per_image > 1 else caps[0]})
  path = os.path.join(folder, name)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(entries, f)
  return f'json:{path}@{os.path.join(folder, "img")}'


def write_prepared_set(folder, n_images=24, caps_per_image=1, shards=4, split='train',
                       offset=1000, bad=()):
  """Project-format TFRecords. `bad` adds ('corrupt'|'utf8'|'empty'|'noimage') records."""
  examples = [(image_bytes(i), [caption(i * 10 + j) for j in range(caps_per_image)], i, -1)
              for i in range(offset, offset + n_images)]
  for k, kind in enumerate(bad):
    img = {'corrupt': b'\xff\xd8\xffnot a jpeg', 'noimage': b''}.get(kind, image_bytes(k))
    cap = {'utf8': b'bad \xff\xfe caption', 'empty': b' ?! '}.get(kind, b'fine caption')
    examples.append((img, [cap], 5000 + k, -1))
  info = {split: records.write_split(folder, split, examples, shards)}
  records.write_info(folder, 'fixture', info)
  return f'prepared:{folder}?split={split}'


def write_wds_set(folder, n_per_shard=(5, 4), with_stats=(True, False), bad=False):
  """img2dataset-style webdataset tars NNNNN.tar (+ NNNNN_stats.json)."""
  os.makedirs(folder, exist_ok=True)
  k = 0
  for s, n in enumerate(n_per_shard):
    path = os.path.join(folder, f'{s:05d}.tar')
    with tarfile.open(path, 'w') as tar:
      for j in range(n):
        key = f'{s:05d}{j:04d}'
        files = {'jpg': image_bytes(k, 'JPEG'), 'txt': caption(k).encode(),
                 'json': json.dumps({'key': key}).encode()}
        if bad and j == 0:
          del files['jpg']
        if bad and j == 1:
          files['txt'] = b'\xff\xfe'
        for ext, data in files.items():
          info = tarfile.TarInfo(f'{key}.{ext}')
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
        k += 1
    if with_stats[s]:
      with open(os.path.join(folder, f'{s:05d}_stats.json'), 'w') as f:
        json.dump({'successes': n, 'count': n}, f)
  return f'wds:{folder}'


def data_config(train, test='', **kw):
  cfg = config_lib.get_data_config('emoji')
  cfg.train, cfg.test = train, test or train
  cfg.update(kw)
  return cfg


def take(it, n):
  return [next(it) for _ in range(n)]


@functools.lru_cache(maxsize=None)
def prepared_bundled(name):
  """Prepares a bundled set once per test session (the emoji render takes ~20 s)."""
  from codis_jax.data import prepare  # pylint: disable=import-outside-toplevel
  folder = tempfile.mkdtemp(prefix=f'codis_{name}_')
  atexit.register(shutil.rmtree, folder, True)
  return prepare.ensure_prepared(name, folder)


@pytest.fixture
def json_set(tmp_path):
  return write_json_set(str(tmp_path))
