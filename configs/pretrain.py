"""CODIS pretraining config: the paper's settings, with named variants.

Use `--config=configs/pretrain.py` for the paper (ViT-B/16@256 + BERT-base 6+6) or
`--config=configs/pretrain.py:NAME` for a variant; any `--config.a.b=value` overrides.

Variants (Table 4/5 of the paper are one flag each):
  paper            the paper's settings (default)
  demo             bundled emoji data, a model small enough for 2 CPU cores
  tiny             the smallest model; used by tests and the CPU benchmark
  cross_only       ablation: i2t/t2i alignment only, no codebook (ALBEF's ITC: the mean of
                   the two terms, as ALBEF's loss_ita)
  intra_cross      ablation: intra + cross alignment, no codebook
  codebook_student ablation: transport plans from student (not teacher) features
  codebook_500     ablation: 500 codewords (any size: --config.model.codebook_size=N)
  gpu              the fast settings for NVIDIA GPUs: bf16 compute, cuDNN flash attention,
                   image tokens padded to a multiple of 8 and text to an even length,
                   8 data worker processes (one training process per GPU)
  tpu              the fast settings for TPUs: bf16 compute, this project's Pallas
                   attention, 32 data worker processes (one process feeds 4-8 chips)
Variants compose with commas: `configs/pretrain.py:demo,cross_only`, `:gpu,intra_cross`.
The paper variant itself computes in float32 with XLA's attention (what runs anywhere).
"""

import ml_collections
from ml_collections import config_dict

_ABLATIONS = ('cross_only', 'intra_cross', 'codebook_student', 'codebook_500')


def _paper() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 512  # global batch, over all hosts and devices
  c.num_epochs = 30
  # Fixed step budget; 0 = num_epochs * steps_per_epoch of the data.
  c.total_steps = 0
  c.text_len = 25

  c.model = ml_collections.ConfigDict(dict(
      image_size=256, patch_size=16,
      vit_width=768, vit_depth=12, vit_heads=12, vit_mlp_dim=3072, vit_ln_eps=1e-6,
      vocab_size=30522, text_width=768, text_layers=6, fusion_layers=6, text_heads=12,
      text_mlp_dim=3072, max_positions=512, type_vocab_size=2, text_ln_eps=1e-12,
      dropout=0.1,  # BERT hidden dropout (ALBEF's config_bert); the ViT has none
      # 'erf': the exact GELU of timm's ViT and HF's BERT (ALBEF). 'tanh': its tanh
      # approximation (Google's BERT, flax's nn.gelu), within 4.8e-4 of it; XLA:GPU
      # computes that one inside the matmul before it (activations.gelu_tanh).
      gelu='erf',
      embed_dim=256, codebook_size=4000,
      temp_init=0.07, temp_min=0.001, temp_max=0.5,
      # Special token ids of the bert-base-uncased vocabulary.
      pad_id=0, cls_id=101, sep_id=102, mask_id=103,
      # Performance knobs: compute dtype (params stay float32), remat of encoder
      # layers ('none' | 'full' | 'dots'), and jax.nn.dot_product_attention's
      # implementation ('' = JAX picks, 'xla', or 'cudnn' = flash attention on GPU;
      # odd lengths such as the paper's 257 and 25 are padded to even for its backward),
      # or 'pallas': this project's TPU kernel (models/tpu_attention.py).
      dtype='float32', remat='none', attention_impl='',
      # The step's fusion rows of one image share its cross-attention keys/values
      # (computed once per image, then gathered); False recomputes them per row.
      share_image_kv=True,
      # The ViT runs on its tokens padded to a multiple of this (masked, exact; 0 = off):
      # the paper's 257 tokens otherwise get padded inside every GPU attention.
      pad_image_tokens=0,
      # The text and fusion encoders run on the text padded to a multiple of this
      # (masked; 0 = off): cuDNN's path otherwise pads the paper's 25 tokens to 26 in
      # every attention layer.
      pad_text_tokens=0,
      # Keep the weights that compute in `dtype` as a copy in that dtype in the train state
      # (float32 master weights stay; the update rewrites the copy), instead of converting
      # each weight of student and teacher every step. No effect in float32.
      weight_copy=False,
      # The dtype each weight gradient leaves its matmul in, and so the dtype of XLA's
      # cross-device sum of it (all-reduce / reduce-scatter): float32, or `dtype` to halve
      # that traffic and sum in bf16 (as FSDP's reduce_dtype, Megatron's
      # --grad-reduce-in-bf16). Rounded to `dtype` after the sum either way.
      weight_grad_dtype='float32',
  ))

  c.loss = ml_collections.ConfigDict(dict(
      w_mlm=1.0, w_itm=1.0, w_ica=1.0, w_code=1.0,
      # L_ica terms and how they combine (paper eq. 5 sums the four).
      ica_terms='i2t,t2i,i2i,t2t', ica_reduction='sum',
      use_codebook=True,
      codebook_pairing='cross',   # 'cross' (eq. 2, Fig. 3) | 'same' (Alg. 1, eq. 3)
      codebook_features='teacher',  # plans from 'teacher' | 'student' features
      ipot_beta=0.5, ipot_iters=50, ipot_inner=1,
      alpha=0.4, alpha_warmup_epochs=1.0,  # distillation weight, ramped (ALBEF)
      mlm_prob=0.15,
      # ITM hard negatives are sampled within groups of this many consecutive
      # examples of the global batch; 0 = the whole global batch. A config value,
      # never the device count, so results do not depend on the mesh. 64 = ALBEF's
      # per-GPU batch in its 8 x 64 setting.
      itm_group_size=64,
  ))

  c.queue_size = 65536
  c.momentum = 0.995

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-4, warmup_lr=1e-5, min_lr=1e-5, warmup_steps=1000,
      schedule='cosine',  # the paper's per-step cosine; 'albef_epochs': ALBEF's code
      weight_decay=0.02, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=0.0,
      mu_dtype='float32',
  ))

  c.data = _data('paper')

  # Parallelism: mesh axis sizes (-1 = the rest of the devices) and the rules mapping the
  # models' logical axis names to mesh axes. See codis_jax/sharding.py and the README.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.logical_axis_rules = (
      ('act_batch', ('data', 'fsdp')), ('queue', ('data', 'fsdp')),
      ('embed', 'fsdp'), ('mlp', 'tensor'), ('heads', 'tensor'), ('vocab', 'tensor'),
      ('act_mlp', 'tensor'), ('act_heads', 'tensor'), ('act_vocab', 'tensor'),
      ('act_len', None), ('act_embed', None), ('act_kv', None), ('kv', None),
      ('proj', None), ('codebook', None),
  )

  # Pretrained initialisation (codis_jax/interop/pretrained.py): local directory or file of
  # a HF BERT / HF-or-timm ViT checkpoint; '' = random init.
  c.init = ml_collections.ConfigDict(dict(bert='', vit='', bert_fusion='albef'))

  # Zero-shot retrieval every eval.every_steps of pretraining (0: only at the end), with
  # codis_jax/evaluate's scorer (codis_jax/pretrain_eval.py). eval.data: a retrieval spec
  # or ALBEF JSON path; '' = the data config's retrieval set. eval.params: the weights
  # evaluated periodically, 'student' (as ALBEF) or 'ema' (the end reports both).
  # eval.rerank: ITM re-ranking of each query's top eval.k_test (False: ITC only).
  # eval.max_images > 0 keeps the set's first N images.
  c.eval = ml_collections.ConfigDict(dict(every_steps=0, data='', k_test=256,
                                          batch_size=64, params='student', rerank=True,
                                          max_images=0))

  # The training program (codis_jax/main.py, loop.py, checkpoint.py, metrics_log.py).
  # A non-finite loss or gradient stops the run (naming the step and the terms); with
  # skip_nonfinite=True that update is skipped instead (counted as `skipped`).
  c.skip_nonfinite = False
  # JAX's persistent compilation cache ('' = off; $JAX_COMPILATION_CACHE_DIR wins).
  c.jax_cache_dir = '~/.cache/codis_jax/jax_compile'
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=1000, keep=3, async_save=True))
  c.log = ml_collections.ConfigDict(dict(every_steps=50, tensorboard=True, plot=True))
  # Test hooks: poison the batch of step nan_step with NaN; SIGKILL the process itself
  # after step kill_step (once pending checkpoints are written). -1 = off.
  c.debug = ml_collections.ConfigDict(dict(nan_step=-1, kill_step=-1))
  return c


def _data(name: str) -> ml_collections.ConfigDict:
  """The data section: `name` picks a codis_jax.data config (emoji, fashion_mnist, paper,
  or 'synthetic' for random in-memory pairs); the other fields override that config's
  value when set (None = its default), e.g. --config.data.data_dir=/data. Placeholders,
  not the data config itself, so that reading this file never imports TensorFlow."""
  ph = config_dict.placeholder
  fields = dict(train=str, test=str, retrieval=str, data_dir=str, tokenizer=str,
                text_sep=bool, auto_prepare=bool, max_words=int, crop_scale_min=float,
                crop_scale_max=float, randaug_ops=int, randaug_magnitude=int,
                shuffle_buffer=int, cycle_length=int, prefetch=int, num_threads=int,
                workers=int)
  c = ml_collections.ConfigDict({k: ph(t) for k, t in fields.items()})
  c.name = name
  return c


def _tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.batch_size = 8
  c.text_len = 12
  c.model.update(dict(
      image_size=32, patch_size=8, vit_width=32, vit_depth=2, vit_heads=2, vit_mlp_dim=64,
      vocab_size=512, text_width=32, text_layers=2, fusion_layers=2, text_heads=2,
      text_mlp_dim=64, max_positions=64, dropout=0.0, embed_dim=16, codebook_size=24,
      mask_id=4, cls_id=1, sep_id=2, pad_id=0,
  ))
  c.queue_size = 32
  c.loss.itm_group_size = 0  # the whole (small) batch
  c.optim.warmup_steps = 10
  c.total_steps = 100
  c.data.name = 'synthetic'
  c.checkpoint.every_steps = 50
  c.log.every_steps = 10
  return c


def _demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The bundled emoji set (prepared on first use) on 2 CPU cores in under 10 minutes.

  Measured choices (README, "The demo"): 32px images in 8px patches; the emoji train
  captions' own 1,746-piece WordPiece vocabulary (codis_jax/demo_vocab.py; BERT's 30,522
  would make the MLM head half the step); 3 text layers and 1 fusion layer (the fusion
  passes of ITM and MLM were half the step's FLOPs with 2; ITC retrieval, which the demo
  scores, uses none of them); a faster teacher (momentum 0.99: 0.995 barely moves in a
  run this short); lr 2e-3; mild crops and no RandAugment (both measured worse here);
  batch 56 so that 1,500 steps fit in the 10 minutes.
  """
  c.batch_size = 56
  c.total_steps = 1500  # ~26 epochs of the 3,244 train pairs
  c.text_len = 12       # 95% of the captions fit
  c.model.update(dict(
      image_size=32, patch_size=8, vit_width=128, vit_depth=4, vit_heads=4,
      vit_mlp_dim=256, text_width=128, text_layers=3, fusion_layers=1, text_heads=4,
      text_mlp_dim=256, max_positions=64, dropout=0.0, embed_dim=128, codebook_size=256,
      vocab_size=1792, pad_id=0, cls_id=2, sep_id=3, mask_id=4,  # demo_vocab's ids
  ))
  c.queue_size = 1008  # a multiple of the batch (the ring buffer's writes never wrap)
  c.loss.itm_group_size = 0  # hard negatives from the whole batch (as the paper's 64)
  c.momentum = 0.99
  c.optim.update(dict(lr=2e-3, warmup_lr=1e-5, min_lr=1e-5, warmup_steps=50))
  c.data.name = 'emoji'
  # One tf.data thread: TF's default pools contend with XLA's for the 2 cores (+20% pairs/s).
  c.data.update(dict(tokenizer='emoji_train_vocab', crop_scale_min=0.5, randaug_ops=0,
                     num_threads=1))
  c.checkpoint.every_steps = 500
  c.log.every_steps = 50
  c.eval.update(dict(k_test=16, batch_size=64))  # ITM re-ranks each query's top 16
  return c


def _ablation(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  if name == 'cross_only':
    c.loss.ica_terms, c.loss.use_codebook = 'i2t,t2i', False
    c.loss.ica_reduction = 'mean'  # ALBEF: loss_ita = (loss_i2t + loss_t2i) / 2
  elif name == 'intra_cross':
    c.loss.use_codebook = False
  elif name == 'codebook_student':
    c.loss.codebook_features = 'student'
  elif name == 'codebook_500':
    c.model.codebook_size = 500
  return c


# Performance knobs (README "Performance"): the same model and losses, in bf16 compute
# (float32 master weights) and, with dropout, other draws of its masks; the state has the
# same shapes (a weight copy is never saved), so a checkpoint from one resumes in the
# others. The gpu variant also takes GELU's tanh approximation (model.gelu), which XLA:GPU
# fuses into the cuBLASLt matmul before it: -4.1% step time on the H100's compile-only
# roofline (37.61 -> 36.06 ms), -3.4% on the H200's; it is within 4.8e-4 of the exact
# GELU, where bf16 rounds values near 1 in steps of 7.8e-3 (model.gelu=erf keeps that).
# The bf16 weight copy: -2.0% step time on the H200's compile-only roofline, +3.3% on the
# v6e's (XLA:TPU converts weights inside its matmul fusions anyway), so GPU only.
# Data workers: a COCO-sized image costs ~3.8 ms of CPU (~260 images/s per worker) and
# one process's threads stop near 2,000 images/s (the GIL; README, Input pipeline).
# 8 feed one GPU's ~1,400 pairs/s at the target; 32 feed a 4-8 chip TPU host's ~3,000-
# 5,500 (its compile-only rooflines) and fit the 200+ vCPUs of TPU VMs.
_HARDWARE = {
    'gpu': dict(model=dict(dtype='bfloat16', attention_impl='cudnn', pad_image_tokens=8,
                           pad_text_tokens=2, weight_copy=True, gelu='tanh'),
            data=dict(workers=8)),
    'tpu': dict(model=dict(dtype='bfloat16', attention_impl='pallas'),
                data=dict(workers=32)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = _paper()
  for name in filter(None, (arg or 'paper').split(',')):
    if name == 'paper':
      continue
    elif name == 'tiny':
      c = _tiny(c)
    elif name == 'demo':
      c = _demo(c)
    elif name in _ABLATIONS:
      c = _ablation(c, name)
    elif name in _HARDWARE:
      c.model.update(_HARDWARE[name]['model'])
      c.data.update(_HARDWARE[name]['data'])
    else:
      raise ValueError(
          f'configs/pretrain.py: unknown variant {name!r}; choose from paper, demo, tiny, '
          + ', '.join(_ABLATIONS + tuple(_HARDWARE)))
  return c
