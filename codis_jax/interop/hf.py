"""Hugging Face exports of the two unimodal towers: `ViTModel` and `BertModel` directories.

Each directory holds `config.json` and `model.safetensors` and loads with
`ViTModel.from_pretrained(d, add_pooling_layer=False)` /
`BertModel.from_pretrained(d, add_pooling_layer=False)` with no missing or unexpected keys
(our towers have no pooler). Only numpy and safetensors are needed to write them.

- ViT: LayerNorm eps is the model's (1e-6, timm/ALBEF), not HF's default 1e-12; [CLS] is
  prepended before adding position embeddings in both, so `pos_embed` maps 1:1 to
  `embeddings.position_embeddings`. q/k/v are separate Linears in HF (fused in timm).
- BERT: only the text layers 0..N-1 (the fusion layers need cross-attention without a
  causal mask, which HF's BertModel cannot express). No attention-probability dropout,
  as in our model. `position_ids` is not written: transformers keeps it non-persistent.
"""

import json
import os

import numpy as np
from safetensors.numpy import save_file

from codis_jax.interop import mapping


def write_safetensors(state_dict: dict, path: str):
  """Contiguous numpy copies; metadata format=pt so transformers accepts the file."""
  tensors = {k: np.array(v, order='C', copy=None) for k, v in state_dict.items()}
  save_file(tensors, path, metadata={'format': 'pt'})


def _write(out_dir, state_dict, config):
  os.makedirs(out_dir, exist_ok=True)
  write_safetensors(state_dict, os.path.join(out_dir, 'model.safetensors'))
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return out_dir


def hidden_act(m) -> str:
  """transformers' name of the model's GELU (model.gelu): 'gelu' is the exact (erf) one,
  'gelu_pytorch_tanh' torch's tanh approximation."""
  return {'erf': 'gelu', 'tanh': 'gelu_pytorch_tanh'}[m.get('gelu', 'erf')]


def hf_vit_config(m) -> dict:
  return {
      'architectures': ['ViTModel'], 'model_type': 'vit',
      'hidden_size': m.vit_width, 'num_hidden_layers': m.vit_depth,
      'num_attention_heads': m.vit_heads, 'intermediate_size': m.vit_mlp_dim,
      'hidden_act': hidden_act(m),
      'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0,
      'layer_norm_eps': m.vit_ln_eps, 'initializer_range': 0.02,
      'image_size': m.image_size, 'patch_size': m.patch_size, 'num_channels': 3,
      'qkv_bias': True, 'encoder_stride': m.patch_size,
  }


def hf_bert_config(m) -> dict:
  return {
      'architectures': ['BertModel'], 'model_type': 'bert',
      'vocab_size': m.vocab_size, 'hidden_size': m.text_width,
      'num_hidden_layers': m.text_layers, 'num_attention_heads': m.text_heads,
      'intermediate_size': m.text_mlp_dim, 'hidden_act': hidden_act(m),
      'hidden_dropout_prob': m.dropout, 'attention_probs_dropout_prob': 0.0,
      'max_position_embeddings': m.max_positions, 'type_vocab_size': m.type_vocab_size,
      'layer_norm_eps': m.text_ln_eps, 'initializer_range': 0.02,
      'pad_token_id': m.pad_id, 'position_embedding_type': 'absolute',
  }


def hf_vit_state_dict(params, model_config) -> dict:
  rules = mapping.vit_rules('', 'visual_encoder/', model_config.vit_depth, style='hf')
  return mapping.export_rules(rules, mapping.flatten(params))


def hf_bert_state_dict(params, model_config) -> dict:
  rules = mapping.bert_rules('', '', model_config.text_layers, 0, position_ids=False)
  return mapping.export_rules(rules, mapping.flatten(params))


def to_hf_vit(params, model_config, out_dir: str) -> str:
  """Writes the image encoder as a transformers ViTModel directory; returns out_dir."""
  return _write(out_dir, hf_vit_state_dict(params, model_config), hf_vit_config(model_config))


def to_hf_bert(params, model_config, out_dir: str) -> str:
  """Writes embeddings + text layers as a transformers BertModel directory."""
  return _write(out_dir, hf_bert_state_dict(params, model_config),
                hf_bert_config(model_config))
