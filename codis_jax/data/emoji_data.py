"""The bundled emoji image-caption set: Noto Color Emoji glyphs + the `emoji` package's names.

Every fully-qualified emoji that the installed font draws as ONE glyph (newer ones it
lacks come out as several glyphs or .notdef and are dropped) is rendered with Pillow at
the font's bitmap size 109 onto a 136x128 transparent canvas, composited on white.
Caption: its English name with colons and underscores removed
(':waving_hand_medium_skin_tone:' -> 'waving hand medium skin tone').

Split (fixed, deterministic): base emoji (skin-tone modifiers removed) are ordered by
the SHA-1 of their code points, and the first TEST_BASES whose base glyph renders form
the test split, as their base image only; their skin-tone variants are left out of
both sides, so no emoji, in any skin tone, is on both sides and test captions are
distinct (chance R@1 = 1/TEST_BASES). Everything else is train.
"""

import hashlib
import io
import os

from codis_jax.data.errors import DataError

FONT = '/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf'
FONT_SIZE = 109          # the only bitmap strike in Noto Color Emoji
CANVAS = (136, 128)
TEST_BASES = 290
_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))


def caption_of(name):
  return ' '.join(name.strip(':').replace('_', ' ').split())


def base_of(e):
  return ''.join(ch for ch in e if ch not in _TONES)


def _load_font(path=FONT):
  from PIL import ImageFont, features  # pylint: disable=import-outside-toplevel
  if not os.path.exists(path):
    raise DataError(f'emoji font not found: {path} (Debian package fonts-noto-color-emoji)')
  if not features.check('raqm'):  # without it ZWJ sequences and flags fall apart
    raise DataError('Pillow has no raqm text layout (needs the Debian package libfribidi0)')
  return ImageFont.truetype(path, FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)


def _renderable(e, font, cmap):
  core = e.replace('\ufe0f', '')
  if len(core) == 1 and ord(core) not in cmap:
    return False
  return font.getlength(e) <= CANVAS[0] + 4  # one glyph, not a row of pieces


def render(e, font):
  """PNG bytes of `e` on white, CANVAS-sized RGB."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  glyph = Image.new('RGBA', CANVAS, (0, 0, 0, 0))
  ImageDraw.Draw(glyph).text((0, 0), e, font=font, embedded_color=True)
  image = Image.new('RGBA', CANVAS, (255, 255, 255, 255))
  image.alpha_composite(glyph)
  out = io.BytesIO()
  image.convert('RGB').save(out, format='PNG', optimize=False)
  return out.getvalue()


def select(font_path=FONT):
  """-> (train, test, counts); train/test are lists of (emoji, caption, image_id)."""
  import emoji  # pylint: disable=import-outside-toplevel
  from fontTools.ttLib import TTFont  # pylint: disable=import-outside-toplevel
  font = _load_font(font_path)
  cmap = TTFont(font_path, lazy=True).getBestCmap()
  qualified = emoji.STATUS['fully_qualified']
  all_fq = [e for e, v in emoji.EMOJI_DATA.items() if v['status'] == qualified]
  kept = [e for e in all_fq if _renderable(e, font, cmap)]
  ids = {e: i for i, e in enumerate(kept)}
  names = {e: caption_of(emoji.EMOJI_DATA[e]['en']) for e in kept}
  bases = sorted({base_of(e) for e in kept},
                 key=lambda b: hashlib.sha1(b.encode('utf-8')).hexdigest())
  test_bases = [b for b in bases if b in ids][:TEST_BASES]
  held = set(test_bases)
  train = [(e, names[e], ids[e]) for e in kept if base_of(e) not in held]
  test = [(b, names[b], ids[b]) for b in test_bases]
  counts = {'fully_qualified': len(all_fq), 'renderable': len(kept), 'bases': len(bases),
            'train_pairs': len(train), 'test_pairs': len(test),
            'held_out_variants': len(kept) - len(train) - len(test)}
  return train, test, counts


def examples(items, font_path=FONT):
  """(emoji, caption, id) -> (png bytes, [caption], image_id, label=-1) for records.py."""
  font = _load_font(font_path)
  for e, caption, image_id in items:
    yield render(e, font), [caption], image_id, -1
