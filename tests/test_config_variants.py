"""configs/pretrain.py's hardware variants (`gpu`, `tpu`): performance knobs only, composable
with the others, and a state of the same shapes (so checkpoints move between them)."""

import jax
import jax.numpy as jnp
import pytest

from codis_jax import checkpoint
from codis_jax import state as state_lib
from configs import pretrain
from configs import retrieval_coco


@pytest.mark.parametrize('spec', ['gpu,cross_only', 'cross_only,gpu'])
def test_hardware_variant_composes_in_any_order(spec):
  c = pretrain.get_config(spec)
  assert (c.model.dtype, c.model.attention_impl, c.model.pad_image_tokens,
          c.model.pad_text_tokens, c.model.weight_copy) == ('bfloat16', 'cudnn', 8, 2, True)
  assert c.loss.ica_terms == 'i2t,t2i' and not c.loss.use_codebook
  assert c.loss.ica_reduction == 'mean'  # ALBEF's loss_ita = (i2t + t2i) / 2
  # Only `model` performance keys and the data workers differ from the paper's settings.
  paper, tpu = pretrain.get_config('cross_only'), pretrain.get_config('tpu')
  assert c.data.workers == 8 and tpu.data.workers == 32 and paper.data.workers is None
  same = {'model': paper.model.to_dict(), 'data': paper.data.to_dict()}
  assert c.to_dict() | same == paper.to_dict()
  assert (tpu.model.dtype, tpu.model.attention_impl) == ('bfloat16', 'pallas')
  # The fine-tuning configs take the pretraining variants.
  assert retrieval_coco.get_config('tiny,gpu').model.attention_impl == 'cudnn'
  # ALBEF's fine-tuning: timm's per-epoch cosine; hard negatives from 32 per GPU.
  r = retrieval_coco.get_config()
  assert r.optim.schedule == 'albef_epochs' and r.loss.itm_group_size == 32
  assert r.batch_size == 256 and pretrain.get_config().optim.schedule == 'cosine'


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

  saved = lambda state: checkpoint._saved_tree(state)  # what a checkpoint holds
  paper = shapes('paper')
  for spec in ('gpu', 'tpu'):
    state = shapes(spec)
    assert jax.tree.structure(saved(state)) == jax.tree.structure(saved(paper))
    assert jax.tree.leaves(saved(state)) == jax.tree.leaves(saved(paper)), spec
  # The gpu variant's bf16 weight copy (model.weight_copy) is all it adds, never saved.
  copy = shapes('gpu').weight_copy
  assert paper.weight_copy is None and shapes('tpu').weight_copy is None
  assert {x.dtype for x in jax.tree.leaves(copy)} == {jnp.dtype('bfloat16')}
  assert 'visual_encoder/blocks_0/mlp/fc1/kernel' in copy['teacher']


def test_a_paper_sized_run_without_pretrained_towers_is_warned(caplog):
  from codis_jax import loop  # pylint: disable=import-outside-toplevel
  c = pretrain.get_config()
  with caplog.at_level('WARNING', logger='codis_jax'):
    loop.warn_random_init(c)
  assert 'config.init.vit/bert is empty' in caplog.text
  assert 'the image encoder and the text encoder start from RANDOM' in caplog.text
  caplog.clear()
  c.init.vit, c.init.bert = '/weights/deit', '/weights/bert'
  with caplog.at_level('WARNING', logger='codis_jax'):
    loop.warn_random_init(c)
    loop.warn_random_init(pretrain.get_config('tiny'))  # not the paper's architecture
    c.init.bert = ''
    loop.warn_random_init(c)
  assert caplog.text.count('RANDOM') == 1
  assert 'config.init.bert is empty: the text encoder starts from RANDOM' in caplog.text
