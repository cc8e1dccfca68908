"""ViT image encoder (timm / ALBEF layout): pre-norm blocks, [CLS], learned positions."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from codis_jax.models import layers
from codis_jax.models import param_ops

# timm's trunc_normal_(std=.02), ALBEF's ViT init, cuts at +-2 in absolute terms (100 std):
# a plain normal. flax's truncated_normal(0.02) would cut at 2 std, leaving std 0.0176.
_INIT = nn.initializers.normal(0.02)
# CLIP's per-channel RGB mean and std on [0, 1] pixels, as ALBEF normalises.
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_pixels(images):
  """uint8 pixels [..., 3] -> float32 (x / 255 - mean) / std; float input is taken as
  already normalised and returned as it is; other dtypes are refused. The data pipeline
  hands uint8 to the device (a quarter of float32's bytes); here XLA fuses the scaling
  into the patch embedding."""
  if jnp.issubdtype(images.dtype, jnp.floating):
    return images
  if images.dtype != jnp.uint8:
    raise ValueError(f'images must be uint8 pixels or normalised floats, not {images.dtype}')
  scale = 1.0 / (255.0 * np.asarray(PIXEL_STD, np.float32))
  shift = np.asarray(PIXEL_MEAN, np.float32) / np.asarray(PIXEL_STD, np.float32)
  return images.astype(jnp.float32) * scale - shift


class PatchEmbed(nn.Module):
  """images [B, H, W, 3] -> [B, H/p, W/p, D]: timm's stride-p convolution (flax's
  nn.Conv parameters: kernel [p, p, 3, D], bias [D]) through `param_ops.patch_conv`."""
  patch_size: int
  width: int
  dtype: Any = jnp.float32
  grad_dtype: Any = None  # the kernel's gradient (layers.Dense.grad_dtype)

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    kernel = self.param('kernel', layers.logical_init(_INIT, (None, None, None, 'embed')),
                        (p, p, images.shape[-1], self.width), jnp.float32)
    bias = self.param('bias', layers.logical_init(nn.initializers.zeros, ('embed',)),
                      (self.width,), jnp.float32)
    x = param_ops.patch_conv(normalize_pixels(images).astype(self.dtype),
                             kernel.astype(self.dtype), self.grad_dtype)
    return param_ops.add_param(x, bias.astype(self.dtype))


class ViTBlock(nn.Module):
  """x + attn(norm1(x)); x + mlp(norm2(x)). [B, T, D] -> [B, T, D]."""
  num_heads: int
  mlp_dim: int
  eps: float
  dtype: Any = jnp.float32
  attention_impl: str | None = None
  num_tokens: int | None = None  # tokens after it are padding (None: none)
  grad_dtype: Any = None  # the kernels' gradients (layers.Dense.grad_dtype)
  gelu: str = 'erf'  # activations.activation

  @nn.compact
  def __call__(self, x):
    h = layers.layer_norm(self.eps, self.dtype, 'norm1')(x)
    x = x + layers.Attention(self.num_heads, self.dtype, _INIT, self.attention_impl,
                             self.grad_dtype, name='attn')(h, h, kv_length=self.num_tokens)
    h = layers.layer_norm(self.eps, self.dtype, 'norm2')(x)
    x = x + layers.Mlp(self.mlp_dim, self.dtype, _INIT, self.grad_dtype, self.gelu,
                       name='mlp')(h)
    return layers.constrain(x, ('act_batch', 'act_len', 'act_embed'))


class ViT(nn.Module):
  """images [B, H, W, 3] (uint8 pixels, or floats already normalised) -> tokens
  [B, 1 + (H/p)*(W/p), D] after the final norm.

  pad_tokens_to > 1: the blocks run on the tokens padded to a multiple of it, the padding
  masked out as keys and dropped at the end (exact). GPU matmuls want lengths in multiples
  of 8: XLA otherwise pads the paper's 257 tokens inside every attention (and cuDNN's path
  to an even length), a copy per layer in each direction.
  """
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  eps: float = 1e-6
  dtype: Any = jnp.float32
  remat: str = 'none'
  attention_impl: str | None = None
  pad_tokens_to: int = 0
  grad_dtype: Any = None  # the kernels' gradients (layers.Dense.grad_dtype)
  gelu: str = 'erf'  # activations.activation

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f'image size {images.shape[1:3]} is not a multiple of patch {p}')
    x = PatchEmbed(p, self.width, self.dtype, self.grad_dtype, name='patch_embed')(images)
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    cls = self.param('cls_token', layers.logical_init(_INIT, (None, None, 'embed')),
                     (1, 1, d), jnp.float32)
    pos = self.param('pos_embed', layers.logical_init(_INIT, (None, None, 'embed')),
                     (1, 1 + gh * gw, d), jnp.float32)
    # The [CLS] row broadcast over the batch, its gradient summed in float32.
    cls = param_ops.add_param(jnp.zeros((b, 1, d), x.dtype), cls.astype(x.dtype)[0])
    x = jnp.concatenate([cls, x], axis=1)
    x = param_ops.add_param(x, pos.astype(x.dtype)[0])
    x = layers.constrain(x, ('act_batch', 'act_len', 'act_embed'))
    n = x.shape[1]
    extra = layers.padding_to(n, self.pad_tokens_to)
    x = jnp.pad(x, ((0, 0), (0, extra), (0, 0)))
    block = layers.maybe_remat(ViTBlock, self.remat)
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_dim, self.eps, self.dtype, self.attention_impl,
                n if extra else None, self.grad_dtype, self.gelu, name=f'blocks_{i}')(x)
    return layers.layer_norm(self.eps, self.dtype, 'norm')(x[:, :n])


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of PyTorch's bicubic resize along one axis (`F.interpolate(...,
  mode='bicubic', align_corners=False)`, what ALBEF's interpolate_pos_embed calls): Keys'
  kernel with A = -0.75, half-pixel centres, taps beyond the edge clamped to it, and no
  antialiasing. jax.image.resize's bicubic differs (A = -0.5; antialiased when shrinking)."""
  a = -0.75
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1            # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a      # 1 < |x| < 2
  src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  first = np.floor(src).astype(np.int64)
  t = src - first
  taps = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)
  m = np.zeros((n_out, n_in))
  for k in range(4):
    np.add.at(m, (np.arange(n_out), np.clip(first - 1 + k, 0, n_in - 1)), taps[:, k])
  return m


def interpolate_pos_embed(pos_embed, new_grid: int) -> np.ndarray:
  """Bicubic resize of the patch position grid, as ALBEF's interpolate_pos_embed (PyTorch's
  bicubic; see _bicubic_matrix). Runs on the host, in float64, when weights are loaded.

  pos_embed: [1, 1 + g*g, D] -> [1, 1 + new_grid**2, D], same dtype; the [CLS] position is
  kept.
  """
  pos_embed = np.asarray(pos_embed)
  n = pos_embed.shape[1] - 1
  g = int(round(np.sqrt(n)))
  if g * g != n:
    raise ValueError(f'position embedding has {n} patch positions, not a square grid')
  if g == new_grid:
    return pos_embed
  m = _bicubic_matrix(g, new_grid)
  grid = pos_embed[0, 1:].reshape(g, g, -1).astype(np.float64)
  grid = np.einsum('ai,bj,ijd->abd', m, m, grid).reshape(1, new_grid * new_grid, -1)
  return np.concatenate([pos_embed[:, :1], grid.astype(pos_embed.dtype)], 1)
