"""The training program, run as users run it: `python -m codis_jax.main` subprocesses.

All runs share one tiny config (12 steps) and one XLA compilation cache (TEST_CACHE), so
the train step is compiled once, by the reference run, and loaded by every other run.
Runs that do not depend on each other go in parallel.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

from codis_jax import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CACHE = os.path.join(tempfile.gettempdir(), 'codis_jax_test_compile_cache')
TIMING = ('pairs_per_s', 'elapsed_s', 'mfu')
# One CPU device: with conftest's 8 fake devices, XLA:CPU's in-process collectives abort
# a run ("Termination timeout ... 40 seconds exceeded") when their threads starve on a
# loaded 2-core machine. The sharded restore is tested on 8 devices in test_checkpoint.py.
ENV = {**os.environ, 'JAX_DEFAULT_MATMUL_PRECISION': 'highest', 'PYTHONPATH': ROOT,
       # Optimisation level 0 halves XLA:CPU's compile time; these steps are tiny.
       'XLA_FLAGS': '--xla_force_host_platform_device_count=1 '
                    '--xla_backend_optimization_level=0'}
TINY = dict(total_steps=12, jax_cache_dir=TEST_CACHE,
            log=dict(every_steps=2, tensorboard=False, plot=False),
            checkpoint=dict(every_steps=4, keep=2))


def _flags(d, prefix='--config.'):
  out = []
  for k, v in d.items():
    out += _flags(v, f'{prefix}{k}.') if isinstance(v, dict) else [f'{prefix}{k}={v}']
  return out


def _main(workdir, *args):
  cmd = [sys.executable, '-m', 'codis_jax.main', '--config=configs/pretrain.py:tiny',
         f'--workdir={workdir}', *_flags(TINY), *args]
  return subprocess.Popen(cmd, cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)


def _finish(p, timeout=600):
  out, _ = p.communicate(timeout=timeout)
  return p.returncode, out


def _rows(workdir):
  rows = {}
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      r = json.loads(line)
      rows[r['step']] = {k: v for k, v in r.items() if k not in TIMING}
  return rows


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The uninterrupted reference run first (it compiles the step), then the others at
  once: killed after step 7; NaN at step 6 (stop); NaN at step 6 (skip)."""
  base = tmp_path_factory.mktemp('runs')
  ref = _main(base / 'ref')
  ref_result = _finish(ref)
  procs = {'kill': _main(base / 'kill', '--config.debug.kill_step=7'),
           'nan': _main(base / 'nan', '--config.debug.nan_step=6'),
           'skip': _main(base / 'skip', '--config.debug.nan_step=6',
                         '--config.skip_nonfinite=True')}
  yield base, {'ref': ref_result, **procs}
  for p in procs.values():
    if p.poll() is None:
      p.kill()


def test_overrides_reach_the_config_and_bad_ones_fail_in_one_line(tmp_path):
  rc, out = _finish(_main(tmp_path, '--mode=config', '--config.loss.w_itm=0',
                          '--config.seed=7'))
  assert rc == 0, out
  written = json.load(open(tmp_path / 'config.json', encoding='utf-8'))
  assert written['loss']['w_itm'] == 0.0 and written['seed'] == 7
  assert written['total_steps'] == 12  # the test's own overrides too
  for bad, want in (('--config.loss.w_itmm=0', "unknown config key in "
                     "--config.loss.w_itmm: no 'w_itmm' (did you mean 'w_itm'?)"),
                    ('--config.batch_size=eight', 'invalid literal for int()')):
    rc, out = _finish(_main(tmp_path, '--mode=config', bad))
    lines = out.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and want in lines[0], out


@pytest.mark.parametrize('impl, what, mode', [
    ('pallas', 'the TPU attention kernel', 'train'),
    ('cudnn', "NVIDIA's flash attention", 'train'),
    ('cudnn', "NVIDIA's flash attention", 'eval')])
def test_accelerator_attention_kernel_off_its_chip_is_a_clear_error(tmp_path, impl, what,
                                                                    mode):
  rc, out = _finish(_main(tmp_path, f'--config.model.attention_impl={impl}', f'--mode={mode}'))
  assert rc == 1 and f"attention_impl='{impl}' is {what}" in out, out
  assert "this run's devices are cpu" in out and 'Traceback' not in out


def test_exact_resume_after_sigkill(runs):
  base, procs = runs
  rc, out = procs['ref']
  assert rc == 0, out
  rc, out = _finish(procs['kill'])
  assert rc == -signal.SIGKILL, out  # it killed itself after step 7
  assert ckpt_lib.Checkpointer(base / 'kill' / 'checkpoints').all_steps() == [4]
  rc, out = _finish(_main(base / 'kill'))  # restarted: resumes from step 4
  assert rc == 0, out
  ref, resumed = ckpt_lib.restore_raw(base / 'ref'), ckpt_lib.restore_raw(base / 'kill')
  assert int(ref['state']['step']) == int(resumed['state']['step']) == 12
  jax.tree.map(np.testing.assert_array_equal, ref['state'], resumed['state'])
  assert ref['extra']['data'] == resumed['extra']['data']
  ref_rows, rows = _rows(base / 'ref'), _rows(base / 'kill')
  assert sorted(rows) == sorted(ref_rows) == [2, 4, 6, 8, 10, 12]
  for step in rows:
    assert rows[step] == ref_rows[step], step


def test_sigterm_writes_a_checkpoint_and_exits_0(tmp_path):
  # The same step as the other runs (so it comes from the cache); a log line every step
  # makes each step wait for the device, so the signal lands well before step 12.
  p = _main(tmp_path, '--config.log.every_steps=1', '--config.checkpoint.every_steps=100')
  seen = []
  for line in p.stdout:
    seen.append(line)
    if line.startswith('step 3/'):
      p.send_signal(signal.SIGTERM)
      break
  rc, out = _finish(p)
  out = ''.join(seen) + out
  assert rc == 0, out
  assert 'preempted: checkpoint written at step' in out, out
  raw = ckpt_lib.restore_raw(str(tmp_path))
  assert 3 <= int(raw['state']['step']) < 12, out
  assert int(raw['state']['step']) == int(os.path.basename(raw['path']))


def test_nonfinite_loss_stops_naming_step_and_terms(runs):
  base, procs = runs
  rc, out = _finish(procs['nan'])
  assert rc == 1, out
  msg = out.strip().splitlines()[-1]
  assert msg.startswith('codis_jax.main: error: non-finite'), out
  assert 'at step 6' in msg and 'loss_ica' in msg and 'loss_itm' in msg, msg
  assert ckpt_lib.Checkpointer(base / 'nan' / 'checkpoints').all_steps() == [4]
  for leaf in jax.tree.leaves(ckpt_lib.restore_raw(base / 'nan')['state']):
    assert np.all(np.isfinite(leaf))


def test_nonfinite_update_is_skipped_when_asked(runs):
  base, procs = runs
  rc, out = _finish(procs['skip'])
  assert rc == 0, out
  raw = ckpt_lib.restore_raw(base / 'skip')
  assert int(raw['state']['step']) == 12 and raw['extra']['guard']['skipped'] == 1
  for leaf in jax.tree.leaves(raw['state']):
    assert np.all(np.isfinite(leaf))
  rows, ref_rows = _rows(base / 'skip'), _rows(base / 'ref')
  assert rows[4] == ref_rows[4]  # the same run until the bad step
  assert rows[12]['skipped'] == 1 and rows[12]['loss'] != ref_rows[12]['loss']


def test_export_mode_writes_the_runs_newest_checkpoint(runs):
  base, procs = runs
  assert procs['ref'][0] == 0, procs['ref'][1]
  workdir = base / 'ref'
  config_before = (workdir / 'config.json').read_text(encoding='utf-8')
  rc, out = _finish(_main(workdir, '--mode=export', '--config.seed=99'))
  assert rc == 0, out
  assert (workdir / 'config.json').read_text(encoding='utf-8') == config_before  # untouched
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  sd = load_file(str(workdir / 'export' / 'albef.safetensors'))
  raw = ckpt_lib.restore_raw(workdir)
  # ALBEF's Linear weights are [out, in]: the transpose of the Flax kernel.
  want = raw['state']['params']['vision_proj']['kernel'].T
  np.testing.assert_array_equal(sd['vision_proj.weight'], want)
  for d in ('hf_vit', 'hf_bert'):
    assert (workdir / 'export' / d / 'model.safetensors').exists(), out
