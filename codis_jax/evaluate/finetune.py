"""Retrieval fine-tuning program (paper Table 2 protocol, ALBEF's Retrieval.py).

  python -m codis_jax.evaluate.finetune --config=configs/retrieval_coco.py \
      --config.finetune.checkpoint=PRETRAIN_WORKDIR --workdir=DIR

Starts from a pretraining checkpoint (student and teacher weights; position embeddings
interpolated to config.model.image_size) or, with no checkpoint, a random init. Trains
with finetune_step on config.retrieval.train_file, evaluates retrieval on the splits of
config.eval.splits every config.eval.every_steps (0: at the end only; also before
training with config.finetune.eval_at_start), and writes DIR/checkpoints (the pretraining
layout plus idx_queue: `--mode=eval` and export read them), DIR/metrics.jsonl and
DIR/eval_results.json. Resumes from DIR/checkpoints when there is one.
"""

import json
import logging
import os
import sys
import time

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from codis_jax import loop
from codis_jax import metrics_log
from codis_jax import sharding
from codis_jax import state as state_lib
from codis_jax.evaluate import data_sets
from codis_jax.evaluate import finetune_step
from codis_jax.evaluate import metrics
from codis_jax.evaluate import retrieval
from codis_jax.evaluate import weights

log = logging.getLogger('codis_jax.evaluate')
_BATCH_KEYS = ('image', 'text_ids', 'text_mask', 'image_id')


def state_shardings(config, tx, mesh):
  """(abstract FinetuneState, its NamedShardings): the pretraining layout + idx_queue."""
  abstract, shard = sharding.state_shardings(config, tx, mesh)
  idx = nn.logical_to_mesh_sharding(P('queue'), mesh, sharding.rules(config))
  q = config.queue_size
  abstract = finetune_step.from_train_state(abstract, jax.ShapeDtypeStruct((q,), np.int32))
  return abstract, finetune_step.from_train_state(shard, idx)


def _pretrained(config):
  """-> (effective config, params or None, ema params or None, queues or None)."""
  path = config.finetune.checkpoint
  if not path:
    log.warning('config.finetune.checkpoint is empty: fine-tuning from a RANDOM init')
    return config, None, None, None
  state, saved, where = weights.load(path)
  config = weights.effective_config(config, saved)
  log.info('fine-tuning from %s', where)
  ema = state.get('ema_params') or None
  return (config, weights.adapt(state['params'], config.model),
          weights.adapt(ema, config.model) if ema else None, saved_queues(state, config))


def saved_queues(state, config):
  """The checkpoint's queues, pointer and (a fine-tuning checkpoint's) ids, as ALBEF's
  load_state_dict(strict=False) takes them; None (random queues) where the shapes differ
  from the config's."""
  want = (config.queue_size, config.model.embed_dim)
  image, text = state.get('image_queue'), state.get('text_queue')
  if image is None or text is None or image.shape != want or text.shape != want:
    log.info('fine-tuning starts from random queues: the checkpoint has %s, the config %s',
             None if image is None else image.shape, want)
    return None
  ptr = int(state.get('queue_ptr', 0))
  if ptr % config.batch_size:  # the pointer must advance in whole global batches
    ptr = 0
  ids = state.get('idx_queue')
  ids = ids if ids is not None and ids.shape == want[:1] else None
  return image, text, ptr, ids


def _evaluate(config, state, mesh, sets, step, writer):
  params = weights.select({'params': state.params, 'ema_params': state.ema_params},
                          config.eval.params)
  out = {}
  for split, rset in sets.items():
    r = retrieval.retrieval_metrics(
        config.model, params, rset, k_test=config.eval.k_test, mesh=mesh,
        batch_size=config.eval.batch_size, rerank_batch_size=config.eval.rerank_batch_size,
        itm_score=config.eval.itm_score, rerank=config.eval.rerank,
        axis_rules=config.logical_axis_rules)
    out.update({f'{split}/{k}': v for k, v in r.items()})
    for stage in ('itc', 'itm'):
      if f'{stage}/r_mean' in r:
        print(f'step {step} {split} {stage}: ' + metrics.format_recall(
            {k.split('/', 1)[1]: v for k, v in r.items() if k.startswith(stage)}), flush=True)
  writer.write(step, out)
  return out


def finetune(config, workdir) -> dict:
  """Runs the fine-tuning; -> {'step': last step, 'eval': {step: metrics}}."""
  primary = jax.process_index() == 0
  config, params, ema, queues = _pretrained(config)
  mesh, ckpt, start, extra, data, total = loop.open_run(
      config, workdir, data_sets.train_pipeline)
  spe = data.steps_per_epoch
  tx = state_lib.make_optimizer(config.optim, total, spe)
  lr = state_lib.learning_rate_schedule(config.optim, total, spe)
  abstract, shardings = state_shardings(config, tx, mesh)
  rng_init, rng = jax.random.split(jax.random.key(config.seed))
  with sharding.mesh_context(mesh, config):
    if start:
      log.info('resuming from %s/%d', ckpt.directory, start)
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
      state = loop.rebuild_weight_copy(ckpt.restore_state(start, target, config), config,
                                       shardings)
    else:
      state = jax.jit(lambda r, p, e, q: finetune_step.initial_state(config, tx, r, p, e, q),
                      out_shardings=shardings)(rng_init, params, ema, queues)
  del params, ema, queues
  replicated = NamedSharding(mesh, P())
  step_fn = jax.jit(finetune_step.make_finetune_step(config, tx, spe, lr),
                    in_shardings=(shardings, sharding.batch_sharding(mesh), replicated),
                    out_shardings=(shardings, replicated), donate_argnums=0)
  rng = jax.device_put(rng, replicated)
  sets = data_sets.eval_sets(config)
  writer = metrics_log.MetricsWriter(workdir, enabled=primary,
                                     tensorboard=config.log.tensorboard, resume_step=start)
  results = {}
  if config.finetune.eval_at_start and not start:
    results[0] = _evaluate(config, state, mesh, sets, 0, writer)
  t_last, step = time.time(), start
  try:
    for step in range(start + 1, total + 1):
      batch = next(data)
      batch = sharding.shard_batch(mesh, {k: batch[k] for k in _BATCH_KEYS})
      with sharding.mesh_context(mesh, config):
        state, m = step_fn(state, batch, rng)
      last = step == total
      if step % config.log.every_steps == 0 or last:
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        now = time.time()
        m.update(epoch=step / spe, step_s=(now - t_last) / config.log.every_steps)
        t_last = now
        writer.write(step, m)
        if primary:
          print(f'step {step}/{total} | ep {step / spe:.2f} | loss {m["loss"]:.4f} '
                f'(ita {m["loss_ita"]:.4f} itm {m["loss_itm"]:.4f}) | itm_acc '
                f'{m["itm_acc"]:.3f} | lr {m["lr"]:.2e}', flush=True)
      if last or step % config.checkpoint.every_steps == 0:
        ckpt.save(step, state, {'data': loop.data_states(data)}, config)
      every = config.eval.every_steps
      if last or (every and step % every == 0):
        results[step] = _evaluate(config, state, mesh, sets, step, writer)
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
  if primary and results:
    with open(os.path.join(workdir, 'eval_results.json'), 'w', encoding='utf-8') as f:
      json.dump({str(k): v for k, v in results.items()}, f, indent=1)
  return {'step': step, 'eval': results, 'state': state, 'mesh': mesh, 'config': config}


def main(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise SystemExit(f'unexpected arguments: {argv[1:]}')
  cfg, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if cfg is None or not workdir:
    raise SystemExit('--config and --workdir are required')
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
  logging.getLogger('absl').setLevel(logging.WARNING)
  sharding.maybe_initialize_distributed()
  try:
    finetune(cfg, os.path.abspath(workdir))
  except ValueError as e:  # config, data and checkpoint errors: one line, no traceback
    print(f'codis_jax.evaluate.finetune: error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  from absl import app, flags as _flags  # pylint: disable=ungrouped-imports
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'e.g. configs/retrieval_coco.py')
  _flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
  app.run(main)
