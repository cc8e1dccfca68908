"""The data spec syntax: one string names the sources of a split.

    SPEC   := SOURCE ('+' SOURCE)*
    SOURCE := KIND ':' LOCATION ['@' ROOT] ['?' KEY '=' VALUE ('&' KEY '=' VALUE)*]

Kinds:
  json:FILE[@IMAGE_ROOT]        ALBEF annotation list [{"image", "caption": str | [str]}];
                                the root defaults to the JSON file's folder
  prepared:NAME_OR_DIR          the project's TFRecord format (see records.py); a bare
                                name is looked up under data_dir. Option: split=
  wds:DIR_OR_GLOB               webdataset tar shards (img2dataset's default output)
  i2d_tfrecord:DIR_OR_GLOB      img2dataset's TFRecord output
  tfds:NAME                     a prepared TFDS dataset (never downloaded). Options:
                                split=, data_dir=, image_key=, caption_key=, id_key=

Relative paths resolve against the config's data_dir; `gs://` and other tf.io.gfile
paths work everywhere. '+', '@', '?' and '&' cannot appear inside paths.
Example: 'json:coco.json@coco/images+json:vg.json@vg/images+prepared:emoji?split=train'
"""

import dataclasses
import os

from codis_jax.data.errors import DataError

KINDS = ('json', 'prepared', 'wds', 'i2d_tfrecord', 'tfds')
_OPTIONS = {
    'json': (),
    'prepared': ('split',),
    'wds': (),
    'i2d_tfrecord': (),
    'tfds': ('split', 'data_dir', 'image_key', 'caption_key', 'id_key'),
}


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  kind: str
  location: str
  root: str = ''
  options: tuple = ()  # sorted (key, value) pairs, hashable

  def option(self, key, default=''):
    return dict(self.options).get(key, default)


def default_data_dir():
  """$CODIS_DATA_DIR, else ~/.cache/codis_jax."""
  return os.environ.get('CODIS_DATA_DIR') or os.path.expanduser('~/.cache/codis_jax')


def resolve_path(path, data_dir):
  """Absolute, `~`-expanded, or joined to data_dir; URLs (gs://...) are kept."""
  if '://' in path:
    return path
  path = os.path.expanduser(path)
  if os.path.isabs(path):
    return path
  return os.path.join(data_dir or default_data_dir(), path)


def parse_spec(spec, data_dir=''):
  """Parses SPEC into a list of SourceSpec, resolving paths; DataError if malformed."""
  if not isinstance(spec, str) or not spec.strip():
    raise DataError(f'empty data spec {spec!r}; expected e.g. "json:/a.json@/images"')
  out = []
  for part in spec.split('+'):
    part = part.strip()
    kind, sep, rest = part.partition(':')
    if not sep or kind not in KINDS:
      raise DataError(f'data spec source {part!r} in {spec!r}: expected KIND:LOCATION '
                      f'with KIND one of {", ".join(KINDS)}')
    rest, _, query = rest.partition('?')
    location, _, root = rest.partition('@')
    if not location:
      raise DataError(f'data spec source {part!r}: empty location')
    options = {}
    for item in filter(None, query.split('&')):
      key, eq, value = item.partition('=')
      if not eq or key not in _OPTIONS[kind]:
        raise DataError(f'data spec source {part!r}: bad option {item!r}; '
                        f'{kind} takes {list(_OPTIONS[kind]) or "no options"}')
      options[key] = value
    if root and kind != 'json':
      raise DataError(f'data spec source {part!r}: only json sources take @IMAGE_ROOT')
    if kind != 'tfds':  # a TFDS location is a dataset name, not a path
      location = resolve_path(location, data_dir)
    if kind == 'json':
      root = resolve_path(root, data_dir) if root else os.path.dirname(location)
    if 'data_dir' in options:
      options['data_dir'] = resolve_path(options['data_dir'], data_dir)
    out.append(SourceSpec(kind, location, root, tuple(sorted(options.items()))))
  return out
