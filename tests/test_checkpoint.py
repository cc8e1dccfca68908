"""Checkpoints: sharded round trip, the raw reader, and refusing an incompatible config.

No train step is compiled here (only the state's initialiser), so these stay fast.
"""

import os

import jax
import numpy as np
import pytest

from codis_jax import checkpoint as ckpt_lib
from codis_jax import loop
from codis_jax import sharding
from codis_jax import state as state_lib
from test_weight_copy import check_copy


def _sharded_state(config, seed=0):
  mesh = sharding.create_mesh(config)
  tx = state_lib.make_optimizer(config.optim, config.total_steps)
  state, shardings = loop._initial_state(config, tx, mesh, None, 0, jax.random.key(seed))
  return state, shardings, tx, mesh


def _save(config, workdir, state, step=3):
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'))
  extra = {'rng': [1, 2], 'data': [{'epoch': 0, 'position': 24}], 'guard': {},
           'elapsed_s': 1.0}
  ckpt.save(step, state, extra, config)
  ckpt.wait()
  return ckpt


def test_round_trip_into_the_sharded_layout_and_raw(tiny_config, tmp_path):
  c = tiny_config
  state, shardings, tx, mesh = _sharded_state(c)
  state = state.replace(step=state.step + 3, queue_ptr=state.queue_ptr + 8)
  ckpt = _save(c, tmp_path, state)
  assert ckpt.latest_step() == 3

  abstract, shardings = loop._state_shardings(c, tx, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  restored = ckpt.restore_state(3, target, c)
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state),
               jax.device_get(restored))
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
    assert got.sharding.is_equivalent_to(want, got.ndim)
  assert ckpt.restore_extra(3)['data'][0]['position'] == 24

  # The exporters' reader: a workdir or a step folder, numpy leaves, the config back.
  for path in (tmp_path, tmp_path / 'checkpoints' / '3'):
    raw = ckpt_lib.restore_raw(str(path))
    assert set(raw['state']) == {'step', 'params', 'ema_params', 'opt_state',
                                 'image_queue', 'text_queue', 'queue_ptr'}
    assert isinstance(raw['state']['params']['temp'], np.ndarray)
    assert int(raw['state']['step']) == 3 and int(raw['state']['queue_ptr']) == 8
    np.testing.assert_array_equal(raw['state']['image_queue'],
                                  np.asarray(state.image_queue))
    assert raw['config'].model.vit_width == c.model.vit_width
    assert raw['extra']['rng'] == [1, 2]
  with pytest.raises(ckpt_lib.CheckpointError, match='no checkpoint found'):
    ckpt_lib.restore_raw(str(tmp_path / 'nowhere'))


def test_incompatible_checkpoint_is_refused_naming_the_shapes(tiny_config, tmp_path):
  c = tiny_config
  c.checkpoint.keep = 1
  state, *_ = _sharded_state(c)
  _save(c, tmp_path, state).close()
  wide = c.copy_and_resolve_references()
  wide.model.vit_width = 48  # every ViT weight changes shape
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    loop.train(wide, str(tmp_path))  # refused before the step is ever compiled
  msg = str(e.value)
  assert 'does not fit this config' in msg, msg
  assert 'params/visual_encoder/' in msg and '(32,)' in msg and '(48,)' in msg, msg
  assert 'model.vit_width: 32 -> 48' in msg, msg


def test_weight_copy_is_left_out_and_rebuilt_from_the_restored_weights(tiny_config,
                                                                       tmp_path):
  """model.weight_copy: checkpoints hold the float32 weights only; a restore makes the bf16
  copy from them, split as the weights (fsdp x tensor), and the same checkpoint restores
  into a config without the copy."""
  c = tiny_config
  c.model.dtype, c.model.weight_copy = 'bfloat16', True
  c.mesh.update(data=2, fsdp=2, tensor=2)
  state, shardings, tx, mesh = _sharded_state(c)
  assert state.weight_copy is not None
  # Saved weights that differ from the copy: a restore must not bring back a stale one.
  state = state.replace(params=jax.tree.map(lambda x: x + 0.25, state.params))
  ckpt = _save(c, tmp_path, state)
  assert 'weight_copy' not in ckpt_lib.restore_raw(str(tmp_path))['state']

  restored, _ = loop._initial_state(c, tx, mesh, ckpt, 3, jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(restored.params['temp']),
                                np.asarray(state.params['temp']))  # the saved weights
  check_copy(restored, shardings)

  plain = c.copy_and_resolve_references()
  plain.model.weight_copy = False
  tx = state_lib.make_optimizer(plain.optim, plain.total_steps)
  again, _ = loop._initial_state(plain, tx, mesh, ckpt, 3, jax.random.key(1))
  ckpt.close()
  assert again.weight_copy is None
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.params),
               jax.device_get(restored.params))


def test_checkpoint_of_another_mu_dtype_is_refused_naming_the_moments(tiny_config, tmp_path):
  """optim.mu_dtype is part of the state: a float32-moment checkpoint does not restore into
  a bf16-moment run (nor silently casts); the error names the moments' dtypes."""
  c = tiny_config
  c.checkpoint.keep = 1
  state, *_ = _sharded_state(c)
  _save(c, tmp_path, state).close()
  bf16 = c.copy_and_resolve_references()
  bf16.optim.mu_dtype = 'bfloat16'
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    loop.train(bf16, str(tmp_path))
  msg = str(e.value)
  assert '/mu/' in msg and 'checkpoint dtype float32 vs config bfloat16' in msg, msg
