"""Zero-shot classification with caption templates (e.g. Fashion-MNIST, "a photo of a {}").

Each class is a text, the template filled with its name; an image's prediction is the
class whose text scores highest: by ITC similarity, or (use_itm) by the ITM match score
over all classes with ITC breaking ties. This is image -> text retrieval over the class
texts, so it runs on the retrieval machinery (batched, sharded over the mesh).
"""

import dataclasses

import numpy as np

from codis_jax.evaluate import retrieval

TEMPLATE = 'a photo of a {}'


def class_texts(names, template=TEMPLATE):
  return [template.format(n) for n in names]


def predict(model_config, params, image_set, text_ids, text_mask, *, mesh=None,
            batch_size=64, use_itm=False, axis_rules=None):
  """image_set: a retrieval set (its images are classified; its texts are ignored);
  text_ids/text_mask: int32 [C, L], one text per class.

  -> {'itc': int [N] predicted class, 'itm': int [N] (use_itm only)}.
  """
  num_classes = len(text_ids)
  if num_classes < 2:
    raise ValueError(f'zero-shot classification needs >= 2 classes, got {num_classes}')
  # Only the images and the class texts matter; txt2img/img2txt are never read here.
  classes = dataclasses.replace(image_set, text_ids=np.asarray(text_ids, np.int32),
                                text_mask=np.asarray(text_mask, np.int32),
                                txt2img=np.zeros(num_classes, np.int32), img2txt=[])
  scores = retrieval.compute_scores(model_config, params, classes, k_test=num_classes,
                                    mesh=mesh, batch_size=batch_size, rerank=use_itm,
                                    axis_rules=axis_rules)
  out = {'itc': np.argmax(scores.sims, axis=1)}
  if use_itm:
    best = scores.i2t.max(axis=1, keepdims=True)
    out['itm'] = np.argmax(np.where(scores.i2t == best, scores.sims, -np.inf), axis=1)
  return out


def accuracy(predictions, labels) -> float:
  """Top-1 accuracy in %."""
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  if predictions.shape != labels.shape or not len(labels):
    raise ValueError(f'accuracy: {predictions.shape} predictions for {labels.shape} labels')
  return 100.0 * float(np.mean(predictions == labels))


def evaluate_fashion_mnist(params, model_config, *, data_dir='', template=TEMPLATE,
                           max_images=0, text_len=30, mesh=None, batch_size=64,
                           use_itm=False, tokenizer='', text_sep=False,
                           axis_rules=None) -> dict:
  """Top-1 zero-shot accuracy on the Fashion-MNIST test split (10,000 images; the bundled
  set is prepared on first use). -> {'zeroshot/top1_itc': %, ['zeroshot/top1_itm': %]}."""
  # pylint: disable=import-outside-toplevel
  from codis_jax import data as data_lib
  from codis_jax.data import fashion_mnist, records, tokenize
  from codis_jax.evaluate import data_sets
  path = data_lib.ensure_prepared('fashion_mnist', data_dir or None)
  rset = data_lib.load_retrieval_set(f'prepared:{path}?split=test', model_config.image_size,
                                     text_len, tokenizer, text_sep)
  rset = retrieval.subset(rset, max_images or None)
  # The set's captions are its classes' prompts: they give the labels.
  prompts = [tokenize.pre_caption(p) for p in records.read_info(path)['prompts']]
  labels = np.asarray([prompts.index(caps[0]) for caps in rset.captions])
  texts = [tokenize.pre_caption(t) for t in class_texts(fashion_mnist.PROMPT_NAMES, template)]
  ids, mask = tokenize.TextEncoder(text_len, tokenizer, sep=text_sep).batch(texts)
  data_sets.check_vocab(ids, model_config.vocab_size)
  pred = predict(model_config, params, rset, ids, mask, mesh=mesh, batch_size=batch_size,
                 use_itm=use_itm, axis_rules=axis_rules)
  return {f'zeroshot/top1_{k}': accuracy(v, labels) for k, v in pred.items()}
