"""Grad-CAM on the fusion encoder's cross-attention, per word (paper Figure 4; ALBEF's
visualization notebook).

  python -m codis_jax.evaluate.gradcam --checkpoint=PATH --image=IMG \
      --caption="a dog on a couch" --out=out.png [--layer=-1] [--params=student]

For one fusion layer (ALBEF: layer 8, the third of six): map = mean over heads of
(cross-attention probabilities * max(0, d ITM-match-logit / d probabilities)), one map per
text token over the image patches. WordPiece pieces of one word are averaged into that
word's map. Writes one PNG: the image, then one panel per word with its heat map.

The model's Attention calls jax.nn.dot_product_attention and never forms the
probabilities, so the chosen layer's cross-attention is recomputed here from its own
query/key/value/out parameters (a flax method interceptor swaps it in): same output, but
with explicit probabilities, to which a zero perturbation is added whose gradient is the
gradient with respect to the probabilities.
"""

import argparse
import logging
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from codis_jax.evaluate import weights
from codis_jax.models import codis
from codis_jax.models import layers

log = logging.getLogger('codis_jax.evaluate')
PANEL_INCHES, DPI = 2.0, 100  # each panel 200 x 240 px
# One image on any machine, in float32: a checkpoint's performance knobs (its `gpu` or
# `tpu` variant's kernels, or text padding, which would change the maps' query length)
# are reset to these.
PLAIN_MODEL = dict(dtype='float32', attention_impl='', remat='none', pad_image_tokens=0,
                   pad_text_tokens=0)


def default_layer(model_config):
  """ALBEF visualises layer 8 of 0-11, the third of six fusion layers. Never the last
  one: there only [CLS] reaches the ITM head, so every word's gradient is zero."""
  return model_config.text_layers + max(0, min(2, model_config.fusion_layers - 2))


def _explicit_cross_attention(layer_name, delta, captured):
  """An interceptor replacing `layer_name`'s cross-attention by the same computation with
  explicit probabilities [B, H, T, S] (+ delta); they are appended to `captured`."""

  def intercept(next_fun, args, kwargs, context):
    mod = context.module
    if (context.method_name != '__call__' or not isinstance(mod, layers.Attention)
        or mod.name != 'crossattention' or getattr(mod.parent, 'name', None) != layer_name):
      return next_fun(*args, **kwargs)
    q_in, kv_in = args[0], args[1]
    p = mod.variables['params']
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    proj = lambda x, n: jnp.einsum('bld,dhk->blhk', f32(x), f32(p[n]['kernel'])) + f32(p[n]['bias'])
    q, k, v = proj(q_in, 'query'), proj(kv_in, 'key'), proj(kv_in, 'value')
    probs = jax.nn.softmax(jnp.einsum('bthk,bshk->bhts', q, k) / np.sqrt(q.shape[-1]), -1)
    probs = probs + delta
    captured.append(probs)
    out = jnp.einsum('bhts,bshk->bthk', probs, v)
    out = jnp.einsum('bthk,hkd->btd', out, f32(p['out']['kernel'])) + f32(p['out']['bias'])
    return out.astype(q_in.dtype)

  return intercept


def gradcam(model_config, params, image, ids, mask, *, layer=None):
  """image: [S, S, 3] uint8 pixels (or float32, already normalised); ids, mask: int32 [L].

  -> (maps float32 [L, gh, gw] (0 on padding), ITM match logit). `layer` is the ALBEF
  layer number (text_layers .. text_layers + fusion_layers - 1).
  """
  c = ml_collections.ConfigDict(model_config.to_dict())
  c.update({k: v for k, v in PLAIN_MODEL.items() if k in c})
  layer = default_layer(c) if layer is None or layer < 0 else layer
  if not c.text_layers <= layer < c.text_layers + c.fusion_layers:
    raise ValueError(f'layer {layer} is not a fusion layer: choose from '
                     f'{c.text_layers}..{c.text_layers + c.fusion_layers - 1}')
  if layer == c.text_layers + c.fusion_layers - 1:
    log.warning('layer %d is the last fusion layer: only [CLS] gets a gradient there, '
                'so the word maps are zero', layer)
  model = codis.build_model(c, train=False)
  grid = c.image_size // c.patch_size
  heads, length = c.text_heads, len(ids)
  apply = lambda method, *a: model.apply({'params': params}, *a, method=method)

  def score(delta, image, ids, mask):
    captured = []
    with nn.intercept_methods(_explicit_cross_attention(f'layer_{layer}', delta, captured)):
      image_tokens, _ = apply(codis.CODIS.encode_image, image[None])
      text_tokens, _ = apply(codis.CODIS.encode_text, ids[None], mask[None])
      fused = apply(codis.CODIS.fuse, text_tokens, mask[None], image_tokens)
      logit = apply(codis.CODIS.itm_logits, fused)[0, 1]
    if len(captured) != 1:
      raise RuntimeError(f'fusion layer_{layer} cross-attention not found in the model')
    return logit, captured[0]

  @jax.jit
  def run(image, ids, mask):
    delta = jnp.zeros((1, heads, length, 1 + grid * grid), jnp.float32)
    (logit, probs), grad = jax.value_and_grad(score, has_aux=True)(delta, image, ids, mask)
    cam = probs[0, :, :, 1:] * jnp.maximum(grad[0, :, :, 1:], 0.0)  # drop the image [CLS]
    cam = jnp.mean(cam, axis=0) * mask[:, None]
    return cam.reshape(length, grid, grid), logit

  maps, logit = run(jnp.asarray(image), jnp.asarray(ids), jnp.asarray(mask))
  return np.asarray(maps), float(logit)


def word_maps(tokens, maps):
  """WordPiece tokens (no [CLS]/[SEP]/padding) and their maps -> (words, one map each):
  '##' pieces join the word before them and the word's map is the mean of its pieces'."""
  words, groups = [], []
  for tok, m in zip(tokens, maps):
    if tok.startswith('##') and words:
      words[-1] += tok[2:]
      groups[-1].append(m)
    else:
      words.append(tok)
      groups.append([m])
  return words, [np.mean(g, axis=0) for g in groups]


def render(rgb, words, maps, out_path):
  """One row: the image, then each word's heat map over it. PNG of
  (200 * (1 + len(words))) x 240 pixels."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  n = 1 + len(words)
  fig, axes = plt.subplots(1, n, figsize=(PANEL_INCHES * n, PANEL_INCHES * 1.2), dpi=DPI,
                           squeeze=False)
  axes = axes[0]
  h, w = rgb.shape[:2]
  axes[0].imshow(rgb)
  axes[0].set_title('image')
  for ax, word, m in zip(axes[1:], words, maps):
    m = np.asarray(m, np.float32)
    m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
    up = np.asarray(Image.fromarray(m).resize((w, h), Image.BICUBIC))
    ax.imshow(rgb)
    ax.imshow(np.clip(up, 0, 1), cmap='jet', alpha=0.5, vmin=0, vmax=1)
    ax.set_title(word)
  for ax in axes:
    ax.axis('off')
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.85, wspace=0.05)
  fig.savefig(out_path, dpi=DPI)
  plt.close(fig)


def load_image(path, size):
  """-> uint8 RGB [size, size, 3] as evaluation sees it (the model normalises it)."""
  from codis_jax.data import transforms  # pylint: disable=import-outside-toplevel
  with open(path, 'rb') as f:
    return transforms.load_pixels(f.read(), size)  # the test-time resize of the data package


def visualize(checkpoint, image_path, caption, out_path, *, layer=-1, params='student',
              image_size=0, text_len=30, tokenizer=''):
  """The whole command: -> (words, ITM match logit)."""
  from codis_jax.data import tokenize  # pylint: disable=import-outside-toplevel
  state, saved, where = weights.load(checkpoint)
  model_config = ml_collections.ConfigDict(saved.model.to_dict())
  if image_size:
    model_config.image_size = image_size
  tokenizer = tokenizer or (saved.get('data') or {}).get('tokenizer') or ''
  sep = weights.text_sep_of(saved)
  p = weights.adapt(weights.select(state, params), model_config)
  rgb = load_image(image_path, model_config.image_size)
  encoder = tokenize.TextEncoder(min(text_len, model_config.max_positions), tokenizer, sep=sep)
  ids, mask = encoder(tokenize.pre_caption(caption, max_words=text_len))
  if ids.max() >= model_config.vocab_size:
    raise ValueError(f'token id {ids.max()} is outside the model vocabulary '
                     f'({model_config.vocab_size}): wrong --tokenizer for this checkpoint')
  maps, logit = gradcam(model_config, p, rgb, ids, mask, layer=layer)
  n = int(mask.sum())
  end = n - 1 if sep else n  # the word pieces, without [CLS] (and [SEP])
  tokens = tokenize.load_hf_tokenizer(tokenizer).convert_ids_to_tokens(ids[1:end].tolist())
  words, wmaps = word_maps(tokens, maps[1:end])
  render(rgb, words, wmaps, out_path)
  log.info('Grad-CAM of %s (%s weights) on layer %s', where, params, layer)
  return words, logit


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--checkpoint', required=True, help='workdir, checkpoints/ or step folder')
  p.add_argument('--image', required=True)
  p.add_argument('--caption', required=True)
  p.add_argument('--out', required=True, help='PNG to write')
  p.add_argument('--layer', type=int, default=-1,
                 help='fusion layer, ALBEF numbering; -1 = the third fusion layer (ALBEF: 8)')
  p.add_argument('--params', default='student', choices=weights.PARAMS_CHOICES)
  p.add_argument('--image_size', type=int, default=0, help="0 = the checkpoint's")
  p.add_argument('--text_len', type=int, default=30)
  p.add_argument('--tokenizer', default='',
                 help="tokenizer; default: the checkpoint's (data.tokenizer), else bundled")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(message)s')
  try:
    words, logit = visualize(args.checkpoint, args.image, args.caption, args.out,
                             layer=args.layer, params=args.params,
                             image_size=args.image_size, text_len=args.text_len,
                             tokenizer=args.tokenizer)
  except (ValueError, OSError) as e:
    print(f'codis_jax.evaluate.gradcam: error: {e}', file=sys.stderr)
    return 1
  print(f'wrote {args.out}: {len(words)} words ({" ".join(words)}); ITM match logit '
        f'{logit:.3f}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
