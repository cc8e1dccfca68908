"""queue.py: the ring buffer against numpy slicing, wrap-around, sharding and bad sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from codis_jax import queue as queue_lib

Q, B, E = 32, 8, 4


def np_enqueue(queue, ptr, feats):
  """ALBEF's _dequeue_and_enqueue: queue[ptr:ptr + B] = feats; ptr = (ptr + B) % Q."""
  queue = queue.copy()
  queue[ptr:ptr + len(feats)] = feats
  return queue, (ptr + len(feats)) % len(queue)


def test_init_queue_is_unit_rows_and_seeded():
  q = np.asarray(queue_lib.init_queue(jax.random.key(0), Q, E))
  assert q.shape == (Q, E) and q.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, rtol=1e-6)
  assert np.array_equal(q, queue_lib.init_queue(jax.random.key(0), Q, E))
  assert not np.allclose(q, queue_lib.init_queue(jax.random.key(1), Q, E))


@pytest.mark.parametrize('ptr', [0, B, Q - B])  # Q - B: the write ends the ring, ptr -> 0
def test_enqueue_writes_the_batch_rows_and_advances(ptr):
  rng = np.random.default_rng(ptr)
  queue = rng.standard_normal((Q, E)).astype(np.float32)
  feats = rng.standard_normal((B, E)).astype(np.float32)
  got, new_ptr = jax.jit(queue_lib.enqueue)(queue, jnp.int32(ptr), feats)
  want, want_ptr = np_enqueue(queue, ptr, feats)
  assert np.array_equal(np.asarray(got), want)
  assert int(new_ptr) == want_ptr


def test_a_full_cycle_of_writes_replaces_every_row_in_order():
  queue, ptr = np.zeros((Q, E), np.float32), jnp.int32(0)
  want, want_ptr = queue.copy(), 0
  step = jax.jit(queue_lib.enqueue)
  for i in range(Q // B + 1):  # one write past a full cycle: it overwrites the oldest rows
    feats = np.full((B, E), i + 1, np.float32)
    queue, ptr = step(queue, ptr, feats)
    want, want_ptr = np_enqueue(want, want_ptr, feats)
    assert np.array_equal(np.asarray(queue), want) and int(ptr) == want_ptr
  assert int(ptr) == B and want[0, 0] == Q // B + 1


def test_enqueue_passes_no_gradient_and_casts_to_the_queue_dtype():
  queue = jnp.zeros((Q, E), jnp.float32)
  feats = jnp.ones((B, E), jnp.bfloat16)
  g = jax.grad(lambda f: queue_lib.enqueue(queue, jnp.int32(0), f)[0].sum())(feats)
  assert not np.any(np.asarray(g))
  assert queue_lib.enqueue(queue, jnp.int32(0), feats)[0].dtype == jnp.float32


def test_enqueue_on_a_sharded_queue_equals_numpy():
  # tests/conftest.py provides 8 fake CPU devices: the queue sharded along its length.
  mesh = Mesh(np.array(jax.devices()), ('d',))
  n = len(jax.devices())
  rng = np.random.default_rng(0)
  queue = rng.standard_normal((4 * n, E)).astype(np.float32)
  feats = rng.standard_normal((n, E)).astype(np.float32)
  ptr = 3 * n  # a write that spans devices' rows and ends the ring
  sharded = jax.device_put(queue, NamedSharding(mesh, P('d', None)))
  got, new_ptr = jax.jit(queue_lib.enqueue)(sharded, jnp.int32(ptr), feats)
  want, want_ptr = np_enqueue(queue, ptr, feats)
  assert np.array_equal(np.asarray(got), want) and int(new_ptr) == want_ptr
  assert got.sharding.spec == P('d', None)


@pytest.mark.parametrize('size,batch', [(30, 8), (8, 16), (32, 0)])
def test_a_queue_the_batch_does_not_tile_names_the_config_keys(size, batch):
  with pytest.raises(ValueError, match='config.queue_size.*config.batch_size'):
    queue_lib.check_queue_size(size, batch)
  if batch:
    with pytest.raises(ValueError, match='config.queue_size'):
      queue_lib.enqueue(jnp.zeros((size, E)), jnp.int32(0), jnp.zeros((batch, E)))
