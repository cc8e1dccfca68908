"""Data configs: get_data_config(name) -> ml_collections.ConfigDict (all fields flat and
overridable from the command line, e.g. --config.data.train='json:/a.json@/images').

Split specs use the syntax of spec.py; relative paths resolve against data_dir
('' = $CODIS_DATA_DIR or ~/.cache/codis_jax).
"""

import ml_collections

from codis_jax.data.errors import DataError


def _base(**specs):
  c = ml_collections.ConfigDict()
  c.name = ''
  c.train = ''            # spec of the pretraining split
  c.test = ''             # spec of the evaluation split (pairs, via create_pipeline)
  c.retrieval = ''        # ALBEF retrieval JSON or a spec, for load_retrieval_set
  c.data_dir = ''         # '' = $CODIS_DATA_DIR or ~/.cache/codis_jax
  c.tokenizer = ''        # folder for BertTokenizerFast.from_pretrained; '' = bundled
  c.text_sep = False      # captions as ALBEF's [CLS] text; True: BERT's [CLS] text [SEP]
  c.auto_prepare = True   # build the bundled sets (emoji, fashion_mnist) when missing
  c.max_words = 30        # ALBEF's pre_caption truncation
  c.crop_scale_min = 0.2  # RandomResizedCrop area range
  c.crop_scale_max = 1.0
  c.randaug_ops = 2       # ALBEF RandomAugment(N=2, M=7); 0 turns it off
  c.randaug_magnitude = 7
  c.shuffle_buffer = 10_000  # sharded sources only; JSON pairs are fully permuted
  c.cycle_length = 16     # shards read at once per host
  c.prefetch = 2          # batches
  c.num_threads = 0       # tf.data private thread pool; 0 = TF's default
  c.workers = 0           # processes for the per-image work; 0 = tf.data's threads here
  c.update(specs)
  return c


def get_data_config(name='emoji'):
  """'emoji' | 'fashion_mnist' | 'paper' (COCO + VG + SBU + CC3M ALBEF JSON files)."""
  if name == 'emoji':
    return _base(name=name, train='prepared:emoji', test='prepared:emoji',
                 retrieval='json:emoji/test_retrieval.json')
  if name == 'fashion_mnist':
    return _base(name=name, train='prepared:fashion_mnist', test='prepared:fashion_mnist')
  if name == 'paper':
    # ALBEF's pretraining JSONs and its COCO retrieval test file; point data_dir at the
    # folder holding them, or override any spec.
    train = '+'.join(f'json:paper/{d}.json@paper/{d}' for d in ('coco', 'vg', 'sbu', 'cc3m'))
    return _base(name=name, train=train, test='json:paper/coco_test.json@paper/coco',
                 retrieval='json:paper/coco_test.json@paper/coco')
  raise DataError(f'unknown data config {name!r}; known: emoji, fashion_mnist, paper')
