"""The data of evaluation and fine-tuning, from config.retrieval (via codis_jax.data).

config.retrieval.{train,val,test}_file are ALBEF JSON files relative to the data config's
data_dir, their images relative to config.retrieval.image_root (default: the JSON's
folder); a value that already is a data spec ('prepared:emoji?split=train',
'json:a.json@images') is used as it is. TensorFlow is imported here, lazily.
"""

import logging
import os

import jax

log = logging.getLogger('codis_jax.evaluate')
SPLITS = ('train', 'val', 'test')


def data_config(config):
  """The data package's config named by config.data.name, with config.data's overrides."""
  from codis_jax import loop  # pylint: disable=import-outside-toplevel
  return loop.data_config(config)


def split_spec(config, split):
  """config.retrieval.<split>_file as a data spec ('' when unset)."""
  from codis_jax.data import spec as spec_lib  # pylint: disable=import-outside-toplevel
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; choose from {SPLITS}')
  rc = config.retrieval
  value = rc.get(f'{split}_file', '')
  if not value:
    return ''
  if value.split(':', 1)[0] in spec_lib.KINDS:
    return value
  return f'json:{value}' + (f'@{rc.image_root}' if rc.get('image_root') else '')


def _maybe_prepare_emoji(spec, dc):
  """The emoji test JSON is written by the bundled set's preparation: build it if needed."""
  from codis_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from codis_jax.data import spec as spec_lib  # pylint: disable=import-outside-toplevel
  for s in spec_lib.parse_spec(spec, dc.get('data_dir', '')):
    folder = os.path.dirname(s.location) if s.kind == 'json' else s.location
    if os.path.basename(folder.rstrip('/')) == 'emoji' and not os.path.exists(s.location):
      if dc.get('auto_prepare', True):
        data_lib.ensure_prepared('emoji', os.path.dirname(folder.rstrip('/')))


def load_split(config, split, image_size=None, text_len=None):
  """The retrieval set of config.retrieval.<split>_file (None when unset)."""
  from codis_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  spec = split_spec(config, split)
  if not spec:
    return None
  dc = data_config(config)
  _maybe_prepare_emoji(spec, dc)
  dc.retrieval = spec
  rset = data_lib.load_retrieval_set(dc, image_size or config.model.image_size,
                                     text_len or config.text_len)
  check_vocab(rset.text_ids, config.model.vocab_size)
  n = config.eval.get('max_images', 0)
  if n:
    from codis_jax.evaluate import retrieval  # pylint: disable=import-outside-toplevel
    rset = retrieval.subset(rset, n)
  log.info('%s set %s: %d images, %d texts', split, spec, rset.num_images, rset.num_texts)
  return rset


def check_vocab(text_ids, vocab_size):
  top = int(text_ids.max()) if text_ids.size else 0
  if top >= vocab_size:
    raise ValueError(f'token id {top} is outside the model vocabulary ({vocab_size}): the '
                     'tokenizer (data.tokenizer) does not match config.model.vocab_size')


def eval_sets(config):
  """{split: retrieval set} for the splits of config.eval.splits that are configured."""
  names = [s.strip() for s in config.eval.splits.split(',') if s.strip()]
  sets = {s: load_split(config, s) for s in names}
  sets = {k: v for k, v in sets.items() if v is not None}
  if not sets:
    raise ValueError(f'no evaluation data: config.eval.splits={config.eval.splits!r} names '
                     'no configured config.retrieval.<split>_file')
  return sets


def train_pipeline(config, state=None):
  """The training stream of config.retrieval.train_file (per-host batches)."""
  from codis_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  spec = split_spec(config, 'train')
  if not spec:
    raise ValueError('config.retrieval.train_file is not set: nothing to fine-tune on')
  dc = data_config(config)
  dc.train = spec
  return data_lib.create_pipeline(
      dc, split='train', global_batch_size=config.batch_size,
      image_size=config.model.image_size, text_len=config.text_len, train=True,
      seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), state=state)
