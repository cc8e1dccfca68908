"""BERT (HF / ALBEF layout): embeddings, text layers, fusion layers, tied MLM head.

ALBEF splits BERT-base in two: layers 0-5 encode text alone (self-attention), layers 6-11
fuse (self-attention, cross-attention to the image tokens, MLP). Post-norm, exact GELU,
LayerNorm eps 1e-12, hidden dropout after each residual branch.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from codis_jax.models import activations
from codis_jax.models import layers
from codis_jax.models import param_ops

_INIT = nn.initializers.normal(0.02)


class BertEmbeddings(nn.Module):
  """ids [B, L] -> [B, L, D]: word + position + token-type(0), LayerNorm, dropout."""
  vocab_size: int
  width: int
  max_positions: int
  type_vocab_size: int
  eps: float
  dropout: float
  deterministic: bool
  dtype: Any = jnp.float32

  def setup(self):
    embed = lambda n, axes, name: nn.Embed(
        n, self.width, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=layers.logical_init(_INIT, axes), name=name)
    self.word_embeddings = embed(self.vocab_size, ('vocab', 'embed'), 'word_embeddings')
    self.position_embeddings = embed(self.max_positions, (None, 'embed'),
                                     'position_embeddings')
    self.token_type_embeddings = embed(self.type_vocab_size, (None, 'embed'),
                                       'token_type_embeddings')
    self.norm = layers.layer_norm(self.eps, self.dtype, 'LayerNorm')
    self.drop = nn.Dropout(self.dropout)

  def __call__(self, ids):
    length = ids.shape[1]
    if length > self.max_positions:
      raise ValueError(f'text length {length} exceeds max_positions {self.max_positions}')
    # Position and type rows are added once to every row of the batch, their gradients
    # summed over the batch in float32 (`param_ops.add_param`); every token has type 0. They
    # are gathered, not sliced: with a slice XLA:GPU lays the whole text stream out
    # batch-minor (H200 roofline of the paper step +1.1 ms).
    table = lambda embed: embed.embedding.astype(self.dtype)
    x = param_ops.take_param(table(self.word_embeddings), ids)
    x = param_ops.add_param(x, param_ops.take_param(table(self.position_embeddings),
                                                    jnp.arange(length)))
    x = param_ops.add_param(x, param_ops.take_param(table(self.token_type_embeddings),
                                                    jnp.zeros((), jnp.int32)))
    x = self.drop(self.norm(x), deterministic=self.deterministic)
    return layers.constrain(x, ('act_batch', 'act_len', 'act_embed'))

  def attend(self, hidden, grad_dtype=None):
    """Tied decoder: hidden [B, L, D] (the compute dtype) -> [B, L, V] against the word
    embeddings; their gradient leaves the matmul in grad_dtype (`param_ops.dot_param`)."""
    table = self.word_embeddings.embedding.astype(hidden.dtype)
    return param_ops.dot_param(hidden, table.T, 1, grad_dtype)


class BertLayer(nn.Module):
  """One BERT layer; with `cross=True` a fusion layer (cross-attention after self-attention).

  x [B, L, D]; x_mask bool [B, 1, 1, L]; image [B, S, Dv] (fusion only), or [N, S, Dv]
  with image_index picking each text row's image: int [G, B/G] (`layers.take_rows`) or a
  tuple of slots (`layers.slot_attention`).
  -> [B, L, D].
  """
  num_heads: int
  mlp_dim: int
  eps: float
  dropout: float
  deterministic: bool
  cross: bool = False
  dtype: Any = jnp.float32
  attention_impl: str | None = None
  grad_dtype: Any = None  # the kernels' gradients (layers.Dense.grad_dtype)
  image_length: int | None = None  # image tokens after it are padding (masked as keys)
  gelu: str = 'erf'  # activations.activation

  @nn.compact
  def __call__(self, x, x_mask, image=None, image_index=None):
    drop = lambda h: nn.Dropout(self.dropout)(h, deterministic=self.deterministic)
    attn = lambda name: layers.Attention(self.num_heads, self.dtype, _INIT,
                                         self.attention_impl, self.grad_dtype, name=name)
    norm = lambda name: layers.layer_norm(self.eps, self.dtype, name)
    x = norm('attention_norm')(x + drop(attn('attention')(x, x, x_mask)))
    if self.cross:
      # Every image token is visible: ALBEF gives the image no mask.
      x = norm('crossattention_norm')(x + drop(attn('crossattention')(
          x, image, None, image_index, self.image_length)))
    h = layers.dense(self.mlp_dim, 'embed', ('mlp',), dtype=self.dtype, init=_INIT,
                     name='intermediate', grad_dtype=self.grad_dtype)(x)
    h = layers.constrain(activations.activation(self.gelu)(h),
                         ('act_batch', 'act_len', 'act_mlp'))
    h = layers.dense(x.shape[-1], 'mlp', ('embed',), dtype=self.dtype, init=_INIT,
                     name='output', grad_dtype=self.grad_dtype)(h)
    x = norm('output_norm')(x + drop(h))
    return layers.constrain(x, ('act_batch', 'act_len', 'act_embed'))


class BertStack(nn.Module):
  """`num_layers` BertLayers numbered from `first_layer` (ALBEF numbers 0-11 across both).

  x [B, L, D], text_mask [B, L] -> [B, L, D]; image, image_index as BertLayer's.
  pad_tokens_to > 1: the layers run on L padded to a multiple of it (the padding masked
  out as keys, its rows dropped at the end), so that cuDNN's attention gets an even
  length instead of padding the paper's odd 25 tokens itself in every layer and
  direction. Exact without dropout; with dropout the masks are drawn for the padded
  shape (the same distribution, other draws).
  """
  num_layers: int
  first_layer: int
  num_heads: int
  mlp_dim: int
  eps: float
  dropout: float
  deterministic: bool
  cross: bool = False
  dtype: Any = jnp.float32
  remat: str = 'none'
  attention_impl: str | None = None
  pad_tokens_to: int = 0
  grad_dtype: Any = None  # the kernels' gradients (layers.Dense.grad_dtype)
  gelu: str = 'erf'  # activations.activation

  @nn.compact
  def __call__(self, x, text_mask, image=None, image_index=None):
    n = x.shape[1]
    extra = layers.padding_to(n, self.pad_tokens_to)
    x = jnp.pad(x, ((0, 0), (0, extra), (0, 0)))
    mask = layers.padding_mask(jnp.pad(text_mask, ((0, 0), (0, extra))))
    image_length = None
    if image is not None and self.attention_impl == 'cudnn' and image.shape[1] % 2:
      # cuDNN's path pads odd key lengths by one (`layers.even_length_attention`); padded
      # here once, each layer's keys and values come out of their matmuls padded.
      image_length = image.shape[1]
      image = jnp.pad(image, ((0, 0), (0, 1), (0, 0)))
    layer_cls = layers.maybe_remat(BertLayer, self.remat)
    for i in range(self.first_layer, self.first_layer + self.num_layers):
      x = layer_cls(self.num_heads, self.mlp_dim, self.eps, self.dropout,
                    self.deterministic, self.cross, self.dtype, self.attention_impl,
                    self.grad_dtype, image_length, self.gelu,
                    name=f'layer_{i}')(x, mask, image, image_index)
    return x[:, :n]


class MlmHead(nn.Module):
  """BERT's prediction head: dense + GELU + LayerNorm, then the tied decoder plus a bias.

  hidden [B, L, D] -> logits [B, L, V]; `embeddings` is the BertEmbeddings to tie to.
  """
  vocab_size: int
  eps: float
  dtype: Any = jnp.float32
  grad_dtype: Any = None  # the kernels' gradients (layers.Dense.grad_dtype)
  gelu: str = 'erf'  # activations.activation

  @nn.compact
  def __call__(self, hidden, embeddings: BertEmbeddings):
    # A square kernel cannot name 'embed' twice; its output dim stays unsplit.
    h = layers.dense(hidden.shape[-1], 'embed', ('embed_out',), dtype=self.dtype,
                     init=_INIT, name='transform', grad_dtype=self.grad_dtype)(hidden)
    h = layers.layer_norm(self.eps, self.dtype, 'transform_norm')(
        activations.activation(self.gelu)(h))
    bias = self.param('bias', layers.logical_init(nn.initializers.zeros, ('vocab',)),
                      (self.vocab_size,), jnp.float32)
    logits = param_ops.add_param(embeddings.attend(h, self.grad_dtype), bias.astype(h.dtype))
    return layers.constrain(logits, ('act_batch', 'act_len', 'act_vocab'))
