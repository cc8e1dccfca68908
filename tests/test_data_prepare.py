"""The bundled data sets: emoji (Noto Color Emoji + emoji names) and Fashion-MNIST."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from codis_jax.data import (DataError, create_pipeline, emoji_data, ensure_prepared,
                            get_data_config, load_retrieval_set, records, tokenize)
from test_data_fixtures import prepared_bundled


def _read_split(path, split):
  info = records.read_info(path)
  files = [os.path.join(path, f) for f in info['splits'][split]['shards']]
  return list(tf.data.TFRecordDataset(files).map(records.parse_example).as_numpy_iterator())


def test_emoji_counts_and_split():
  path = prepared_bundled('emoji')
  info = records.read_info(path)
  counts = info['counts']
  train, test = _read_split(path, 'train'), _read_split(path, 'test')
  assert len(test) == counts['test_pairs'] == emoji_data.TEST_BASES == 290
  assert len(train) == counts['train_pairs'] == sum(info['splits']['train']['shard_pairs'])
  assert 3000 < len(train) < 3900 and counts['renderable'] > 3600
  assert len(train) + len(test) + counts['held_out_variants'] == counts['renderable']
  # No emoji on both sides, in any skin tone; test captions distinct even after cleaning.
  test_bases = set(info['test_emoji'])
  import emoji
  names = {emoji_data.caption_of(v['en']): e for e, v in emoji.EMOJI_DATA.items()}
  train_emoji = [names[r['captions'][0].decode()] for r in train]
  assert not {emoji_data.base_of(e) for e in train_emoji} & test_bases
  test_caps = [tokenize.pre_caption(r['captions'][0].decode()) for r in test]
  assert len(set(test_caps)) == 290 and all(test_caps)
  ids = [r['image_id'] for r in train] + [r['image_id'] for r in test]
  assert len(set(ids)) == len(ids)
  # Images: 136x128 RGB on white, with colour in them.
  from PIL import Image
  import io
  img = np.asarray(Image.open(io.BytesIO(test[0]['image'])))
  assert img.shape == (128, 136, 3) and img[0, 0].tolist() == [255, 255, 255]
  assert img.std() > 20
  # The retrieval JSON holds the same 290 in ALBEF's format, with the files beside it.
  with open(os.path.join(path, 'test_retrieval.json'), encoding='utf-8') as f:
    entries = json.load(f)
  assert len(entries) == 290 and all(isinstance(e['caption'], list) for e in entries)
  assert all(os.path.exists(os.path.join(path, e['image'])) for e in entries)


def test_prepare_is_cached():
  path = prepared_bundled('emoji')
  info = os.path.join(path, 'dataset_info.json')
  before = os.path.getmtime(info)
  assert ensure_prepared('emoji', os.path.dirname(path)) == path
  assert os.path.getmtime(info) == before
  with pytest.raises(DataError, match='unknown bundled'):
    ensure_prepared('imagenet', os.path.dirname(path))


def test_emoji_pipeline_and_retrieval_set():
  path = prepared_bundled('emoji')
  cfg = get_data_config('emoji')
  cfg.data_dir, cfg.shuffle_buffer = os.path.dirname(path), 64
  it = create_pipeline(cfg, split='train', global_batch_size=8, image_size=32, text_len=25,
                       train=True, seed=0)
  assert it.num_examples > 3000 and next(it)['image'].shape == (8, 32, 32, 3)
  rs = load_retrieval_set(cfg, image_size=32, text_len=30)
  assert rs.num_images == rs.num_texts == 290 and rs.text_ids.shape == (290, 30)
  assert rs.txt2img.tolist() == list(range(290)) and rs.img2txt[5] == [5]
  batches = list(rs.image_batches(128))
  assert len(batches) == 3 and batches[-1]['valid'].sum() == 290 - 256
  assert rs.stats()['ok'] == 290
  # The same set through the prepared spec gives the same captions in the same order.
  rs2 = load_retrieval_set(f'prepared:{path}?split=test', image_size=32, text_len=30)
  assert rs2.captions == rs.captions
  np.testing.assert_array_equal(rs2.image_ids, rs.image_ids)


def test_auto_prepare_when_missing(tmp_path, monkeypatch):
  from codis_jax.data import prepare
  calls = []
  monkeypatch.setattr(prepare, 'ensure_prepared', lambda name, d: calls.append((name, d)))
  cfg = get_data_config('emoji')
  cfg.data_dir = str(tmp_path)
  with pytest.raises(DataError):  # the stub prepared nothing
    create_pipeline(cfg, split='train', global_batch_size=8, image_size=32, text_len=25,
                    train=True, seed=0)
  assert calls == [('emoji', str(tmp_path))]


def test_fashion_mnist_counts_and_captions():
  path = prepared_bundled('fashion_mnist')
  info = records.read_info(path)
  assert sum(info['splits']['train']['shard_pairs']) == 60000
  assert sum(info['splits']['test']['shard_pairs']) == 10000
  assert len(info['class_names']) == 10 and info['prompts'][0] == 'a photo of a t-shirt'
  test = _read_split(path, 'test')
  assert len(test) == 10000
  labels = np.asarray([r['label'] for r in test])
  assert np.bincount(labels).tolist() == [1000] * 10
  for r in test[:50]:
    assert r['captions'][0].decode() == info['prompts'][r['label']]
  assert sorted(r['image_id'] for r in test) == list(range(60000, 70000))
  cfg = get_data_config('fashion_mnist')
  cfg.data_dir = os.path.dirname(path)
  b = next(create_pipeline(cfg, split='test', global_batch_size=16, image_size=32,
                           text_len=30, train=False, seed=0))
  assert b['image'].shape == (16, 32, 32, 3) and b['valid'].all()
  # Grayscale became 3 equal uint8 channels.
  assert b['image'].dtype == np.uint8
  np.testing.assert_array_equal(b['image'][..., 0], b['image'][..., 1])
