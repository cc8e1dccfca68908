"""configs/pretrain.py's hardware variants (`gpu`, `tpu`): performance knobs only, composable
with the others, and a state of the same shapes (so checkpoints move between them)."""

import glob
import json
import os
import subprocess

import jax
import pytest

from codis_jax import state as state_lib
from configs import pretrain
from configs import retrieval_coco


@pytest.mark.parametrize('spec', ['gpu,cross_only', 'cross_only,gpu'])
def test_hardware_variant_composes_in_any_order(spec):
  c = pretrain.get_config(spec)
  assert (c.model.dtype, c.model.attention_impl, c.model.pad_image_tokens,
          c.model.pad_text_tokens) == ('bfloat16', 'cudnn', 8, 2)
  assert c.loss.ica_terms == 'i2t,t2i' and not c.loss.use_codebook
  # Only `model` performance keys differ from the paper's settings.
  paper, tpu = pretrain.get_config('cross_only'), pretrain.get_config('tpu')
  assert c.to_dict() | {'model': paper.model.to_dict()} == paper.to_dict()
  assert (tpu.model.dtype, tpu.model.attention_impl) == ('bfloat16', 'pallas')
  # The fine-tuning configs take the pretraining variants.
  assert retrieval_coco.get_config('tiny,gpu').model.attention_impl == 'cudnn'


def test_unknown_variant_names_the_choices():
  with pytest.raises(ValueError, match="unknown variant 'gpus'.*codebook_500, gpu, tpu"):
    pretrain.get_config('gpus')


def test_hardware_variants_build_the_same_state(cudnn_via_xla):
  """Same parameter, optimiser, EMA and queue shapes and dtypes (float32 master weights
  under bf16 compute): a checkpoint of one resumes in the others."""
  del cudnn_via_xla  # init traces the gpu variant's attention

  def shapes(spec):
    c = pretrain.get_config(spec)
    tx = state_lib.make_optimizer(c.optim, 100)
    return jax.eval_shape(lambda r: state_lib.create_train_state(c, r, tx),
                          jax.random.key(0))

  paper = shapes('paper')
  for spec in ('gpu', 'tpu'):
    state = shapes(spec)
    assert jax.tree.structure(state) == jax.tree.structure(paper)
    assert jax.tree.leaves(state) == jax.tree.leaves(paper), spec


@pytest.mark.parametrize('gpu', [False, True])
def test_single_host_launcher_picks_the_variant_of_the_host(tmp_path, gpu):
  """launch/single_host.sh without CONFIG: the `gpu` variant where nvidia-smi lists GPUs,
  else the `tpu` one on a TPU host, else the paper's settings."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  # A stand-in nvidia-smi that lists a GPU, or fails as it does without a driver.
  (bin_dir / 'nvidia-smi').write_text(
      '#!/bin/sh\necho "GPU 0: NVIDIA H200"\n' if gpu else '#!/bin/sh\nexit 9\n')
  (bin_dir / 'nvidia-smi').chmod(0o755)
  tpu_host = bool(glob.glob('/dev/accel[0-9]*') or glob.glob('/dev/vfio/[0-9]*'))
  env = {k: v for k, v in os.environ.items() if k != 'CONFIG'}
  env['PATH'] = f'{bin_dir}:{env["PATH"]}'
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(['bash', 'launch/single_host.sh', str(tmp_path / 'w'), '--mode=config'],
                       cwd=root, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  variant = 'gpu' if gpu else 'tpu' if tpu_host else ''
  assert f'single_host.sh: --config=configs/pretrain.py{":" * bool(variant)}{variant}\n' in (
      out.stderr)
  written = json.load(open(tmp_path / 'w' / 'config.json', encoding='utf-8'))
  want = {'gpu': 'cudnn', 'tpu': 'pallas'}.get(variant, '')
  assert written['model']['attention_impl'] == want
