"""Feature queues: a ring buffer of L2-normalised teacher features.

The queue is stored length-first, [Q, E], so that it can be sharded along its length over
the batch axes of a mesh. One pointer serves both queues (they advance together).
"""

import jax
import jax.numpy as jnp


def init_queue(rng, size: int, dim: int):
  """Random unit vectors (ALBEF's init). -> [size, dim] float32."""
  q = jax.random.normal(rng, (size, dim), jnp.float32)
  return q / jnp.linalg.norm(q, axis=-1, keepdims=True)


def check_queue_size(queue_size: int, global_batch: int):
  """The pointer advances by the global batch, so the batch must tile the queue exactly."""
  if global_batch <= 0 or queue_size % global_batch:
    raise ValueError(
        f'config.queue_size={queue_size} is not a multiple of the global batch '
        f'config.batch_size={global_batch}: the ring buffer would write across its end. '
        'Choose a queue size that the global batch divides.')


def enqueue(queue, ptr, feats):
  """Write `feats` at rows [ptr, ptr + B) and advance the pointer.

  queue: [Q, E]; ptr: int32 scalar in [0, Q), a multiple of B; feats: [B, E] (the global
  batch). Returns (queue [Q, E], new ptr = (ptr + B) mod Q). No gradient flows.

  Written as a row-wise select rather than a dynamic_update_slice: when the queue is
  sharded along Q, XLA partitions a dynamic_update_slice by all-gathering the whole
  queue, while this form only gathers the small batch `feats`; every device then updates
  its own rows in place. Same result as the slice write, bit for bit.
  """
  check_queue_size(queue.shape[0], feats.shape[0])
  b = feats.shape[0]
  feats = jax.lax.stop_gradient(feats).astype(queue.dtype)
  offset = jnp.arange(queue.shape[0], dtype=jnp.int32) - ptr   # row -> index into feats
  inside = (offset >= 0) & (offset < b)
  queue = jnp.where(inside[:, None], feats[jnp.clip(offset, 0, b - 1)], queue)
  return queue, (ptr + b) % queue.shape[0]
