"""The demo command end to end, shortened: emoji data (prepared if missing), the demo
vocabulary, train, periodic and final retrieval evaluation, checkpoint, loss curve,
TensorBoard.

A shortened run cannot learn the zero-shot task (the full demo needs its 1,500 steps;
README, "The demo"), so this one trains the demo model on the held-out pairs themselves
(--config.data.train=prepared:emoji?split=test): it checks that the program learns and
that its evaluation measures it, at 10x chance at R@10, not the zero-shot number.
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np

from codis_jax import checkpoint as ckpt_lib
from test_main import ENV, ROOT, TEST_CACHE

STEPS = 300
SHORT = [f'--config.total_steps={STEPS}', '--config.batch_size=32', '--config.queue_size=256',
         '--config.optim.warmup_steps=10', '--config.log.every_steps=50',
         f'--config.eval.every_steps={STEPS // 2}', '--config.eval.k_test=8',
         '--config.eval.batch_size=32', '--config.checkpoint.every_steps=100',
         '--config.data.train=prepared:emoji?split=test', f'--config.jax_cache_dir={TEST_CACHE}']


def test_shortened_demo_end_to_end(tmp_path):
  cmd = [sys.executable, '-m', 'codis_jax.main', '--config=configs/pretrain.py:demo',
         f'--workdir={tmp_path}', *SHORT]
  p = subprocess.run(cmd, cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, timeout=1200, check=False)
  out = p.stdout
  assert p.returncode == 0, out[-5000:]
  assert f'step {STEPS}/{STEPS}' in out, out[-3000:]
  lines = [l for l in out.splitlines() if l.startswith('zero-shot retrieval')]
  # ITC and ITM re-ranked, for the student and the teacher weights.
  assert len(lines) == 4 and '290 images, 290 texts' in lines[0], out[-3000:]

  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl', encoding='utf-8')]
  at = lambda step: {k: v for r in rows if r['step'] == step for k, v in r.items()}
  mid, final = at(STEPS // 2), at(STEPS)
  assert 'itc/student/tr_r1' in mid and 'itm/student/ir_r10' in mid, sorted(mid)
  chance_r10 = 100 * 10 / 290
  for stage in ('itc', 'itm'):
    for params in ('student', 'ema'):
      for d in ('tr', 'ir'):
        r = [final[f'{stage}/{params}/{d}_r{k}'] for k in (1, 5, 10)]
        assert 0 <= r[0] <= r[1] <= r[2] <= 100, (stage, params, d, r)
  # Learnt: the student's ITC recall at the end, both directions, and better than midway.
  for d in ('tr', 'ir'):
    assert final[f'itc/student/{d}_r10'] >= 10 * chance_r10, final
  assert final['itc/student/r_mean'] > mid['itc/student/r_mean'], (mid, final)
  assert np.isfinite(final['loss']) and final['data_bad/corrupt_image'] == 0, final

  raw = ckpt_lib.restore_raw(tmp_path)
  assert int(raw['state']['step']) == STEPS and raw['config'].data.name == 'emoji'
  assert raw['state']['params']['embeddings']['word_embeddings']['embedding'].shape[0] == 1792
  assert os.path.getsize(tmp_path / 'loss_curve.png') > 10_000
  assert glob.glob(str(tmp_path / 'tensorboard' / 'events.out.tfevents.*'))
