"""NumpyIterator: iterate a tf.data Dataset as numpy, and close it without a deadlock.

Why not `ds.as_numpy_iterator()`: our pipeline runs Python (tf.numpy_function) on
tf.data threads. A standard iterator is destroyed when its handle is garbage-collected,
and that happens WITH the GIL held while the destructor waits for the in-flight Python
calls, which wait for the GIL: the process hangs (seen with TF 2.21). Here the iterator
is deleted by an explicit DeleteIterator op, and TF releases the GIL while an op runs.
"""

import atexit
import threading
import weakref

import tensorflow as tf

_OPEN = weakref.WeakSet()
_LOCK = threading.Lock()


class NumpyIterator:
  """next() -> the dataset's element structure with numpy leaves; close() frees it."""

  def __init__(self, dataset):
    self._spec = dataset.element_spec
    flat = tf.nest.flatten(self._spec)
    self._types = [s.dtype for s in flat]
    self._shapes = [s.shape for s in flat]
    self._handle, self._deleter = tf.raw_ops.AnonymousIteratorV2(
        output_types=self._types, output_shapes=self._shapes)
    tf.raw_ops.MakeIterator(dataset=tf.data.experimental.to_variant(dataset),
                            iterator=self._handle)
    with _LOCK:
      _OPEN.add(self)

  def __iter__(self):
    return self

  def __next__(self):
    if self._handle is None:
      raise StopIteration
    try:
      flat = tf.raw_ops.IteratorGetNext(iterator=self._handle, output_types=self._types,
                                        output_shapes=self._shapes)
    except tf.errors.OutOfRangeError:
      raise StopIteration from None
    return tf.nest.pack_sequence_as(self._spec, [t.numpy() for t in flat])

  def close(self):
    """Deletes the iterator inside an op (GIL released); idempotent."""
    handle, deleter = self._handle, self._deleter
    self._handle = self._deleter = None
    if handle is not None:
      tf.raw_ops.DeleteIterator(handle=handle, deleter=deleter)

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  (interpreter shutdown)
      pass


@atexit.register
def _close_all():
  """Close every open iterator before the interpreter starts tearing down."""
  with _LOCK:
    its = list(_OPEN)
  for it in its:
    it.close()
