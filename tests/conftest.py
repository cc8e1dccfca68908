"""Test set-up: 8 fake CPU devices for mesh tests, float32 matmuls, the repo on sys.path."""

import os
import sys

# Must happen before JAX is imported anywhere. Besides the 8 fake devices, lower XLA's
# CPU optimisation effort: test programs are tiny and run once, so compile time dominates
# (about 3x faster to compile; numerics are unchanged: same ops, same precision).
# XLA:CPU's concurrency-optimised scheduler lets the fake devices of one program reach
# independent collectives in different orders; on a loaded 2-core machine the in-process
# rendezvous then deadlocks (seen: 4 devices in an all-gather, 4-5 in an all-reduce of the
# same run, abort after 40 s: 6 of 6 runs of test_sharding beside two busy loops). With
# that scheduler off, 6 of 6 such runs passed.
os.environ['XLA_FLAGS'] = ' '.join([
    os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8',
    '--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true',
    '--xla_cpu_enable_concurrency_optimized_scheduler=false'])
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

import pytest  # noqa: E402

from configs import pretrain  # noqa: E402
from batches import make_batch  # noqa: E402,F401  (re-exported for the tests)


@pytest.fixture
def tiny_config():
  return pretrain.get_config('tiny')


@pytest.fixture
def cudnn_via_xla(monkeypatch):
  """cuDNN has no CPU kernel (not even to trace): every jax.nn.dot_product_attention call,
  'cudnn' ones included, runs XLA's with the same arguments."""
  plain = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, 'dot_product_attention',
                      lambda *a, **kw: plain(*a, **{**kw, 'implementation': 'xla'}))
