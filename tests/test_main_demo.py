"""The demo command end to end, shortened: emoji data, train, checkpoint, recall, plot.

A shortened run cannot learn zero-shot retrieval (the full demo needs ~600 steps; see
docs/readme_program.md), so this one trains on the held-out pairs themselves
(--config.data.train=prepared:emoji?split=test) with a small model for 60 steps: it
checks that the program learns and that its evaluation measures it (10x chance at R@10),
not the zero-shot number.
"""

import glob
import json
import os
import subprocess
import sys

from test_main import ENV, ROOT, TEST_CACHE

SHORT = ['--config.total_steps=60', '--config.batch_size=32', '--config.queue_size=256',
         '--config.model.vit_width=64', '--config.model.vit_depth=2',
         '--config.model.vit_mlp_dim=128', '--config.model.text_width=64',
         '--config.model.text_layers=1', '--config.model.fusion_layers=1',
         '--config.model.text_mlp_dim=128', '--config.model.embed_dim=64',
         '--config.model.codebook_size=64', '--config.optim.warmup_steps=10',
         '--config.log.every_steps=20', '--config.eval.batch_size=32',
         '--config.data.train=prepared:emoji?split=test', f'--config.jax_cache_dir={TEST_CACHE}']


def test_shortened_demo_end_to_end(tmp_path):
  cmd = [sys.executable, '-m', 'codis_jax.main', '--config=configs/pretrain.py:demo',
         f'--workdir={tmp_path}', *SHORT]
  p = subprocess.run(cmd, cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, timeout=900, check=False)
  assert p.returncode == 0, p.stdout[-5000:]
  assert 'zero-shot ITC retrieval' in p.stdout and 'step 60/60' in p.stdout, p.stdout[-3000:]
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl', encoding='utf-8')]
  final = {k: v for r in rows if r['step'] == 60 for k, v in r.items()}
  chance_r10 = 100 * 10 / 290
  for key in ('itc/ema/tr_r10', 'itc/ema/ir_r10', 'itc/student/tr_r10',
              'itc/student/ir_r10'):
    assert key in final, sorted(final)
  best = max(final['itc/student/tr_r10'], final['itc/ema/tr_r10'])
  assert best >= 10 * chance_r10, final
  assert max(final['itc/student/ir_r10'], final['itc/ema/ir_r10']) >= 10 * chance_r10, final
  assert final['data_bad/corrupt_image'] == 0
  assert os.path.getsize(tmp_path / 'loss_curve.png') > 10_000
  assert glob.glob(str(tmp_path / 'tensorboard' / 'events.out.tfevents.*'))
  assert '60' in os.listdir(tmp_path / 'checkpoints')
