"""Run logging: the progress line, metrics.jsonl + TensorBoard, and the loss-curve PNG.

Only the primary host writes files. TensorFlow (for tf.summary) is imported lazily, and
only when config.log.tensorboard is on.
"""

import json
import os

LOSS_KEYS = ('loss', 'loss_ica', 'loss_code', 'loss_itm', 'loss_mlm')
_SHORT = {'loss': 'loss', 'loss_ica': 'ica', 'loss_code': 'code', 'loss_itm': 'itm',
          'loss_mlm': 'mlm'}


def format_duration(seconds) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


def progress_line(step, total, epoch, metrics, pairs_per_s, eta_s, mfu=None) -> str:
  """One line: step, epoch, loss terms, lr, throughput, ETA (and MFU, codebook usage,
  skipped updates and bad input records when there are any)."""
  parts = [f'step {step}/{total}', f'ep {epoch:.2f}']
  parts.append(' '.join(f'{_SHORT[k]} {metrics[k]:.4f}' for k in LOSS_KEYS if k in metrics))
  if 'lr' in metrics:
    parts.append(f'lr {metrics["lr"]:.2e}')
  parts.append(f'{pairs_per_s:.1f} pairs/s')
  if mfu is not None:
    parts.append(f'MFU {100 * mfu:.1f}%')
  parts.append(f'ETA {format_duration(eta_s)}')
  if 'codebook_used_img' in metrics:
    parts.append(f'codes img {metrics["codebook_used_img"]:.0f} '
                 f'txt {metrics.get("codebook_used_txt", 0):.0f}')
  if metrics.get('skipped'):
    parts.append(f'skipped {metrics["skipped"]:.0f}')
  bad = sum(v for k, v in metrics.items() if k.startswith('data_bad/'))
  if bad:
    parts.append(f'bad records {bad:.0f}')
  return ' | '.join(parts)


class MetricsWriter:
  """Appends {'step': s, **scalars} lines to WORKDIR/metrics.jsonl and writes the same
  scalars to TensorBoard under WORKDIR/tensorboard."""

  def __init__(self, workdir, *, enabled=True, tensorboard=True, resume_step=0):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    # A killed run may have logged past its last checkpoint: drop those lines so that
    # the resumed run's log reads as one run.
    if os.path.exists(self.path):
      lines = [l for l in _read_lines(self.path) if l.get('step', 0) <= resume_step]
      with open(self.path, 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(l) + '\n' for l in lines)
    if tensorboard:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      from tensorflow.core.framework import summary_pb2  # pylint: disable=import-outside-toplevel
      self._tf = tf
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))
      # What tf.summary.scalar writes, without needing the tensorboard package.
      self._meta = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='scalars'))

  def write(self, step, scalars: dict):
    if not self.enabled:
      return
    row = {'step': int(step), **{k: _jsonable(v) for k, v in scalars.items()}}
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write(json.dumps(row) + '\n')
    if self._tb is not None:
      with self._tb.as_default(step=int(step)):
        for k, v in row.items():
          if k != 'step' and isinstance(v, (int, float)):
            self._tf.summary.write(k, self._tf.constant(v, self._tf.float32),
                                   metadata=self._meta)
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _jsonable(v):
  if hasattr(v, 'item'):
    v = v.item()
  if isinstance(v, float) and v != v:  # NaN is not JSON; keep it readable
    return 'nan'
  return v


def _read_lines(path):
  out = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:  # a line cut short by a kill
        pass
  return out


def read_metrics(workdir) -> list:
  path = os.path.join(workdir, 'metrics.jsonl')
  return _read_lines(path) if os.path.exists(path) else []


def plot_losses(workdir, filename='loss_curve.png'):
  """The loss terms (log scale) and the learning rate against the step -> a PNG."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = {r['step']: r for r in read_metrics(workdir) if 'loss' in r}  # last one wins
  steps = sorted(rows)
  if not steps:
    return None
  fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                  gridspec_kw={'height_ratios': [3, 1]})
  for k in LOSS_KEYS:
    ys = [rows[s].get(k) for s in steps]
    if all(isinstance(y, (int, float)) for y in ys):
      ax.plot(steps, ys, label=k, lw=2 if k == 'loss' else 1)
  ax.set_yscale('log')
  ax.set_ylabel('loss')
  ax.legend()
  ax.grid(alpha=0.3)
  ax_lr.plot(steps, [rows[s].get('lr', 0.0) for s in steps], color='gray')
  ax_lr.set_ylabel('lr')
  ax_lr.set_xlabel('step')
  ax_lr.grid(alpha=0.3)
  fig.suptitle(os.path.basename(os.path.abspath(workdir)))
  fig.tight_layout()
  path = os.path.join(workdir, filename)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
