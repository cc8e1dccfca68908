"""Key and layout rules between the Flax parameter tree and PyTorch state dicts.

One `Rule` names a PyTorch key, the flat Flax paths ('a/b/c') it is built from, and a
`kind` saying how the arrays convert. Export and import both walk the same rule lists, so
the two directions cannot drift apart. Layout facts handled by the kinds:
  dense / dense_out  Flax kernels are [in..., out...]; torch Linear.weight is (out, in).
                     q/k/v kernels are [D, heads, head_dim] (1 input dim); attention
                     output kernels are [heads, head_dim, D] (2 input dims).
  qkv / qkv_bias     timm's ViT fuses q, k, v into one Linear: rows q, then k, then v.
  conv               NHWC Conv kernel [p, p, 3, D] <-> torch Conv2d weight (D, 3, p, p).
  tied               a second torch key holding a copy of a Flax leaf (the MLM decoder
                     tied to the word embeddings); written on export, skipped on import.
  arange             the BERT `position_ids` buffer: int64 (1, max_positions), no Flax leaf.
  queue / ptr        [Q, E] length-first queues <-> ALBEF's feature-first (E, Q); the
                     int32 scalar pointer <-> int64 (1,).
The converters use only array methods (or jnp when given JAX arrays), so they also run
under `jax.eval_shape` on abstract arrays: paper-size key/shape checks allocate nothing.
"""

import dataclasses
import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

QKV = ('query', 'key', 'value')


@dataclasses.dataclass(frozen=True)
class Rule:
  key: str          # PyTorch state-dict key
  kind: str         # conversion, see the module docstring
  paths: tuple      # flat Flax paths read (export) or written (import)


# ----------------------------------------------------------------------------- helpers

def flatten(tree) -> dict:
  """Nested dict (boxed or not) -> {'a/b/c': array}."""
  return traverse_util.flatten_dict(nn.meta.unbox(tree), sep='/')


def unflatten(flat: dict) -> dict:
  return traverse_util.unflatten_dict(flat, sep='/')


def _xp(*xs):
  return jnp if any(isinstance(x, jax.Array) for x in xs) else np


def _linear(kernel, n_in):
  """Flax kernel [in..., out...] -> torch weight (out, in)."""
  return kernel.reshape(math.prod(kernel.shape[:n_in]), -1).T


_EXPORT = {
    'copy': lambda x: x,
    'tied': lambda x: x.copy(),  # a separate tensor: safetensors refuses shared storage
    'dense': lambda k: _linear(k, 1),
    'dense_out': lambda k: _linear(k, 2),
    'bias': lambda b: b.reshape(-1),
    'conv': lambda k: k.transpose(3, 2, 0, 1),
    'qkv': lambda q, k, v: _xp(q, k, v).concatenate([_linear(t, 1) for t in (q, k, v)], 0),
    'qkv_bias': lambda q, k, v: _xp(q, k, v).concatenate([t.reshape(-1) for t in (q, k, v)]),
    'arange': lambda pos: np.arange(pos.shape[0], dtype=np.int64)[None],
    'queue': lambda q: q.T,
    'ptr': lambda p: p.astype(np.int64).reshape(1),
}


def export_rules(rules, flat: dict) -> dict:
  """Flat Flax arrays -> {torch key: array}, in rule order."""
  out = {}
  for r in rules:
    missing = [p for p in r.paths if p not in flat]
    if missing:
      raise KeyError(f'{r.key}: the parameter tree has no {missing[0]!r}')
    out[r.key] = _EXPORT[r.kind](*(flat[p] for p in r.paths))
  return out


def _torch_shape(rule, shapes):
  """The torch shape the rule produces from Flax leaves of `shapes` (no allocation)."""
  structs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  with warnings.catch_warnings():  # 'ptr' asks for int64; only the shape matters here
    warnings.simplefilter('ignore', UserWarning)
    return tuple(jax.eval_shape(_EXPORT[rule.kind], *structs).shape)


def _import_one(rule, t, shapes):
  k = rule.kind
  if k in ('copy', 'bias'):
    return [t.reshape(shapes[0])]
  if k in ('dense', 'dense_out'):
    return [t.T.reshape(shapes[0])]
  if k == 'conv':
    return [t.transpose(2, 3, 1, 0)]
  if k == 'qkv':
    return [p.T.reshape(s) for p, s in zip(np.split(t, 3, axis=0), shapes)]
  if k == 'qkv_bias':
    return [p.reshape(s) for p, s in zip(np.split(t, 3), shapes)]
  if k == 'queue':
    return [t.T]
  if k == 'ptr':
    return [t.reshape(()).astype(np.int32)]
  raise ValueError(f'no import for kind {k!r}')


def import_rules(rules, state_dict: dict, shapes: dict, *, source='checkpoint') -> dict:
  """{torch key: array} -> {flat Flax path: np.ndarray}, checking every shape.

  `shapes` maps the Flax paths to the model's shapes. Raises one ValueError that names
  every missing key and every key whose shape does not fit.
  """
  out, problems = {}, []
  for r in rules:
    if r.kind in ('tied', 'arange'):
      continue
    if r.key not in state_dict:
      problems.append(f'{r.key}: missing from the {source} (needed for {r.paths[0]})')
      continue
    t = np.asarray(state_dict[r.key])
    want = _torch_shape(r, [shapes[p] for p in r.paths])
    if tuple(t.shape) != want:
      problems.append(f'{r.key}: the {source} has shape {tuple(t.shape)}, the model needs '
                      f'{want} (for {", ".join(r.paths)} of shape '
                      f'{", ".join(str(tuple(shapes[p])) for p in r.paths)})')
      continue
    for p, a in zip(r.paths, _import_one(r, t, [shapes[p] for p in r.paths])):
      out[p] = np.array(a, order='C', copy=None)  # ascontiguousarray would make 0-d 1-d
  if problems:
    shown = '\n  '.join(problems[:20])
    more = f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else ''
    raise ValueError(f'{len(problems)} weight(s) of the {source} do not fit the model:\n  '
                     f'{shown}{more}')
  return out


# ------------------------------------------------------------------------ rule builders

def _ln(tk, fk):
  return [Rule(tk + '.weight', 'copy', (fk + '/scale',)),
          Rule(tk + '.bias', 'copy', (fk + '/bias',))]


def _lin(tk, fk, kind='dense'):
  return [Rule(tk + '.weight', kind, (fk + '/kernel',)),
          Rule(tk + '.bias', 'bias', (fk + '/bias',))]


def vit_rules(tp: str, fp: str, depth: int, style: str = 'timm'):
  """ViT rules. tp: torch prefix ('visual_encoder.'); fp: Flax prefix ('visual_encoder/').

  style 'timm' (ALBEF): fused qkv; style 'hf': transformers' ViTModel, written with the
  classic names (encoder.layer.N.attention.attention.query) that transformers 4.x loads
  natively and 5.x renames on load.
  """
  if style == 'timm':
    rules = [Rule(tp + 'cls_token', 'copy', (fp + 'cls_token',)),
             Rule(tp + 'pos_embed', 'copy', (fp + 'pos_embed',)),
             Rule(tp + 'patch_embed.proj.weight', 'conv', (fp + 'patch_embed/kernel',)),
             Rule(tp + 'patch_embed.proj.bias', 'copy', (fp + 'patch_embed/bias',))]
    for i in range(depth):
      t, f = f'{tp}blocks.{i}.', f'{fp}blocks_{i}/'
      qkv = tuple(f'{f}attn/{n}/kernel' for n in QKV)
      rules += _ln(t + 'norm1', f + 'norm1')
      rules += [Rule(t + 'attn.qkv.weight', 'qkv', qkv),
                Rule(t + 'attn.qkv.bias', 'qkv_bias', tuple(p[:-6] + 'bias' for p in qkv))]
      rules += _lin(t + 'attn.proj', f + 'attn/out', 'dense_out')
      rules += _ln(t + 'norm2', f + 'norm2')
      rules += _lin(t + 'mlp.fc1', f + 'mlp/fc1') + _lin(t + 'mlp.fc2', f + 'mlp/fc2')
    return rules + _ln(tp + 'norm', fp + 'norm')
  if style != 'hf':
    raise ValueError(f'unknown ViT style {style!r}')
  e = tp + 'embeddings.'
  rules = [Rule(e + 'cls_token', 'copy', (fp + 'cls_token',)),
           Rule(e + 'position_embeddings', 'copy', (fp + 'pos_embed',)),
           Rule(e + 'patch_embeddings.projection.weight', 'conv', (fp + 'patch_embed/kernel',)),
           Rule(e + 'patch_embeddings.projection.bias', 'copy', (fp + 'patch_embed/bias',))]
  for i in range(depth):
    t, f = f'{tp}encoder.layer.{i}.', f'{fp}blocks_{i}/'
    for n in QKV:
      rules += _lin(f'{t}attention.attention.{n}', f'{f}attn/{n}')
    rules += _lin(t + 'attention.output.dense', f + 'attn/out', 'dense_out')
    rules += _ln(t + 'layernorm_before', f + 'norm1') + _ln(t + 'layernorm_after', f + 'norm2')
    rules += _lin(t + 'intermediate.dense', f + 'mlp/fc1') + _lin(t + 'output.dense', f + 'mlp/fc2')
  return rules + _ln(tp + 'layernorm', fp + 'norm')


def bert_layer_rules(tp: str, fp: str, cross: bool):
  """One BERT layer: tp 'text_encoder.bert.encoder.layer.7.', fp 'fusion_layers/layer_7/'."""
  rules = []
  for name in ('attention', 'crossattention') if cross else ('attention',):
    for n in QKV:
      rules += _lin(f'{tp}{name}.self.{n}', f'{fp}{name}/{n}')
    rules += _lin(f'{tp}{name}.output.dense', f'{fp}{name}/out', 'dense_out')
    rules += _ln(f'{tp}{name}.output.LayerNorm', f'{fp}{name}_norm')
  rules += _lin(tp + 'intermediate.dense', fp + 'intermediate')
  rules += _lin(tp + 'output.dense', fp + 'output')
  rules += _ln(tp + 'output.LayerNorm', fp + 'output_norm')
  return rules


def bert_layer_path(fp: str, i: int, n_text: int) -> str:
  """Flax prefix of global BERT layer i (text layers first, then fusion layers)."""
  return f'{fp}{"text_layers" if i < n_text else "fusion_layers"}/layer_{i}/'


def bert_embedding_rules(tp: str, fp: str, position_ids: bool = True):
  e, f = tp + 'embeddings.', fp + 'embeddings/'
  rules = [Rule(e + 'position_ids', 'arange', (f + 'position_embeddings/embedding',))]
  rules = rules if position_ids else []
  for n in ('word_embeddings', 'position_embeddings', 'token_type_embeddings'):
    rules.append(Rule(f'{e}{n}.weight', 'copy', (f'{f}{n}/embedding',)))
  return rules + _ln(e + 'LayerNorm', f + 'LayerNorm')


def bert_rules(tp: str, fp: str, n_text: int, n_fusion: int, position_ids: bool = True):
  """BERT (no pooler): embeddings and layers 0..n_text+n_fusion-1, ALBEF numbering."""
  rules = bert_embedding_rules(tp, fp, position_ids)
  for i in range(n_text + n_fusion):
    rules += bert_layer_rules(f'{tp}encoder.layer.{i}.', bert_layer_path(fp, i, n_text),
                              cross=i >= n_text)
  return rules


def mlm_rules(tp: str, fp: str, tied: bool = True):
  """BERT's MLM head, tp 'text_encoder.cls.predictions.'; the decoder is tied."""
  rules = [Rule(tp + 'bias', 'copy', (fp + 'mlm_head/bias',))]
  rules += _lin(tp + 'transform.dense', fp + 'mlm_head/transform')
  rules += _ln(tp + 'transform.LayerNorm', fp + 'mlm_head/transform_norm')
  if tied:
    rules += [Rule(tp + 'decoder.weight', 'tied', (fp + 'embeddings/word_embeddings/embedding',)),
              Rule(tp + 'decoder.bias', 'tied', (fp + 'mlm_head/bias',))]
  return rules


def albef_rules(model_config, momentum: bool = True, queues: bool = True):
  """ALBEF's pretraining state dict, in ALBEF's key order, plus `codebook` at the end.

  Student leaves are read from `path`, the EMA teacher's from `ema/path`.
  """
  m = model_config
  rules = [Rule('temp', 'copy', ('temp',))]
  if queues:
    rules += [Rule('image_queue', 'queue', ('image_queue',)),
              Rule('text_queue', 'queue', ('text_queue',)),
              Rule('queue_ptr', 'ptr', ('queue_ptr',))]

  def tower(s, fp, parts):
    out = []
    for part in parts:
      if part == 'vit':
        out += vit_rules(f'visual_encoder{s}.', fp + 'visual_encoder/', m.vit_depth)
      elif part == 'bert':
        out += bert_rules(f'text_encoder{s}.bert.', fp, m.text_layers, m.fusion_layers)
        out += mlm_rules(f'text_encoder{s}.cls.predictions.', fp)
      else:
        out += _lin(part + s, fp + part)
    return out

  rules += tower('', '', ('vit', 'bert', 'vision_proj', 'text_proj', 'itm_head'))
  if momentum:  # ALBEF's model_pairs order
    rules += tower('_m', 'ema/', ('vit', 'vision_proj', 'bert', 'text_proj'))
  return rules + [Rule('codebook', 'copy', ('codebook',))]


def param_shapes(model_config) -> dict:
  """{flat path: shape} of the model's parameters, without allocating them."""
  from codis_jax.models import codis  # local: keeps this module light to import
  model = codis.build_model(model_config, train=False)
  s = model_config.image_size
  images = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  tree = jax.eval_shape(lambda i, t: model.init(jax.random.key(0), i, t, t), images, ids)
  return {k: tuple(v.shape) for k, v in flatten(tree['params']).items()}
