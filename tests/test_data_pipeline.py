"""create_pipeline: batch contract, tokenisation, determinism, resume, per-host sharding."""

import json

import numpy as np
import pytest

from codis_jax.data import create_pipeline, tokenize
from test_data_fixtures import (caption, data_config, take, write_json_set,
                                write_prepared_set, write_wds_set)

S, L = 32, 25


def _pipe(cfg, split='train', batch=4, train=True, seed=0, **kw):
  return create_pipeline(cfg, split=split, global_batch_size=batch, image_size=S, text_len=L,
                         train=train, seed=seed, **kw)


def _keys(batches):
  """Identify pairs by their token ids (every fixture caption is unique)."""
  out = []
  for b in batches:
    valid = b.get('valid', np.ones(len(b['image_id']), bool))
    out += [tuple(r) for r in b['text_ids'][valid]]
  return out


def test_batch_contract(tmp_path):
  cfg = data_config(write_json_set(str(tmp_path), n_images=10, caps_per_image=2))
  it = _pipe(cfg, batch=8)
  assert it.num_examples == 20 and it.steps_per_epoch == 2
  b = next(it)
  assert set(b) == {'image', 'text_ids', 'text_mask', 'image_id'}
  assert b['image'].shape == (8, S, S, 3) and b['image'].dtype == np.uint8
  assert b['text_ids'].shape == (8, L) and b['text_ids'].dtype == np.int32
  assert b['text_mask'].shape == (8, L) and b['text_mask'].dtype == np.int32
  assert b['image_id'].shape == (8,) and b['image_id'].dtype == np.int32
  assert b['image'].std() > 10  # real pixels, not a blank
  assert np.all(b['text_ids'][:, 0] == 101)  # [CLS]
  assert not np.any(b['text_ids'] == 102)  # no [SEP]: ALBEF's format (data.text_sep=False)
  assert np.all((b['text_ids'] == 0) == (b['text_mask'] == 0))
  assert np.all(b['text_mask'][:, :-1] >= b['text_mask'][:, 1:])  # no holes
  # Captions of one image share its image_id.
  ids = {}
  for row, image_id in zip(b['text_ids'], b['image_id']):
    ids.setdefault(image_id, []).append(row)
  assert all(len(v) <= 2 for v in ids.values())


def albef_encoding(hf, text):
  """ALBEF's tokenizer (models/tokenization_bert.py): [CLS] + word pieces, no [SEP],
  truncated to L tokens, then padded."""
  ids = [hf.cls_token_id] + hf(text, add_special_tokens=False)['input_ids'][:L - 1]
  return (np.asarray(ids + [hf.pad_token_id] * (L - len(ids))),
          np.asarray([1] * len(ids) + [0] * (L - len(ids))))


@pytest.mark.parametrize('sep', [False, True])
def test_tokenisation_matches_hf(tmp_path, sep):
  from transformers import BertTokenizerFast
  hf = BertTokenizerFast.from_pretrained(tokenize.default_tokenizer_dir())
  assert len(hf) == 30522
  texts = ['A man riding a wave on top of a surfboard.', "Two dogs' toys -- on/the grass!",
           'grinning face with big eyes', 'a photo of a t-shirt',
           ' '.join(f'word{i}' for i in range(40)), 'Café naïve façade — émoji 😀']

  def ref(text):  # BERT's [CLS] ... [SEP] as HF encodes it, or ALBEF's
    if sep:
      r = hf(text, max_length=L, padding='max_length', truncation=True)
      return np.asarray(r['input_ids']), np.asarray(r['attention_mask'])
    return albef_encoding(hf, text)

  enc = tokenize.TextEncoder(L, sep=sep)
  for t in texts:
    ids, mask = enc(tokenize.pre_caption(t))
    want_ids, want_mask = ref(tokenize.pre_caption(t))
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
  # ... and through the whole pipeline (evaluation order = file order).
  cfg = data_config(write_json_set(str(tmp_path), n_images=6, caps_per_image=1))
  cfg.text_sep = sep
  b = next(_pipe(cfg, batch=6, train=False))
  want = [ref(tokenize.pre_caption(caption(i * 10))) for i in range(6)]
  np.testing.assert_array_equal(b['text_ids'], [w[0] for w in want])
  np.testing.assert_array_equal(b['text_mask'], [w[1] for w in want])


def test_pre_caption_is_albefs():
  assert tokenize.pre_caption("  A man's HAT -- on/the <person>!  ") == 'a mans hat on the person'
  assert tokenize.pre_caption(' '.join(['w'] * 40), 30) == ' '.join(['w'] * 30)
  assert tokenize.pre_caption(' ?!. ') == ''


def test_deterministic_for_a_seed(tmp_path):
  cfg = data_config(write_json_set(str(tmp_path), n_images=12, caps_per_image=1))
  a, b = take(_pipe(cfg), 4), take(_pipe(cfg), 4)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  c = take(_pipe(cfg, seed=1), 3)
  assert _keys(a[:3]) != _keys(c)
  # Each epoch is a different permutation of the same pairs.
  epochs = _keys(a[:3]), _keys(a[3:] + take(_pipe(cfg), 6)[4:])
  assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]


@pytest.mark.parametrize('kind', ['json', 'prepared', 'mixed'])
def test_resume_continues_exactly(tmp_path, kind):
  specs = []
  if kind in ('json', 'mixed'):
    specs.append(write_json_set(str(tmp_path / 'j'), n_images=9, caps_per_image=2))
  if kind in ('prepared', 'mixed'):
    specs.append(write_prepared_set(str(tmp_path / 'p'), n_images=14, bad=('corrupt',)))
  cfg = data_config('+'.join(specs), shuffle_buffer=8)
  full = take(_pipe(cfg), 12)  # crosses an epoch boundary
  first = _pipe(cfg)
  head = take(first, 5)
  state = json.loads(json.dumps(first.get_state()))
  tail = take(_pipe(cfg, state=state), 7)
  for x, y in zip(full, head + tail):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  with pytest.raises(ValueError, match='seed'):
    _pipe(cfg, seed=3, state=state)


@pytest.mark.parametrize('kind', ['json', 'prepared', 'wds_one_shard'])
def test_two_hosts_disjoint_and_complete(tmp_path, kind):
  if kind == 'json':
    spec = write_json_set(str(tmp_path), n_images=8, caps_per_image=2)
  elif kind == 'prepared':
    spec = write_prepared_set(str(tmp_path), n_images=13, shards=3)
  else:  # fewer shards than hosts: every host reads the shard, keeps every 2nd record
    spec = write_wds_set(str(tmp_path), n_per_shard=(11,), with_stats=(True,))
  cfg = data_config(spec, shuffle_buffer=4)
  everything = _keys(list(_pipe(cfg, batch=4, train=False)))
  hosts = []
  for h in range(2):
    it = _pipe(cfg, batch=4, train=False, process_index=h, process_count=2)
    batches = list(it)
    assert len(batches) == it.steps_per_epoch  # same number of batches on both hosts
    assert all(len(b['image_id']) == 2 for b in batches)
    hosts.append(_keys(batches))
  assert not set(hosts[0]) & set(hosts[1])
  assert sorted(hosts[0] + hosts[1]) == sorted(everything)
  assert len(everything) == len(set(everything))
  if kind == 'json':  # training: disjoint per epoch, and together one full epoch
    train = [_keys(take(_pipe(cfg, batch=4, process_index=h, process_count=2), 4))
             for h in range(2)]
    assert not set(train[0]) & set(train[1])
    assert sorted(train[0] + train[1]) == sorted(everything)


def test_eval_pads_and_marks_valid(tmp_path):
  cfg = data_config(write_json_set(str(tmp_path), n_images=7, caps_per_image=1))
  it = _pipe(cfg, batch=4, train=False)
  batches = list(it)
  assert it.steps_per_epoch == 2 and len(batches) == 2
  assert batches[1]['valid'].tolist() == [True, True, True, False]
  assert batches[1]['image'].shape == (4, S, S, 3)
  with pytest.raises(StopIteration):
    next(it)
