"""The jaxpr FLOP counter against hand counts (2*M*N*K per matmul)."""

import jax
import jax.numpy as jnp
import numpy as np

from codis_jax import flops
from codis_jax.models import vit


def _mlp(w, x):
  return jnp.tanh(x @ w[0]) @ w[1]


B, D, H, O = 4, 16, 32, 8
W = (jnp.ones((D, H)), jnp.ones((H, O)))
X = jnp.ones((B, D))


def test_matmuls_forward_and_backward():
  fwd = 2 * B * D * H + 2 * B * H * O
  assert flops.count(_mlp, W, X) == fwd
  # Gradient w.r.t. the weights only: layer 2 needs dW2 and dh (2 matmuls), layer 1 only
  # dW1 (x needs no gradient): forward + 2*(B*H*O term) + 1*(B*D*H term).
  bwd = 2 * (2 * B * H * O) + 2 * B * D * H
  grad = jax.grad(lambda w, x: _mlp(w, x).sum())
  assert flops.count(grad, W, X) == fwd + bwd
  # Under remat the backward recomputes what it needs: layer 1's matmul (layer 2's output
  # is not needed by the backward of a sum). The counter sees it, so MFU uses remat=none.
  remat_grad = jax.grad(lambda w, x: jax.checkpoint(_mlp)(w, x).sum())
  assert flops.count(remat_grad, W, X) == fwd + bwd + 2 * B * D * H


def test_loops_and_branches():
  step = lambda i, y: y @ W[0][:, :D]
  assert flops.count(lambda x: jax.lax.fori_loop(0, 5, step, x), X) == 5 * 2 * B * D * D
  branches = lambda p, x: jax.lax.cond(p, lambda x: x @ W[0], lambda x: jnp.zeros((B, H)), x)
  assert flops.count(branches, True, X) == 2 * B * D * H  # the costlier branch


def test_vit_forward_matches_the_transformer_formula():
  """Patch conv + per layer 24*T*D^2 (qkv, out, 4x MLP) + 4*T^2*D (scores, weighted sum)."""
  size, patch, width, depth, mlp = 32, 8, 64, 3, 256
  model = vit.ViT(patch, width, depth, 4, mlp, 1e-6)
  images = jnp.ones((2, size, size, 3))
  params = jax.eval_shape(model.init, jax.random.key(0), images)
  t = 1 + (size // patch) ** 2
  patches = 2 * (t - 1) * (patch * patch * 3) * width
  layer = 2 * t * width * (4 * width + 2 * mlp) + 4 * t * t * width
  want = 2 * (patches + depth * layer)
  np.testing.assert_equal(flops.count(model.apply, params, images), want)


def test_shared_image_kv_saves_three_quarters_of_the_cross_kv_projections(tiny_config):
  """Per fusion layer, the keys and values of the image tokens (S x Dv -> Dt each) are
  projected for B images instead of 4B rows: 3B rows x 2 projections fewer, forward and
  both backward products (into the weights and into the student's image tokens)."""
  from codis_jax import state as state_lib  # pylint: disable=import-outside-toplevel
  from codis_jax import train  # pylint: disable=import-outside-toplevel
  from conftest import make_batch  # pylint: disable=import-outside-toplevel
  c = tiny_config
  tx = state_lib.make_optimizer(c.optim, 100)
  st = jax.eval_shape(lambda r: state_lib.create_train_state(c, r, tx), jax.random.key(0))
  batch, rng = make_batch(c), jax.random.key(1)
  count = {}
  for share in (True, False):
    c.model.share_image_kv = share
    count[share] = flops.count(train.make_train_step(c, tx, 10), st, batch, rng)
  m = c.model
  s = 1 + (m.image_size // m.patch_size) ** 2
  projection = 2 * s * m.vit_width * m.text_width
  assert count[False] - count[True] == 3 * (3 * c.batch_size) * 2 * projection * m.fusion_layers
