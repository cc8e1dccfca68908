"""Test set-up: 8 fake CPU devices for mesh tests, float32 matmuls, the repo on sys.path."""

import os
import sys

# Must happen before JAX is imported anywhere. Besides the 8 fake devices, lower XLA's
# CPU optimisation effort: test programs are tiny and run once, so compile time dominates
# (about 3x faster to compile; numerics are unchanged: same ops, same precision).
os.environ['XLA_FLAGS'] = ' '.join([
    os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8',
    '--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true'])
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# Persistent compilation cache shared by the test processes (and the subprocesses they
# start): many tests compile the same tiny step; a hit replaces a compile with a file read.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.cache', 'jax'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from configs import pretrain  # noqa: E402


def make_batch(config, seed=0, batch_size=None):
  """A random but valid batch for `config`: images, ids with [CLS] ... [SEP] and padding."""
  rs = np.random.RandomState(seed)
  b = batch_size or config.batch_size
  m, length = config.model, config.text_len
  ids = rs.randint(5, m.vocab_size, size=(b, length)).astype(np.int32)
  lengths = rs.randint(4, length + 1, size=b)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids[:, 0] = m.cls_id
  ids[np.arange(b), lengths - 1] = m.sep_id
  ids = np.where(mask > 0, ids, m.pad_id).astype(np.int32)
  image = rs.randn(b, m.image_size, m.image_size, 3).astype(np.float32)
  return {'image': image, 'text_ids': ids, 'text_mask': mask,
          'image_id': np.arange(b, dtype=np.int32)}


@pytest.fixture
def tiny_config():
  return pretrain.get_config('tiny')
