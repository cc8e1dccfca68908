"""A small WordPiece vocabulary for the CPU demo: the pieces of the emoji TRAIN captions.

BERT's 30,522-entry vocabulary makes the MLM head about half of the demo's FLOPs (every
position's logits over the whole vocabulary, student and teacher). The emoji train
captions use ~1,700 WordPiece tokens; this vocabulary holds exactly those (as the
bert-base-uncased tokenizer splits them), the special tokens, and every single character
(plain and ##) so that an unseen word still splits into pieces. Built from the train split
only, so nothing about the held-out captions leaks in; their unseen words come out as
characters, or [UNK]. Tokenisation of train captions is unchanged (WordPiece is greedy
longest-match and every piece it picked is kept), only the ids are renumbered.

Ids: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4 (configs/pretrain.py:demo sets these).
Selected by config.data.tokenizer = NAME (below); built once, into DATA_DIR/NAME.
"""

import json
import os
import string
import uuid

NAME = 'emoji_train_vocab'
SPECIALS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
_CHARS = string.ascii_lowercase + string.digits


def build(out_dir, captions):
  """Writes vocab.txt + tokenizer_config.json for BertTokenizerFast.from_pretrained."""
  from codis_jax.data import tokenize  # pylint: disable=import-outside-toplevel
  bert = tokenize.load_hf_tokenizer()
  pieces = set()
  for c in captions:
    pieces.update(bert.tokenize(tokenize.pre_caption(c)))
  chars = list(_CHARS) + ['##' + ch for ch in _CHARS]
  vocab = list(SPECIALS) + chars + sorted(pieces - set(chars) - set(SPECIALS))
  tmp = f'{out_dir}.tmp-{uuid.uuid4().hex[:8]}'
  os.makedirs(tmp)  # written aside, renamed into place: safe for concurrent runs
  with open(os.path.join(tmp, 'vocab.txt'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(vocab) + '\n')
  config = {'do_lower_case': True, 'tokenizer_class': 'BertTokenizer',
            'model_max_length': 512, **dict(zip(
                ('pad_token', 'unk_token', 'cls_token', 'sep_token', 'mask_token'),
                SPECIALS))}
  with open(os.path.join(tmp, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
    json.dump(config, f)
  try:
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    os.rename(tmp, out_dir)
  except OSError:  # another process finished first
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def ensure(data_dir=None):
  """The vocabulary folder for the emoji train split (built on first use)."""
  from codis_jax.data import emoji_data  # pylint: disable=import-outside-toplevel
  from codis_jax.data.spec import default_data_dir  # pylint: disable=import-outside-toplevel
  out = os.path.join(data_dir or default_data_dir(), NAME)
  if not os.path.exists(os.path.join(out, 'vocab.txt')):
    train, _, _ = emoji_data.select()
    build(out, [caption for _, caption, _ in train])
  return out
