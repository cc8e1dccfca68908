"""Retrieval fine-tuning and evaluation on MSCOCO (ALBEF's Retrieval_coco.yaml).

  python -m codis_jax.evaluate --config=configs/retrieval_coco.py \
      --config.eval.checkpoint=PRETRAIN_WORKDIR --workdir=DIR          # zero-shot
  python -m codis_jax.evaluate.finetune --config=configs/retrieval_coco.py \
      --config.finetune.checkpoint=PRETRAIN_WORKDIR --workdir=DIR      # fine-tune

The pretraining config (configs/pretrain.py) plus three sections:
  retrieval  the data: ALBEF's JSON files (train: [{"image", "caption", "image_id"}],
             val/test: [{"image", "caption": [...]}]) relative to data.data_dir, and the
             image root they are relative to; a value KIND:... is a data spec as is.
  eval       checkpoint to evaluate, k_test (ALBEF: 256 COCO, 128 Flickr), the weights
             ('student' as ALBEF, or 'ema'), batch sizes, ITM score, splits.
  finetune   the pretrained checkpoint to start from ('' = random init).
The model architecture comes from the checkpoint; image_size (384: ALBEF fine-tunes and
evaluates ViT-B/16 at 384 with interpolated position embeddings) from here.

Variants: the pretraining ones ('paper' default, 'demo', 'tiny', 'gpu', 'tpu'; commas
compose); their image size is scaled by 384/256 like the paper's. 'emoji' swaps the data for the bundled
emoji set (train split / held-out test) and the bert-base-uncased vocabulary, e.g.
`configs/retrieval_coco.py:demo,emoji` for a CPU-sized run.
"""

import os
import sys

import ml_collections

# The repository root, so that this file also loads from another working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import pretrain  # pylint: disable=wrong-import-position

DATASETS = {
    # name: (JSON prefix, image root, k_test, epochs) as ALBEF's Retrieval_*.yaml
    'coco': ('coco', 'coco', 256, 5),
    'flickr': ('flickr30k', 'flickr30k', 128, 10),
}


def retrieval_config(dataset: str, arg: str | None = None) -> ml_collections.ConfigDict:
  names = [n for n in (arg or 'paper').split(',') if n]
  c = pretrain.get_config(','.join(n for n in names if n != 'emoji') or 'paper')
  prefix, root, k_test, epochs = DATASETS[dataset]
  m = c.model
  paper = m.image_size == 256
  # 256 -> 384 for the paper; the small variants scale alike, to a multiple of the patch.
  m.image_size = 384 if paper else int(round(m.image_size * 1.5 / m.patch_size)) * m.patch_size
  c.text_len = 30                     # ALBEF's max_length in Retrieval.py
  c.num_epochs = epochs
  c.total_steps = 0
  if paper:
    c.batch_size = 256                # ALBEF: 32 per GPU x 8 GPUs
    c.loss.itm_group_size = 32        # hard negatives from each GPU's 32, as ALBEF
  # ALBEF's schedule (timm's cosine stepped per epoch; warm-up lr = lr: epoch 0 at 1e-5).
  c.optim.update(dict(lr=1e-5, warmup_lr=1e-5, min_lr=1e-6, warmup_steps=0,
                      weight_decay=0.02, schedule='albef_epochs'))
  c.loss.update(dict(alpha=0.4, alpha_warmup_epochs=1.0))
  c.data.crop_scale_min = 0.5         # ALBEF's retrieval RandomResizedCrop(scale=(0.5, 1))
  c.retrieval = ml_collections.ConfigDict(dict(
      image_root=root, train_file=f'{prefix}_train.json', val_file=f'{prefix}_val.json',
      test_file=f'{prefix}_test.json'))
  c.eval.update(dict(k_test=k_test, params='student', batch_size=64))
  c.eval.checkpoint = ''              # a workdir, its checkpoints/ folder or a step folder
  c.eval.task = 'retrieval'           # 'retrieval' | 'zeroshot'
  c.eval.splits = 'val,test'          # of retrieval.*_file, those that are set
  c.eval.rerank = True                # False: ITC numbers only
  c.eval.rerank_batch_size = 128      # pairs per fusion call (global)
  c.eval.itm_score = 'logit'          # ALBEF ranks by the ITM "match" logit; or 'prob'
  c.eval.max_images = 0               # > 0: only the first N images (CI-sized)
  c.finetune = ml_collections.ConfigDict(dict(checkpoint='', eval_at_start=False))
  if 'emoji' in names:
    _emoji(c)
  return c


def _emoji(c):
  c.data.name = 'emoji'
  c.retrieval.update(dict(image_root='', train_file='prepared:emoji?split=train', val_file='',
                          test_file='emoji/test_retrieval.json'))
  c.eval.splits = 'test'
  # The emoji captions are tokenized with bert-base-uncased's WordPiece vocabulary.
  c.model.update(dict(vocab_size=30522, pad_id=0, cls_id=101, sep_id=102, mask_id=103))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return retrieval_config('coco', arg)
