"""The codis_jax program.

  python -m codis_jax.main --config=configs/pretrain.py[:VARIANT] --workdir=DIR \
      [--mode=train] [--config.a.b=value ...]

Writes DIR/config.json and DIR/config.txt, then runs the mode. `train` trains (resuming
from DIR/checkpoints when there is one), then prints zero-shot retrieval recall (ITC, and
ITM re-ranked) on the held-out retrieval set (config.eval.data, else the data config's)
and plots DIR/loss_curve.png. A bad flag, an
unusable config or checkpoint, or a non-finite loss ends the program with one line on
stderr and a non-zero exit; SIGTERM saves a checkpoint and exits 0.

Modes are a dispatch table, MODES: name -> 'module:function', the function called as
fn(config, workdir) -> exit code or None.
"""

import difflib
import importlib
import importlib.util
import logging
import os
import sys
import traceback

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/pretrain.py:demo',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and the config.')
flags.DEFINE_string('mode', 'train', 'What to do; one of the MODES table.')

# name -> fn(config, workdir), or 'module:fn' imported only when chosen.
MODES = {
    'train': None,  # train_mode, below
    'config': None,  # config_mode: write and print the resolved config, then exit
    'eval': 'codis_jax.evaluate.run:run',
    'export': 'codis_jax.interop.export:run',
}

log = logging.getLogger('codis_jax')


def _fail(msg, code=1):
  print(f'codis_jax.main: {msg}', file=sys.stderr, flush=True)
  sys.exit(code)


def _unknown_key(argv):
  """The first --config.a.b override naming no key of the config file, with a hint."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), '')
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_codis_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for a in argv:
    if not a.startswith('--config.'):
      continue
    node = config
    for part in a.split('=')[0][len('--config.'):].split('.'):
      if not hasattr(node, 'keys') or part not in node:
        near = difflib.get_close_matches(part, list(getattr(node, 'keys', list)()), 1)
        hint = f' (did you mean {near[0]!r}?)' if near else ''
        return f'unknown config key in {a.split("=")[0]}: no {part!r}{hint}'
      node = node[part]
  return None


def parse_flags(argv):
  """absl's parser, but every mistake is one line on stderr (exit 2), no traceback."""
  try:
    return FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  (flags.Error, KeyError, ...)
    try:
      msg = _unknown_key(argv) if isinstance(e, (KeyError, AttributeError)) else None
    except Exception:  # pylint: disable=broad-except  (then the plain message will do)
      msg = None
    if msg is None:
      lines = [l.strip() for l in str(e).splitlines() if l.strip()]
      msg = lines[-1] if lines else type(e).__name__
    _fail(f'bad flag: {msg}', 2)


def write_config(config, workdir):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
    f.write(config.to_json_best_effort(indent=2) + '\n')
  with open(os.path.join(workdir, 'config.txt'), 'w', encoding='utf-8') as f:
    f.write(str(config))


def train_mode(config, workdir):
  """Train (or resume), then the end-of-run zero-shot retrieval and the loss plot."""
  import jax  # pylint: disable=import-outside-toplevel
  from codis_jax import loop, metrics_log, pretrain_eval  # pylint: disable=import-outside-toplevel

  has_set = pretrain_eval.has_retrieval_set(config)
  evaluate = None
  if config.eval.every_steps and has_set:
    evaluate = lambda state, mesh: pretrain_eval.evaluate(config, state, mesh)
  elif config.eval.every_steps:
    logging.warning('config.eval.every_steps=%d but no retrieval set (config.eval.data, or '
                    "the data config's `retrieval`): no periodic evaluation",
                    config.eval.every_steps)
  result = loop.train(config, workdir, evaluate=evaluate)
  if result.preempted:
    return 0
  primary = jax.process_index() == 0
  if has_set:
    scalars, lines = pretrain_eval.evaluate(config, result.state, result.mesh, both=True)
    if primary:
      metrics_log.MetricsWriter(workdir, tensorboard=False,
                                resume_step=result.step).write(result.step, scalars)
      for line in lines:
        print(line, flush=True)
  if primary and config.log.plot:
    path = metrics_log.plot_losses(workdir)
    if path:
      print(f'loss curve: {path}', flush=True)
  return 0


def check_attention_backend(config, backend: str):
  """A clear error for an attention kernel of another kind of chip than `backend`'s."""
  impl = config.model.attention_impl
  kernels = {'pallas': ('tpu', 'the TPU attention kernel', "('cudnn' on GPUs)"),
             'cudnn': ('gpu', "NVIDIA's flash attention", "('pallas' on TPUs)")}
  if impl in kernels and backend != kernels[impl][0]:
    raise ValueError(f"config.model.attention_impl={impl!r} is {kernels[impl][1]}; this "
                     f"run's devices are {backend}: use '' or 'xla' {kernels[impl][2]}, "
                     "or the config variant for these devices")


def config_mode(config, workdir):
  del workdir  # main wrote the config there already
  print(config, end='', flush=True)
  return 0


def _resolve(mode):
  if mode not in MODES:
    _fail(f'bad flag: --mode={mode!r}; choose from {", ".join(sorted(MODES))}', 2)
  if not isinstance(MODES[mode], str):
    return MODES[mode] or {'train': train_mode, 'config': config_mode}[mode]
  module, fn = MODES[mode].split(':')
  try:
    return getattr(importlib.import_module(module), fn)
  except (ImportError, AttributeError):
    _fail(f'--mode={mode} is not available yet: {module}.{fn}(config, workdir) is '
          'missing', 2)


def main(argv):
  if len(argv) > 1:
    _fail(f'bad flag: unexpected arguments {argv[1:]}', 2)
  if FLAGS.config is None or not FLAGS.workdir:
    _fail('bad flag: --config and --workdir are required', 2)
  run = _resolve(FLAGS.mode)
  config, workdir = FLAGS.config, os.path.abspath(FLAGS.workdir)
  if FLAGS.mode == 'config':  # no JAX needed
    write_config(config, workdir)
    return run(config, workdir)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s',
                      datefmt='%H:%M:%S')
  logging.getLogger('absl').setLevel(logging.WARNING)  # Orbax is chatty at INFO
  import jax  # pylint: disable=import-outside-toplevel
  from codis_jax import checkpoint, loop, sharding  # pylint: disable=import-outside-toplevel
  sharding.maybe_initialize_distributed()
  if jax.process_index() == 0 and FLAGS.mode != 'export':  # export reads a run's workdir
    write_config(config, workdir)
  try:
    if FLAGS.mode != 'export':  # export runs no model
      check_attention_backend(config, jax.default_backend())
    return run(config, workdir) or 0
  except (loop.RunError, checkpoint.CheckpointError, ValueError) as e:
    # ValueError: DataError and the config checks of the step, mesh and optimiser. The
    # traceback goes to a file, so that a real bug stays debuggable.
    path = os.path.join(workdir, f'error.{jax.process_index()}.log')
    with open(path, 'w', encoding='utf-8') as f:
      traceback.print_exc(file=f)
    _fail(f'error: {e} (traceback: {path})', 1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
