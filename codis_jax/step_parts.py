"""Where the step's time goes: the train step's parts, each jitted and timed alone.

  python -m codis_jax.step_parts --config=paper --batch=64 --dtype=bfloat16   # one chip
  python -m codis_jax.step_parts --config=tiny --batch=8                      # CPU

Each part runs at the shapes it has inside the step (B = global batch; the teacher runs
forward only, the student forward + backward into its parameters and into the inputs that
come from another part):

  vision_student   encode_image, B images
  vision_teacher   encode_image, B images, forward
  text_student     encode_text, 2B rows (clean + masked text in one call)
  text_teacher     encode_text, 2B rows, forward
  fusion_student   fuse on 4B rows (ITM positives, 2 negative sets, MLM) + MLM head on B;
                   with share_image_kv, cross-attention keys/values from the B images
  fusion_teacher   fuse + MLM head on B rows, forward
  ipot             the codebook plans of both modalities (forward; the plans take no gradient)
  update           AdamW, temperature clamp, EMA teacher, enqueue (`train.apply_update`)

Per part: milliseconds, model GFLOPs (`codis_jax.flops`), achieved TFLOP/s, MFU on a known
chip, and its share of the whole step's time. The parts' FLOPs cover the step's but for the
losses' own matmuls (queue similarities, ITM head); "rest" is the step minus the parts:
losses, sampling, masking, and whatever XLA does differently in the fused step.
"""

import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from codis_jax import bench
from codis_jax import flops as flops_lib
from codis_jax import state as state_lib
from codis_jax import train
from codis_jax.models import codis

FLAGS = flags.FLAGS


def _inputs(config, model, params, batch):
  """Random stand-ins at the step's shapes for what one part takes from another."""
  b, rs = config.batch_size, np.random.RandomState(0)
  images = jnp.asarray(batch['image'])
  tok_shape = jax.eval_shape(
      lambda p, x: model.apply({'params': p}, x, method=codis.CODIS.encode_image),
      params, images)[0]
  dtype = jnp.dtype(config.model.dtype)
  rand = lambda shape: jnp.asarray(rs.randn(*shape), dtype)
  ids = jnp.asarray(np.concatenate([batch['text_ids']] * 2))
  return dict(
      images=images, ids2=ids, mask2=jnp.asarray(np.concatenate([batch['text_mask']] * 2)),
      text4=rand((4 * b, config.text_len, config.model.text_width)),
      mask4=jnp.ones((4 * b, config.text_len), jnp.int32),
      image4=rand((4 * b,) + tok_shape.shape[1:]),
      # share_image_kv: an example's 4 fusion rows see its own image but the third.
      index4=(None, None, train.group_index(b, jnp.roll(jnp.arange(b), 1)), None),
      text1=rand((b, config.text_len, config.model.text_width)),
      mask1=jnp.asarray(batch['text_mask']), image1=rand(tok_shape.shape))


def make_parts(config, tx, state, batch):
  """{name: (fn, args)}: each part of the step as a function to jit and time."""
  student = codis.build_model(config.model, train=True)
  teacher = codis.build_model(config.model, train=False)
  x = _inputs(config, student, state.params, batch)
  drop = jax.random.key(5)
  b = config.batch_size

  def run(model, p, method, *args):
    return model.apply({'params': p}, *args, method=method, rngs={'dropout': drop})

  def fwd_bwd(fn):
    """fn(params, *float_inputs) -> outputs; their vector-Jacobian product w.r.t. params
    and the float inputs (what the step's backward pass computes). The cotangent is the
    output itself: a constant one would let XLA fold parts of the backward away."""
    def grads(params, *args):
      out, vjp = jax.vjp(fn, params, *args)
      return vjp(jax.tree.map(lambda o: o / o.size, out))
    return grads

  def fusion_student(p, text4, image):
    index = (x['index4'],) if config.model.share_image_kv else ()
    fused = run(student, p, codis.CODIS.fuse, text4, x['mask4'], image, *index)
    return fused, run(student, p, codis.CODIS.mlm_logits, fused[3::4])

  def fusion_teacher(p, text1, image1):
    fused = run(teacher, p, codis.CODIS.fuse, text1, x['mask1'], image1)
    return run(teacher, p, codis.CODIS.mlm_logits, fused)

  feats = jax.random.normal(jax.random.key(3), (b, config.model.embed_dim))
  grads = jax.tree.map(jnp.zeros_like, state.params)
  tparams = state_lib.teacher_params(state)
  parts = {
      'vision_student': (fwd_bwd(lambda p: run(student, p, codis.CODIS.encode_image,
                                               x['images'])), (state.params,)),
      'vision_teacher': (lambda p: run(teacher, p, codis.CODIS.encode_image, x['images']),
                         (tparams,)),
      'text_student': (fwd_bwd(lambda p: run(student, p, codis.CODIS.encode_text, x['ids2'],
                                             x['mask2'])), (state.params,)),
      'text_teacher': (lambda p: run(teacher, p, codis.CODIS.encode_text, x['ids2'],
                                     x['mask2']), (tparams,)),
      'fusion_student': (fwd_bwd(fusion_student), (state.params, x['text4'], x[
          'image1' if config.model.share_image_kv else 'image4'])),
      'fusion_teacher': (fusion_teacher, (tparams, x['text1'], x['image1'])),
      'update': (lambda s, g: train.apply_update(s, g, tx, config, feats, feats),
                 (state, grads)),
  }
  if config.loss.use_codebook:
    plans, cost = bench.ipot_call(config)
    parts['ipot'] = (plans, (cost,))
  return parts


def measure(config, steps: int, init=bench.init_state) -> list[dict]:
  """Rows {part, ms, gflops, tflops_per_s, share[, mfu]}, the whole step first.
  init(config) -> (tx, fresh train state)."""
  tx, state = init(config)
  batch = bench.synthetic_batch(config, config.batch_size)
  rng = jax.random.key(1)
  step = train.make_train_step(config, tx, steps_per_epoch=1000)
  parts = {'step': (step, (state, jax.device_put(batch), rng)),
           **make_parts(config, tx, state, batch)}
  # FLOPs as the bench counts them: remat off, attention as matmuls (bench.flops_config).
  fc = bench.flops_config(config)
  counted = {'step': train.make_train_step(fc, tx, steps_per_epoch=1000),
             **{k: fn for k, (fn, _) in make_parts(fc, tx, state, batch).items()}}
  peak = bench.device_peak_flops(jax.devices()[0])
  rows = []
  for name, (fn, args) in parts.items():
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = bench.time_call(lambda: compiled(*args), steps)
    flops = flops_lib.count(counted[name], *args)
    row = dict(part=name, ms=1e3 * seconds, gflops=flops / 1e9,
               tflops_per_s=flops / seconds / 1e12)
    if peak:
      row['mfu'] = flops / seconds / (peak * jax.device_count())
    rows.append(row)
    print(f'[step_parts] {name}: {row["ms"]:.2f} ms', file=sys.stderr, flush=True)
  step_ms = rows[0]['ms']
  rest = step_ms - sum(r['ms'] for r in rows[1:])
  rows.append(dict(part='rest (step - parts)', ms=rest,
                   gflops=rows[0]['gflops'] - sum(r['gflops'] for r in rows[1:])))
  for r in rows:
    r['share'] = r['ms'] / step_ms
  return rows


def format_rows(rows) -> str:
  lines = ['| part | ms | share of step | GFLOPs | TFLOP/s | MFU |', '|---' * 6 + '|']
  for r in rows:
    tf = f"{r['tflops_per_s']:.2f}" if 'tflops_per_s' in r else ''
    mfu = f"{100 * r['mfu']:.1f}%" if 'mfu' in r else ''
    lines.append(f"| {r['part']} | {r['ms']:.2f} | {100 * r['share']:.1f}% | "
                 f"{r['gflops']:.4g} | {tf} | {mfu} |")
  return '\n'.join(lines)


def main(argv):
  del argv
  config = bench.make_config(FLAGS.config, FLAGS.batch, FLAGS.dtype, FLAGS.remat,
                             FLAGS.attention, FLAGS.set)
  print(f'{FLAGS.config}, batch {config.batch_size}, {config.model.dtype}, remat '
        f'{config.model.remat}, attention {config.model.attention_impl or "default"}, '
        f'overrides {",".join(FLAGS.set) or "none"}, {jax.devices()[0].device_kind}')
  print(format_rows(measure(config, FLAGS.steps)), flush=True)


if __name__ == '__main__':
  flags.DEFINE_string('config', 'tiny', 'pretrain.py variant.')
  flags.DEFINE_integer('batch', 8, 'Global batch size (0 = the config value).')
  flags.DEFINE_integer('steps', 5, 'Timed calls per part after one untimed call.')
  flags.DEFINE_string('dtype', '', 'Override config.model.dtype.')
  flags.DEFINE_string('remat', '', 'Override config.model.remat.')
  flags.DEFINE_string('attention', '', 'Override config.model.attention_impl.')
  flags.DEFINE_list('set', [], 'More config overrides, KEY=VALUE (as bench --set).')
  app.run(main)
