"""From-scratch initialisation of the ViT as ALBEF's (timm's trunc_normal_(std=.02))."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from codis_jax.models import vit


def test_vit_init_is_timms_untruncated_normal():
  # timm's trunc_normal_(std=.02) truncates at +-2 absolute: N(0, 0.02) in practice, so
  # the kernels reach beyond 2 std (0.04); biases 0, LayerNorms 1 and 0.
  model = vit.ViT(patch_size=16, width=768, depth=1, num_heads=12, mlp_dim=3072)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params'])
  flat = {'/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
  for name in ('blocks_0/mlp/fc1/kernel', 'blocks_0/mlp/fc2/kernel', 'pos_embed',
               'patch_embed/kernel'):
    w = flat[name]
    # 2.4M (fc) to 4k (pos_embed) samples: the std's sampling error is under 1.2%.
    assert abs(w.std() / 0.02 - 1) < 0.035, (name, w.std())
    assert abs(w.mean()) < 0.002, name
  fc1 = flat['blocks_0/mlp/fc1/kernel']
  assert np.mean(np.abs(fc1) > 0.04) > 0.04  # N(0, 0.02): 4.6% beyond 2 std
  for name, w in flat.items():
    if name.endswith('bias'):
      assert not np.any(w), name
    if name.endswith('scale'):
      assert np.all(w == 1), name
