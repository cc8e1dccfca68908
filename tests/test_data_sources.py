"""Sources: bad records are skipped and counted; fatal problems raise one DataError;
webdataset tars, img2dataset TFRecords, prepared TFRecords and TFDS all read."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from codis_jax.data import DataError, create_pipeline, spec as spec_lib, tokenize
from test_data_fixtures import (caption, data_config, image_bytes, write_json_set,
                                write_prepared_set, write_wds_set)

S, L = 32, 25


def _pipe(cfg, batch=4, train=False, **kw):
  return create_pipeline(cfg, split='train', global_batch_size=batch, image_size=S,
                         text_len=L, train=train, seed=0, **kw)


def _texts(batches):
  """Decoded captions of the valid rows, for comparison with the fixture captions."""
  from transformers import BertTokenizerFast
  tok = BertTokenizerFast.from_pretrained(tokenize.default_tokenizer_dir())
  out = []
  for b in batches:
    valid = b.get('valid', np.ones(len(b['image_id']), bool))
    out += [tok.decode(r, skip_special_tokens=True) for r in b['text_ids'][valid]]
  return sorted(out)


def _clean(i):
  return tokenize.pre_caption(caption(i))


def _bad_json_set(folder):
  """8 good pairs; 2 missing, 2 corrupt images; 2 empty captions; 1 non-UTF-8 caption;
  4 malformed entries."""
  os.makedirs(os.path.join(folder, 'img'))
  entries = []
  for i in range(8):
    with open(os.path.join(folder, 'img', f'{i}.jpg'), 'wb') as f:
      f.write(image_bytes(i, 'JPEG'))
    entries.append({'image': f'{i}.jpg', 'caption': caption(i)})
  with open(os.path.join(folder, 'img', 'junk.jpg'), 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0 this is not really a jpeg')
  with open(os.path.join(folder, 'img', 'cut.jpg'), 'wb') as f:
    f.write(image_bytes(99, 'JPEG', size=(64, 64))[:300])  # truncated
  entries += [
      {'image': 'gone.jpg', 'caption': 'missing image one'},
      {'image': 'sub/gone2.png', 'caption': ['missing image two']},
      {'image': 'junk.jpg', 'caption': 'corrupt image'},
      {'image': 'cut.jpg', 'caption': 'truncated image'},
      {'image': '0.jpg', 'caption': ''},
      {'image': '1.jpg', 'caption': ' ?!... '},
      {'image': '2.jpg', 'caption': 'NONUTF8'},
      42, {'image': '3.jpg'}, {'caption': 'no image'}, {'image': 5, 'caption': 'x'},
  ]
  raw = json.dumps(entries).encode().replace(b'NONUTF8', b'bad \xff\xfe bytes')
  path = os.path.join(folder, 'bad.json')
  with open(path, 'wb') as f:
    f.write(raw)
  return f'json:{path}@{os.path.join(folder, "img")}'


EXPECTED_BAD = {'ok': 8, 'missing_image': 2, 'corrupt_image': 2, 'empty_caption': 2,
                'bad_utf8': 1, 'malformed_entry': 4}


@pytest.mark.parametrize('workers', [0, 2])
def test_bad_records_skipped_and_counted_eval(tmp_path, caplog, workers):
  it = _pipe(data_config(_bad_json_set(str(tmp_path)), workers=workers), batch=4)
  assert it.num_examples == 15
  with caplog.at_level('WARNING', logger='codis_jax.data'):
    batches = list(it)
  assert len(batches) == 4 and sum(b['valid'].sum() for b in batches) == 8
  assert _texts(batches) == sorted(_clean(i) for i in range(8))
  assert it.stats() == EXPECTED_BAD
  lines = [r.getMessage() for r in caplog.records if 'bad input' in r.getMessage()]
  assert len(lines) == 1 and 'bad.json[15] (malformed_entry)' in lines[0]


@pytest.mark.parametrize('workers', [0, 2])
def test_bad_records_skipped_and_counted_train(tmp_path, workers):
  cfg = data_config(_bad_json_set(str(tmp_path)), randaug_ops=0, workers=workers)
  it = _pipe(cfg, batch=2, train=True)
  batches = [next(it) for _ in range(4)]  # the 8 good pairs of epoch 0
  assert _texts(batches) == sorted(_clean(i) for i in range(8))
  assert it.get_state()['epoch'] == 0
  stats = it.stats()  # the prefetch may have read into epoch 1: at least the exact counts
  assert all(stats[k] >= v for k, v in EXPECTED_BAD.items())
  assert stats['malformed_entry'] == 4


@pytest.mark.parametrize('workers', [0, 2])
def test_bad_records_in_sharded_sources(tmp_path, workers):
  prepared = write_prepared_set(str(tmp_path / 'p'), n_images=5, shards=2,
                                bad=('corrupt', 'utf8', 'empty', 'noimage'))
  wds = write_wds_set(str(tmp_path / 'w'), n_per_shard=(4, 3), bad=True)
  it = _pipe(data_config(f'{prepared}+{wds}', workers=workers), batch=4)
  batches = list(it)
  stats = it.stats()
  assert stats == {'ok': 5 + 3, 'missing_image': 1 + 2, 'corrupt_image': 1,
                   'empty_caption': 1, 'bad_utf8': 1 + 2, 'malformed_entry': 0}
  assert sum(b['valid'].sum() for b in batches) == 8


@pytest.mark.parametrize('make, message', [
    (lambda d: f'json:{d}/nope.json@{d}', 'annotation file not found'),
    (lambda d: write_json_set(d).split('@')[0] + f'@{d}/no_root', 'image root not found'),
    (lambda d: 'tfds:surely_not_a_dataset_xyz', 'surely_not_a_dataset_xyz'),
    (lambda d: f'prepared:{d}/absent', 'dataset_info.json'),
    (lambda d: f'wds:{d}/empty_dir', 'no \\*.tar shards'),
    (lambda d: 'csv:/a.csv', 'KIND'),
    (lambda d: 'json:/a.json@/r?split=x', 'bad option'),
])
def test_fatal_problems_raise_one_data_error(tmp_path, make, message):
  d = str(tmp_path)
  os.makedirs(os.path.join(d, 'empty_dir'))
  with pytest.raises(DataError, match=message):
    _pipe(data_config(make(d)))


def test_missing_split_and_unprepared_tfds(tmp_path):
  cfg = data_config(write_json_set(str(tmp_path)))
  with pytest.raises(DataError, match='validation'):
    create_pipeline(cfg, split='validation', global_batch_size=2, image_size=S, text_len=L,
                    train=True, seed=0)
  with pytest.raises(DataError, match='coco_captions'):  # known to TFDS, not prepared
    _pipe(data_config(f'tfds:coco_captions?data_dir={tmp_path}'))


def test_spec_syntax():
  specs = spec_lib.parse_spec('json:a.json@imgs+prepared:emoji?split=test+wds:gs://b/s/*.tar'
                              '+tfds:coco_captions?split=val&data_dir=/t', data_dir='/data')
  assert [s.kind for s in specs] == ['json', 'prepared', 'wds', 'tfds']
  assert (specs[0].location, specs[0].root) == ('/data/a.json', '/data/imgs')
  assert specs[1].location == '/data/emoji' and specs[1].option('split') == 'test'
  assert specs[2].location == 'gs://b/s/*.tar'
  assert specs[3].option('split') == 'val' and specs[3].option('data_dir') == '/t'
  assert spec_lib.parse_spec('json:/x/a.json')[0].root == '/x'
  for bad in ('', 'json', 'json:', 'prepared:x@root', 'tfds:x?colour=red'):
    with pytest.raises(DataError):
      spec_lib.parse_spec(bad)


def test_webdataset_tars(tmp_path):
  spec = write_wds_set(str(tmp_path), n_per_shard=(5, 4), with_stats=(True, False))
  it = _pipe(data_config(spec), batch=3)
  assert it.num_examples == 9
  batches = list(it)
  assert _texts(batches) == sorted(_clean(i) for i in range(9))
  ids = np.concatenate([b['image_id'] for b in batches])
  assert sorted(ids) == sorted([j for j in range(5)] + [10000 + j for j in range(4)])


def test_img2dataset_tfrecords(tmp_path):
  path = str(tmp_path / '00000.tfrecord')
  with tf.io.TFRecordWriter(path) as w:
    for i in range(5):
      f = tf.train.Feature
      w.write(tf.train.Example(features=tf.train.Features(feature={
          'jpg': f(bytes_list=tf.train.BytesList(value=[image_bytes(i, 'JPEG')])),
          'txt': f(bytes_list=tf.train.BytesList(value=[caption(i).encode()])),
          'key': f(bytes_list=tf.train.BytesList(value=[f'{i:09d}'.encode()])),
      })).SerializeToString())
  it = _pipe(data_config(f'i2d_tfrecord:{tmp_path}'), batch=5)
  b = next(it)
  assert it.num_examples == 5 and b['valid'].all()
  assert sorted(b['image_id']) == list(range(5))
  assert _texts([b]) == sorted(_clean(i) for i in range(5))


def test_prepared_tfrecords_train_and_multi_caption(tmp_path):
  spec = write_prepared_set(str(tmp_path), n_images=6, caps_per_image=2, shards=3)
  cfg = data_config(spec, randaug_ops=0)
  it = _pipe(cfg, batch=4, train=True)
  assert it.num_examples == 12 and it.steps_per_epoch == 3
  batches = [next(it) for _ in range(3)]
  assert _texts(batches) == sorted(_clean(i * 10 + j) for i in range(1000, 1006)
                                   for j in range(2))
  ids = np.concatenate([b['image_id'] for b in batches])
  assert sorted(ids) == sorted(list(range(1000, 1006)) * 2)


def test_tfds_source(tmp_path):
  import tensorflow_datasets as tfds

  class TinyCaptionsForCodis(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(encoding_format='png'),
          'image/id': np.int64,
          'captions': tfds.features.Sequence({'text': tfds.features.Text()}),
      }))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(6), 'val': self._generate_examples(3)}

    def _generate_examples(self, n):
      for i in range(n):
        image = np.zeros((12, 10, 3), np.uint8) + i * 20
        yield i, {'image': image, 'image/id': 100 + i,
                  'captions': {'text': [caption(i * 10), caption(i * 10 + 1)]}}

  TinyCaptionsForCodis(data_dir=str(tmp_path)).download_and_prepare()
  spec = f'tfds:tiny_captions_for_codis?data_dir={tmp_path}'
  it = _pipe(data_config(spec + '&split=val'), batch=3)
  b = next(it)
  assert it.num_examples == 3 and sorted(b['image_id']) == [100, 101, 102]
  assert _texts([b]) == sorted(_clean(i * 10) for i in range(3))  # first caption
  it = _pipe(data_config(spec, randaug_ops=0), batch=3, train=True)
  batches = [next(it) for _ in range(2)]
  assert sorted(np.concatenate([b['image_id'] for b in batches])) == list(range(100, 106))
  with pytest.raises(DataError, match='no split'):
    _pipe(data_config(spec + '&split=nope'))
