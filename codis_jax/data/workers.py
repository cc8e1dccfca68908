"""The per-record work (read a local image, decode, crop, flip, RandAugment, tokenise) and
the worker processes that run it when data.workers > 0.

Why processes: the per-image work is Python around PIL, OpenCV and tokenizers calls, and
the threads of one process share one GIL, ~0.5 ms per image (README, Input pipeline >
Speed): one process stops near 1,700-2,000 images/s whatever its cores, short of a TPU
host's 4-8 chips. With W workers the parent keeps only the record lookup and the
bytes in and out, one call per chunk of records.

Workers are plain `python -c` subprocesses with the parent's sys.path, not
multiprocessing's spawn, which would re-import the parent's __main__ (codis_jax.main: JAX,
TensorFlow) into each; they import numpy, PIL, OpenCV and tokenizers only. They talk
pickle over a pair of pipes, ignore SIGINT and SIGTERM (the parent handles preemption and
may still need batches while it saves) and exit when the parent closes the pipe or dies.
"""

import os
import queue
import signal
import subprocess
import sys
import weakref
from multiprocessing import connection

import numpy as np

from codis_jax.data import transforms
from codis_jax.data.errors import DataError, REASON_CODE

CHUNK = 16  # records per call: amortises the parent's per-call cost, keeps latency low


class RecordWork:
  """One record -> (pixels uint8 [S, S, 3], ids int32 [L], mask int32 [L], reason int).

  Picklable: each worker gets a copy once, at start. reason is 0 for a good record, else
  REASON_CODE['missing_image' | 'corrupt_image'] with blank pixels and ids.
  """

  def __init__(self, encoder, image_size, train, aug_seed, crop_scale, randaug):
    self.encoder, self.image_size, self.train = encoder, image_size, train
    self.aug_seed, self.crop_scale, self.randaug = aug_seed, crop_scale, tuple(randaug)

  def __call__(self, path, data, text, epoch, pos):
    """path: a local file to read ('' when `data` holds the encoded bytes); text: the
    cleaned caption; (epoch, pos): the record's place in the stream, which seeds its
    crop, flip and RandAugment (so a resumed run draws the same ones)."""
    if path:
      try:
        with open(path, 'rb') as f:
          data = f.read()
      except (OSError, UnicodeEncodeError):
        return self.failed('missing_image')
    if not data:
      return self.failed('missing_image')
    try:
      if self.train:
        rng = np.random.default_rng([self.aug_seed, int(epoch), int(pos)])
        pixels = transforms.train_pixels(data, self.image_size, rng, self.crop_scale,
                                         *self.randaug)
      else:
        pixels = transforms.load_pixels(data, self.image_size)
    except Exception:  # pylint: disable=broad-except  (PIL raises many kinds)
      return self.failed('corrupt_image')
    ids, mask = self.encoder(text)
    return pixels, ids, mask, 0

  def failed(self, reason):
    """The blank outputs and code of a record skipped for `reason`."""
    s, n = self.image_size, self.encoder.text_len
    return (np.zeros((s, s, 3), np.uint8), np.zeros((n,), np.int32),
            np.zeros((n,), np.int32), REASON_CODE[reason])

  def chunk(self, items):
    """items: list of (path, data, text, epoch, pos) -> (pixels uint8 [n, S, S, 3],
    ids int32 [n, L], mask int32 [n, L], reasons int32 [n])."""
    out = [self(*item) for item in items]
    return (np.stack([o[0] for o in out]), np.stack([o[1] for o in out]),
            np.stack([o[2] for o in out]), np.asarray([o[3] for o in out], np.int32))


class WorkerPool:
  """W worker processes running RecordWork.chunk; `run(items)` is called from tf.data's
  threads, each call on one idle worker. A worker that dies breaks the pool: every call
  from then on raises the same DataError (the run must stop: its batches would change)."""

  def __init__(self, work, workers):
    if workers < 1:
      raise DataError(f'data.workers={workers}: a worker pool needs at least one')
    self.workers, self.error = workers, None
    self._idle = queue.SimpleQueue()
    self._procs = []
    for _ in range(workers):  # all start importing at once
      to_child, from_parent = os.pipe()
      to_parent, from_child = os.pipe()
      boot = (f'import sys; sys.path[:] = {sys.path!r}; '
              f'from codis_jax.data.workers import serve; serve({to_child}, {from_child})')
      proc = subprocess.Popen([sys.executable, '-c', boot], pass_fds=(to_child, from_child),
                              stdin=subprocess.DEVNULL)
      os.close(to_child)
      os.close(from_child)
      self._procs.append((proc, connection.Connection(from_parent, readable=False),
                          connection.Connection(to_parent, writable=False)))
    # On collection; at exit the owner (pipeline.Pipeline) closes the pool after its
    # tf.data iterator, whose in-flight calls still need the workers.
    self._finalizer = weakref.finalize(self, _shutdown, list(self._procs))
    self._finalizer.atexit = False
    try:
      for i, (_, send, _) in enumerate(self._procs):
        send.send(work)
        self._idle.put(i)
    except OSError:
      self.close()
      raise DataError('a data worker process exited at start (data.workers='
                      f'{workers}); its error is above on stderr') from None

  @property
  def pids(self):
    return [p.pid for p, _, _ in self._procs]

  def run(self, items):
    """list of (path, data, text, epoch, pos) -> RecordWork.chunk's arrays."""
    i = self._idle.get()
    if i is None:  # broken: pass the news on to the next waiting thread
      self._idle.put(None)
      raise self.error
    proc, send, recv = self._procs[i]
    try:
      send.send(items)
      out = recv.recv()
    except (EOFError, OSError):
      try:
        code = proc.wait(timeout=5)
      except subprocess.TimeoutExpired:
        code = 'still running'
      self.error = DataError(
          f'data worker {i} (pid {proc.pid}) died, exit code {code}, with '
          f'data.workers={self.workers}; any error it printed is above on stderr. '
          'A worker killed by the OOM killer (code -9) needs fewer data.workers or '
          'more host memory')
      self._idle.put(None)
      raise self.error from None
    self._idle.put(i)
    return out

  def close(self):
    """Stops the workers (they exit on EOF); idempotent."""
    found = self._finalizer.detach()  # not finalizer(): that is a no-op once exit began
    if found:
      _shutdown(*found[2])


def _shutdown(procs):
  for _, send, _ in procs:  # EOF: each worker exits after the chunk it is on
    send.close()
  for proc, _, recv in procs:
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    recv.close()


def serve(read_fd, write_fd):
  """A worker's main loop: the RecordWork, then chunks; replies until EOF."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  inbox = connection.Connection(read_fd, writable=False)
  outbox = connection.Connection(write_fd, readable=False)
  try:
    work = inbox.recv()
    while True:
      outbox.send(work.chunk(inbox.recv()))
  except (EOFError, BrokenPipeError):  # the parent closed the pipe or is gone
    return
