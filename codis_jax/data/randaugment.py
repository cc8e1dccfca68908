"""ALBEF's RandomAugment(2, 7, isPIL=True, augs=[...]) as stateless TF graph ops.

Why not keras.layers.RandAugment (the maintained tf.data-ready option): it evaluates
all 11 of its ops on every image and selects with `where`, which measured 17 img/s on
2 cores at 256 px (vs ~1,000 for the rest of the transform); its op set and magnitude
scale differ from ALBEF's (rotations up to 0.7 * 360 degrees at factor 0.7, colour,
contrast, posterize and solarize, which ALBEF leaves out); and it draws randomness from a
stateful SeedGenerator, so augmentations are not reproducible under a parallel map or
after a resume. The ops below are those of ALBEF's dataset/randaugment.py with its
magnitudes (MAX_LEVEL 10, translate_const 10 px, fill 128); each sampled op is applied
with probability 0.5, and all randomness comes from the per-example `seed`.
"""

import math

import tensorflow as tf

ALBEF_OPS = ('Identity', 'AutoContrast', 'Equalize', 'Brightness', 'Sharpness',
             'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate')
_MAX_LEVEL = 10.0
_FILL = 128.0


def _affine(x, t):
  """t = [a0, a1, a2, b0, b1, b2]: output pixel (x, y) samples input (a.(x,y,1), b.(x,y,1))."""
  t = tf.concat([tf.cast(t, tf.float32), tf.zeros([2])], 0)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=x[None], transforms=t[None], output_shape=tf.shape(x)[:2],
      fill_value=_FILL, interpolation='BILINEAR', fill_mode='CONSTANT')
  return out[0]


def auto_contrast(x):
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1e-6), 1.0)
  offset = tf.where(hi > lo, -lo * scale, 0.0)
  return tf.clip_by_value(x * scale + offset, 0.0, 255.0)


def equalize(x):
  """PIL's (and ALBEF's) histogram equalisation, per channel."""
  xi = tf.cast(tf.round(tf.clip_by_value(x, 0.0, 255.0)), tf.int32)
  hist = tf.reshape(tf.math.bincount(xi + tf.constant([0, 256, 512]), minlength=768,
                                     maxlength=768), [3, 256])  # [channel, level]
  last = 255 - tf.argmax(tf.reverse(hist, [1]) > 0, axis=1, output_type=tf.int32)
  last_count = tf.gather(hist, last, batch_dims=1)
  step = (tf.reduce_sum(hist, 1) - last_count) // 255
  safe = tf.maximum(step, 1)[:, None]
  lut = (tf.cumsum(hist, axis=1) + safe // 2) // safe
  lut = tf.clip_by_value(tf.concat([tf.zeros([3, 1], tf.int32), lut[:, :-1]], 1), 0, 255)
  eq = tf.gather(lut, tf.transpose(xi, [2, 0, 1]), batch_dims=1)  # [3, H, W]
  eq = tf.cast(tf.transpose(eq, [1, 2, 0]), tf.float32)
  return tf.where(step[None, None, :] > 0, eq, x)


def sharpness(x, factor):
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], 'VALID')[0]
  inner = x[1:-1, 1:-1]
  blended = smooth + factor * (inner - smooth)
  return tf.clip_by_value(x + tf.pad(blended - inner, [[1, 1], [1, 1], [0, 0]]), 0., 255.)


def _branches(x, magnitude, sign):
  level = magnitude / _MAX_LEVEL
  enhance = level * 1.8 + 0.1
  shear = sign * level * 0.3
  shift = sign * level * 10.0
  theta = sign * level * 30.0 * math.pi / 180.0
  h = tf.cast(tf.shape(x)[0], tf.float32)
  w = tf.cast(tf.shape(x)[1], tf.float32)
  cx, cy = w / 2.0, h / 2.0
  cos, sin = tf.cos(theta), tf.sin(theta)
  table = {
      'Identity': lambda: x,
      'AutoContrast': lambda: auto_contrast(x),
      'Equalize': lambda: equalize(x),
      'Brightness': lambda: tf.clip_by_value(x * enhance, 0.0, 255.0),
      'Sharpness': lambda: sharpness(x, enhance),
      'ShearX': lambda: _affine(x, [1.0, shear, 0.0, 0.0, 1.0, 0.0]),
      'ShearY': lambda: _affine(x, [1.0, 0.0, 0.0, shear, 1.0, 0.0]),
      'TranslateX': lambda: _affine(x, [1.0, 0.0, shift, 0.0, 1.0, 0.0]),
      'TranslateY': lambda: _affine(x, [1.0, 0.0, 0.0, 0.0, 1.0, shift]),
      'Rotate': lambda: _affine(x, tf.stack([
          cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy])),
  }
  return table


def randaugment(x, seed, num_ops=2, magnitude=7, ops=ALBEF_OPS, prob=0.5):
  """x: float32 [H, W, 3] in [0, 255]; seed: int [2]. Returns the same shape and range.

  The ops run in a tf.while_loop around ONE switch_case (a skipped op is an extra
  identity branch), so the graph holds each op once: tf.data instantiates it faster.
  """
  s_op, s_apply, s_sign = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  choice = tf.random.stateless_uniform([num_ops], s_op, 0, len(ops), dtype=tf.int32)
  applied = tf.random.stateless_uniform([num_ops], s_apply) < prob
  choice = tf.where(applied, choice, len(ops))
  signs = tf.where(tf.random.stateless_uniform([num_ops], s_sign) < 0.5, -1.0, 1.0)
  shape = x.shape

  def body(i, img):
    table = _branches(img, float(magnitude), signs[i])
    branches = [table[name] for name in ops] + [lambda: img]
    return i + 1, tf.ensure_shape(tf.switch_case(choice[i], branches), shape)

  _, x = tf.while_loop(lambda i, _: i < num_ops, body, [tf.constant(0), x])
  return x
