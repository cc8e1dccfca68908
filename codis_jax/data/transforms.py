"""Image decoding, crop and resize (Python, PIL) and the rest of the ALBEF transforms (TF).

Decoding runs in PIL inside tf.numpy_function rather than tf.io.decode_image because a
corrupt image must be flagged and skipped, and a TF decode op can only fail the whole
pipeline; PIL also converts every mode ALBEF's `Image.open(p).convert('RGB')` does
(grayscale, palette, CMYK, first GIF frame). The random resized crop and the resize are
PIL's too, exactly as ALBEF (torchvision on PIL images, bicubic) does them, and cheaper
than TF's antialiased bicubic. PIL releases the GIL while it decodes and resamples, so
the parallel map still scales across cores. Flip, RandAugment and normalisation run in
the TF graph on the fixed-size result.
"""

import io
import math
import warnings

import numpy as np
from PIL import Image
import tensorflow as tf

from codis_jax.data.randaugment import randaugment

# CLIP's mean/std, as ALBEF normalises.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
# Random resized crops keep at least this fraction of the side (sqrt(0.2) ~ 0.447), so
# a JPEG may be decoded at reduced scale while every crop keeps >= image_size pixels.
_MIN_SIDE = 0.44


def _open(data, image_size, train):
  """Encoded bytes -> PIL RGB image. Raises on corrupt data.

  Transparent images are composited on white (ALBEF's convert('RGB') would keep the
  hidden colour, usually black). With image_size > 0, large JPEGs are decoded at a
  reduced DCT scale that still leaves every crop at full resolution.
  """
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # PIL warns on odd EXIF/ICC data; not our concern
    img = Image.open(io.BytesIO(data))
    if image_size and img.format == 'JPEG':
      want = int(image_size / _MIN_SIDE) + 1 if train else image_size
      img.draft('RGB', (want, want))
    img.load()
    if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
      img = img.convert('RGBA')
      white = Image.new('RGBA', img.size, (255, 255, 255, 255))
      img = Image.alpha_composite(white, img)
    return img.convert('RGB')


def decode_image(data, image_size=0, train=False):
  """Encoded bytes -> uint8 [H, W, 3] RGB, at full size (or JPEG-draft size)."""
  return np.asarray(_open(data, image_size, train), dtype=np.uint8)


def crop_box(rng, width, height, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision RandomResizedCrop.get_params: (left, top, right, bottom)."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  in_ratio = width / height  # fallback: the central crop with a clamped ratio
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


def load_pixels(data, image_size, rng=None, scale=(0.2, 1.0)):
  """Encoded bytes -> uint8 [S, S, 3]: ALBEF's RandomResizedCrop(S, scale, bicubic) when
  `rng` (a numpy Generator) is given, else its test-time Resize((S, S), bicubic)."""
  img = _open(data, image_size, train=rng is not None)
  box = crop_box(rng, img.width, img.height, scale) if rng is not None else None
  img = img.resize((image_size, image_size), Image.BICUBIC, box=box)
  return np.asarray(img, dtype=np.uint8)


def normalize(x):
  """[0, 255] -> (x / 255 - mean) / std, float32."""
  return (tf.cast(x, tf.float32) / 255.0 - tf.constant(MEAN)) / tf.constant(STD)


def eval_transform(pixels):
  """uint8 [S, S, 3] (already resized by load_pixels) -> normalised float32."""
  return normalize(pixels)


def train_transform(pixels, seed, randaug_ops=2, randaug_magnitude=7):
  """uint8 [S, S, 3] (already cropped by load_pixels) -> horizontal flip ->
  RandomAugment(randaug_ops, randaug_magnitude) -> normalise; deterministic in `seed`."""
  s_flip, s_aug = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  x = tf.cast(pixels, tf.float32)
  x = tf.cond(tf.random.stateless_uniform([], s_flip) < 0.5,
              lambda: tf.reverse(x, [1]), lambda: x)
  if randaug_ops > 0:
    x = randaugment(x, s_aug, num_ops=randaug_ops, magnitude=randaug_magnitude)
  return normalize(x)
