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

Work. Records go through loader.Loader in chunks; their image and text work
(workers.RecordWork) runs on tf.data's threads, or with data.workers = W > 0 in W worker
processes: the same batches either way, without one process's GIL as the ceiling.
"""

import atexit
import functools
import logging
import os
import weakref

import numpy as np
import tensorflow as tf

from codis_jax.data import sources as sources_lib
from codis_jax.data.iterate import NumpyIterator
from codis_jax.data.loader import Loader
from codis_jax.data import spec as spec_lib
from codis_jax.data import tokenize
from codis_jax.data import workers as workers_lib
from codis_jax.data.errors import DataError, BadRecords

log = logging.getLogger('codis_jax.data')
_BUNDLED = ('emoji', 'fashion_mnist')
_OPEN = weakref.WeakSet()


@atexit.register  # registered after iterate.py's: runs first, while the workers are up
def _close_all():
  for pipeline in list(_OPEN):
    pipeline.close()


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
    encoder = tokenize.TextEncoder(text_len, cfg.get('tokenizer', ''),
                                   sep=bool(cfg.get('text_sep')))
    aug_seed = int(np.random.SeedSequence([self.seed, process_index, 0]).generate_state(1)[0])
    work = workers_lib.RecordWork(
        encoder, image_size, train, aug_seed,
        (float(cfg.get('crop_scale_min', 0.2)), float(cfg.get('crop_scale_max', 1.0))),
        (int(cfg.get('randaug_ops', 2)), int(cfg.get('randaug_magnitude', 7))))
    self._workers = cfg.get('workers', 0) or 0
    if not isinstance(self._workers, int) or self._workers < 0:
      raise DataError(f'data.workers={self._workers!r}: 0 (work in this process) or more')
    self._pool = None  # started with the iterator
    self._loader = Loader(self._indexed, len(specs), self._bad, work,
                          cfg.get('max_words', 30))
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
    cfg, size, L = self._cfg, self._image_size, self._loader.work.encoder.text_len

    def epoch_stream(epoch):
      ds = self._handles(epoch).enumerate()
      ds = ds.skip(tf.where(tf.equal(epoch, epoch0), tf.constant(skip, tf.int64), 0))
      return ds.map(lambda pos, e: {**e, '_pos': pos, '_epoch': epoch})

    last = epoch0 + 1 if not self.train else np.iinfo(np.int64).max
    ds = tf.data.Dataset.range(epoch0, last).flat_map(epoch_stream)
    keep = ('text_ids', 'text_mask', 'image_id', '_pos', '_epoch')

    fields = ('src', 'idx', 'image', 'caption', 'image_id', 'name', '_epoch', '_pos')
    out_types = [tf.uint8, tf.int32, tf.int32, tf.int32, tf.int32]
    if self._pool is None:  # the work right here, as many chunks at once as TF likes
      run, parallel = self._loader.work.chunk, tf.data.AUTOTUNE
    else:  # two chunks in flight per worker: the next is ready when one finishes
      run, parallel = self._pool.run, 2 * self._workers
    chunk = functools.partial(self._loader.chunk, run)

    def load(e):  # one chunk of records (tf.numpy_function costs per call, not per record)
      pixels, ids, mask, image_id, reason = tf.numpy_function(
          chunk, [e[k] for k in fields], out_types, stateful=False)
      return {'image': tf.ensure_shape(pixels, [None, size, size, 3]),
              'text_ids': tf.ensure_shape(ids, [None, L]),
              'text_mask': tf.ensure_shape(mask, [None, L]),
              'image_id': tf.ensure_shape(image_id, [None]),
              'reason': tf.ensure_shape(reason, [None]), '_pos': e['_pos'],
              '_epoch': e['_epoch']}

    def finish(r):
      out = {'image': r['image'], **{k: r[k] for k in keep}}
      return out if self.train else {**out, 'valid': tf.equal(r['reason'], 0)}

    ds = ds.batch(workers_lib.CHUNK).map(
        load, num_parallel_calls=parallel, deterministic=True).unbatch()
    if self.train:
      ds = ds.filter(lambda r: tf.equal(r['reason'], 0))
    ds = ds.map(finish).batch(self.batch_size, drop_remainder=self.train)
    ds = ds.prefetch(cfg.get('prefetch', 2))
    options = tf.data.Options()
    options.deterministic = True
    if cfg.get('num_threads', 0):  # plus a thread for each chunk waiting on a worker
      options.threading.private_threadpool_size = cfg.num_threads + 2 * self._workers
    return ds.with_options(options)

  # ---- iterator protocol ---------------------------------------------------------------
  def __iter__(self):
    return self

  def __next__(self):
    if self._it is None:
      if self._workers and self._pool is None:
        self._pool = workers_lib.WorkerPool(self._loader.work, self._workers)
        _OPEN.add(self)
      self._it = NumpyIterator(self._dataset(self._epoch, self._position))
    if not self.train and self._batches >= self.steps_per_epoch:
      self._bad.maybe_log(final=True)
      raise StopIteration
    try:
      batch = next(self._it)
    except tf.errors.OpError:
      if self._pool is not None and self._pool.error is not None:
        raise self._pool.error from None  # a worker died: say so, not TF's wrapping
      raise
    except StopIteration:  # evaluation only (training never ends): pad to the fixed count
      self._bad.maybe_log(final=True)
      batch = None
    self._bad.maybe_log()
    return self._finish(batch)

  def _finish(self, batch):
    b, L, S = self.batch_size, self._loader.work.encoder.text_len, self._image_size
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
    """Stops the background work and any worker processes now (they also stop when the
    pipeline is collected, or at exit)."""
    if self._it is not None:
      self._it.close()
    if self._pool is not None:
      self._pool.close()

  @property
  def worker_pids(self):
    """Process ids of the data workers (empty with data.workers = 0 or before next())."""
    return self._pool.pids if self._pool is not None else []

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
