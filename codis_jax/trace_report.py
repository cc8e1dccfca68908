"""Where a profiled step's device time goes: a summary of a `jax.profiler` trace.

  python -m codis_jax.trace_report TRACE_DIR [--module=jit_train_step] [--top=25]

Reads the newest `perfetto_trace.json.gz` under TRACE_DIR (what `bench --profile_dir`
writes) and keeps the events of XLA's ops: those whose args name an `hlo_op` (GPU kernels
on the device's streams, the thunks of XLA:CPU; failing those, every event on a
/device: process, each kernel name its own op). For the module that spent the most time
(or `--module`), per step (distinct `run_id`s, else `--steps`):
  - window: first op start to last op end; busy: the union of the ops' intervals over all
    streams / threads; idle = window - busy (launch gaps, host syncs);
  - time per category (attention, convolution, matmul, collective, copy, fusion, other),
    classified from the kernel and HLO op names, summed over ops (streams can overlap;
    an op's time excludes the ops nested in it, e.g. a while loop's body on XLA:CPU);
  - the top op kinds (HLO op names without their number) and ops, with kernel names.
"""

import collections
import glob
import gzip
import json
import os
import re
import sys

from absl import app
from absl import flags

# First match wins; tested against the kernel name and the HLO op name together.
CATEGORIES = (
    ('attention', r'fmha|flash|sdpa|attention|attn'),
    ('convolution', r'convolution|fprop|dgrad|wgrad|conv2d'),
    ('matmul', r'gemm|xmma|cublas|cutlass|matmul|\bdot\b|dot[._]|ynn_fusion'),
    ('collective', r'nccl|all-reduce|all-gather|reduce-scatter|all-to-all|collective'),
    ('copy', r'^copy|memcpy|memset|transpose'),
    ('fusion', r'fusion|wrapped_|loop_|input_|reduce|triton|broadcast|convert|select'),
)


def category(kernel: str, hlo_op: str) -> str:
  text = f'{kernel} {hlo_op}'.lower()
  for name, pattern in CATEGORIES:
    if re.search(pattern, text):
      return name
  return 'other'


def find_trace(path: str) -> str:
  """`path` itself, or the newest perfetto_trace.json.gz below it."""
  if os.path.isfile(path):
    return path
  found = glob.glob(os.path.join(path, '**', 'perfetto_trace.json.gz'), recursive=True)
  if not found:
    raise FileNotFoundError(f'no perfetto_trace.json.gz under {path} (write one with '
                            'bench --profile_dir)')
  return max(found, key=os.path.getmtime)


def load_events(path: str) -> list[dict]:
  with (gzip.open if path.endswith('.gz') else open)(path, 'rt') as f:
    data = json.load(f)
  return data['traceEvents'] if isinstance(data, dict) else data


def union_us(intervals) -> float:
  """Total length of the union of [start, end) intervals."""
  total, end = 0.0, float('-inf')
  for s, e in sorted(intervals):
    if e > end:
      total += e - max(s, end)
      end = e
  return total


def self_times(events) -> list[float]:
  """Each event's duration less its direct children's on the same thread (a while loop's
  event on XLA:CPU holds its body's ops), so that summed times count nothing twice."""
  out = [e['dur'] for e in events]
  threads = collections.defaultdict(list)
  for i, e in enumerate(events):
    threads[(e['pid'], e.get('tid'))].append(i)
  for idx in threads.values():
    stack = []
    for i in sorted(idx, key=lambda i: (events[i]['ts'], -events[i]['dur'])):
      start = events[i]['ts']
      while stack and events[stack[-1]]['ts'] + events[stack[-1]]['dur'] <= start:
        stack.pop()
      if stack:
        out[stack[-1]] -= events[i]['dur']
      stack.append(i)
  return out


def summarise(events, module: str = '', steps: int = 0) -> dict:
  """The summary (see the module docstring) of trace events; times in microseconds."""
  names = {e['pid']: e['args']['name'] for e in events
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  ops = [e for e in events if e.get('ph') == 'X' and 'hlo_op' in e.get('args', {})]
  if not ops:  # kernels without XLA's names: each kernel name is its own op
    ops = [{**e, 'args': {**e.get('args', {}), 'hlo_op': e['name']}} for e in events
           if e.get('ph') == 'X' and names.get(e['pid'], '').startswith('/device:')]
  if not ops:
    raise ValueError('the trace has no XLA op events (args.hlo_op) nor device kernels: '
                     'was it recorded around the steps, with jax.profiler.trace?')
  by_module = collections.Counter()
  for e in ops:
    by_module[e['args'].get('hlo_module', '')] += e['dur']
  module = module or by_module.most_common(1)[0][0]
  if module not in by_module:
    raise ValueError(f'module {module!r} is not in the trace; it has {sorted(by_module)}')
  ops = [e for e in ops if e['args'].get('hlo_module', '') == module]
  # On a GPU the kernels sit on the device's process; XLA:CPU runs its ops on the host.
  device = [e for e in ops if names.get(e['pid'], '').startswith('/device:')]
  ops = device or ops
  runs = {e['args']['run_id'] for e in ops if 'run_id' in e['args']}
  steps = steps or len(runs) or 1
  window = max(e['ts'] + e['dur'] for e in ops) - min(e['ts'] for e in ops)
  busy = union_us((e['ts'], e['ts'] + e['dur']) for e in ops)
  per_cat = collections.Counter()
  per_op = collections.defaultdict(lambda: [0.0, 0, None, None])
  for e, dur in zip(ops, self_times(ops)):
    hlo_op = e['args']['hlo_op']
    cat = category(e['name'], hlo_op)
    per_cat[cat] += dur
    row = per_op[hlo_op]
    row[0] += dur
    row[1] += 1
    row[2], row[3] = row[2] or e['name'], cat
  kinds = collections.Counter()
  for k, v in per_op.items():
    kinds[re.sub(r'\.\d+$', '', k)] += v[0]
  return dict(
      module=module, where=sorted({names.get(e['pid'], str(e['pid'])) for e in ops}),
      steps=steps, window_us=window / steps, busy_us=busy / steps,
      summed_us=sum(per_cat.values()) / steps,
      categories={k: v / steps for k, v in per_cat.most_common()},
      kinds={k: v / steps for k, v in kinds.most_common()},
      ops=[dict(op=k, us=v[0] / steps, calls=v[1] / steps, kernel=v[2], category=v[3])
           for k, v in sorted(per_op.items(), key=lambda kv: -kv[1][0])])


def format_summary(s: dict, top: int = 25) -> str:
  ms = lambda us: f'{us / 1e3:.2f}'
  lines = [
      f"module {s['module']} on {', '.join(s['where'])}, {s['steps']} step(s); per step:",
      f"window {ms(s['window_us'])} ms, ops busy {ms(s['busy_us'])} ms "
      f"({100 * s['busy_us'] / s['window_us']:.1f}%), idle "
      f"{ms(s['window_us'] - s['busy_us'])} ms; op time summed over streams "
      f"{ms(s['summed_us'])} ms", '',
      '| category | ms/step | share of summed op time |', '|---|---|---|']
  for k, v in s['categories'].items():
    lines.append(f"| {k} | {ms(v)} | {100 * v / s['summed_us']:.1f}% |")
  lines += ['', f'top {top} op kinds (HLO op names without their number):',
            '| op kind | ms/step | share |', '|---|---|---|']
  for k, v in list(s['kinds'].items())[:top]:
    lines.append(f"| {k} | {ms(v)} | {100 * v / s['summed_us']:.1f}% |")
  lines += ['', f'top {top} ops:', '| HLO op | category | calls/step | ms/step | share | kernel |',
            '|---|---|---|---|---|---|']
  for r in s['ops'][:top]:
    lines.append(f"| {r['op']} | {r['category']} | {r['calls']:g} | {ms(r['us'])} | "
                 f"{100 * r['us'] / s['summed_us']:.1f}% | {r['kernel'][:90]} |")
  return '\n'.join(lines)


def main(argv):
  if len(argv) != 2:
    sys.exit('usage: python -m codis_jax.trace_report TRACE_DIR_OR_FILE [--module=...]')
  path = find_trace(argv[1])
  print(f'trace: {path}')
  print(format_summary(summarise(load_events(path), flags.FLAGS.module, flags.FLAGS.steps),
                       flags.FLAGS.top))


if __name__ == '__main__':
  flags.DEFINE_string('module', '', 'HLO module to summarise (default: the costliest).')
  flags.DEFINE_integer('steps', 0, 'Steps in the trace when its events carry no run_id.')
  flags.DEFINE_integer('top', 25, 'How many ops to list.')
  app.run(main)
