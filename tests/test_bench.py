"""The step benchmark runs, and its model FLOPs agree with XLA's own CPU count."""

import json
import math
import os
import subprocess
import sys

import pytest

from codis_jax import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_tiny_model_flops_agree_with_xla_cpu_cost_analysis():
  r = bench.bench_config('tiny', batch=8, steps=1, remat='dots')
  assert r['batch'] == 8 and r['remat'] == 'dots' and r['step_s'] > 0
  assert 'mfu' not in r  # no peak is known for a CPU
  # Model FLOPs (matmuls of the jaxpr, remat off) vs XLA's count of the compiled step,
  # which adds elementwise ops and the matmuls remat=dots recomputes (measured: 0.78);
  # a missing backward pass (2/3 of the matmuls) would put it near 0.26.
  ratio = r['gflops_per_pair'] / r['compiled_gflops_per_pair']
  assert 0.6 < ratio < 1.0, ratio
  assert r['skipped'] == 0


def test_bench_times_the_guarded_step():
  """The benchmark runs the step as the loop does, inside the non-finite guard: a first
  update that sends the weights to 1e30 makes the next loss non-finite, and the guard
  refuses that update (and, halted, every later one)."""
  r = bench.bench_config('tiny', batch=8, steps=2, overrides=['optim.warmup_lr=1e30'])
  assert r['skipped'] >= 1 and math.isfinite(r['first_loss'])


def test_state_cache_shares_one_fresh_state_across_performance_variants():
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  calls = []

  def init(config):
    calls.append(config.optim.lr)
    return 'tx', {'w': jnp.full((3,), config.optim.lr)}

  cache = bench.StateCache(init)
  base = ['model.dtype=bfloat16']
  for overrides in ([], base, base + ['model.remat=dots', 'model.share_image_kv=false'],
                    ['model.attention_impl=xla']):
    _, state = cache(bench.make_config('tiny', 8, overrides=overrides))
    state['w'] = state['w'] + 1  # a variant's steps must not reach the next one's state
  assert calls == [1e-4]
  np.testing.assert_array_equal(cache(bench.make_config('tiny', 8))[1]['w'],
                                np.full(3, 1e-4, np.float32))
  # Anything else (here the learning rate) is another train state.
  cache(bench.make_config('tiny', 8, overrides=['optim.lr=0.5']))
  assert calls == [1e-4, 0.5]


def test_overrides_parse_as_the_values_they_replace():
  c = bench.make_config('tiny', 8, overrides=['model.share_image_kv=False', 'loss.ipot_iters=7',
                                              'optim.lr=0.25', 'model.dtype=bfloat16'])
  assert (c.model.share_image_kv, c.loss.ipot_iters, c.optim.lr, c.model.dtype) == (
      False, 7, 0.25, 'bfloat16')
  # batch_size in a variant wins over the run's batch, with the queue cut to a multiple.
  c = bench.make_config('tiny', 8, overrides=['batch_size=24'])
  assert (c.batch_size, c.queue_size) == (24, 24)
  assert bench.make_config('tiny', 64).queue_size == 64  # never empty (tiny's is 32)
  for bad, match in (('model.nosuch=1', "no key 'model.nosuch'"),
                     ('loss.ipot_iters=many', 'takes a int'),
                     ('model.share_image_kv=yes', 'takes true or false'),
                     ('model=1', 'KEY=VALUE'), ('loss.ipot_iters', 'KEY=VALUE')):
    with pytest.raises(ValueError, match=match):
      bench.make_config('tiny', 8, overrides=[bad])


@pytest.mark.parametrize('kind,peak', [
    ('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA A100-SXM4-80GB', 312e12),
    ('TPU v4', 275e12), ('TPU v5 lite', 197e12), ('TPU v5', 459e12),
    ('TPU v6 lite', 918e12), ('cpu', None)])
def test_peak_flops_by_device_kind(kind, peak):
  # JAX's kinds: v5e is 'TPU v5 lite' and v5p plain 'TPU v5' (a prefix of v5e's).
  device = type('Device', (), {'device_kind': kind})()
  assert bench.device_peak_flops(device) == peak


def test_a_failing_variant_leaves_the_trace_and_parts_to_the_next(tmp_path):
  """bench_gpu.sh runs the GPU variant first: when its kernel fails (here cuDNN on a CPU),
  the next variant still runs and gets the profiler trace and the step's parts."""
  out = tmp_path / 'bench.jsonl'
  proc = subprocess.run(
      [sys.executable, '-m', 'codis_jax.bench', '--configs=tiny', '--batch=4', '--steps=1',
       '--variant=model.attention_impl=cudnn', '--variant=', '--parts', '--nopipeline',
       f'--json={out}', f'--profile_dir={tmp_path / "trace"}'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode != 0 and '1 variant(s) failed' in proc.stderr, proc.stderr[-2000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(rows) == 2 and 'cuDNN' in rows[0]['error'] and rows[0]['overrides'] == [
      'model.attention_impl=cudnn']
  assert 'error' not in rows[1] and rows[1]['step_s'] > 0
  assert 'step parts, tiny [config as is]:' in proc.stdout
  assert any(files for _, _, files in os.walk(tmp_path / 'trace'))
