"""How far the bf16 step's gradients are from the float32 step's, per kind of parameter.

  python -m codis_jax.grad_precision --config=tiny --batch=64

Computes the gradient of the step's loss with respect to the student's parameters twice,
at model.dtype=float32 and bfloat16 (same init, batch and dropout key; dropout off so
that both draw nothing), and prints, per group of parameters, the median and the worst
relative L2 error ||g_bf16 - g_f32|| / ||g_f32||. Kernels show the floor that the bf16
forward sets; a group far above it sums its gradient in too few bits (README,
Performance: parameter gradients are summed in float32).
"""

from absl import app
from absl import flags
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from codis_jax import bench
from codis_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('config', 'tiny', 'configs/pretrain.py variant.')
flags.DEFINE_integer('batch', 64, 'Batch size.')


def step_grads(config, batch_size: int, dtype: str) -> dict:
  """{'a/b/kernel': gradient} of the step's loss w.r.t. the student's parameters."""
  config = bench.make_config(config, batch_size, overrides=[f'model.dtype={dtype}',
                                                            'model.dropout=0.0'])
  tx, state = bench.init_state(config)
  step = train.make_train_step(config, tx, steps_per_epoch=10)
  batch = jax.tree.map(jnp.asarray, bench.synthetic_batch(config, batch_size))
  loss = lambda p: step(state.replace(params=p), batch, jax.random.key(3))[1]['loss']
  grads = jax.jit(jax.grad(loss))(state.params)
  return traverse_util.flatten_dict(jax.device_get(grads), sep='/')


def group(path: str, paths) -> str | None:
  """The report's group of a parameter path; None for key biases (softmax ignores a
  bias added to every key, so their true gradient is zero and the ratio is noise)."""
  module, _, name = path.rpartition('/')
  if path.endswith('key/bias'):
    return None
  for key in ('word_embeddings', 'token_type_embeddings', 'position_embeddings',
              'pos_embed', 'cls_token', 'patch_embed/bias', 'mlm_head/bias'):
    if key in path:
      return key
  if name in ('scale', 'bias') and f'{module}/scale' in paths:
    return 'LayerNorm scale and bias'
  return {'bias': 'Dense biases', 'kernel': 'kernels'}.get(name, 'other float32 parameters')


def report(f32: dict, bf16: dict) -> dict:
  """{group: (count, median error, worst error)}."""
  errors = {}
  for path, want in f32.items():
    g, norm = group(path, f32), np.linalg.norm(np.float64(want))
    if g is None or norm == 0:
      continue
    err = np.linalg.norm(np.float64(bf16[path]) - np.float64(want)) / norm
    errors.setdefault(g, []).append(float(err))
  return {g: (len(e), float(np.median(e)), max(e)) for g, e in sorted(errors.items())}


def main(argv):
  del argv
  rows = report(step_grads(FLAGS.config, FLAGS.batch, 'float32'),
                step_grads(FLAGS.config, FLAGS.batch, 'bfloat16'))
  print(f'# {FLAGS.config}, batch {FLAGS.batch}: relative L2 error of the bf16 gradients\n'
        '| parameters | count | median | worst |\n|---|---|---|---|')
  for g, (n, median, worst) in rows.items():
    print(f'| {g} | {n} | {100 * median:.2f}% | {100 * worst:.2f}% |')


if __name__ == '__main__':
  app.run(main)
