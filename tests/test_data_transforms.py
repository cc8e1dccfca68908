"""Decoding to RGB, ALBEF's RandAugment ops (against PIL / numpy references), transforms."""

import io

import numpy as np
from PIL import Image, ImageOps
import pytest
import tensorflow as tf

from codis_jax.data import randaugment as ra
from codis_jax.data import transforms


def _encode(img, fmt, **kw):
  out = io.BytesIO()
  img.save(out, format=fmt, **kw)
  return out.getvalue()


def _photo(h=48, w=64, seed=0):
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


def test_decode_every_mode_to_rgb():
  rgb = Image.fromarray(_photo())
  cases = {
      'jpeg_rgb': _encode(rgb, 'JPEG'),
      'jpeg_gray': _encode(rgb.convert('L'), 'JPEG'),
      'jpeg_cmyk': _encode(rgb.convert('CMYK'), 'JPEG'),
      'png_rgba': _encode(rgb.convert('RGBA'), 'PNG'),
      'png_la': _encode(rgb.convert('LA'), 'PNG'),
      'png_palette': _encode(rgb.convert('P'), 'PNG'),
      'png_1bit': _encode(rgb.convert('1'), 'PNG'),
      'gif': _encode(rgb.convert('P'), 'GIF'),
      'webp': _encode(rgb, 'WEBP'),
      'bmp': _encode(rgb, 'BMP'),
  }
  for name, data in cases.items():
    arr = transforms.decode_image(data)
    assert arr.shape == (48, 64, 3) and arr.dtype == np.uint8, name
  gray = transforms.decode_image(cases['jpeg_gray'])
  assert np.array_equal(gray[..., 0], gray[..., 2])


def test_decode_transparency_on_white_and_first_gif_frame():
  rgba = np.zeros((10, 12, 4), np.uint8)
  rgba[:5, :, :] = (200, 10, 10, 255)  # top half opaque red, bottom transparent black
  arr = transforms.decode_image(_encode(Image.fromarray(rgba, 'RGBA'), 'PNG'))
  assert arr[0, 0].tolist() == [200, 10, 10] and arr[9, 0].tolist() == [255, 255, 255]
  frames = [Image.new('RGB', (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
  out = io.BytesIO()
  frames[0].save(out, format='GIF', save_all=True, append_images=frames[1:])
  first = transforms.decode_image(out.getvalue())
  assert first.shape == (8, 8, 3) and first[0, 0, 0] > 200 and first[0, 0, 2] < 50


def test_decode_rejects_corrupt_and_drafts_large_jpegs():
  for data in (b'', b'not an image', _encode(Image.fromarray(_photo()), 'JPEG')[:200]):
    with pytest.raises(Exception):
      transforms.decode_image(data)
  big = _encode(Image.fromarray(_photo(1500, 2000)), 'JPEG')
  train = transforms.decode_image(big, image_size=256, train=True)
  evaluation = transforms.decode_image(big, image_size=256, train=False)
  assert train.shape == (750, 1000, 3)   # halved: still >= 256 / 0.44 on both sides
  assert evaluation.shape == (375, 500, 3)  # quartered: still >= 256
  assert transforms.decode_image(big).shape == (1500, 2000, 3)


def _tf(x):
  return tf.constant(x, tf.float32)


def test_equalize_and_autocontrast_match_pil():
  img = np.clip(_photo(40, 40) * 0.5 + 40, 0, 255).astype(np.uint8)
  ours = ra.equalize(_tf(img)).numpy()
  np.testing.assert_array_equal(ours, np.asarray(ImageOps.equalize(Image.fromarray(img))))
  ours = ra.auto_contrast(_tf(img)).numpy()
  ref = np.asarray(ImageOps.autocontrast(Image.fromarray(img)))
  assert np.abs(ours - ref).max() <= 1.0
  flat = np.full((8, 8, 3), 77, np.uint8)  # one level: both leave it alone
  np.testing.assert_array_equal(ra.equalize(_tf(flat)).numpy(), flat)
  np.testing.assert_array_equal(ra.auto_contrast(_tf(flat)).numpy(), flat)


def test_sharpness_brightness_and_affine_match_albef_formulas():
  img = _photo(20, 24).astype(np.float32)
  level = 7 / 10
  factor = level * 1.8 + 0.1  # ALBEF enhance_level_to_args
  k = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13
  smooth = sum(k[i, j] * img[i:i + 18, j:j + 22] for i in range(3) for j in range(3))
  ref = img.copy()
  ref[1:-1, 1:-1] = np.clip(smooth + factor * (img[1:-1, 1:-1] - smooth), 0, 255)
  np.testing.assert_allclose(ra.sharpness(_tf(img), factor).numpy(), ref, atol=1e-3)
  table = ra._branches(_tf(img), 7.0, tf.constant(1.0))
  np.testing.assert_allclose(table['Brightness']().numpy(), np.clip(img * factor, 0, 255),
                             rtol=1e-6)
  shifted = table['TranslateX']().numpy()  # 7 px (translate_const 10 * 0.7), gray fill
  np.testing.assert_allclose(shifted[:, :-7], img[:, 7:], atol=1e-3)
  assert np.all(shifted[:, -7:] == 128)
  rotated = table['Rotate']().numpy()  # 21 degrees about the centre
  assert np.all(rotated[0, 0] == 128) and np.abs(rotated[10, 12] - img[10, 12]).max() < 30


def test_randaugment_deterministic_in_seed_and_in_range():
  x = _tf(_photo(32, 32))
  outs = [ra.randaugment(x, tf.constant([0, s], tf.int64)).numpy() for s in range(12)]
  again = ra.randaugment(x, tf.constant([0, 3], tf.int64)).numpy()
  np.testing.assert_array_equal(outs[3], again)
  assert all(o.shape == (32, 32, 3) and o.min() >= 0 and o.max() <= 255 for o in outs)
  changed = sum(not np.array_equal(o, x.numpy()) for o in outs)
  assert 3 <= changed <= 12  # each of 2 ops applies with p=0.5 (and may be Identity)
  none = ra.randaugment(x, tf.constant([0, 1], tf.int64), prob=0.0).numpy()
  np.testing.assert_array_equal(none, x.numpy())


def test_crop_box_follows_torchvision():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, right, bottom = transforms.crop_box(rng, 64, 48)
    w, h = right - left, bottom - top
    assert 0 <= left < right <= 64 and 0 <= top < bottom <= 48
    assert 0.2 * 0.9 <= w * h / (64 * 48) <= 1.0 and 0.7 <= w / h <= 1.4
  # No crop of a 1000x10 strip has an allowed ratio: the clamped centre crop.
  assert transforms.crop_box(rng, 1000, 10) == (493, 0, 506, 10)  # w = round(10 * 4/3)


def test_load_pixels_and_transforms():
  data = _encode(Image.fromarray(_photo(48, 64)), 'PNG')
  ref = np.asarray(Image.fromarray(_photo(48, 64)).resize((32, 32), Image.BICUBIC))
  np.testing.assert_array_equal(transforms.load_pixels(data, 32), ref)  # ALBEF's test resize
  a = transforms.load_pixels(data, 32, np.random.default_rng(1))
  b = transforms.load_pixels(data, 32, np.random.default_rng(1))
  c = transforms.load_pixels(data, 32, np.random.default_rng(2))
  assert a.shape == (32, 32, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
  pixels = tf.constant(a)
  x = transforms.train_transform(pixels, tf.constant([1, 2], tf.int64)).numpy()
  y = transforms.train_transform(pixels, tf.constant([1, 2], tf.int64)).numpy()
  z = transforms.train_transform(pixels, tf.constant([1, 3], tf.int64)).numpy()
  assert x.shape == (32, 32, 3) and x.dtype == np.float32
  np.testing.assert_array_equal(x, y)
  assert not np.array_equal(x, z)
  flat = tf.fill([16, 16, 3], tf.constant(128, tf.uint8))
  out = transforms.eval_transform(flat).numpy()
  expected = (128 / 255 - np.asarray(transforms.MEAN)) / np.asarray(transforms.STD)
  np.testing.assert_allclose(out, np.broadcast_to(expected, (16, 16, 3)), atol=1e-5)
