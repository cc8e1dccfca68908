"""Evaluating a checkpoint: retrieval (zero-shot or fine-tuned) or zero-shot classification.

  python -m codis_jax.evaluate --config=configs/retrieval_coco.py \
      --config.eval.checkpoint=PATH --workdir=DIR

evaluate_checkpoint(config, workdir) reads config.eval.checkpoint (a workdir, its
checkpoints/ folder or one step folder), takes the model architecture from it (image size
from the config, position embeddings interpolated), and by config.eval.task runs
  retrieval  ITC and ITM re-ranked TR/IR R@1/5/10 on each split of config.eval.splits;
  zeroshot   top-1 accuracy on Fashion-MNIST with config.eval.zeroshot's template.
Results are printed and written to DIR/eval_results.json.

evaluate_emoji(...) is the bundled held-out emoji set's retrieval evaluation, for the
end of the demo run and CI.
"""

import json
import logging
import os

import jax

from codis_jax import sharding
from codis_jax.evaluate import data_sets
from codis_jax.evaluate import metrics
from codis_jax.evaluate import retrieval
from codis_jax.evaluate import weights

log = logging.getLogger('codis_jax.evaluate')
TASKS = ('retrieval', 'zeroshot')


def _print_recall(prefix, r):
  for stage, name in (('itc', 'ITC'), ('itm', 'ITM re-ranked')):
    if f'{stage}/r_mean' in r:
      sub = {k.split('/', 1)[1]: v for k, v in r.items() if k.startswith(stage + '/')}
      print(f'{prefix} {name}: {metrics.format_recall(sub)}', flush=True)


def evaluate_checkpoint(config, workdir) -> dict:
  """-> {'<split>/itc/tr_r1': %, ...} or {'zeroshot/top1_itc': %, ...}."""
  task = config.eval.get('task', 'retrieval')
  if task not in TASKS:
    raise ValueError(f'config.eval.task={task!r}: choose from {TASKS}')
  params, config, where = weights.for_eval(config.eval.checkpoint, config)
  model_config = config.model
  mesh = sharding.create_mesh(config)
  primary = jax.process_index() == 0
  if primary:
    print(f'evaluating {where} ({config.eval.params} weights, {task}, image size '
          f'{model_config.image_size})', flush=True)
  results = {}
  if task == 'retrieval':
    for split, rset in data_sets.eval_sets(config).items():
      r = retrieval.retrieval_metrics(
          model_config, params, rset, k_test=config.eval.k_test, mesh=mesh,
          batch_size=config.eval.batch_size,
          rerank_batch_size=config.eval.rerank_batch_size, itm_score=config.eval.itm_score,
          rerank=config.eval.rerank, axis_rules=config.logical_axis_rules)
      results.update({f'{split}/{k}': v for k, v in r.items()})
      if primary:
        _print_recall(f'{split} ({rset.num_images} images, {rset.num_texts} texts)', r)
  else:
    from codis_jax.evaluate import zeroshot  # pylint: disable=import-outside-toplevel
    z = config.eval.zeroshot
    results = zeroshot.evaluate_fashion_mnist(
        params, model_config, data_dir=config.data.data_dir or '', template=z.template,
        max_images=config.eval.max_images, text_len=config.text_len, mesh=mesh,
        batch_size=config.eval.batch_size, use_itm=z.use_itm,
        tokenizer=config.data.tokenizer or '', text_sep=bool(config.data.get('text_sep')),
        axis_rules=config.logical_axis_rules)
    if primary:
      print('zero-shot Fashion-MNIST top-1: ' + ', '.join(
          f'{k.split("_")[-1].upper()} {v:.2f}%' for k, v in results.items()), flush=True)
  if primary:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'eval_results.json'), 'w', encoding='utf-8') as f:
      json.dump({'checkpoint': where, 'params': config.eval.params, **results}, f, indent=1)
  return results


def run(config, workdir):
  """codis_jax.main's `--mode=eval`: fn(config, workdir) -> exit code."""
  evaluate_checkpoint(config, workdir)
  return 0


def evaluate_emoji(params, model_config, data_dir='', *, k_test=64, max_images=0,
                   text_len=30, batch_size=64, rerank_batch_size=None, rerank=True,
                   mesh=None, tokenizer='', text_sep=False, axis_rules=None) -> dict:
  """Retrieval recall on the bundled emoji set's held-out test split (290 images, one
  caption each; prepared on first use). max_images > 0 keeps only the first N (CI-sized).

  params: a full parameter tree (e.g. state.params or state.teacher_params(state));
  model_config: the config's model section, with the bert-base-uncased vocabulary.
  -> {'itc/tr_r1': %, ..., 'itm/r_mean': %}.
  """
  # pylint: disable=import-outside-toplevel
  from codis_jax import data as data_lib
  folder = data_lib.ensure_prepared('emoji', data_dir or None)
  rset = data_lib.load_retrieval_set(os.path.join(folder, 'test_retrieval.json'),
                                     model_config.image_size, text_len, tokenizer, text_sep)
  data_sets.check_vocab(rset.text_ids, model_config.vocab_size)
  rset = retrieval.subset(rset, max_images or None)
  return retrieval.retrieval_metrics(
      model_config, params, rset, k_test=k_test, mesh=mesh, batch_size=batch_size,
      rerank_batch_size=rerank_batch_size, rerank=rerank, axis_rules=axis_rules)
