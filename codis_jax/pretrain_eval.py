"""Zero-shot retrieval during and at the end of pretraining, with evaluate/'s scorer.

    scalars, lines = pretrain_eval.evaluate(config, state, mesh, both=False)

The retrieval set is config.eval.data (a spec or an ALBEF JSON path) or, when empty, the
training data config's own retrieval set (the demo: the 290 held-out emoji), tokenized
with the training tokenizer. Scores are codis_jax.evaluate.retrieval's: ITC
similarities, then (config.eval.rerank) the ITM re-ranking of each query's top
config.eval.k_test; recall and its tie rule are codis_jax.evaluate.metrics'.
Keys: 'itc/<weights>/tr_r1', ..., 'itm/<weights>/r_mean', <weights> = student | ema.
"""

import logging

from codis_jax import state as state_lib
from codis_jax.evaluate import metrics
from codis_jax.evaluate import retrieval

log = logging.getLogger('codis_jax')
WEIGHTS = ('student', 'ema')
_SETS = {}  # loaded retrieval sets, kept across periodic evaluations


def has_retrieval_set(config) -> bool:
  from codis_jax import loop  # pylint: disable=import-outside-toplevel
  return bool(config.eval.data) or (config.data.name != 'synthetic'
                                    and bool(loop.data_config(config).get('retrieval')))


def retrieval_set(config):
  """The retrieval set of `config` (loaded once per process)."""
  # pylint: disable=import-outside-toplevel
  from codis_jax import data as data_lib
  from codis_jax import loop
  from codis_jax.evaluate import data_sets
  key = (config.eval.data, config.data.to_json_best_effort(), config.model.image_size,
         config.text_len)
  if key not in _SETS:
    dc = loop.data_config(config)
    rset = data_lib.load_retrieval_set(config.eval.data or dc, config.model.image_size,
                                       config.text_len, dc.get('tokenizer', ''),
                                       dc.get('text_sep'))
    data_sets.check_vocab(rset.text_ids, config.model.vocab_size)
    _SETS[key] = retrieval.subset(rset, config.eval.get('max_images') or None)
  return _SETS[key]


def evaluate(config, state, mesh, both=False):
  """-> ({'itc/<weights>/tr_r1': %, ...}, printable lines).

  Scores config.eval.params' weights ('student', as ALBEF, or 'ema': the teacher's); with
  both=True the other ones too.
  """
  first = config.eval.params
  if first not in WEIGHTS:
    raise ValueError(f'config.eval.params={first!r}: choose one of {WEIGHTS}')
  rset = retrieval_set(config)
  scalars, lines = {}, []
  for name in [first] + ([w for w in WEIGHTS if w != first] if both else []):
    params = state_lib.teacher_params(state) if name == 'ema' else state.params
    r = retrieval.retrieval_metrics(
        config.model, params, rset, k_test=config.eval.k_test, mesh=mesh,
        batch_size=config.eval.batch_size, rerank=config.eval.rerank,
        axis_rules=config.logical_axis_rules)
    for stage, title in (('itc', 'ITC'), ('itm', f'ITM re-ranked (top {config.eval.k_test})')):
      sub = {k.split('/', 1)[1]: v for k, v in r.items() if k.startswith(stage + '/')}
      if not sub:
        continue
      scalars.update({f'{stage}/{name}/{k}': v for k, v in sub.items()})
      lines.append(f'zero-shot retrieval, {title}, {name} weights ({rset.num_images} '
                   f'images, {rset.num_texts} texts, chance R@1 '
                   f'{100 / rset.num_images:.2f}%): {metrics.format_recall(sub)}')
  return scalars, lines
