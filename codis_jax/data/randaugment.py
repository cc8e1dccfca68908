"""ALBEF's RandomAugment(2, 7, isPIL=True, augs=[...]) on uint8 [H, W, 3] arrays, with OpenCV.

ALBEF applies its RandomAugment to a uint8 array with OpenCV and hands uint8 on to
ToTensor; so does this module, op by op with ALBEF's magnitudes (MAX_LEVEL 10,
translate_const 10 px, fill 128), each sampled op applied with probability 0.5 and the
sign of the geometric ones random. OpenCV provides the primitives (LUTs, filter2D,
warpAffine, calcHist); this file only composes them. All randomness comes from the numpy
Generator passed in, so an augmentation is reproducible from (seed, epoch, position).

Why OpenCV and not TF graph ops or keras.layers.RandAugment: the same ops written as TF
float32 graph ops (this project's earlier version) cost ~1.8 ms per affine op and ~4.6 ms
per Equalize on a 256-px image; OpenCV's uint8 kernels take 0.05-0.3 ms. Keras'
RandAugment runs all 11 of its ops on every image (17 images/s on 2 cores), has a
different op set and scale, and draws from a stateful generator.
"""

import cv2
import numpy as np

ALBEF_OPS = ('Identity', 'AutoContrast', 'Equalize', 'Brightness', 'Sharpness',
             'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate')
_MAX_LEVEL = 10.0
_FILL = (128, 128, 128)
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0  # PIL's SMOOTH
_LEVELS = np.arange(256, dtype=np.float32)

# tf.data already runs one image per thread; OpenCV's own pool on top oversubscribes.
cv2.setNumThreads(1)


def _apply_lut(img, table):
  """img: uint8 [H, W, 3]; table: float [3, 256] per channel -> uint8 [H, W, 3]."""
  lut = np.clip(table, 0, 255).astype(np.uint8)  # truncates, as ALBEF's astype(uint8)
  return cv2.LUT(img, np.ascontiguousarray(lut.T)[:, None, :])


def _channel_min_max(img):
  pairs = [cv2.minMaxLoc(c)[:2] for c in cv2.split(img)]
  return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def auto_contrast(img):
  """uint8 [H, W, 3] -> uint8: each channel stretched from [min, max] to [0, 255]."""
  lo, hi = (v[:, None] for v in _channel_min_max(img))  # [3, 1] each
  scale = np.where(hi > lo, 255.0 / np.maximum(hi - lo, 1), 1.0)
  offset = np.where(hi > lo, -lo * scale, 0.0)
  return _apply_lut(img, _LEVELS[None] * scale + offset)


def equalize(img):
  """uint8 [H, W, 3] -> uint8: PIL's (and ALBEF's) histogram equalisation per channel."""
  tables = []
  for c in range(3):
    hist = cv2.calcHist([img], [c], None, [256], [0, 256]).reshape(256).astype(np.int64)
    nonzero = hist[hist > 0]
    step = int(nonzero[:-1].sum()) // 255  # every count but the top level's
    if step == 0:  # one level (or nearly): PIL leaves the channel as it is
      tables.append(_LEVELS)
      continue
    shifted = np.concatenate([[step // 2], hist[:-1]])
    tables.append(np.cumsum(shifted) // step)
  return _apply_lut(img, np.stack(tables))


def brightness(img, factor):
  """uint8 [H, W, 3] -> uint8: pixels times `factor`, clipped."""
  return _apply_lut(img, np.broadcast_to(_LEVELS * factor, (3, 256)))


def sharpness(img, factor):
  """uint8 [H, W, 3] -> uint8: blend with PIL's SMOOTH filter; the 1-px border is kept."""
  smooth = cv2.filter2D(img, -1, _SMOOTH)
  out = img.copy()
  blend = smooth[1:-1, 1:-1] + factor * (img[1:-1, 1:-1].astype(np.float32) - smooth[1:-1, 1:-1])
  out[1:-1, 1:-1] = np.clip(blend, 0, 255).astype(np.uint8)
  return out


def affine(img, matrix):
  """uint8 [H, W, 3] -> uint8: cv2.warpAffine with the forward 2x3 `matrix`, bilinear,
  gray fill (ALBEF's shear, translate and rotate)."""
  h, w = img.shape[:2]
  return cv2.warpAffine(img, np.asarray(matrix, np.float32), (w, h), flags=cv2.INTER_LINEAR,
                        borderValue=_FILL)


def _matrix(name, level, sign, width, height):
  """ALBEF's forward matrices; `level` = magnitude / 10, `sign` in {-1, 1}."""
  if name == 'Rotate':  # about the image centre, up to 30 degrees at level 1
    return cv2.getRotationMatrix2D((width / 2, height / 2), sign * level * 30.0, 1.0)
  shear, shift = sign * level * 0.3, sign * level * 10.0
  return {'ShearX': [[1, shear, 0], [0, 1, 0]], 'ShearY': [[1, 0, 0], [shear, 1, 0]],
          'TranslateX': [[1, 0, -shift], [0, 1, 0]],
          'TranslateY': [[1, 0, 0], [0, 1, -shift]]}[name]


def apply_op(img, name, magnitude, sign=1.0):
  """One ALBEF op at `magnitude` (0-10) on uint8 [H, W, 3]; `sign` flips the geometric ones."""
  level = magnitude / _MAX_LEVEL
  if name == 'Identity':
    return img
  if name == 'AutoContrast':
    return auto_contrast(img)
  if name == 'Equalize':
    return equalize(img)
  if name == 'Brightness':
    return brightness(img, level * 1.8 + 0.1)
  if name == 'Sharpness':
    return sharpness(img, level * 1.8 + 0.1)
  h, w = img.shape[:2]
  return affine(img, _matrix(name, level, sign, w, h))


def sample_ops(rng, num_ops=2, ops=ALBEF_OPS, prob=0.5):
  """[(op name, sign)] to apply, in order: `num_ops` draws with replacement, each kept
  with probability `prob`. rng: numpy Generator."""
  choice = rng.integers(0, len(ops), num_ops)
  applied = rng.random(num_ops) < prob
  signs = np.where(rng.random(num_ops) < 0.5, -1.0, 1.0)
  return [(ops[c], s) for c, a, s in zip(choice, applied, signs) if a]


def randaugment(img, rng, num_ops=2, magnitude=7, ops=ALBEF_OPS, prob=0.5):
  """img: uint8 [H, W, 3]; rng: numpy Generator. Returns uint8 [H, W, 3]."""
  for name, sign in sample_ops(rng, num_ops, ops, prob):
    img = apply_op(img, name, float(magnitude), sign)
  return img
