"""tpu_aot: the step compiled for TPU chips by libtpu, on this CPU-only machine.

Runs the tool in a subprocess (libtpu stays out of the test process) on the tiny config.
References: the chips' datasheet figures, the train state's bytes from `jax.eval_shape`,
and the step's model FLOPs.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from codis_jax import bench
from codis_jax import roofline

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU_AOT = ROOT / '.tpu_aot'

pytestmark = pytest.mark.skipif(not (TPU_AOT / 'libtpu').is_dir(),
                                reason='libtpu not in .tpu_aot (bash launch/setup.sh)')

# Datasheet: bf16 TFLOP/s, HBM GB/s, HBM GiB per chip.
DATASHEET = {'v4': (275e12, 1228e9, 32), 'v5e': (197e12, 819e9, 16)}


def state_bytes(config):
  """Bytes of the train state and the batch, from their shapes alone."""
  _, state, batch, _ = roofline.step_args(config)
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves((state, batch)))


def test_tiny_step_compiled_for_v5e_and_v4(tmp_path):
  out = tmp_path / 'rows.jsonl'
  env = dict(os.environ, PYTHONPATH=f'{TPU_AOT}{os.pathsep}{ROOT}')
  proc = subprocess.run(
      [sys.executable, '-m', 'codis_jax.tpu_aot', '--config=tiny', '--batch=8', '--dtype=',
       '--target=v5e', '--target=v4', f'--json={out}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r['target'] for r in rows] == ['v5e', 'v4']
  config = bench.make_config('tiny', 8)
  raw = state_bytes(config)
  for r in rows:
    peak, bandwidth, hbm_gib = DATASHEET[r['target']]
    assert r['peak_flops'] == peak  # bench.PEAK_FLOPS found from libtpu's device kind
    assert r['hbm_gib'] == hbm_gib and r['fits'] and r['batch'] == 8
    # Arguments are the train state and the batch, in TPU layouts: minor dims padded to
    # 128 lanes, which inflates the tiny model's 32- and 64-wide arrays (~2.9x here).
    assert raw <= r['args_gib'] * 2**30 < 4 * raw
    assert r['xla_flops'] >= r['model_flops'] > 0  # XLA adds the elementwise FLOPs
    assert r['floor_s'] == pytest.approx(max(r['xla_flops'] / peak,
                                             r['xla_bytes'] / bandwidth))
    assert r['mfu_ceiling'] == pytest.approx(r['model_flops'] / r['floor_s'] / peak)
    assert 0 < r['mfu_ceiling'] < 1
  assert proc.stdout.count('fits.') == 2 and 'MFU <=' in proc.stdout
