"""The sharded step equals the single-device step on any mesh (8 fake CPU devices)."""

import jax
import numpy as np
import pytest

from codis_jax import sharding
from codis_jax import state as state_lib
from codis_jax import train
from conftest import make_batch

STEPS = 3


def _run(config, mesh_sizes=None):
  tx = state_lib.make_optimizer(config.optim, config.total_steps)
  step = train.make_train_step(config, tx, steps_per_epoch=10)
  rng = jax.random.key(3)
  if mesh_sizes is None:  # plain single-device jit: the reference
    st = jax.jit(lambda r: state_lib.create_train_state(config, r, tx))(jax.random.key(0))
    run, put = jax.jit(step), lambda b: b
  else:
    config.mesh.update(dict(zip(sharding.MESH_AXES, mesh_sizes)))
    mesh = sharding.create_mesh(config)
    st, shardings = sharding.create_sharded_state(config, tx, mesh, jax.random.key(0))
    run = sharding.jit_train_step(step, config, mesh, shardings)
    put = lambda b: sharding.shard_batch(mesh, b)
  metrics = []
  for i in range(STEPS):
    st, m = run(st, put(make_batch(config, seed=i)), rng)
    metrics.append(jax.tree.map(np.asarray, m))
  return jax.device_get(st), metrics


@pytest.fixture(scope='module')
def reference():
  from configs import pretrain
  return _run(pretrain.get_config('tiny'))


@pytest.mark.parametrize('mesh_sizes', [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_mesh_step_matches_single_device(reference, tiny_config, mesh_sizes):
  _assert_matches(_run(tiny_config, mesh_sizes), reference)


def test_cudnn_path_on_a_mesh_matches_single_device(reference, tiny_config, cudnn_via_xla):
  """attention_impl='cudnn' (fused q/k/v projections, even-length padding; the kernel run
  through XLA, as cuDNN has no CPU kernel) on a data x fsdp x tensor mesh equals the
  single-device step with XLA's attention and separate projections."""
  del cudnn_via_xla
  tiny_config.model.attention_impl = 'cudnn'
  _assert_matches(_run(tiny_config, (2, 2, 2)), reference)


def _assert_matches(run, reference):
  (state, metrics), (ref_state, ref_metrics) = run, reference
  for m, r in zip(metrics, ref_metrics):
    for k in r:
      np.testing.assert_allclose(m[k], r[k], rtol=2e-4, atol=1e-5, err_msg=k)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  jax.tree.map(close, state.params, ref_state.params)
  jax.tree.map(close, state.ema_params, ref_state.ema_params)
  close(state.image_queue, ref_state.image_queue)
  close(state.text_queue, ref_state.text_queue)
  assert int(state.queue_ptr) == int(ref_state.queue_ptr)


def test_state_is_sharded_as_configured(tiny_config):
  tiny_config.mesh.update(data=2, fsdp=4, tensor=1)
  mesh = sharding.create_mesh(tiny_config)
  tx = state_lib.make_optimizer(tiny_config.optim, 100)
  st, _ = sharding.create_sharded_state(tiny_config, tx, mesh, jax.random.key(0))
  q = st.image_queue
  assert q.addressable_shards[0].data.shape == (tiny_config.queue_size // 8,
                                               tiny_config.model.embed_dim)
  # FSDP splits the 'embed' dim of weights over 4 devices.
  k = st.params['text_layers']['layer_0']['intermediate']['kernel']
  assert k.addressable_shards[0].data.shape == (tiny_config.model.text_width // 4,
                                               tiny_config.model.text_mlp_dim)
  mu = st.opt_state[0].mu['text_layers']['layer_0']['intermediate']['kernel']
  assert mu.sharding == k.sharding


@pytest.mark.parametrize('field,value,match', [
    ('batch_size', 12, 'batch_size=12 does not divide over the 8 devices'),
    ('queue_size', 36, 'queue_size=36'),
])
def test_bad_divisibility_is_a_clear_error(tiny_config, field, value, match):
  setattr(tiny_config, field, value)
  mesh = sharding.create_mesh(tiny_config)
  with pytest.raises(ValueError, match=match):
    sharding.check_batch(tiny_config, mesh)


def test_mesh_shape_errors():
  with pytest.raises(ValueError, match='at most one -1'):
    sharding.mesh_shape({'data': -1, 'fsdp': -1, 'tensor': 1}, 8)
  with pytest.raises(ValueError, match='uses 6 devices but 8'):
    sharding.mesh_shape({'data': 3, 'fsdp': 2, 'tensor': 1}, 8)
  assert sharding.mesh_shape({'data': -1, 'fsdp': 2, 'tensor': 2}, 8) == (2, 2, 2)
