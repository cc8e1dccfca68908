"""The project's standard format: TFRecord shards of tf.train.Example + dataset_info.json.

    DIR/dataset_info.json
        {"format": "codis_tfrecord", "version": 1, "name": ..., "class_names": [...],
         "splits": {SPLIT: {"shards": [FILE, ...], "shard_images": [n, ...],
                            "shard_pairs": [n, ...]}}}
    DIR/SPLIT-00000-of-00004.tfrecord ...

Each Example is one image with its captions:
    image     bytes   the encoded image (JPEG/PNG/GIF as found; prepare writes PNG)
    caption   bytes*  one or more UTF-8 captions (each one is a training pair)
    image_id  int64   dataset-wide id of the image
    label     int64   optional class index (Fashion-MNIST), -1 when absent
Per-shard counts live in the info file so the pipeline knows sizes without a scan.
"""

import json
import os

import tensorflow as tf

from codis_jax.data.errors import DataError

FORMAT = 'codis_tfrecord'
INFO_FILE = 'dataset_info.json'


def make_example(image_bytes, captions, image_id, label=-1):
  f = tf.train.Feature
  return tf.train.Example(features=tf.train.Features(feature={
      'image': f(bytes_list=tf.train.BytesList(value=[image_bytes])),
      'caption': f(bytes_list=tf.train.BytesList(
          value=[c.encode('utf-8') if isinstance(c, str) else c for c in captions])),
      'image_id': f(int64_list=tf.train.Int64List(value=[int(image_id)])),
      'label': f(int64_list=tf.train.Int64List(value=[int(label)])),
  })).SerializeToString()


FEATURES = {
    'image': tf.io.FixedLenFeature([], tf.string, default_value=''),
    'caption': tf.io.VarLenFeature(tf.string),
    'image_id': tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    'label': tf.io.FixedLenFeature([], tf.int64, default_value=-1),
}


def parse_example(serialized):
  """Graph op: serialized Example -> {image, captions [k], image_id, label}."""
  ex = tf.io.parse_single_example(serialized, FEATURES)
  return {'image': ex['image'], 'captions': tf.sparse.to_dense(ex['caption'], ''),
          'image_id': ex['image_id'], 'label': ex['label']}


def write_split(out_dir, split, examples, num_shards):
  """Writes (image_bytes, captions, image_id, label) tuples round-robin into shards.

  Returns the split's info entry. Files are written under a temporary name and
  renamed at the end, so an interrupted prepare never looks finished.
  """
  tf.io.gfile.makedirs(out_dir)
  names = [f'{split}-{i:05d}-of-{num_shards:05d}.tfrecord' for i in range(num_shards)]
  writers = [tf.io.TFRecordWriter(os.path.join(out_dir, n + '.tmp')) for n in names]
  images, pairs = [0] * num_shards, [0] * num_shards
  for i, (image_bytes, captions, image_id, label) in enumerate(examples):
    s = i % num_shards
    writers[s].write(make_example(image_bytes, captions, image_id, label))
    images[s] += 1
    pairs[s] += len(captions)
  for w, n in zip(writers, names):
    w.close()
    tf.io.gfile.rename(os.path.join(out_dir, n + '.tmp'), os.path.join(out_dir, n),
                       overwrite=True)
  return {'shards': names, 'shard_images': images, 'shard_pairs': pairs}


def write_info(out_dir, name, splits, **extra):
  info = {'format': FORMAT, 'version': 1, 'name': name, 'splits': splits, **extra}
  with tf.io.gfile.GFile(os.path.join(out_dir, INFO_FILE), 'w') as f:
    json.dump(info, f, indent=1)


def read_info(directory):
  path = os.path.join(directory, INFO_FILE)
  if not tf.io.gfile.exists(path):
    raise DataError(f'prepared dataset not found: {path} does not exist '
                    '(run `python -m codis_jax.data.prepare NAME` or fix the path)')
  with tf.io.gfile.GFile(path) as f:
    info = json.load(f)
  if info.get('format') != FORMAT:
    raise DataError(f'{path}: not a {FORMAT} dataset_info file')
  return info
