"""Initialise the model from pretrained PyTorch weights (ALBEF's recipe).

Config keys (strings; '' = keep the random init):
  config.init.bert         BERT weights: a local directory (model.safetensors or
                           pytorch_model.bin, sharded or not), a file, or a hub name
                           (downloaded only when online). HF BertModel / BertForMaskedLM /
                           BertForPreTraining layouts, or an ALBEF checkpoint.
  config.init.vit          ViT / DeiT weights: HF ViTModel / DeiTModel (either the classic
                           or the transformers-5 key names), timm, or an ALBEF checkpoint.
  config.init.bert_fusion  'albef' (default): fusion layer i <- source layer i (ALBEF
                           initialises layers N.. of its fusion encoder from BERT layers
                           N..); 'none': fusion layers keep their random init.
Cross-attention stays freshly initialised unless the source has it (an ALBEF checkpoint).
The MLM head comes from `cls.predictions.*` when present (its decoder is tied to the word
embeddings). ViT position embeddings are resized to the model's grid; a distillation
token (DeiT) is dropped. Every shape is checked; a mismatch raises a ValueError naming
the key. `.bin`/`.pth` files are read with `torch.load(..., weights_only=True)`.
"""

import json
import os
import re

from absl import logging
import jax
import numpy as np
from flax import traverse_util

from codis_jax.interop import mapping

_WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin',
                 'pytorch_model.bin.index.json')


# ------------------------------------------------------------------------------ reading

def _resolve(source: str) -> str:
  path = os.path.expanduser(source)
  if os.path.exists(path):
    return path
  if source.startswith(('.', '/', '~')) or source.count('/') > 1:
    raise FileNotFoundError(f'pretrained weights {source!r}: no such file or directory')
  # A hub name ("org/name"): only works online; safetensors preferred over pickles.
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
    path = snapshot_download(source, allow_patterns=['*.json', 'model*.safetensors'])
    if not any(f.endswith('.safetensors') for f in os.listdir(path)):
      path = snapshot_download(source, allow_patterns=['*.json', 'pytorch_model*.bin'])
  except Exception as e:  # offline, unknown repo, no huggingface_hub
    raise FileNotFoundError(f'pretrained weights {source!r}: not a local path, and the hub '
                            f'download failed ({type(e).__name__}: {e})') from e
  return path


def _to_numpy(t):
  if hasattr(t, 'detach'):  # a torch tensor
    t = t.detach().cpu()
    t = t.float() if t.is_floating_point() else t
    return t.numpy()
  t = np.asarray(t)
  return t.astype(np.float32) if np.issubdtype(t.dtype, np.floating) else t


def _read_file(path: str) -> dict:
  if path.endswith('.index.json'):  # sharded checkpoint
    with open(path) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
    out = {}
    for name in files:
      out.update(_read_file(os.path.join(os.path.dirname(path), name)))
    return out
  if path.endswith('.safetensors'):
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      return load_file(path)
    except (TypeError, ValueError):  # bfloat16 has no numpy dtype: go through torch
      from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
      return load_file(path)
  import torch  # pylint: disable=g-import-not-at-top
  # weights_only: a pickle may run arbitrary code; this refuses anything but tensors.
  return torch.load(path, map_location='cpu', weights_only=True)


def load_state_dict(source: str) -> dict:
  """A PyTorch checkpoint (dir, file or hub name) -> {key: float32/int numpy array}.

  Unwraps {'model': ...} (ALBEF, DeiT) and {'state_dict': ...} (timm trainers).
  """
  path = _resolve(source)
  if os.path.isdir(path):
    found = [os.path.join(path, n) for n in _WEIGHT_FILES if os.path.exists(os.path.join(path, n))]
    if not found:
      raise FileNotFoundError(f'{source!r} has none of {_WEIGHT_FILES}')
    path = found[0]  # safetensors first
  sd = _read_file(path)
  for wrapper in ('model', 'state_dict'):
    if isinstance(sd.get(wrapper), dict):
      sd = sd[wrapper]
  return {k: _to_numpy(v) for k, v in sd.items() if hasattr(v, 'shape')}


def _prefix(keys, suffix):
  """The shortest prefix p with p + suffix a key ('visual_encoder.' before '..._m.')."""
  found = [k[:-len(suffix)] for k in keys if k.endswith(suffix)]
  return min(found, key=len) if found else None


def _count(sd, fmt):
  n = 0
  while fmt.format(n) in sd:
    n += 1
  return n


# --------------------------------------------------------------------------------- BERT

def bert_weights(sd: dict, shapes: dict, model_config, fusion: str = 'albef',
                 source: str = 'BERT checkpoint') -> dict:
  """BERT state dict -> {flat Flax path: array} for embeddings, layers and MLM head."""
  # Checkpoints converted from TensorFlow name LayerNorm parameters gamma/beta.
  sd = {re.sub(r'LayerNorm\.gamma$', 'LayerNorm.weight',
               re.sub(r'LayerNorm\.beta$', 'LayerNorm.bias', k)): v for k, v in sd.items()}
  p = _prefix(sd, 'embeddings.word_embeddings.weight')
  if p is None:
    raise ValueError(f'{source}: no BERT weights (no key ending in '
                     "'embeddings.word_embeddings.weight')")
  n_text, n_fusion = model_config.text_layers, model_config.fusion_layers
  if fusion not in ('albef', 'none'):
    raise ValueError(f"config.init.bert_fusion={fusion!r}: choose 'albef' or 'none'")
  need = n_text + (n_fusion if fusion == 'albef' else 0)
  layer = p + 'encoder.layer.{}.'
  have = _count(sd, layer + 'attention.self.query.weight')
  if have < need:
    raise ValueError(
        f'{source} has {have} BERT layers; the model needs {need} (text_layers={n_text}'
        + (f' + fusion_layers={n_fusion}; or set config.init.bert_fusion=\'none\' to '
           'initialise the text layers only)' if fusion == 'albef' else ')'))
  pos = p + 'embeddings.position_embeddings.weight'
  rows = shapes['embeddings/position_embeddings/embedding'][0]
  if pos in sd and sd[pos].shape[0] > rows:  # fewer positions: keep the first ones
    sd[pos] = sd[pos][:rows]
  rules = mapping.bert_embedding_rules(p, '', position_ids=False)
  for i in range(need):
    has_cross = (layer + 'crossattention.self.query.weight').format(i) in sd
    rules += mapping.bert_layer_rules(layer.format(i), mapping.bert_layer_path('', i, n_text),
                                      cross=i >= n_text and has_cross)
  cls = (p[:-len('bert.')] if p.endswith('bert.') else p) + 'cls.predictions.'
  if cls + 'transform.dense.weight' in sd:
    rules += mapping.mlm_rules(cls, '', tied=False)
  out = mapping.import_rules(rules, sd, shapes, source=source)
  logging.info('%s: %d BERT tensors loaded (prefix %r, %d of %d layers)%s', source,
               len(out), p, need, have, '' if cls + 'transform.dense.weight' in sd
               else '; no MLM head in the source')
  return out


# ---------------------------------------------------------------------------------- ViT

# transformers 5 ViT/DeiT names -> the classic names our rules use.
_HF5_RENAMES = (('.attention.q_proj.', '.attention.attention.query.'),
                ('.attention.k_proj.', '.attention.attention.key.'),
                ('.attention.v_proj.', '.attention.attention.value.'),
                ('.attention.o_proj.', '.attention.output.dense.'),
                ('.mlp.fc1.', '.intermediate.dense.'), ('.mlp.fc2.', '.output.dense.'))


def _classic_hf_names(sd, p):
  out = {}
  for k, v in sd.items():
    if k.startswith(p + 'layers.'):
      k = p + 'encoder.layer.' + k[len(p + 'layers.'):]
      for a, b in _HF5_RENAMES:
        k = k.replace(a, b)
    out[k] = v
  return out


def vit_weights(sd: dict, shapes: dict, model_config,
                source: str = 'ViT checkpoint') -> dict:
  """timm / HF ViT or DeiT state dict -> {flat Flax path: array} for `visual_encoder`."""
  p = _prefix(sd, 'blocks.0.attn.qkv.weight')
  if p is not None:
    style, blocks = 'timm', p + 'blocks.{}.attn.qkv.weight'
    pos, dist = p + 'pos_embed', p + 'dist_token'
  else:
    p5 = _prefix(sd, 'layers.0.attention.q_proj.weight')
    sd = _classic_hf_names(sd, p5) if p5 is not None else sd
    p = _prefix(sd, 'encoder.layer.0.attention.attention.query.weight')
    if p is None:
      raise ValueError(f'{source}: no ViT weights (neither timm `blocks.N.attn.qkv` nor HF '
                       '`encoder.layer.N.attention.attention.query` / `layers.N.attention.q_proj`)')
    style, blocks = 'hf', p + 'encoder.layer.{}.attention.attention.query.weight'
    pos, dist = p + 'embeddings.position_embeddings', p + 'embeddings.distillation_token'
  depth, have = model_config.vit_depth, _count(sd, blocks)
  if have != depth:
    raise ValueError(f'{source} has {have} ViT blocks ({blocks.format("N")}); the model has '
                     f'config.model.vit_depth={depth}')
  sd = dict(sd)
  if pos in sd:
    pe = sd[pos]
    if dist in sd:  # DeiT: [CLS], [DIST], patches -> drop the distillation position
      pe = np.concatenate([pe[:, :1], pe[:, 2:]], axis=1)
    want = shapes['visual_encoder/pos_embed']
    if pe.shape[1] != want[1] and pe.shape[2] == want[2]:
      from codis_jax.models import vit  # pylint: disable=g-import-not-at-top
      grid = int(round((want[1] - 1) ** 0.5))
      logging.info('%s: position embeddings %s resized to %s', source, pe.shape, want)
      pe = np.asarray(vit.interpolate_pos_embed(pe, grid))
    sd[pos] = pe
  rules = mapping.vit_rules(p, 'visual_encoder/', depth, style)
  out = mapping.import_rules(rules, sd, shapes, source=source)
  logging.info('%s: %d ViT tensors loaded (%s layout, prefix %r)', source, len(out), style, p)
  return out


# ---------------------------------------------------------------------------- the entry

def apply_pretrained(params, config):
  """Returns `params` with config.init.{bert,vit} weights copied in (see module doc).

  params: the student tree (boxed or plain; numpy or JAX arrays, shardings kept). Call
  it on the host, outside jit, before the teacher is copied from the student.
  """
  init = config.get('init') or {}
  bert_src, vit_src = init.get('bert', ''), init.get('vit', '')
  if not bert_src and not vit_src:
    return params
  flat = traverse_util.flatten_dict(params, sep='/')
  value = lambda leaf: leaf.unbox() if hasattr(leaf, 'unbox') else leaf
  shapes = {k: tuple(np.shape(value(v))) for k, v in flat.items()}
  updates = {}
  if vit_src:
    updates.update(vit_weights(load_state_dict(vit_src), shapes, config.model, vit_src))
  if bert_src:
    updates.update(bert_weights(load_state_dict(bert_src), shapes, config.model,
                                init.get('bert_fusion', 'albef'), bert_src))
  for k, new in updates.items():
    leaf = flat[k]
    old = value(leaf)
    new = new.astype(old.dtype)
    if isinstance(old, jax.Array):
      new = jax.device_put(new, old.sharding)
    flat[k] = leaf.replace_boxed(new) if hasattr(leaf, 'replace_boxed') else new
  return traverse_util.unflatten_dict(flat, sep='/')
