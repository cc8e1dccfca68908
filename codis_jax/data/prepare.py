"""python -m codis_jax.data.prepare emoji|fashion_mnist [--data_dir DIR] [--force]

Writes a bundled data set in the project's TFRecord format (records.py) under
DATA_DIR/NAME (DATA_DIR: --data_dir, else $CODIS_DATA_DIR, else ~/.cache/codis_jax).
A finished set is never rebuilt (unless --force): the build goes to a temporary folder
that is renamed into place at the end, so concurrent or interrupted runs are safe.
"""

import argparse
import json
import logging
import os
import shutil
import uuid

from codis_jax.data import emoji_data
from codis_jax.data import fashion_mnist
from codis_jax.data import records
from codis_jax.data.errors import DataError
from codis_jax.data.spec import default_data_dir

log = logging.getLogger('codis_jax.data')
NAMES = ('emoji', 'fashion_mnist')


def _build_emoji(out):
  train, test, counts = emoji_data.select()
  splits = {'train': records.write_split(out, 'train', emoji_data.examples(train), 8),
            'test': records.write_split(out, 'test', emoji_data.examples(test), 2)}
  # The test split again in ALBEF's retrieval format: image files + a JSON list.
  os.makedirs(os.path.join(out, 'test_images'))
  entries = []
  for (png, caps, image_id, _), (_, _, _) in zip(emoji_data.examples(test), test):
    rel = f'test_images/{image_id:05d}.png'
    with open(os.path.join(out, rel), 'wb') as f:
      f.write(png)
    entries.append({'image': rel, 'caption': caps, 'image_id': image_id})
  with open(os.path.join(out, 'test_retrieval.json'), 'w', encoding='utf-8') as f:
    json.dump(entries, f, ensure_ascii=False, indent=0)
  records.write_info(out, 'emoji', splits, counts=counts,
                     test_emoji=[e for e, _, _ in test])


def _build_fashion_mnist(out):
  splits = {'train': records.write_split(out, 'train', fashion_mnist.examples('train'), 8),
            'test': records.write_split(out, 'test',
                                        fashion_mnist.examples('test', id_offset=60000), 2)}
  records.write_info(out, 'fashion_mnist', splits,
                     class_names=list(fashion_mnist.CLASS_NAMES),
                     prompts=[fashion_mnist.TEMPLATE.format(n)
                              for n in fashion_mnist.PROMPT_NAMES])


def ensure_prepared(name, data_dir=None, force=False):
  """Builds DATA_DIR/NAME if it is not there yet; returns its path. Local folders only."""
  if name not in NAMES:
    raise DataError(f'unknown bundled data set {name!r}; known: {", ".join(NAMES)}')
  data_dir = data_dir or default_data_dir()
  final = os.path.join(data_dir, name)
  if os.path.exists(os.path.join(final, records.INFO_FILE)) and not force:
    return final
  os.makedirs(data_dir, exist_ok=True)
  tmp = os.path.join(data_dir, f'.{name}.tmp-{uuid.uuid4().hex[:8]}')
  os.makedirs(tmp)
  log.info('preparing %s into %s', name, final)
  try:
    (_build_emoji if name == 'emoji' else _build_fashion_mnist)(tmp)
    if os.path.exists(final):
      if not force and os.path.exists(os.path.join(final, records.INFO_FILE)):
        return final  # another process finished first
      shutil.rmtree(final)
    os.rename(tmp, final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('name', choices=NAMES)
  p.add_argument('--data_dir', default='', help='default: $CODIS_DATA_DIR or ~/.cache/codis_jax')
  p.add_argument('--force', action='store_true', help='rebuild even if present')
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(message)s')
  path = ensure_prepared(args.name, args.data_dir or None, args.force)
  info = records.read_info(path)
  sizes = {s: sum(v['shard_pairs']) for s, v in info['splits'].items()}
  print(f'{args.name}: {path} {json.dumps(sizes)}')
  if 'counts' in info:
    print(json.dumps(info['counts']))


if __name__ == '__main__':
  main()
