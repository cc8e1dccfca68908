"""ALBEF's image transforms up to ToTensor, on uint8: decode, crop and resize (PIL), flip
and RandAugment (OpenCV). Normalisation happens on the device, in the model's first op
(`models.vit.normalize_pixels`): batches travel as uint8, a quarter of float32's bytes.

Decoding runs in PIL inside tf.numpy_function rather than tf.io.decode_image because a
corrupt image must be flagged and skipped, and a TF decode op can only fail the whole
pipeline; PIL also converts every mode ALBEF's `Image.open(p).convert('RGB')` does
(grayscale, palette, CMYK, first GIF frame). The random resized crop and the resize are
PIL's too, exactly as ALBEF (torchvision on PIL images, bicubic) does them, and cheaper
than TF's antialiased bicubic. PIL and OpenCV release the GIL while they work, so the
parallel map scales across cores.
"""

import io
import math
import warnings

import cv2
import numpy as np
from PIL import Image

from codis_jax.data.randaugment import randaugment
_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect range


def _open(data, image_size, min_side=1.0):
  """Encoded bytes -> PIL RGB image. Raises on corrupt data.

  Transparent images are composited on white (ALBEF's convert('RGB') would keep the
  hidden colour, usually black). With image_size > 0, large JPEGs are decoded at a
  reduced DCT scale (PIL's draft: 1/2, 1/4 or 1/8) that still leaves the resize a source
  of >= image_size pixels per side: min_side is the smallest crop side as a fraction of
  the image's shorter side (1 for the test-time resize).
  """
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # PIL warns on odd EXIF/ICC data; not our concern
    img = Image.open(io.BytesIO(data))
    if image_size and img.format == 'JPEG':
      img.draft('RGB', (math.ceil(image_size / min_side),) * 2)
    img.load()
    if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
      img = img.convert('RGBA')
      white = Image.new('RGBA', img.size, (255, 255, 255, 255))
      img = Image.alpha_composite(white, img)
    return img.convert('RGB')


def decode_image(data, image_size=0, train=False):
  """Encoded bytes -> uint8 [H, W, 3] RGB, at full size (or JPEG-draft size)."""
  return np.asarray(_open(data, image_size, _min_side(train)), dtype=np.uint8)


def _min_side(train, scale_min=0.2):
  """A crop of area fraction >= scale_min and aspect >= 3/4 has sides of at least
  sqrt(scale_min * 3/4) of the shorter image side (0.387 at ALBEF's 0.2)."""
  return math.sqrt(scale_min * _RATIO[0]) if train else 1.0


def crop_box(rng, width, height, scale=(0.2, 1.0), ratio=_RATIO):
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
  img = _open(data, image_size, _min_side(rng is not None, scale[0]))
  box = crop_box(rng, img.width, img.height, scale) if rng is not None else None
  img = img.resize((image_size, image_size), Image.BICUBIC, box=box)
  return np.asarray(img, dtype=np.uint8)


def train_pixels(data, image_size, rng, scale=(0.2, 1.0), randaug_ops=2,
                 randaug_magnitude=7):
  """Encoded bytes -> uint8 [S, S, 3]: ALBEF's pretraining transform before ToTensor,
  RandomResizedCrop(S, scale, bicubic) -> horizontal flip (p = 0.5) ->
  RandomAugment(randaug_ops, randaug_magnitude). rng: numpy Generator, the only source of
  randomness."""
  pixels = load_pixels(data, image_size, rng, scale)
  if rng.random() < 0.5:
    pixels = cv2.flip(pixels, 1)
  if randaug_ops > 0:
    pixels = randaugment(pixels, rng, num_ops=randaug_ops, magnitude=randaug_magnitude)
  return pixels
