"""Sources: where records come from, and how many there are.

Two shapes of source, because they are ordered differently (see pipeline.py):
  * IndexedSource (ALBEF JSON): every pair is addressable by an index, so an epoch is a
    permutation of indices; the image is read at load time from its path.
  * ShardedSource (prepared TFRecords, img2dataset tars / TFRecords, TFDS): records live
    in shard files read sequentially; an epoch permutes shards and shuffles in a buffer.
Both produce "pairs" (one image, one caption); a record with several captions gives one
pair per caption (except TFDS; see TfdsSource).
"""

import abc
import json
import os
import zlib

import numpy as np
import tensorflow as tf

from codis_jax.data import records
from codis_jax.data.errors import DataError


def read_file(path):
  """Bytes of a local file (plain open: faster) or of any tf.io.gfile URL."""
  if '://' in path:
    with tf.io.gfile.GFile(path, 'rb') as f:
      return f.read()
  with open(path, 'rb') as f:
    return f.read()


class IndexedSource:
  """An ALBEF annotation file: [{"image": path, "caption": str | [str]}, ...].

  Malformed entries (not a dict, no image path, caption neither a string nor a list of
  strings) are counted once, at load. Non-UTF-8 bytes are kept as surrogates so that
  the one bad caption, not the whole file, is skipped later.
  """

  def __init__(self, spec, bad):
    path, root = spec.location, spec.root
    if not tf.io.gfile.exists(path):
      raise DataError(f'annotation file not found: {path}')
    if not tf.io.gfile.isdir(root):
      raise DataError(f'image root not found: {root} (for {path})')
    with tf.io.gfile.GFile(path, 'rb') as f:
      raw = f.read().decode('utf-8', errors='surrogateescape')
    try:
      entries = json.loads(raw)
    except json.JSONDecodeError as e:
      raise DataError(f'annotation file {path} is not valid JSON: {e}') from e
    if not isinstance(entries, list):
      raise DataError(f'annotation file {path}: expected a JSON list of entries')
    self.name = path
    self.image_paths = []    # per image
    self.captions = []       # per pair
    pair_image = []
    ids = {}
    for i, entry in enumerate(entries):
      caps = entry.get('caption') if isinstance(entry, dict) else None
      image = entry.get('image') if isinstance(entry, dict) else None
      if isinstance(caps, str):
        caps = [caps]
      if (not isinstance(image, str) or not image or not isinstance(caps, list)
          or not caps or not all(isinstance(c, str) for c in caps)):
        bad.bad('malformed_entry', f'{path}[{i}]')
        continue
      full = image if (os.path.isabs(image) or '://' in image) else os.path.join(root, image)
      if full not in ids:
        ids[full] = len(self.image_paths)
        self.image_paths.append(full)
      for c in caps:
        self.captions.append(c)
        pair_image.append(ids[full])
    self.pair_image = np.asarray(pair_image, np.int64)
    self.num_pairs = len(self.captions)
    # Ids: the entries' own integer "image_id" when every entry has one (prepare writes
    # them), else the image's number in file order.
    given = [e.get('image_id') if isinstance(e, dict) else None for e in entries]
    self.image_ids = np.arange(len(self.image_paths), dtype=np.int64)
    if entries and all(isinstance(g, int) for g in given):
      by_path = {}
      for e, g in zip(entries, given):
        if isinstance(e.get('image'), str):
          p = e['image']
          by_path.setdefault(p if (os.path.isabs(p) or '://' in p) else os.path.join(root, p), g)
      self.image_ids = np.asarray([by_path[p] for p in self.image_paths], np.int64)

  def lookup(self, i):
    """pair index -> (image path, caption str, image id)."""
    image = int(self.pair_image[i])
    return self.image_paths[image], self.captions[i], int(self.image_ids[image])


class ShardedSource(abc.ABC):
  """Shard files with known pair counts; `read(path, seed)` -> a Dataset of pairs:
  {'image': encoded bytes, 'caption': bytes, 'image_id': int64, 'name': str}."""
  shards = ()
  shard_pairs = ()

  @property
  def num_pairs(self):
    return int(sum(self.shard_pairs))

  @abc.abstractmethod
  def read(self, path, seed):
    """One shard file -> a tf.data.Dataset of pairs (the fields above)."""


def _expand(ds, path):
  """{image, captions [k], image_id} records -> one element per caption, named path#n."""
  def per_record(n, r):
    k = tf.shape(r['captions'])[0]
    return tf.data.Dataset.from_tensor_slices({
        'image': tf.fill([k], r['image']), 'caption': r['captions'],
        'image_id': tf.fill([k], r['image_id']),
        'name': tf.fill([k], tf.strings.join([path, '#', tf.strings.as_string(n)]))})
  return ds.enumerate().flat_map(per_record)


class PreparedSource(ShardedSource):
  """The project's format (records.py): DIR/dataset_info.json + SPLIT-*.tfrecord."""

  def __init__(self, spec, split):
    info = records.read_info(spec.location)
    split = spec.option('split', split)
    if split not in info['splits']:
      raise DataError(f'prepared dataset {spec.location} has no split {split!r}; '
                      f'it has {sorted(info["splits"])}')
    s = info['splits'][split]
    self.name = f'{spec.location}:{split}'
    self.info = info
    self.shards = [os.path.join(spec.location, f) for f in s['shards']]
    self.shard_pairs = list(s['shard_pairs'])

  def read(self, path, seed):
    return _expand(tf.data.TFRecordDataset(path).map(records.parse_example), path)


def _list_shards(location, suffix):
  if tf.io.gfile.isdir(location):
    files = tf.io.gfile.glob(os.path.join(location, '*' + suffix))
  else:
    files = tf.io.gfile.glob(location)
  files = sorted(f for f in files if f.endswith(suffix))
  if not files:
    raise DataError(f'no *{suffix} shards found at {location}')
  return files


def _stats_count(shard, suffix):
  """img2dataset writes NNNNN_stats.json next to each shard; 'successes' = records."""
  stats = shard[:-len(suffix)] + '_stats.json'
  if tf.io.gfile.exists(stats):
    with tf.io.gfile.GFile(stats) as f:
      return int(json.load(f)['successes'])
  return None


_IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp', 'gif', 'bmp')


def _key_to_id(key):
  return int(key) if key.isdigit() and len(key) < 19 else zlib.crc32(key.encode()) >> 1


def iter_tar_samples(path):
  """Yields (image bytes, caption bytes, image_id, name) per webdataset sample (key)."""
  import tarfile  # pylint: disable=import-outside-toplevel
  with tf.io.gfile.GFile(path, 'rb') as f, tarfile.open(fileobj=f, mode='r|*') as tar:
    key, parts = None, {}
    for member in tar:
      if not member.isfile():
        continue
      base = os.path.basename(member.name)
      k, _, ext = base.partition('.')
      k = os.path.join(os.path.dirname(member.name), k)
      if k != key and key is not None:
        yield _tar_sample(path, key, parts)
        parts = {}
      key = k
      parts[ext.lower()] = tar.extractfile(member).read()
    if key is not None:
      yield _tar_sample(path, key, parts)


def _tar_sample(path, key, parts):
  image = next((parts[e] for e in _IMAGE_EXTS if e in parts), b'')
  caption = parts.get('txt')
  if caption is None and 'json' in parts:
    try:
      caption = str(json.loads(parts['json']).get('caption') or '').encode('utf-8')
    except (ValueError, AttributeError):
      caption = b''
  return image, caption or b'', _key_to_id(os.path.basename(key)), f'{path}#{key}'


class WebDatasetSource(ShardedSource):
  """img2dataset's webdataset output: NNNNN.tar of KEY.jpg + KEY.txt (or KEY.json)."""

  def __init__(self, spec):
    self.name = spec.location
    self.shards = _list_shards(spec.location, '.tar')
    self.shard_pairs = [_stats_count(s, '.tar') or sum(1 for _ in iter_tar_samples(s))
                        for s in self.shards]

  def read(self, path, seed):
    sig = (tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.string),
           tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.string))
    ds = tf.data.Dataset.from_generator(
        lambda p: iter_tar_samples(p.decode() if isinstance(p, bytes) else p),
        output_signature=sig, args=(path,))
    return ds.map(lambda i, c, k, n: {'image': i, 'caption': c, 'image_id': k, 'name': n})


class Img2DatasetTFRecordSource(ShardedSource):
  """img2dataset's TFRecord output: Examples with 'jpg'|'png'|'webp', 'txt', 'key'."""

  def __init__(self, spec):
    self.name = spec.location
    self.shards = _list_shards(spec.location, '.tfrecord')
    self.shard_pairs = [
        _stats_count(s, '.tfrecord') or int(tf.data.TFRecordDataset(s).reduce(0, lambda n, _: n + 1))
        for s in self.shards]

  def read(self, path, seed):
    spec = {k: tf.io.FixedLenFeature([], tf.string, default_value='')
            for k in ('jpg', 'png', 'webp', 'txt', 'key')}

    def parse(n, serialized):
      ex = tf.io.parse_single_example(serialized, spec)
      image = tf.strings.join([ex['jpg'], ex['png'], ex['webp']])  # the one present
      key = ex['key']
      digits = tf.strings.regex_full_match(key, '[0-9]{1,18}')
      image_id = tf.cond(digits, lambda: tf.strings.to_number(key, tf.int64),
                         lambda: tf.strings.to_hash_bucket_fast(key, 2**31 - 1))
      return {'image': image, 'caption': ex['txt'], 'image_id': image_id,
              'name': tf.strings.join([path, '#', tf.strings.as_string(n)])}
    return tf.data.TFRecordDataset(path).enumerate().map(parse)


class TfdsSource(ShardedSource):
  """A prepared TFDS dataset (TFRecord file format), read shard by shard; never downloads.

  One pair per image (record counts come from the TFDS metadata without a scan): a
  random caption per epoch in training, as ALBEF's pretrain_dataset does, the first one
  in evaluation. Feature keys are options: image_key, caption_key, id_key.
  """

  def __init__(self, spec, split, train):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    data_dir = spec.option('data_dir') or None
    try:
      builder = tfds.builder(spec.location, data_dir=data_dir)
    except Exception as e:  # tfds raises DatasetNotFoundError and friends
      raise DataError(f'TFDS dataset {spec.location!r} not found: {e}') from e
    if not builder.is_prepared():
      raise DataError(f'TFDS dataset {spec.location!r} is not prepared in '
                      f'{builder.data_dir}; prepare it first (never downloaded here)')
    split = spec.option('split', split)
    if split not in builder.info.splits:
      raise DataError(f'TFDS dataset {spec.location!r} has no split {split!r}; '
                      f'it has {sorted(builder.info.splits)}')
    if str(builder.info.file_format.value) != 'tfrecord':
      raise DataError(f'TFDS dataset {spec.location!r} is stored as '
                      f'{builder.info.file_format.value}; only tfrecord is supported')
    info = builder.info.splits[split]
    self.name = f'tfds:{spec.location}:{split}'
    self.shards = [str(p) for p in info.filepaths]
    self.shard_pairs = list(info.shard_lengths)
    self._features = builder.info.features
    self._keys = [spec.option(k, d) for k, d in (
        ('image_key', 'image'), ('caption_key', 'captions/text'), ('id_key', 'image/id'))]
    self._train = train
    self._tfds = tfds

  def _get(self, ex, key):
    for part in key.split('/') if key not in ex else [key]:
      ex = ex[part]
    return ex

  def read(self, path, seed):
    image_key, caption_key, id_key = self._keys
    decoders = {image_key: self._tfds.decode.SkipDecoding()}

    def parse(n, serialized):
      ex = self._features.deserialize_example(serialized, decoders=decoders)
      caps = tf.reshape(self._get(ex, caption_key), [-1])
      k = tf.maximum(tf.shape(caps)[0], 1)
      pick = 0
      if self._train:
        pick = tf.random.stateless_uniform(
            [], tf.stack([tf.cast(seed, tf.int64), n]), 0, tf.cast(k, tf.int64),
            dtype=tf.int64)
      caption = tf.concat([caps, ['']], 0)[pick]  # '' when there is no caption
      try:
        image_id = tf.cast(self._get(ex, id_key), tf.int64)
      except KeyError:
        image_id = n
      return {'image': self._get(ex, image_key), 'caption': caption, 'image_id': image_id,
              'name': tf.strings.join([path, '#', tf.strings.as_string(n)])}
    return tf.data.TFRecordDataset(path).enumerate().map(parse)


def open_sources(specs, split, train, bad):
  """SourceSpecs -> (indexed sources, sharded sources)."""
  indexed, sharded = [], []
  for s in specs:
    if s.kind == 'json':
      indexed.append(IndexedSource(s, bad))
    elif s.kind == 'prepared':
      sharded.append(PreparedSource(s, split))
    elif s.kind == 'wds':
      sharded.append(WebDatasetSource(s))
    elif s.kind == 'i2d_tfrecord':
      sharded.append(Img2DatasetTFRecordSource(s))
    else:
      sharded.append(TfdsSource(s, split, train))
  return indexed, sharded
