"""codis_jax <-> ALBEF's PyTorch pretraining state dict (key names and layouts).

ALBEF's `ALBEF` module holds `visual_encoder` (timm ViT), `text_encoder` (BertForMaskedLM:
`bert.*` without pooler and `cls.predictions.*`), `vision_proj`, `text_proj`, `itm_head`,
`temp`, the queues and their pointer, and momentum copies `*_m` of every tower but
`itm_head`. Our BERT layers 0..N-1 (`text_layers`) and N..N+M-1 (`fusion_layers`, with
cross-attention) map to `text_encoder.bert.encoder.layer.0..N+M-1` as in ALBEF. CODIS adds
`codebook` (K, E), which ALBEF's loaders ignore when loading with strict=False.
"""

import numpy as np

from codis_jax.interop import mapping

_TEACHER_ROOTS = ('visual_encoder', 'embeddings', 'text_layers', 'fusion_layers', 'mlm_head',
                  'vision_proj', 'text_proj')


def to_albef_state_dict(params, ema_params, image_queue, text_queue, queue_ptr,
                        model_config) -> dict:
  """Parameter pytrees -> {ALBEF key: array}, in ALBEF's key order (+ `codebook` last).

  params / ema_params: the student and teacher trees (ema_params may be None: no `*_m`
  keys). image_queue / text_queue: [Q, E] (None: no queue keys); queue_ptr: int scalar.
  Works on numpy arrays, JAX arrays and, under `jax.eval_shape`, abstract ones.
  """
  flat = dict(mapping.flatten(params))
  if ema_params is not None:
    flat.update({'ema/' + k: v for k, v in mapping.flatten(ema_params).items()})
  queues = image_queue is not None
  if queues:
    if text_queue is None or queue_ptr is None:
      raise ValueError('give image_queue, text_queue and queue_ptr together (or none)')
    flat.update(image_queue=image_queue, text_queue=text_queue, queue_ptr=queue_ptr)
  rules = mapping.albef_rules(model_config, momentum=ema_params is not None, queues=queues)
  return mapping.export_rules(rules, flat)


def from_albef_state_dict(state_dict, model_config, *, strict: bool = True) -> dict:
  """{ALBEF key: array} -> {'params', 'ema_params', 'image_queue', 'text_queue',
  'queue_ptr'} (numpy). The inverse of `to_albef_state_dict`.

  A real ALBEF checkpoint has no `codebook`: with strict=False, `params` then lacks it
  (merge in a freshly initialised one), and missing momentum keys or queues give None for
  ema_params / the queues. Tied decoder copies are checked, not read.
  """
  sd = state_dict.get('model', state_dict)
  shapes = mapping.param_shapes(model_config)
  flat_shapes = dict(shapes)
  flat_shapes.update({'ema/' + k: v for k, v in shapes.items()
                      if k.split('/')[0] in _TEACHER_ROOTS})
  has_m = any(k.startswith('visual_encoder_m.') for k in sd)
  has_q = 'image_queue' in sd
  if has_q:
    e, q = np.shape(sd['image_queue'])
    flat_shapes.update(image_queue=(q, e), text_queue=(q, e), queue_ptr=())
  rules = mapping.albef_rules(model_config, momentum=has_m or strict, queues=has_q or strict)
  codebook = 'codebook' in sd
  if not codebook and not strict:
    rules = [r for r in rules if r.key != 'codebook']
  flat = mapping.import_rules(rules, sd, flat_shapes, source='ALBEF state dict')
  _check_tied(rules, sd, flat)
  params = {k: v for k, v in flat.items()
            if not k.startswith('ema/') and k not in ('image_queue', 'text_queue', 'queue_ptr')}
  ema = {k[4:]: v for k, v in flat.items() if k.startswith('ema/')}
  return {
      'params': mapping.unflatten(params),
      'ema_params': mapping.unflatten(ema) if ema else None,
      'image_queue': flat.get('image_queue'),
      'text_queue': flat.get('text_queue'),
      'queue_ptr': flat.get('queue_ptr'),
  }


def _check_tied(rules, sd, flat):
  """A tied copy that disagrees with its source means a corrupted or hand-edited file."""
  for r in rules:
    if r.kind == 'tied' and r.key in sd and r.paths[0] in flat:
      if not np.array_equal(np.asarray(sd[r.key]), flat[r.paths[0]]):
        raise ValueError(f'{r.key} differs from the weight it is tied to ({r.paths[0]})')
