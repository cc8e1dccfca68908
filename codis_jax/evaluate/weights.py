"""Parameters for evaluation and fine-tuning from a training checkpoint.

A checkpoint knows its architecture: the model config is the checkpoint's, except the
image size (fine-tuning and ALBEF's zero-shot evaluation run at 384 px on a model
pretrained at 256, with the position embeddings interpolated), the performance knobs
(dtype, remat, attention_impl, share_image_kv, pad_image/text_tokens, weight_copy,
weight_grad_dtype) and the
training knobs (dropout, temperature clamp), which come from the current config.
"""

import logging

import ml_collections
import numpy as np

from codis_jax.models import vit

log = logging.getLogger('codis_jax.evaluate')

# Taken from the current config; everything else in `model` from the checkpoint.
RUNTIME_KEYS = ('image_size', 'dtype', 'remat', 'attention_impl', 'share_image_kv',
                'pad_image_tokens', 'pad_text_tokens', 'weight_copy', 'weight_grad_dtype',
                'dropout', 'temp_min', 'temp_max')
PARAMS_CHOICES = ('student', 'ema')


def load(path):
  """-> (state: nested dict of numpy arrays, saved config: ConfigDict, step folder)."""
  from codis_jax import checkpoint  # pylint: disable=import-outside-toplevel  (Orbax)
  if not path:
    raise ValueError('no checkpoint given: set --config.eval.checkpoint=PATH (a workdir, its '
                     'checkpoints/ folder, or one step folder)')
  raw = checkpoint.restore_raw(path)
  if 'params' not in raw['state']:
    raise ValueError(f'checkpoint {raw["path"]} has no params')
  return raw['state'], raw['config'], raw['path']


def model_config_for(saved_config, config):
  """The checkpoint's model config with RUNTIME_KEYS from `config.model`."""
  model = ml_collections.ConfigDict(saved_config['model'].to_dict())
  differ = sorted(k for k in model if k not in RUNTIME_KEYS and k in config.model
                  and model[k] != config.model[k])
  if differ:
    log.info('model architecture from the checkpoint (it differs from the config in %s)',
             ', '.join(differ))
  for k in RUNTIME_KEYS:
    if k in config.model:
      model[k] = config.model[k]
  return model


def with_model(config, model_config):
  """A copy of `config` whose model section is `model_config` (what checkpoints record)."""
  out = config.copy_and_resolve_references()
  with out.unlocked():
    out.model = model_config
  return out


def text_sep_of(saved_config) -> bool:
  """Whether the checkpoint's captions ended in [SEP] (data.text_sep; unset = the data
  config's default, False). A checkpoint from before that key was trained with [SEP]."""
  data = saved_config.get('data') or {}
  if 'text_sep' not in data:
    return True
  return bool(data['text_sep'])


def effective_config(config, saved_config):
  """`config` with the checkpoint's model (model_config_for) and, unless config.data
  names them, the tokenizer the checkpoint was trained with (its vocabulary must match)
  and its caption format (data.text_sep)."""
  out = with_model(config, model_config_for(saved_config, config))
  saved_tokenizer = (saved_config.get('data') or {}).get('tokenizer')
  with out.unlocked():
    if saved_tokenizer and not out.data.get('tokenizer'):
      out.data.tokenizer = saved_tokenizer
    if out.data.get('text_sep') is None:
      out.data.text_sep = text_sep_of(saved_config)
  return out


def select(state, which='student'):
  """The full parameter tree to evaluate: the student's, or the teacher's ('ema': EMA
  weights plus the student-only leaves: ITM head, temperature, codebook)."""
  if which not in PARAMS_CHOICES:
    raise ValueError(f'params={which!r}: choose from {PARAMS_CHOICES}')
  if which == 'ema':
    if not state.get('ema_params'):
      raise ValueError("params='ema' but the checkpoint has no ema_params")
    return {**state['params'], **state['ema_params']}
  return dict(state['params'])


def adapt(params, model_config):
  """Interpolates the ViT position embeddings to model_config's grid (bicubic, as ALBEF's
  interpolate_pos_embed); the rest is unchanged."""
  ve = params.get('visual_encoder')
  if ve is None or 'pos_embed' not in ve:
    return params
  c = model_config
  if c.image_size % c.patch_size:
    raise ValueError(f'image_size {c.image_size} is not a multiple of patch_size '
                     f'{c.patch_size}')
  grid = c.image_size // c.patch_size
  pos = ve['pos_embed']
  if pos.shape[1] == grid * grid + 1:
    return params
  log.info('interpolating position embeddings %d -> %d patches', pos.shape[1] - 1, grid * grid)
  new = np.asarray(vit.interpolate_pos_embed(pos, grid), np.float32)
  return {**params, 'visual_encoder': {**ve, 'pos_embed': new}}


def for_eval(path, config, which=None):
  """-> (params ready for config's image size, effective_config, step folder)."""
  state, saved, where = load(path)
  config = effective_config(config, saved)
  params = adapt(select(state, which or config.eval.params), config.model)
  return params, config, where
