"""Decoding to RGB, ALBEF's RandAugment ops (against PIL / numpy references), transforms,
and the model's normalisation of the uint8 pixels they produce."""

import io

import numpy as np
from PIL import Image, ImageOps
import pytest

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
  assert train.shape == (750, 1000, 3)   # halved: still >= 256 / sqrt(0.2 * 3/4) = 662
  assert evaluation.shape == (375, 500, 3)  # quartered: still >= 256
  assert transforms.decode_image(big).shape == (1500, 2000, 3)
  # The smallest crop (area 0.2, aspect 3/4) keeps >= 256 px per side: not halved here
  # (600 px would leave it 232 px, upsampled by the resize).
  side = transforms.decode_image(_encode(Image.fromarray(_photo(1200, 1200)), 'JPEG'),
                                 image_size=256, train=True).shape[0]
  assert side == 1200 and (0.2 * 3 / 4) ** 0.5 * side >= 256


LEVEL = 7 / 10  # ALBEF's magnitude 7 of MAX_LEVEL 10
FACTOR = LEVEL * 1.8 + 0.1  # ALBEF enhance_level_to_args


def _bilinear_warp(img, forward, fill=128.0):
  """numpy reference of cv2.warpAffine(img, forward, INTER_LINEAR, constant fill): each
  output pixel samples the input at inverse(forward) @ (x, y, 1). Also returns where all
  four taps fall inside the image."""
  h, w = img.shape[:2]
  full = np.vstack([np.asarray(forward, np.float64), [0, 0, 1]])
  inv = np.linalg.inv(full)[:2]
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
  sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
  sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
  x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
  fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
  padded = np.pad(img.astype(np.float64), ((2, 2), (2, 2), (0, 0)), constant_values=fill)
  tap = lambda yy, xx: padded[np.clip(yy + 2, 0, h + 3), np.clip(xx + 2, 0, w + 3)]
  out = ((1 - fy) * ((1 - fx) * tap(y0, x0) + fx * tap(y0, x0 + 1))
         + fy * ((1 - fx) * tap(y0 + 1, x0) + fx * tap(y0 + 1, x0 + 1)))
  inside = (x0 >= 0) & (y0 >= 0) & (x0 + 1 < w) & (y0 + 1 < h)
  outside = (x0 + 1 < 0) | (y0 + 1 < 0) | (x0 >= w) | (y0 >= h)
  return out, inside, outside


def test_equalize_autocontrast_brightness_match_pil_and_albef():
  img = np.clip(_photo(40, 40) * 0.5 + 40, 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(ra.equalize(img),
                                np.asarray(ImageOps.equalize(Image.fromarray(img))))
  ref = np.asarray(ImageOps.autocontrast(Image.fromarray(img))).astype(int)
  assert np.abs(ra.auto_contrast(img).astype(int) - ref).max() <= 1
  assert ra.auto_contrast(img).min() == 0 and ra.auto_contrast(img).max() == 255
  flat = np.full((8, 8, 3), 77, np.uint8)  # one level: both leave it alone
  np.testing.assert_array_equal(ra.equalize(flat), flat)
  np.testing.assert_array_equal(ra.auto_contrast(flat), flat)
  # ALBEF's brightness table: (level * factor) clipped, truncated to uint8.
  want = np.floor(np.clip(img.astype(np.float64) * FACTOR, 0, 255)).astype(np.uint8)
  np.testing.assert_array_equal(ra.apply_op(img, 'Brightness', 7.0), want)
  for op in ('Equalize', 'AutoContrast', 'Brightness', 'Sharpness', 'Rotate'):
    out = ra.apply_op(img, op, 7.0)
    assert out.dtype == np.uint8 and out.shape == img.shape, op


def test_sharpness_matches_the_smooth_kernel_blend():
  img = _photo(20, 24)
  k = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float64) / 13
  f = img.astype(np.float64)
  smooth = np.round(sum(k[i, j] * f[i:i + 18, j:j + 22] for i in range(3) for j in range(3)))
  ref = img.astype(np.float64).copy()
  ref[1:-1, 1:-1] = np.clip(smooth + FACTOR * (f[1:-1, 1:-1] - smooth), 0, 255)
  got = ra.apply_op(img, 'Sharpness', 7.0)
  np.testing.assert_array_equal(got[0], img[0])  # the 1-px border is kept
  assert np.abs(got.astype(np.float64) - np.floor(ref)).max() <= 1


def test_geometric_ops_match_a_numpy_bilinear_warp():
  img = _photo(40, 48)
  h, w = img.shape[:2]
  out = ra.apply_op(img, 'TranslateX', 7.0)  # 7 px (translate_const 10 * 0.7), gray fill
  np.testing.assert_array_equal(out[:, :-7], img[:, 7:])
  assert np.all(out[:, -7:] == 128)
  out = ra.apply_op(img, 'TranslateY', 7.0, sign=-1.0)
  np.testing.assert_array_equal(out[7:], img[:-7])
  assert np.all(out[:7] == 128)
  theta = np.deg2rad(21.0)  # 0.7 * 30 degrees about the centre, counter-clockwise
  a, b = np.cos(theta), np.sin(theta)
  cx, cy = w / 2, h / 2
  cases = {'ShearX': [[1, 0.21, 0], [0, 1, 0]], 'ShearY': [[1, 0, 0], [-0.21, 1, 0]],
           'Rotate': [[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]]}
  for name, forward in cases.items():
    sign = -1.0 if name == 'ShearY' else 1.0
    got = ra.apply_op(img, name, 7.0, sign=sign).astype(np.float64)
    want, inside, outside = _bilinear_warp(img, forward)
    assert inside.mean() > 0.5 and outside.any(), name
    assert np.abs(got - want)[inside].max() <= 2, name  # cv2: 1/32-px fixed point
    assert np.all(got[outside] == 128), name


def test_sample_ops_follows_albef_policy():
  rng = np.random.default_rng(0)
  draws = [ra.sample_ops(rng) for _ in range(4000)]
  flat = [op for d in draws for op in d]
  assert abs(len(flat) / 8000 - 0.5) < 0.03  # each of 2 ops kept with p = 0.5
  counts = {name: sum(op == name for op, _ in flat) for name in ra.ALBEF_OPS}
  assert all(abs(c / len(flat) - 0.1) < 0.02 for c in counts.values()), counts
  assert abs(np.mean([s > 0 for _, s in flat]) - 0.5) < 0.03
  assert ra.sample_ops(rng, prob=0.0) == [] and len(ra.sample_ops(rng, prob=1.0)) == 2


def test_randaugment_deterministic_in_rng_and_in_range():
  x = _photo(32, 32)
  outs = [ra.randaugment(x, np.random.default_rng(s)) for s in range(12)]
  np.testing.assert_array_equal(outs[3], ra.randaugment(x, np.random.default_rng(3)))
  assert all(o.shape == (32, 32, 3) and o.dtype == np.uint8 for o in outs)
  changed = sum(not np.array_equal(o, x) for o in outs)
  assert 3 <= changed <= 12  # each of 2 ops applies with p=0.5 (and may be Identity)
  np.testing.assert_array_equal(ra.randaugment(x, np.random.default_rng(1), prob=0.0), x)


def _brightness(img):  # ALBEF's table at magnitude 7, in float64
  return np.floor(np.clip(img.astype(np.float64) * FACTOR, 0, 255)).astype(np.uint8)


def _equalize(img):
  return np.asarray(ImageOps.equalize(Image.fromarray(img)))


def _frequencies(outs, candidates):
  """Which candidate each output equals (exactly one), as frequencies."""
  hits = [[np.array_equal(o, c) for c in candidates.values()] for o in outs]
  assert all(sum(h) == 1 for h in hits)
  return dict(zip(candidates, np.mean(hits, axis=0)))


def _assert_frequencies(got, want, n):
  for k, p in want.items():  # 4 binomial standard errors
    assert abs(got[k] - p) <= 4 * np.sqrt(p * (1 - p) / n), (k, got[k], p)


def test_randaugment_composes_two_uniform_ops():
  """Two ops drawn uniformly with replacement, the second applied to the first's output:
  with {Brightness, Equalize} (which do not commute) each of the 4 ordered compositions,
  from PIL / numpy, 1/4 of the time. (Which draw goes first is not observable: the two
  draws are alike.)"""
  x, n, rng = _photo(32, 32), 2000, np.random.default_rng(0)
  b, e = _brightness, _equalize
  candidates = {'BB': b(b(x)), 'EE': e(e(x)), 'B then E': e(b(x)), 'E then B': b(e(x))}
  outs = [ra.randaugment(x, rng, ops=('Brightness', 'Equalize'), prob=1.0)
          for _ in range(n)]
  _assert_frequencies(_frequencies(outs, candidates), dict.fromkeys(candidates, 0.25), n)


def test_randaugment_keeps_each_op_with_probability_one_half():
  """ALBEF's RandomAugment(2, 7): each op applied with p = 0.5, so 0, 1 or 2 of them with
  p = 1/4, 1/2, 1/4."""
  x, n, rng = _photo(32, 32), 2000, np.random.default_rng(0)
  candidates = {0: x, 1: _brightness(x), 2: _brightness(_brightness(x))}
  outs = [ra.randaugment(x, rng, ops=('Brightness',)) for _ in range(n)]
  _assert_frequencies(_frequencies(outs, candidates), {0: 0.25, 1: 0.5, 2: 0.25}, n)


def _torchvision_crops(rng, width, height, n, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
  """n draws of torchvision's RandomResizedCrop.get_params, from its documented algorithm:
  up to 10 tries of area ~ U(scale) x image area, log aspect ~ U(log ratio), sides
  rounded, kept if they fit, offsets uniform; else the central crop, ratio clamped.
  -> (left, top, w, h) int arrays."""
  w, h, left, top = (np.zeros(n, np.int64) for _ in range(4))
  done = np.zeros(n, bool)
  for _ in range(10):
    area = width * height * rng.uniform(scale[0], scale[1], n)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), n))
    tw, th = np.rint(np.sqrt(area * aspect)), np.rint(np.sqrt(area / aspect))  # half-even
    ok = ~done & (tw > 0) & (tw <= width) & (th > 0) & (th <= height)
    w[ok], h[ok] = tw[ok], th[ok]
    left[ok] = np.floor(rng.uniform(size=n) * (width - tw + 1))[ok]
    top[ok] = np.floor(rng.uniform(size=n) * (height - th + 1))[ok]
    done |= ok
  fw, fh = width, height
  if width / height < ratio[0]:
    fh = round(width / ratio[0])
  elif width / height > ratio[1]:
    fw = round(height * ratio[1])
  w[~done], h[~done], left[~done], top[~done] = fw, fh, (width - fw) // 2, (height - fh) // 2
  return left, top, w, h


def _assert_same_distribution(name, got, ref):
  """got: n draws, ref: m >> n draws of the reference. Means within 4 standard errors, and
  at the reference's deciles/quartiles, P(x <= q) within 4 binomial standard errors."""
  n, m = len(got), len(ref)
  se = np.sqrt(ref.var() * (1 / n + 1 / m))
  assert abs(got.mean() - ref.mean()) <= 4 * se, (name, got.mean(), ref.mean(), se)
  for q in np.quantile(ref, (0.1, 0.25, 0.5, 0.75, 0.9)):
    p, p_got = np.mean(ref <= q), np.mean(got <= q)
    assert abs(p_got - p) <= 4 * np.sqrt(p * (1 - p) * (1 / n + 1 / m)), (name, q, p_got, p)


@pytest.mark.parametrize('width,height', [(64, 48), (30, 100)])
def test_crop_box_follows_torchvision(width, height):
  """2000 boxes against 200000 of the reference above. 64x48: every draw fits within 10
  tries; 30x100: ~21% take the 30x40 fallback."""
  rng = np.random.default_rng(0)
  boxes = np.array([transforms.crop_box(rng, width, height) for _ in range(2000)])
  left, top, right, bottom = boxes.T
  w, h = right - left, bottom - top
  assert np.all((0 <= left) & (left < right) & (right <= width))
  assert np.all((0 <= top) & (top < bottom) & (bottom <= height))
  assert np.all(w * h >= 0.2 * 0.9 * width * height)  # scale >= 0.2, less rounding
  assert np.all((0.7 <= w / h) & (w / h <= 1.4))  # 3/4 and 4/3, give or take rounding
  ref_left, ref_top, ref_w, ref_h = _torchvision_crops(np.random.default_rng(1), width,
                                                       height, 200_000)
  _assert_same_distribution('area', w * h / (width * height),
                            ref_w * ref_h / (width * height))
  _assert_same_distribution('log aspect', np.log(w / h), np.log(ref_w / ref_h))
  # Offsets: where the box can move, its position over the free span.
  for name, off, free, ref_off, ref_free in (('left', left, width - w, ref_left, width - ref_w),
                                            ('top', top, height - h, ref_top, height - ref_h)):
    _assert_same_distribution(name, off[free > 0] / free[free > 0],
                              ref_off[ref_free > 0] / ref_free[ref_free > 0])


def test_crop_box_falls_back_to_the_central_crop():
  # No crop of a 1000x10 strip has an allowed ratio: the clamped centre crop.
  rng = np.random.default_rng(0)
  assert transforms.crop_box(rng, 1000, 10) == (493, 0, 506, 10)  # w = round(10 * 4/3)
  assert transforms.crop_box(rng, 10, 1000) == (0, 493, 10, 506)  # h = round(10 * 4/3)


def test_load_pixels_and_train_pixels():
  data = _encode(Image.fromarray(_photo(48, 64)), 'PNG')
  ref = np.asarray(Image.fromarray(_photo(48, 64)).resize((32, 32), Image.BICUBIC))
  np.testing.assert_array_equal(transforms.load_pixels(data, 32), ref)  # ALBEF's test resize
  a = transforms.load_pixels(data, 32, np.random.default_rng(1))
  b = transforms.load_pixels(data, 32, np.random.default_rng(1))
  c = transforms.load_pixels(data, 32, np.random.default_rng(2))
  assert a.shape == (32, 32, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
  # Without RandAugment: the same crop as load_pixels from the same seed, mirrored or not.
  flips = 0
  for s in range(20):
    crop = transforms.load_pixels(data, 32, np.random.default_rng(s))
    got = transforms.train_pixels(data, 32, np.random.default_rng(s), randaug_ops=0)
    assert got.dtype == np.uint8
    flipped = np.array_equal(got, crop[:, ::-1])
    assert flipped or np.array_equal(got, crop), s
    flips += flipped
  assert 4 <= flips <= 16
  x = transforms.train_pixels(data, 32, np.random.default_rng(5))
  np.testing.assert_array_equal(x, transforms.train_pixels(data, 32, np.random.default_rng(5)))
  assert x.shape == (32, 32, 3) and x.dtype == np.uint8


def test_the_model_normalises_uint8_pixels_as_albef():
  """ToTensor + Normalize(CLIP mean/std), in numpy, against the model's first op."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from configs import pretrain  # pylint: disable=import-outside-toplevel
  from codis_jax.models import codis, vit  # pylint: disable=import-outside-toplevel
  mean = np.array([0.48145466, 0.4578275, 0.40821073])
  std = np.array([0.26862954, 0.26130258, 0.27577711])
  pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
  want = (pixels / 255.0 - mean) / std
  np.testing.assert_allclose(np.asarray(vit.normalize_pixels(jnp.asarray(pixels))), want,
                             rtol=1e-6, atol=1e-6)
  floats = want.astype(np.float32)
  assert vit.normalize_pixels(floats) is floats  # floats are taken as normalised
  with pytest.raises(ValueError, match='uint8 pixels or normalised floats'):
    vit.normalize_pixels(pixels.astype(np.int32))
  m = pretrain.get_config('tiny').model
  model = codis.build_model(m, train=False)
  params = model.init(jax.random.key(0), jnp.zeros((1, m.image_size, m.image_size, 3)),
                      jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))['params']
  pixels = np.random.default_rng(1).integers(0, 256, (2, m.image_size, m.image_size, 3))
  pixels = pixels.astype(np.uint8)
  enc = lambda x: model.apply({'params': params}, x, method=codis.CODIS.encode_image)[1]
  np.testing.assert_allclose(np.asarray(enc(pixels)),
                             np.asarray(enc(((pixels / 255.0 - mean) / std).astype(np.float32))),
                             rtol=1e-5, atol=1e-5)
