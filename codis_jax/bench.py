"""Step benchmark: compile time, step time, pairs/s, FLOPs per pair, MFU, IPOT's share.

  python -m codis_jax.bench                          # tiny + paper configs, small batch, CPU
  python -m codis_jax.bench --configs=paper --batch=64 --steps=20   # on an accelerator

Model FLOPs are counted from the step's jaxpr (`codis_jax.flops`: every matmul and
convolution of forward + backward + update, teacher included) with remat off, so MFU counts
no rematerialised recompute and loses no FLOPs to library calls. MFU = model FLOP/s / the
device's dense bf16 peak (table below); on CPU no peak is known and MFU is not printed.
XLA's own `cost_analysis()` of the compiled step is printed beside it: on CPU it agrees
within a few percent (it adds elementwise FLOPs); on GPU it omits cuBLAS/cuDNN calls.
"""

import copy
import functools
import json
import sys
import time

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from codis_jax import flops as flops_lib
from codis_jax import guard
from codis_jax import hlo_cost
from codis_jax import ot
from codis_jax import state as state_lib
from codis_jax import train
from configs import pretrain

FLAGS = flags.FLAGS


def _define_flags():
  """Defined when run as a program only, so that importing this module (tests) adds no
  absl flags that could clash with another tool's (scaling_report has --dtype too)."""
  flags.DEFINE_list('configs', ['tiny', 'paper'], 'pretrain.py variants to run.')
  flags.DEFINE_integer('batch', 4, 'Global batch size (0 = the config value).')
  flags.DEFINE_integer('steps', 3, 'Timed steps after the compile and one warm-up step.')
  flags.DEFINE_string('dtype', '', 'Override config.model.dtype (float32 | bfloat16).')
  flags.DEFINE_string('remat', '', 'Override config.model.remat (none | full | dots).')
  flags.DEFINE_string('attention', '',
                      'Override config.model.attention_impl (xla | cudnn | pallas).')
  flags.DEFINE_list('set', [], 'More config overrides, KEY=VALUE, e.g. '
                    'model.share_image_kv=false,loss.ipot_iters=20.')
  flags.DEFINE_string('json', '', 'Also append each result as one JSON line to this file.')
  flags.DEFINE_string('profile_dir', '', 'After timing, trace 3 steps with jax.profiler '
                      'into this folder (TensorBoard / Perfetto).')
  flags.DEFINE_multi_string('variant', [], 'Repeatable: a comma-separated override list '
                            '(as --set) for one more run of each config, in this process '
                            '(the fresh train state is shared, see StateCache).')
  flags.DEFINE_bool('parts', False, 'After the first variant that runs, time the step\'s parts '
                    'alone (codis_jax.step_parts) in its mode.')
  flags.DEFINE_bool('pipeline', True, 'Also measure the tf.data pretraining pipeline '
                    "(pairs/s at the configs' image sizes) to set beside the step.")


# Dense bf16 peak FLOP/s per chip (vendor figures, no sparsity), by JAX device kind: TPU
# v5e is 'TPU v5 lite', v5p 'TPU v5', v6e 'TPU v6 lite'.
PEAK_FLOPS = {
    'A100': 312e12, 'H100': 989e12, 'H200': 989e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5': 459e12, 'TPU v6 lite': 918e12,
}


def device_peak_flops(device) -> float | None:
  kind = device.device_kind.lower()
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):  # 'TPU v5 lite' before 'TPU v5'
    if name.lower() in kind:
      return PEAK_FLOPS[name]
  return None


def xla_cost(compiled) -> dict:
  """XLA's `cost_analysis()` of a compiled program as one dict ({} when it has none)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX returns one dict per computation
    cost = cost[0]
  return cost or {}


def _log(msg):
  print(f'[bench {time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)


def flops_config(config):
  """`config` as the model FLOPs are counted: remat and token padding off (recompute and
  padding are not useful work) and attention as plain matmuls (a cuDNN call is opaque to
  the jaxpr counter)."""
  config = copy.deepcopy(config)
  config.model.remat = 'none'
  config.model.attention_impl = 'xla'
  config.model.pad_image_tokens = 0  # padding is not useful work either
  config.model.pad_text_tokens = 0
  return config


def model_flops(config, tx, state, batch, rng) -> int:
  """FLOPs of one step as the model defines it (`flops_config`)."""
  return flops_lib.count(train.make_train_step(flops_config(config), tx, steps_per_epoch=1000),
                         state, batch, rng)


def make_tx(config):
  """The AdamW of `config`'s schedule (at least 1,000 steps long)."""
  return state_lib.make_optimizer(config.optim, max(config.total_steps, 1000))


def init_state(config):
  """(AdamW, a fresh train state) for `config`."""
  tx = make_tx(config)
  return tx, jax.jit(lambda r: state_lib.create_train_state(config, r, tx))(jax.random.key(0))


def loop_step(config, tx, state, guarded=True):
  """(step, its first argument): the train step as the training loop runs it, inside the
  non-finite guard, with the carry (state, guard); guarded=False: the bare step, state."""
  step = train.make_train_step(config, tx, steps_per_epoch=1000)
  if not guarded:
    return step, state
  return guard.guard_step(step), (state, guard.init_guard())


# Model knobs that change how the step computes, not the train state it starts from (a
# weight copy is derived from the weights: the cache rebuilds it per variant).
PERF_KEYS = ('dtype', 'remat', 'attention_impl', 'share_image_kv', 'pad_image_tokens', 'gelu',
             'pad_text_tokens', 'weight_copy', 'weight_grad_dtype')


class StateCache:
  """`init_state` for variants of one config: a config differing from the last one only in
  PERF_KEYS gets a device copy of the same fresh state instead of a new initialisation
  (~60 s of the paper config on an H200). The fresh state waits on the host, so it adds
  nothing to the device memory a variant uses."""

  def __init__(self, init=None):
    self._init = init or init_state
    self._key, self._value = None, None

  def __call__(self, config):
    key = config.to_dict()
    key['model'] = {k: v for k, v in key['model'].items() if k not in PERF_KEYS}
    key = json.dumps(key, sort_keys=True, default=str)
    if key != self._key:
      tx, state = self._init(config)
      if isinstance(state, state_lib.TrainState):
        state = state.replace(weight_copy=None)
      self._key, self._value = key, (tx, jax.device_get(state))
    tx, state = self._value
    if isinstance(state, state_lib.TrainState):
      state = state_lib.refresh_weight_copy(state, config.model)
    return tx, jax.device_put(state)


def ipot_call(config):
  """(fn, costs): IPOT at the step's shapes, fn(costs [2, B, K]) -> the two modalities'
  plans [2, B, K], batched in one loop as `losses.codebook_loss` solves them."""
  lc = config.loss
  costs = 2 * jax.random.uniform(jax.random.key(2),
                                 (2, config.batch_size, config.model.codebook_size))
  plans = jax.vmap(functools.partial(ot.ipot, beta=lc.ipot_beta, num_iters=lc.ipot_iters,
                                     num_inner=lc.ipot_inner))
  return plans, costs


def time_call(fn, steps):
  """Seconds per call of `fn()` over `steps` calls, after one untimed call."""
  out = fn()
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps


def synthetic_batch(config, b):
  rs = np.random.RandomState(0)
  m = config.model
  ids = rs.randint(5, m.vocab_size, (b, config.text_len)).astype(np.int32)
  ids[:, 0] = m.cls_id
  # uint8 pixels, as the data pipeline hands them over (the model normalises them).
  return {'image': rs.randint(0, 256, (b, m.image_size, m.image_size, 3)).astype(np.uint8),
          'text_ids': ids, 'text_mask': np.ones_like(ids),
          'image_id': np.arange(b, dtype=np.int32)}


def apply_overrides(config, items):
  """Sets each 'a.b=value' of `items` on `config`, parsed as the type it replaces."""
  for item in items:
    key, sep, text = item.partition('=')
    *path, leaf = key.split('.')
    node = config
    try:
      for part in path:
        node = node[part]
      old = node[leaf]
    except (KeyError, AttributeError, TypeError):
      raise ValueError(f'override {item!r}: the config has no key {key!r}') from None
    if not sep or isinstance(old, (dict, ml_collections.ConfigDict)):
      raise ValueError(f'override {item!r}: expected KEY=VALUE with KEY a config value')
    if isinstance(old, bool):
      if text.lower() not in ('true', 'false'):
        raise ValueError(f'override {item!r}: {key} takes true or false')
      value = text.lower() == 'true'
    else:
      try:
        value = type(old)(text) if old is not None else text
      except ValueError:
        raise ValueError(f'override {item!r}: {key} takes a {type(old).__name__}') from None
    node[leaf] = value
  return config


def make_config(name: str, batch: int, dtype: str = '', remat: str = '',
                attention: str = '', overrides=()):
  """pretrain.py's `name` variant at global batch `batch` (0: the config's); '' keeps the
  config's dtype / remat / attention; `overrides`: more 'a.b=value' settings, where a
  `batch_size=N` wins over `batch` (one variant of a run at another batch)."""
  config = apply_overrides(pretrain.get_config(name), overrides)
  if any(o.partition('=')[0].strip() == 'batch_size' for o in overrides):
    batch = config.batch_size
  if batch:
    config.batch_size = batch
    # Keep the paper's queue length whenever the batch tiles it; else the largest that does
    # (at least one batch).
    config.queue_size = max(batch, config.queue_size - config.queue_size % batch)
    if config.loss.itm_group_size and batch % config.loss.itm_group_size:
      config.loss.itm_group_size = 0  # a small benchmark batch is one ITM group
  if dtype:
    config.model.dtype = dtype
  if remat:
    config.model.remat = remat
  if attention:
    config.model.attention_impl = attention
  return config


def bench_config(name: str, batch: int, steps: int, dtype: str = '', remat: str = '',
                 attention: str = '', profile_dir: str = '', report=None,
                 overrides=(), init=init_state, process_peak=True) -> dict:
  """Times `steps` steps of pretrain.py's `name` variant; '' keeps the config's value.

  With `profile_dir`, 3 more steps then run under `jax.profiler.trace` (a TensorBoard /
  Perfetto trace of every kernel). `report(result)` is called before that trace, so a
  trace cut short by a time limit loses no result. `init(config) -> (tx, state)`.
  `process_peak`: report the device's peak memory, which covers everything the process
  ran so far (so only the first variant of a process gets it).
  """
  config = make_config(name, batch, dtype, remat, attention, overrides)
  b = config.batch_size
  tx, state = init(config)
  _log(f'{name}: train state initialised')
  step, carry = loop_step(config, tx, state)
  step, carry = jax.jit(step, donate_argnums=0), jax.device_put(carry)
  batch_arrays = jax.device_put(synthetic_batch(config, b))
  rng = jax.random.key(1)

  t0 = time.perf_counter()
  compiled = step.lower(carry, batch_arrays, rng).compile()
  compile_s = time.perf_counter() - t0
  _log(f'{name}: step compiled in {compile_s:.1f} s')
  xla_flops = float(xla_cost(compiled).get('flops', 0.0))
  flops = model_flops(config, tx, state, batch_arrays, rng)
  _log(f'{name}: model FLOPs counted')
  mem = compiled.memory_analysis()

  holder = {'carry': carry}
  first = {}

  def run():
    holder['carry'], metrics = compiled(holder['carry'], batch_arrays, rng)
    first.setdefault('metrics', metrics)
    return metrics['loss']

  step_s = time_call(run, steps)
  _log(f'{name}: {steps} steps timed, {1000 * step_s:.1f} ms/step')
  first_loss = float(first['metrics']['loss'])

  # IPOT alone at the step's shapes (both modalities), to report its share of the step.
  ipot_s = 0.0
  if config.loss.use_codebook:
    plans, cost = ipot_call(config)
    plans = jax.jit(plans)
    ipot_s = time_call(lambda: plans(cost), max(steps, 3))

  device = jax.devices()[0]
  peak = device_peak_flops(device)
  result = dict(
      config=name, device=device.device_kind, batch=b, dtype=config.model.dtype,
      remat=config.model.remat, attention=config.model.attention_impl or 'default',
      overrides=list(overrides),
      compile_s=compile_s, step_s=step_s, pairs_per_s=b / step_s,
      gflops_per_pair=flops / b / 1e9, compiled_gflops_per_pair=xla_flops / b / 1e9,
      ipot_share=ipot_s / step_s, first_loss=first_loss,
      skipped=int(holder['carry'][1]['skipped']),  # steps the guard refused (non-finite)
      temp_gib=mem.temp_size_in_bytes / 2**30 if mem else float('nan'),
      args_gib=mem.argument_size_in_bytes / 2**30 if mem else float('nan'))
  if peak:
    result['mfu'] = flops / step_s / (peak * jax.device_count())
  gpu = hlo_cost.device_for(device.device_kind)
  if gpu is not None:  # the compiled step's roofline on this GPU (codis_jax.roofline)
    try:
      result['roofline_s'] = hlo_cost.summary(hlo_cost.kernels(compiled.as_text()),
                                              gpu)['seconds']
      _log(f'{name}: roofline {1e3 * result["roofline_s"]:.1f} ms; the step ran at '
           f'{100 * result["roofline_s"] / step_s:.0f}% of it')
    except Exception as e:  # pylint: disable=broad-except  (never lose the measurement)
      _log(f'{name}: no roofline ({e})')
  stats = process_peak and getattr(device, 'memory_stats', lambda: None)()
  if stats and 'peak_bytes_in_use' in stats:
    result['peak_gib'] = stats['peak_bytes_in_use'] / 2**30
  if report:
    report(result)
  if profile_dir:  # last: tracing slows the steps it records
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      jax.block_until_ready([run() for _ in range(3)])
    _log(f'{name}: 3 steps traced into {profile_dir}')
  return result


def format_row(r: dict) -> str:
  mfu = f"{100 * r['mfu']:.1f}%" if 'mfu' in r else 'n/a'
  peak = f"{r['peak_gib']:.2f}" if 'peak_gib' in r else 'n/a'
  return (f"| {r['config']} | {r['device']} | {r['batch']} | {r['dtype']} | {r['remat']} | "
          f"{r['attention']} | {r['compile_s']:.1f} | {1000 * r['step_s']:.1f} | "
          f"{r['pairs_per_s']:.1f} | {r['gflops_per_pair']:.4g} | "
          f"{r['compiled_gflops_per_pair']:.4g} | {mfu} | {100 * r['ipot_share']:.2f}% | "
          f"{r['args_gib']:.2f} | {r['temp_gib']:.2f} | {peak} | {r['first_loss']:.5g} | "
          f"{', '.join(r.get('overrides', [])) or '-'} |")


HEADER = ('| config | device | batch | dtype | remat | attention | compile s | step ms | pairs/s '
          '| model GFLOPs/pair | compiled GFLOPs/pair | MFU | IPOT share | args GiB | temp GiB '
          '| peak GiB | loss, step 1 | overrides |\n' + '|---' * 18 + '|')


def _report(result):
  print(format_row(result), flush=True)
  if FLAGS.json:
    with open(FLAGS.json, 'a') as f:
      f.write(json.dumps(result) + '\n')


def main(argv):
  del argv
  if FLAGS.set:
    print(f'config overrides: {", ".join(FLAGS.set)}')
  print(HEADER)
  # The trace and the parts go to the first variant that runs: one failing (e.g. a kernel
  # this device lacks) leaves them, and the other variants, to the next.
  states, failed, first = StateCache(), [], True

  def fail(name, overrides, what, e):
    failed.append(f'{name} [{", ".join(overrides)}]{what}: {type(e).__name__}: {e}'[:2000])
    print(f'| {name} | FAILED: {failed[-1][:300]} |', flush=True)
    if FLAGS.json:
      with open(FLAGS.json, 'a') as f:
        f.write(json.dumps(dict(config=name, overrides=overrides, error=failed[-1])) + '\n')

  for name in FLAGS.configs:
    for variant in FLAGS.variant or ['']:
      overrides = list(FLAGS.set) + [o for o in variant.split(',') if o]
      try:
        bench_config(name, FLAGS.batch, FLAGS.steps, FLAGS.dtype, FLAGS.remat,
                     FLAGS.attention, FLAGS.profile_dir if first else '', report=_report,
                     overrides=overrides, init=states, process_peak=first)
      except Exception as e:  # pylint: disable=broad-except
        fail(name, overrides, '', e)
        continue
      if first and FLAGS.parts:
        from codis_jax import step_parts  # pylint: disable=import-outside-toplevel
        config = make_config(name, FLAGS.batch, FLAGS.dtype, FLAGS.remat, FLAGS.attention,
                             overrides)
        print(f'step parts, {name} [{", ".join(overrides) or "config as is"}]:')
        try:
          print(step_parts.format_rows(step_parts.measure(config, FLAGS.steps, init=states)),
                flush=True)
        except Exception as e:  # pylint: disable=broad-except
          fail(name, overrides, ' (step parts)', e)
      first = False
  if FLAGS.pipeline:
    from codis_jax.data import bench as data_bench  # pylint: disable=import-outside-toplevel
    settings = {(c.model.image_size, c.data.workers or 0)
                for c in map(pretrain.get_config, FLAGS.configs)}
    for size, workers in sorted(settings):
      r = data_bench.run(image_size=size, batch_size=32, batches=10, workers=workers)
      print(f"input pipeline (pretraining transform, synthetic 640x480 JPEGs -> {size} px, "
            f"data.workers={workers}): {r['images_per_s']:.0f} pairs/s on {r['cores']} "
            f"cores ({r['images_per_s_per_core']:.0f} per core)", flush=True)
  if failed:
    raise SystemExit(f'{len(failed)} variant(s) failed:\n' + '\n'.join(failed))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
