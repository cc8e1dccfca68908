"""The CODIS model: ViT, BERT text + fusion encoders, projections, ITM/MLM heads,
the learnable temperature and the codebook.

One module, several methods; the train step calls them with `model.apply(..., method=)`:
  encode_image(images)           -> tokens [B, 1+P, Dv], feature [B, E] (L2-normalised, f32)
    (images: uint8 pixels [B, S, S, 3], or floats already normalised; see vit.py)
  encode_text(ids, mask)         -> tokens [B, L, Dt],  feature [B, E]
  fuse(text, mask, image_tokens[, image_index]) -> fused tokens [B, L, Dt]
  itm_logits(fused)              -> [B, 2] from the fused [CLS]
  mlm_logits(fused)              -> [B, L, V] (decoder tied to the word embeddings)
  temperature()                  -> scalar, clamped to [temp_min, temp_max]
  codebook()                     -> [K, E] (raw; losses L2-normalise it)
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from codis_jax.models import activations, bert, layers, vit


def l2_normalize(x, eps=1e-12):
  """L2-normalise the last axis in float32 (features feed losses, queues and IPOT)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


# Parameters the model uses in float32 whatever config.dtype: the projections into the
# joint space and the ITM head (built with dtype=float32 below), the temperature and the
# codebook. flax's LayerNorms, too, compute with float32 scale and bias.
FLOAT32_PARAMS = ('vision_proj', 'text_proj', 'itm_head', 'temp', 'codebook')


def cast_param_paths(flat_params) -> list:
  """Which parameters the model casts to config.dtype before it uses them: every kernel,
  Dense bias, embedding table and position embedding, i.e. all but FLOAT32_PARAMS and the
  LayerNorms' scale and bias. flat_params: {'a/b/kernel': leaf} (flax's flatten_dict,
  sep='/') -> sorted paths."""
  def float32(path):
    module, _, name = path.rpartition('/')
    layer_norm = name in ('scale', 'bias') and f'{module}/scale' in flat_params
    return layer_norm or any(path == f or path.startswith(f + '/') for f in FLOAT32_PARAMS)
  return sorted(p for p in flat_params if not float32(p))


def weight_grad_dtype(model_config):
  """config.model.weight_grad_dtype (default float32): the dtype each weight gradient
  leaves its matmul in, and so the dtype of XLA's cross-device sum of it; float32 or
  model.dtype (bf16 halves that traffic, as FSDP's reduce_dtype or Megatron's
  --grad-reduce-in-bf16)."""
  name = model_config.get('weight_grad_dtype', 'float32')
  allowed = {'float32', jnp.dtype(model_config.dtype).name}
  if name not in allowed:
    raise ValueError(f'config.model.weight_grad_dtype={name!r}: choose from {sorted(allowed)} '
                     f'(float32, or model.dtype={model_config.dtype!r})')
  return jnp.dtype(name)


class CODIS(nn.Module):
  config: ml_collections.FrozenConfigDict  # the `model` part of the config
  train: bool = False  # dropout on (student) or off (teacher, evaluation)

  def setup(self):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    if c.attention_impl not in ('', 'xla', 'cudnn', 'pallas'):
      raise ValueError(f'config.model.attention_impl={c.attention_impl!r}: choose \'\' '
                       "(XLA picks), 'xla', 'cudnn' (GPU) or 'pallas' (TPU)")
    impl = c.attention_impl or None
    grad_dtype = weight_grad_dtype(c)
    gelu = c.get('gelu', 'erf')
    activations.activation(gelu)  # a bad name fails here, naming the config key
    self.visual_encoder = vit.ViT(
        c.patch_size, c.vit_width, c.vit_depth, c.vit_heads, c.vit_mlp_dim, c.vit_ln_eps,
        dtype, c.remat, impl, c.get('pad_image_tokens', 0), grad_dtype, gelu)
    text_common = dict(num_heads=c.text_heads, mlp_dim=c.text_mlp_dim, eps=c.text_ln_eps,
                       dropout=c.dropout, deterministic=not self.train, dtype=dtype,
                       remat=c.remat, attention_impl=impl,
                       pad_tokens_to=c.get('pad_text_tokens', 0), grad_dtype=grad_dtype,
                       gelu=gelu)
    self.embeddings = bert.BertEmbeddings(
        c.vocab_size, c.text_width, c.max_positions, c.type_vocab_size, c.text_ln_eps,
        c.dropout, not self.train, dtype)
    self.text_layers = bert.BertStack(c.text_layers, 0, **text_common)
    self.fusion_layers = bert.BertStack(c.fusion_layers, c.text_layers, cross=True,
                                        **text_common)
    self.mlm_head = bert.MlmHead(c.vocab_size, c.text_ln_eps, dtype, grad_dtype, gelu)
    proj = lambda name: layers.dense(c.embed_dim, 'embed', ('proj',), dtype=jnp.float32,
                                     init=nn.initializers.normal(0.02), name=name)
    self.vision_proj = proj('vision_proj')
    self.text_proj = proj('text_proj')
    self.itm_head = layers.dense(2, 'embed', (None,), dtype=jnp.float32,
                                 init=nn.initializers.normal(0.02), name='itm_head')
    self.temp = self.param('temp', layers.logical_init(
        nn.initializers.constant(c.temp_init), ()), (), jnp.float32)
    # Codewords start as random directions; they are L2-normalised wherever used.
    self.codebook_weights = self.param('codebook', layers.logical_init(
        nn.initializers.normal(1.0), ('codebook', 'proj')), (c.codebook_size, c.embed_dim),
        jnp.float32)

  def encode_image(self, images):
    tokens = self.visual_encoder(images)
    return tokens, l2_normalize(self.vision_proj(tokens[:, 0].astype(jnp.float32)))

  def encode_text(self, ids, mask):
    tokens = self.text_layers(self.embeddings(ids), mask)
    return tokens, l2_normalize(self.text_proj(tokens[:, 0].astype(jnp.float32)))

  def fuse(self, text_tokens, text_mask, image_tokens, image_index=None):
    """text [B, L, Dt], mask [B, L], image_tokens [B, S, Dv] -> [B, L, Dt]. Or image_tokens
    [N, S, Dv] with image_index naming each text row's image, int [G, B/G] (`take_rows`)
    or a tuple of slots (`layers.slot_attention`): each image's cross-attention
    keys/values are then computed once, however many text rows attend to it."""
    return self.fusion_layers(text_tokens, text_mask, image_tokens.astype(text_tokens.dtype),
                              image_index)

  def itm_logits(self, fused):
    return self.itm_head(fused[:, 0].astype(jnp.float32))

  def mlm_logits(self, fused):
    return self.mlm_head(fused, self.embeddings)

  def temperature(self):
    c = self.config
    # ALBEF clamps the parameter in place and then uses it: the value is clamped, the
    # gradient is the clamped value's, in full (jnp.clip alone would give 0 beyond the
    # bounds and half at them, where the update's clamp leaves the parameter).
    t = self.temp
    return t + jax.lax.stop_gradient(jnp.clip(t, c.temp_min, c.temp_max) - t)

  def codebook(self):
    return self.codebook_weights

  def __call__(self, images, ids, mask):
    """Touches every parameter once (used by `init`). Returns the ITM and MLM logits."""
    image_tokens, _ = self.encode_image(images)
    text_tokens, _ = self.encode_text(ids, mask)
    fused = self.fuse(text_tokens, mask, image_tokens)
    return self.itm_logits(fused), self.mlm_logits(fused), self.temperature(), self.codebook()


def build_model(model_config, train: bool) -> CODIS:
  return CODIS(ml_collections.FrozenConfigDict(model_config), train=train)
