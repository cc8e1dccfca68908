"""The trace summary against hand-computed intervals, and on a real XLA:CPU trace."""

import jax
import jax.numpy as jnp
import pytest

from codis_jax import trace_report


def _op(pid, tid, ts, dur, op, kernel=None, module='jit_train_step', run='1'):
  return dict(ph='X', pid=pid, tid=tid, ts=ts, dur=dur, name=kernel or op,
              args=dict(hlo_op=op, hlo_module=module, run_id=run))


def _gpu_trace():
  meta = [dict(ph='M', name='process_name', pid=1, args=dict(name='/device:GPU:0')),
          dict(ph='M', name='process_name', pid=2, args=dict(name='/host:CPU'))]
  ops = [
      # step 1: two streams; [0,10) gemm, [5,12) fusion overlaps it, [20,24) copy.
      _op(1, 7, 0, 10, 'custom-call.1', 'sm90_xmma_gemm_bf16bf16_bf16f32'),
      _op(1, 8, 5, 7, 'loop_add_fusion.2'),
      _op(1, 7, 20, 4, 'copy.3'),
      # step 2: flash attention [100,106), the same fusion op again [110,112).
      _op(1, 7, 100, 6, 'custom-call.4', 'cudnn_generated_fort_native_sdpa_sm90', run='2'),
      _op(1, 7, 110, 2, 'loop_add_fusion.2', run='2'),
      # Host-side copies of the device ops and another module: both left out.
      _op(2, 3, 0, 50, 'custom-call.1'),
      _op(1, 7, 200, 20, 'fusion.9', module='jit_other', run='3'),
  ]
  host_only = dict(ph='X', pid=2, tid=3, ts=0, dur=500, name='python')  # no hlo_op
  return meta + ops + [host_only]


def test_summary_of_a_gpu_like_trace_matches_a_hand_count():
  s = trace_report.summarise(_gpu_trace())
  assert s['module'] == 'jit_train_step' and s['where'] == ['/device:GPU:0']
  assert s['steps'] == 2  # two run_ids
  # Window 0..112; busy = [0,12) + [20,24) + [100,106) + [110,112) = 24; per step / 2.
  assert s['window_us'] == pytest.approx(112 / 2)
  assert s['busy_us'] == pytest.approx(24 / 2)
  assert s['summed_us'] == pytest.approx((10 + 7 + 4 + 6 + 2) / 2)
  assert s['categories'] == pytest.approx(
      {'matmul': 5.0, 'fusion': 4.5, 'attention': 3.0, 'copy': 2.0})
  fusion = next(r for r in s['ops'] if r['op'] == 'loop_add_fusion.2')
  assert (fusion['calls'], fusion['us']) == (1, 4.5)
  assert s['kinds']['custom-call'] == pytest.approx(8.0)  # gemm 10 + sdpa 6, per step
  text = trace_report.format_summary(s)
  assert '| matmul | 0.01 | 34.5% |' in text and 'sm90_xmma_gemm' in text
  other = trace_report.summarise(_gpu_trace(), module='jit_other')
  assert (other['busy_us'], other['steps']) == (20, 1)


def test_nested_ops_count_once():
  # XLA:CPU records a while loop as one event around its body's ops.
  events = [_op(0, 1, 0, 100, 'while.1'), _op(0, 1, 10, 30, 'dot.2'),
            _op(0, 1, 50, 20, 'add_fusion.3'), _op(0, 1, 55, 5, 'copy.4')]
  assert trace_report.self_times(events) == [50, 30, 15, 5]
  s = trace_report.summarise(events)
  assert s['summed_us'] == s['busy_us'] == s['window_us'] == 100


def test_device_kernels_without_xla_names_still_count():
  bare = [{**e, 'args': {}} for e in _gpu_trace() if e.get('ph') == 'X']
  s = trace_report.summarise(_gpu_trace()[:2] + bare)
  assert s['where'] == ['/device:GPU:0'] and s['steps'] == 1
  assert s['busy_us'] == 24 + 20  # every device kernel, both modules
  assert s['categories']['matmul'] == 10


def test_errors_name_the_cause(tmp_path):
  with pytest.raises(ValueError, match='no XLA op events'):
    trace_report.summarise([dict(ph='X', pid=1, tid=1, ts=0, dur=1, name='x')])
  with pytest.raises(ValueError, match="module 'jit_nope' is not in the trace"):
    trace_report.summarise(_gpu_trace(), module='jit_nope')
  with pytest.raises(FileNotFoundError, match='no perfetto_trace.json.gz'):
    trace_report.find_trace(str(tmp_path))


def test_real_cpu_trace(tmp_path):
  f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum())
  a = jnp.ones((256, 256))
  f(a, a).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(2):
      f(a, a).block_until_ready()
  s = trace_report.summarise(trace_report.load_events(trace_report.find_trace(str(tmp_path))))
  assert s['module'] == 'jit__lambda' and s['steps'] == 2
  assert 0 < s['busy_us'] <= s['window_us']
  assert 'matmul' in s['categories'], s['ops']
