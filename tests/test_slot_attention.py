"""`layers.slot_attention`: query rows that come k per example over one key/value row per
example (the fusion's cross-attention with `share_image_kv`), against float64 numpy on
the rows gathered by hand."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codis_jax.models import layers


def _rows(slots, b):
  """numpy: the key/value row each query row reads, row b*k + j -> example or slot index."""
  rows = np.zeros((b, len(slots)), np.int64)
  for j, s in enumerate(slots):
    if s is None:
      rows[:, j] = np.arange(b)
    else:
      g, per = s.shape
      rows[:, j] = (np.asarray(s) + np.arange(g)[:, None] * per).reshape(-1)
  return rows.reshape(-1)


def _attention_np(q, k, v):
  q, k, v = (np.float64(x) for x in (q, k, v))
  logits = np.einsum('bthd,bshd->bhts', q, k) / np.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum('bhts,bshd->bthd', w / w.sum(-1, keepdims=True), v)


def _plain(q, k, v):
  logits = jnp.einsum('bthd,bshd->bhts', q, k) / np.sqrt(q.shape[-1])
  return jnp.einsum('bhts,bshd->bthd', jax.nn.softmax(logits, -1), v)


# 8 examples in 2 groups of 4; slot 2 reads another example of its group.
OTHER = np.array([[1, 3, 0, 2], [2, 0, 3, 1]])
# Hard negatives can repeat: several rows of a group may read the same example.
REPEATS = np.array([[1, 1, 0, 1], [3, 3, 3, 2]])
SLOTS = {'train': (None, None, OTHER, None), 'finetune': (None, OTHER, None),
         'two others': (OTHER, None, OTHER[:, ::-1].copy()), 'repeats': (None, REPEATS),
         'no own slot': (OTHER, REPEATS)}


@pytest.mark.parametrize('name', sorted(SLOTS))
@pytest.mark.parametrize('attend', ['xla', 'even_length'])
def test_slot_attention_equals_gathered_rows(name, attend):
  rs = np.random.RandomState(0)
  slots = tuple(None if s is None else jnp.asarray(s) for s in SLOTS[name])
  b, t, s, h, d = 8, 5, 7, 2, 8  # odd T and S: the cuDNN path pads both
  q = rs.randn(len(slots) * b, t, h, d).astype(np.float32)
  k, v = (rs.randn(b, s, h, d).astype(np.float32) for _ in range(2))
  f = (functools.partial(layers.attention, mask=None, implementation='xla')
       if attend == 'xla' else
       functools.partial(layers.even_length_attention, mask=None, implementation='xla'))
  got = layers.slot_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), slots, f)
  rows = _rows(SLOTS[name], b)
  np.testing.assert_allclose(np.asarray(got), _attention_np(q, k[rows], v[rows]),
                             atol=1e-5, rtol=1e-5)
  # Gradients: each key/value row sums over the query rows that read it.
  cot = jnp.asarray(rs.randn(*q.shape).astype(np.float32))
  g_slot = jax.grad(lambda *a: jnp.sum(layers.slot_attention(*a, slots, f) * cot),
                    argnums=(0, 1, 2))(q, k, v)
  g_rows = jax.grad(lambda q, k, v: jnp.sum(_plain(q, k[rows], v[rows]) * cot),
                    argnums=(0, 1, 2))(q, k, v)
  for a, want in zip(g_slot, g_rows):
    np.testing.assert_allclose(np.asarray(a), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_flat_index_names_the_same_rows():
  for slots in SLOTS.values():
    index = layers.flat_index(tuple(None if s is None else jnp.asarray(s) for s in slots))
    x = np.arange(8 * 3).reshape(8, 3)
    np.testing.assert_array_equal(layers.take_rows(jnp.asarray(x), index),
                                  x[_rows(slots, 8)])
  with pytest.raises(ValueError, match='every slot is None'):
    layers.flat_index((None, None))


def test_slot_attention_rejects_rows_that_are_not_slots_x_examples():
  q, kv = jnp.zeros((10, 3, 2, 4)), jnp.zeros((4, 5, 2, 4))
  with pytest.raises(ValueError, match='10 query rows are not 3 slots x 4'):
    layers.slot_attention(q, kv, kv, (None, None, None), layers.even_length_attention)


def _cross_attention_arrays(index):
  """Shapes of every array in the jaxpr of a cross-attention module of 4 rows per image."""
  b, t, s, d, heads = 8, 5, 7, 16, 4
  x_q, images = jnp.zeros((4 * b, t, d)), jnp.zeros((b, s, 24))
  attn = layers.Attention(heads)
  params = nn.meta.unbox(attn.init(jax.random.key(0), x_q, jnp.zeros((4 * b, s, 24)))['params'])
  f = lambda img: attn.apply({'params': params}, x_q, img, None, index)
  jaxpr = jax.make_jaxpr(jax.grad(lambda img: jnp.sum(f(img))))(images)
  shapes = set()

  def visit(jx):
    for eqn in jx.eqns:
      shapes.update(tuple(o.aval.shape) for o in eqn.outvars)
      for sub in jax.core.jaxprs_in_params(eqn.params):
        visit(sub)
  visit(jaxpr.jaxpr)
  return shapes


def test_cross_attention_writes_no_per_row_keys():
  # Keys/values per query row ([4B, S, H, D]) are what gathering wrote for every slot;
  # with slots only the other image's B rows are gathered.
  slots = (None, None, jnp.asarray(OTHER), None)
  assert (32, 7, 4, 4) not in _cross_attention_arrays(slots)
  assert (32, 7, 4, 4) in _cross_attention_arrays(layers.flat_index(slots))  # control
