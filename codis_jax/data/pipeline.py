"""create_pipeline: per-host numpy batches for the train step, deterministic and resumable.

Order. All hosts draw the same per-epoch permutation from (seed, epoch) and each takes
its own part: indexed (JSON) pairs by position (perm[host::hosts], cut to an equal
share in training), sharded sources by whole shards (perm[host::hosts]; every P-th
record when there are fewer shards than hosts), read interleaved and shuffled in a
seeded buffer. The streams are merged in a seeded random order that holds each one's
exact share. So the per-host stream of record handles is fixed by (seed, epoch, host)
and a position (handles consumed in the epoch) is the whole resume state: restoring
skips that many handles, before any image is read. Crops and augmentations are drawn
from (seed, host, epoch, position) too, so a resumed run yields identical batches.

Bad records are skipped (training) or yielded with valid=False (evaluation) and
counted per reason in stats(). MLM masking is not done here: the train step masks on
device.
"""

import logging
import os

import numpy as np
import tensorflow as tf

from codis_jax.data import sources as sources_lib
from codis_jax.data.iterate import NumpyIterator
from codis_jax.data import spec as spec_lib
from codis_jax.data import tokenize
from codis_jax.data import transforms
from codis_jax.data.errors import DataError, BadRecords, REASON_CODE

log = logging.getLogger('codis_jax.data')
_ID_BITS = 27  # with several sources, image_id = source << 27 | id within the source
_BUNDLED = ('emoji', 'fashion_mnist')


def _as_bytes(x):
  return x.item() if isinstance(x, np.ndarray) else x


class _Loader:
  """One record handle -> (pixels uint8 [S, S, 3], ids, mask, image_id, reason).

  Runs inside tf.numpy_function on tf.data's threads; a bad record returns a reason
  code (and a blank image) instead of raising, so the pipeline never dies on it.
  """

  def __init__(self, indexed, num_sources, encoder, bad, image_size, train, max_words,
               aug_seed, crop_scale, randaug_ops, randaug_magnitude):
    self.indexed, self.num_sources = indexed, num_sources
    self.encoder, self.bad = encoder, bad
    self.image_size, self.train, self.max_words = image_size, train, max_words
    self.aug_seed, self.crop_scale = aug_seed, crop_scale
    self.randaug = (randaug_ops, randaug_magnitude)
    self._blank = np.zeros((image_size, image_size, 3), np.uint8)
    self._pad = np.zeros((encoder.text_len,), np.int32)

  def _fail(self, reason, name):
    self.bad.bad(reason, name)
    return self._blank, self._pad, self._pad, np.int32(-1), np.int32(REASON_CODE[reason])

  def __call__(self, src, idx, image, caption, image_id, name, epoch, pos):
    src, idx = int(src), int(idx)
    if src < len(self.indexed):
      path, text, image_id = self.indexed[src].lookup(idx)
      name = path
    else:
      name = _as_bytes(name).decode('utf-8', 'replace')
      try:
        text = _as_bytes(caption).decode('utf-8')
      except UnicodeDecodeError:
        return self._fail('bad_utf8', name)
      path = None
    try:
      text.encode('utf-8')  # JSON captions keep bad bytes as surrogates
    except UnicodeEncodeError:
      return self._fail('bad_utf8', name)
    text = tokenize.pre_caption(text, self.max_words)
    if not text:
      return self._fail('empty_caption', name)
    if path is not None:
      try:
        data = sources_lib.read_file(path)
      except (OSError, tf.errors.OpError, UnicodeEncodeError):
        return self._fail('missing_image', name)
    else:
      data = _as_bytes(image)
    if not data:
      return self._fail('missing_image', name)
    try:
      if self.train:
        # Crop, flip and RandAugment draw from (seed, host, epoch, position): the same
        # after a resume.
        rng = np.random.default_rng([self.aug_seed, int(epoch), int(pos)])
        pixels = transforms.train_pixels(data, self.image_size, rng, self.crop_scale,
                                         *self.randaug)
      else:
        pixels = transforms.load_pixels(data, self.image_size)
    except Exception:  # pylint: disable=broad-except  (PIL raises many kinds)
      return self._fail('corrupt_image', name)
    ids, mask = self.encoder(text)
    image_id = int(image_id)
    if self.num_sources > 1:
      image_id = (src << _ID_BITS) | (image_id & ((1 << _ID_BITS) - 1))
    self.bad.good()
    return pixels, ids, mask, np.int32(image_id & 0x7FFFFFFF), np.int32(0)


def _maybe_prepare(specs, data_config):
  """Builds a bundled set (emoji, fashion_mnist) named by a prepared: source if missing."""
  for s in specs:
    name = os.path.basename(s.location.rstrip('/'))
    if (s.kind == 'prepared' and name in _BUNDLED and data_config.get('auto_prepare', True)
        and not tf.io.gfile.exists(os.path.join(s.location, 'dataset_info.json'))):
      from codis_jax.data import prepare  # pylint: disable=import-outside-toplevel
      prepare.ensure_prepared(name, os.path.dirname(s.location.rstrip('/')))


class Pipeline:
  """Iterator of per-host numpy batch dicts; see create_pipeline."""

  def __init__(self, data_config, *, split, global_batch_size, image_size, text_len, train,
               seed, process_index=0, process_count=1, state=None):
    if split not in data_config or not data_config[split]:
      raise DataError(f'data config has no spec for split {split!r} (data.{split})')
    if global_batch_size % process_count:
      raise DataError(f'global batch {global_batch_size} is not a multiple of the '
                      f'{process_count} processes')
    cfg = data_config
    self._cfg, self.train, self.seed, self.split = cfg, train, int(seed), split
    self.batch_size = global_batch_size // process_count
    self._pi, self._pc = process_index, process_count
    self._image_size = image_size
    self._bad = BadRecords()
    specs = spec_lib.parse_spec(cfg[split], cfg.get('data_dir', ''))
    _maybe_prepare(specs, cfg)
    self._indexed, self._sharded = sources_lib.open_sources(specs, split, train, self._bad)
    self._offsets = np.cumsum([0] + [s.num_pairs for s in self._indexed])
    encoder = tokenize.TextEncoder(text_len, cfg.get('tokenizer', ''))
    aug_seed = int(np.random.SeedSequence([self.seed, process_index, 0]).generate_state(1)[0])
    self._loader = _Loader(self._indexed, len(specs), encoder, self._bad, image_size, train,
                           cfg.get('max_words', 30), aug_seed,
                           (float(cfg.get('crop_scale_min', 0.2)),
                            float(cfg.get('crop_scale_max', 1.0))),
                           int(cfg.get('randaug_ops', 2)), int(cfg.get('randaug_magnitude', 7)))
    self.num_examples = int(self._offsets[-1] + sum(s.num_pairs for s in self._sharded))
    if self.num_examples == 0:
      raise DataError(f'data spec {cfg[split]!r} has no records')
    if train:
      self.steps_per_epoch = self.num_examples // global_batch_size
      if self.steps_per_epoch == 0:
        raise DataError(f'{self.num_examples} examples are fewer than one global batch '
                        f'of {global_batch_size}')
    else:  # the same on every host, so that hosts stay in step
      most = max(self._host_pairs(0, h) for h in range(process_count))
      self.steps_per_epoch = -(-most // self.batch_size)
    self._epoch, self._position, self._batches = 0, 0, 0
    if state:
      self._restore(state)
    self._it = None

  # ---- order -------------------------------------------------------------------------
  def _plan(self, epoch, host):
    """The host's part of an epoch, in numpy: (indexed pair ids, per sharded source its
    shard ids and pair count, the mixing order of the streams, seeds)."""
    rng = np.random.default_rng([self.seed, epoch])
    n = int(self._offsets[-1])
    order = rng.permutation(n) if self.train else np.arange(n)
    mine = order[host::self._pc]
    if self.train:
      mine = mine[:n // self._pc]
    shards, counts = [], [len(mine)] if self._indexed else []
    for s in self._sharded:
      perm = rng.permutation(len(s.shards)) if self.train else np.arange(len(s.shards))
      stride = len(s.shards) < self._pc  # then every host reads all, keeps every P-th
      ids = perm if stride else perm[host::self._pc]
      pairs = int(np.sum(np.asarray(s.shard_pairs, np.int64)[ids]))
      shards.append(ids)
      counts.append(len(range(host, pairs, self._pc)) if stride else pairs)
    # Streams interleave in a random order with each one's exact share (sizes are known).
    choice = np.repeat(np.arange(len(counts)), counts)
    if self.train:
      choice = rng.permutation(choice)
    seeds = rng.integers(2**31, size=2 * len(self._sharded) + 1)
    return mine, shards, choice, seeds

  def _host_pairs(self, epoch, host):
    return len(self._plan(epoch, host)[2])

  def _plan_tensors(self, epoch):
    """numpy_function body: the plan of `epoch` for this host as flat arrays."""
    mine, shards, choice, seeds = self._plan(int(epoch), self._pi)
    src = (np.searchsorted(self._offsets, mine, side='right') - 1).astype(np.int32)
    local = (mine - self._offsets[src]).astype(np.int64)
    paths = [np.asarray([s.shards[i].encode() for i in ids], dtype=object).reshape(-1)
             for s, ids in zip(self._sharded, shards)]
    return [src, local, choice.astype(np.int64), seeds.astype(np.int64)] + paths

  def _handles(self, epoch):
    """Graph: the epoch's stream of record handles for this host (epoch is a tensor)."""
    k = len(self._sharded)
    out = tf.numpy_function(self._plan_tensors, [epoch],
                            [tf.int32, tf.int64, tf.int64, tf.int64] + [tf.string] * k,
                            stateful=False)
    src, local, choice, seeds, paths = out[0], out[1], out[2], out[3], out[4:]

    def with_empty(e):  # the fields that only sharded sources fill
      n = tf.shape(e['src'])[0]
      return {**e, 'image': tf.fill([n], ''), 'caption': tf.fill([n], ''),
              'image_id': tf.zeros([n], tf.int64), 'name': tf.fill([n], '')}

    streams = []
    if self._indexed:
      ds = tf.data.Dataset.from_tensor_slices({'src': tf.reshape(src, [-1]),
                                               'idx': tf.reshape(local, [-1])})
      streams.append(ds.batch(1024).map(with_empty).unbatch())
    for j, s in enumerate(self._sharded):
      src_id = len(self._indexed) + j

      def read(path, s=s, seed=seeds[2 * j]):
        return s.read(path, seed)

      def tag(e, i=src_id):
        return {'src': tf.constant(i, tf.int32), 'idx': tf.constant(-1, tf.int64), **e}
      ds = tf.data.Dataset.from_tensor_slices(tf.reshape(paths[j], [-1])).interleave(
          read, cycle_length=max(1, min(len(s.shards), self._cfg.get('cycle_length', 16))),
          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      if len(s.shards) < self._pc:
        ds = ds.shard(self._pc, self._pi)
      buffer = self._cfg.get('shuffle_buffer', 10_000)
      if self.train and buffer > 1:
        ds = ds.shuffle(buffer, seed=seeds[2 * j + 1], reshuffle_each_iteration=False)
      streams.append(ds.map(tag))
    if len(streams) == 1:
      return streams[0]
    return tf.data.Dataset.choose_from_datasets(
        streams, tf.data.Dataset.from_tensor_slices(tf.reshape(choice, [-1])),
        stop_on_empty_dataset=False)

  # ---- the tf.data graph ---------------------------------------------------------------
  def _dataset(self, epoch0, skip):
    """One pipeline for the iterator's life: epochs are flat-mapped one after the other
    (no rebuild, no stall); each element carries its (epoch, position) for get_state."""
    cfg, size, L = self._cfg, self._image_size, self._loader.encoder.text_len

    def epoch_stream(epoch):
      ds = self._handles(epoch).enumerate()
      ds = ds.skip(tf.where(tf.equal(epoch, epoch0), tf.constant(skip, tf.int64), 0))
      return ds.map(lambda pos, e: {**e, '_pos': pos, '_epoch': epoch})

    last = epoch0 + 1 if not self.train else np.iinfo(np.int64).max
    ds = tf.data.Dataset.range(epoch0, last).flat_map(epoch_stream)
    keep = ('text_ids', 'text_mask', 'image_id', '_pos', '_epoch')

    def load(e):
      pixels, ids, mask, image_id, reason = tf.numpy_function(
          self._loader, [e['src'], e['idx'], e['image'], e['caption'], e['image_id'],
                         e['name'], e['_epoch'], e['_pos']],
          [tf.uint8, tf.int32, tf.int32, tf.int32, tf.int32], stateful=False)
      return {'image': tf.ensure_shape(pixels, [size, size, 3]),
              'text_ids': tf.ensure_shape(ids, [L]), 'text_mask': tf.ensure_shape(mask, [L]),
              'image_id': tf.ensure_shape(image_id, []),
              'reason': tf.ensure_shape(reason, []), '_pos': e['_pos'], '_epoch': e['_epoch']}

    def finish(r):
      out = {'image': r['image'], **{k: r[k] for k in keep}}
      return out if self.train else {**out, 'valid': tf.equal(r['reason'], 0)}

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if self.train:
      ds = ds.filter(lambda r: tf.equal(r['reason'], 0))
    ds = ds.map(finish).batch(self.batch_size, drop_remainder=self.train)
    ds = ds.prefetch(cfg.get('prefetch', 2))
    options = tf.data.Options()
    options.deterministic = True
    if cfg.get('num_threads', 0):
      options.threading.private_threadpool_size = cfg.num_threads
    return ds.with_options(options)

  # ---- iterator protocol ---------------------------------------------------------------
  def __iter__(self):
    return self

  def __next__(self):
    if self._it is None:
      self._it = NumpyIterator(self._dataset(self._epoch, self._position))
    if not self.train and self._batches >= self.steps_per_epoch:
      self._bad.maybe_log(final=True)
      raise StopIteration
    try:
      batch = next(self._it)
    except StopIteration:  # evaluation only (training never ends): pad to the fixed count
      self._bad.maybe_log(final=True)
      batch = None
    self._bad.maybe_log()
    return self._finish(batch)

  def _finish(self, batch):
    b, L, S = self.batch_size, self._loader.encoder.text_len, self._image_size
    if batch is None:
      batch = {'image': np.zeros([0, S, S, 3], np.uint8), 'text_ids': np.zeros([0, L], np.int32),
               'text_mask': np.zeros([0, L], np.int32), 'image_id': np.zeros([0], np.int32),
               'valid': np.zeros([0], bool), '_pos': np.zeros([0], np.int64),
               '_epoch': np.zeros([0], np.int64)}
    pos, epoch = batch.pop('_pos'), batch.pop('_epoch')
    if len(pos):
      self._epoch, self._position = int(epoch[-1]), int(pos[-1]) + 1
    self._batches += 1
    n = len(batch['image_id'])
    if n < b:  # only in evaluation: pad to the fixed batch, marked invalid
      batch = {k: np.concatenate([v, np.zeros((b - n,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    return batch

  def close(self):
    """Stops the background work now (it also stops when the iterator is collected)."""
    if self._it is not None:
      self._it.close()

  def get_state(self):
    """Small JSON-serialisable position; pass it as `state=` to continue from here."""
    return {'epoch': self._epoch, 'position': self._position, 'batches': self._batches,
            'seed': self.seed, 'num_examples': self.num_examples,
            'process_index': self._pi, 'process_count': self._pc}

  def _restore(self, state):
    for key, mine in (('seed', self.seed), ('num_examples', self.num_examples),
                      ('process_index', self._pi), ('process_count', self._pc)):
      if state.get(key) != mine:
        raise DataError(f'cannot resume the input pipeline: state has {key}='
                        f'{state.get(key)!r} but this pipeline has {mine!r}')
    self._epoch = int(state['epoch'])
    self._position = int(state['position'])
    self._batches = int(state.get('batches', 0)) if not self.train else 0

  def stats(self):
    """Counts per outcome: 'ok' and each bad-record reason (records processed so far,
    including those read ahead by the prefetch)."""
    return self._bad.stats()


def create_pipeline(data_config, *, split, global_batch_size, image_size, text_len, train,
                    seed, process_index=0, process_count=1, state=None):
  """The public entry point. Returns an iterator of per-host numpy batch dicts:

    image      uint8   [b, S, S, 3]  RGB pixels after the transforms; the model
                                     normalises them (CLIP mean/std) on the device
    text_ids   int32   [b, L]        [CLS] ... [SEP], 0-padded
    text_mask  int32   [b, L]        1 on real tokens (incl. CLS/SEP)
    image_id   int32   [b]           dataset-wide id of the image
    valid      bool    [b]           evaluation only: False on padding / bad records

  b = global_batch_size // process_count. Training is one endless stream of full
  batches: epochs (each reshuffled from (seed, epoch)) follow each other without a gap,
  so no partial batch is ever made and the last batch of an epoch may end with pairs of
  the next; steps_per_epoch = num_examples // global_batch_size. Evaluation makes one
  pass of exactly `steps_per_epoch` batches on every host, the last ones padded. The
  iterator has get_state(), stats(), num_examples and steps_per_epoch.
  """
  return Pipeline(data_config, split=split, global_batch_size=global_batch_size,
                  image_size=image_size, text_len=text_len, train=train, seed=seed,
                  process_index=process_index, process_count=process_count, state=state)
