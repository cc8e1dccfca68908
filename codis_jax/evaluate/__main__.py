"""python -m codis_jax.evaluate --config=configs/retrieval_coco.py \
       --config.eval.checkpoint=PATH --workdir=DIR [--config.a.b=value ...]

Evaluates a checkpoint (see run.py); exits 1 with one line on stderr on a config, data
or checkpoint error.
"""

import logging
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'e.g. configs/retrieval_coco.py')
flags.DEFINE_string('workdir', None, 'Directory for eval_results.json.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if config is None or not workdir:
    raise app.UsageError('--config and --workdir are required')
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s',
                      datefmt='%H:%M:%S')
  logging.getLogger('absl').setLevel(logging.WARNING)
  from codis_jax import sharding  # pylint: disable=import-outside-toplevel
  from codis_jax.evaluate import run  # pylint: disable=import-outside-toplevel
  sharding.maybe_initialize_distributed()
  try:
    run.evaluate_checkpoint(config, os.path.abspath(workdir))
  except ValueError as e:  # config, data (DataError) and checkpoint errors
    print(f'codis_jax.evaluate: error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  app.run(main)
