"""DataError and the bad-record counter shared by every source."""

import collections
import logging
import threading

log = logging.getLogger('codis_jax.data')

# Reasons a record is skipped; `stats()` reports a count for each (0 when none).
REASONS = ('missing_image', 'corrupt_image', 'empty_caption', 'bad_utf8',
           'malformed_entry')
REASON_CODE = {r: i + 1 for i, r in enumerate(REASONS)}  # 0 = good record


class DataError(ValueError):
  """A data problem that must stop the run (missing file, wrong name, bad spec)."""


class BadRecords:
  """Thread-safe counts per reason; remembers the first few bad records by name.

  Updated from tf.data worker threads (inside tf.numpy_function), hence the lock.
  """

  def __init__(self, keep=5):
    self._lock = threading.Lock()
    self._counts = collections.Counter()
    self._examples = []
    self._keep = keep
    self._logged = False

  def good(self, n=1):
    with self._lock:
      self._counts['ok'] += n

  def bad(self, reason, name):
    assert reason in REASON_CODE, reason
    with self._lock:
      self._counts[reason] += 1
      if len(self._examples) < self._keep:
        self._examples.append(f'{name} ({reason})')

  def stats(self):
    with self._lock:
      out = {'ok': self._counts['ok']}
      out.update({r: self._counts[r] for r in REASONS})
      return out

  def maybe_log(self, final=False):
    """Logs ONE line naming the first bad records: once `keep` are known, or at the end."""
    with self._lock:
      if self._logged or not self._examples:
        return
      if len(self._examples) < self._keep and not final:
        return
      self._logged = True
      counts = {r: self._counts[r] for r in REASONS if self._counts[r]}
      examples = '; '.join(self._examples)
    log.warning('skipping bad input records %s; first ones: %s', counts, examples)
