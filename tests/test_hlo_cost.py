"""hlo_cost: kernels, FLOPs and bytes read from optimised HLO, checked by hand counts."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest

from codis_jax import hlo_cost
import compile_only

# GPU-style HLO as XLA writes it: a cuBLAS call with its scratch buffer, a fusion that reads
# a slice of a big buffer, an in-place dynamic-update-slice fusion, and a while loop.
_GPU_HLO = """\
HloModule jit_step, is_scheduled=true

%fused_slice (param_0: f32[1000,256], param_1: s32[]) -> f32[64,256] {
  %param_0 = f32[1000,256]{1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %c0 = s32[] constant(0)
  ROOT %ds = f32[64,256]{1,0} dynamic-slice(%param_0, %param_1, %c0), dynamic_slice_sizes={64,256}
}

%fused_dus (param_0.1: f32[1000,256], param_1.1: bf16[64,256], param_2.1: s32[]) -> f32[1000,256] {
  %param_0.1 = f32[1000,256]{1,0} parameter(0)
  %param_1.1 = bf16[64,256]{1,0} parameter(1)
  %cv = f32[64,256]{1,0} convert(%param_1.1)
  %param_2.1 = s32[] parameter(2)
  %c1 = s32[] constant(0)
  ROOT %dus = f32[1000,256]{1,0} dynamic-update-slice(%param_0.1, %cv, %param_2.1, %c1)
}

%fused_tanh (param_0.2: f32[64,256]) -> f32[64,256] {
  %param_0.2 = f32[64,256]{1,0} parameter(0)
  ROOT %t = f32[64,256]{1,0} tanh(%param_0.2)
}

%body (arg: (s32[], f32[64,256])) -> (s32[], f32[64,256]) {
  %arg = (s32[], f32[64,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %x = f32[64,256]{1,0} get-tuple-element(%arg), index=1
  %tanh_fusion = f32[64,256]{1,0} fusion(%x), kind=kLoop, calls=%fused_tanh
  ROOT %out = (s32[], f32[64,256]{1,0}) tuple(%i, %tanh_fusion)
}

%fused_lt (param_0.3: s32[]) -> pred[] {
  %param_0.3 = s32[] parameter(0)
  %c3 = s32[] constant(3)
  ROOT %lt = pred[] compare(%param_0.3, %c3), direction=LT
}

%cond (arg.1: (s32[], f32[64,256])) -> pred[] {
  %arg.1 = (s32[], f32[64,256]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%arg.1), index=0
  ROOT %lt_fusion = pred[] fusion(%i.1), kind=kLoop, calls=%fused_lt
}

ENTRY %main (p0: bf16[64,128], p1: bf16[128,256], queue: f32[1000,256], ptr: s32[]) -> f32[1000,256] {
  %p0 = bf16[64,128]{1,0} parameter(0)
  %p1 = bf16[128,256]{1,0} parameter(1)
  %queue = f32[1000,256]{1,0} parameter(2)
  %ptr = s32[] parameter(3)
  %gemm = (bf16[64,256]{1,0}, s8[4194304]{0}) custom-call(%p0, %p1), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/dense/dot_general"}, backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %h = bf16[64,256]{1,0} get-tuple-element(%gemm), index=0
  %old = f32[64,256]{1,0} fusion(%queue, %ptr), kind=kLoop, calls=%fused_slice
  %t0 = (s32[], f32[64,256]{1,0}) tuple(%ptr, %old)
  %loop = (s32[], f32[64,256]{1,0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %new = f32[1000,256]{1,0} fusion(%queue, %h, %ptr), kind=kLoop, calls=%fused_dus
}
"""


def test_gpu_style_hlo_kernels_by_hand():
  ks = {k.name: k for k in hlo_cost.kernels(_GPU_HLO)}
  assert sorted(ks) == ['gemm', 'new', 'old', 'tanh_fusion']
  gemm = ks['gemm']
  assert gemm.kind == '__cublas$lt$matmul' and gemm.op_name == 'jit(step)/dense/dot_general'
  assert gemm.flops == 2 * 64 * 256 * 128
  # bf16 operands in, bf16 result out; the s8 scratch buffer is not data.
  assert gemm.bytes == (64 * 128 + 128 * 256 + 64 * 256) * 2
  assert not gemm.f32_matmul and gemm.count == 1
  # The slice fusion reads 64 of the queue's 1000 rows and its int32 offset.
  assert ks['old'].bytes == 64 * 256 * 4 + 4 + 64 * 256 * 4
  # In place: the bf16 update and the offset are read, only the 64 rows are written.
  assert ks['new'].bytes == 64 * 256 * 2 + 4 + 64 * 256 * 4
  # No metadata: named after its first operand that has a name (the GEMM, through the gte).
  assert ks['new'].op_name == 'jit(step)/dense/dot_general'
  # The while body runs its trip count; with a known trip count XLA:GPU never runs the
  # condition (lt_fusion is not a launch).
  assert ks['tanh_fusion'].count == 3 and ks['tanh_fusion'].bytes == 2 * 64 * 256 * 4


def test_roofline_seconds_and_summary_by_hand():
  dev = hlo_cost.Device('test', bf16_flops=100.0, f32_matmul_flops=50.0, bandwidth=10.0,
                        launch_s=1.0)
  compute = hlo_cost.Kernel('a', 'custom-call', 'gemm', '', flops=1000.0, bytes=20.0,
                            count=2, f32_matmul=False)   # 10 s compute > 2 s memory
  f32 = dataclasses.replace(compute, name='b', count=1, f32_matmul=True)  # 20 s at 50 FLOP/s
  memory = hlo_cost.Kernel('c', 'fusion', 'kLoop', '', flops=0.0, bytes=300.0, count=1,
                           f32_matmul=False)             # 30 s of bytes
  assert hlo_cost.roofline_seconds(compute, dev) == 2 * (10 + 1)
  assert hlo_cost.roofline_seconds(f32, dev) == 20 + 1
  s = hlo_cost.summary([compute, f32, memory], dev)
  assert s['launches'] == 4 and s['flops'] == 3000 and s['bytes'] == 40 + 20 + 300
  assert s['seconds'] == 22 + 21 + 31
  assert (s['compute_bound_s'], s['memory_bound_s'], s['launch_s']) == (40, 30, 4)
  groups = hlo_cost.group_by([compute, f32, memory], lambda k: k.kind, dev)
  assert [g[0] for g in groups] == ['gemm', 'kLoop'] and groups[0][1:] == (3, 3000, 60, 43)


def test_cpu_compiled_program_flops_and_loop_counts():
  # A real XLA:CPU compile: one matmul, then a 5-trip loop of two matmuls.
  m, n = 32, 16

  def f(x, w):
    return jax.lax.fori_loop(0, 5, lambda i, c: jnp.tanh(c @ w.T @ w), jax.nn.gelu(x @ w))

  text = jax.jit(f).lower(jax.ShapeDtypeStruct((m, n), jnp.float32),
                          jax.ShapeDtypeStruct((n, n), jnp.float32)).compile().as_text()
  ks = hlo_cost.kernels(text)
  assert sum(k.count * k.flops for k in ks) == 2 * m * n * n * (1 + 2 * 5)
  assert max(k.count for k in ks) == 5
  # The first matmul's kernel reads x and w and writes [m, n], all float32.
  first = [k for k in ks if k.flops and k.count == 1]
  assert len(first) == 1 and first[0].bytes == (m * n + n * n + m * n) * 4


def test_conditional_counts_the_branch_that_moves_most():
  """A real XLA:CPU compile of cond(p, tanh(x @ w), x): one branch runs; the costlier one
  (the matmul's) is counted, not the conditional as one kernel over all its operands."""
  m, n = 32, 16

  def f(p, x, w):
    return jax.lax.cond(p, lambda: jnp.tanh(x @ w), lambda: x)

  text = jax.jit(f).lower(jax.ShapeDtypeStruct((), jnp.bool_),
                          jax.ShapeDtypeStruct((m, n), jnp.float32),
                          jax.ShapeDtypeStruct((n, n), jnp.float32)).compile().as_text()
  assert 'conditional(' in text
  ks = hlo_cost.kernels(text)
  assert 'conditional' not in {k.op for k in ks}
  assert sum(k.flops for k in ks) == 2 * m * n * n
  # The same with the branches in the other order: the choice is by cost, not position.
  swapped = re.sub(r'branch_computations=\{(%[\w.\-]+), (%[\w.\-]+)\}',
                   r'branch_computations={\2, \1}', text)
  assert swapped != text
  assert sum(k.flops for k in hlo_cost.kernels(swapped)) == 2 * m * n * n


def test_unknown_trip_count_and_missing_entry_are_clear_errors():
  with pytest.raises(ValueError, match='no ENTRY'):
    hlo_cost.kernels('%f (p: f32[]) -> f32[] {\n  ROOT %p = f32[] parameter(0)\n}\n')
  bad = _GPU_HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', '')
  with pytest.raises(ValueError, match='no known trip count'):
    hlo_cost.kernels(bad)


_COMPILE_ONLY = """
import jax, jax.numpy as jnp
from codis_jax import hlo_cost, roofline
s = jax.sharding.SingleDeviceSharding(roofline.compile_only_device('h200'))
x = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16, sharding=s)
w = jax.ShapeDtypeStruct((512, 1024), jnp.bfloat16, sharding=s)
text = jax.jit(lambda a, b: a @ b).lower(x, w).compile(
    compiler_options={'xla_gpu_enable_triton_gemm': False}).as_text()
ks = hlo_cost.kernels(text)
print(sum(k.flops for k in ks), [k.kind for k in ks if k.flops])
"""


@compile_only.needs_cuda_plugin
def test_compile_only_gpu_matmul():
  flops, kinds = compile_only.run(_COMPILE_ONLY).strip().splitlines()[-1].split(' ', 1)
  assert float(flops) == 2 * 256 * 512 * 1024 and '__cublas' in kinds


def test_roofline_parts_from_op_paths():
  from codis_jax import roofline  # pylint: disable=import-outside-toplevel
  kernel = lambda name: hlo_cost.Kernel('k', 'fusion', 'kLoop', name, 0.0, 0.0, 1, False)
  cases = {
      'jit(train_step)/transpose(jvp(CODIS.encode_image))/visual_encoder/blocks_3/mlp/add':
          'vision backward',
      'jit(train_step)/jvp(CODIS.fuse)/fusion_layers/layer_8/crossattention/key/add':
          'fusion forward',
      'jit(train_step)/CODIS.encode_text/text_layers/layer_0/attention/query/dot_general':
          'text forward (teacher)',
      'jit(train_step)/jvp()/while/body/closed_call/dot_general': 'IPOT',
      'jit(train_step)/add': 'rest (losses, update, EMA, queues)',
  }
  for name, want in cases.items():
    assert roofline.part(kernel(name)) == want, name


def test_fusion_root_is_the_marked_instruction_not_the_last_line():
  # XLA may print a fusion's ROOT before other instructions; the in-place update is still
  # found (only its update written, the big buffer not read).
  moved = _GPU_HLO.replace(
      '  ROOT %dus = f32[1000,256]{1,0} dynamic-update-slice(%param_0.1, %cv, %param_2.1, %c1)\n',
      '  ROOT %dus = f32[1000,256]{1,0} dynamic-update-slice(%param_0.1, %cv, %param_2.1, %c1)\n'
      '  %unused = f32[2]{0} constant({1, 2})\n')
  assert moved != _GPU_HLO
  new = {k.name: k for k in hlo_cost.kernels(moved)}['new']
  assert new.bytes == 64 * 256 * 2 + 4 + 64 * 256 * 4


# TPU-style HLO as XLA:TPU writes it: tiled layouts, on-chip (S(1)) buffers, an async
# copy into VMEM, a batched matmul written as a base-dilated convolution in a fusion nested
# in the kernel's fusion, and a while loop
# whose trip count is only in its condition (as in the compiled train step's IPOT loop).
_TPU_HLO = """\
HloModule jit_step, is_scheduled=true

%inner_conv (param_0.5: bf16[32,12,2,16], param_1.5: bf16[32,17,2,16]) -> f32[32,2,12,17] {
  %param_0.5 = bf16[32,12,2,16]{1,3,2,0:T(8,128)(2,1)} parameter(0)
  %param_1.5 = bf16[32,17,2,16]{1,3,2,0:T(8,128)(2,1)} parameter(1)
  ROOT %conv = f32[32,2,12,17]{3,2,1,0:T(8,128)} convolution(%param_0.5, %param_1.5), window={size=32x2 stride=31x1 lhs_dilate=32x2}, dim_labels=0b1f_0o1i->01bf
}

%fused_scores (param_0: bf16[32,12,2,16], param_1: bf16[32,17,2,16]) -> f32[32,2,12,17] {
  %param_0 = bf16[32,12,2,16]{1,3,2,0:T(8,128)(2,1)} parameter(0)
  %param_1 = bf16[32,17,2,16]{1,3,2,0:T(8,128)(2,1)S(1)} parameter(1)
  ROOT %nested = f32[32,2,12,17]{3,2,1,0:T(8,128)} fusion(%param_0, %param_1), kind=kOutput, calls=%inner_conv
}

%fused_exp (param_0.1: f32[1000]) -> f32[1000] {
  %param_0.1 = f32[1000]{0:T(1024)} parameter(0)
  ROOT %e = f32[1000]{0:T(1024)} exponential(%param_0.1)
}

%body (arg: (s32[], f32[1000])) -> (s32[], f32[1000]) {
  %arg = (s32[]{:T(128)}, f32[1000]{0:T(1024)}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%arg), index=0
  %x = f32[1000]{0:T(1024)} get-tuple-element(%arg), index=1
  %exp_fusion = f32[1000]{0:T(1024)} fusion(%x), kind=kLoop, calls=%fused_exp
  ROOT %out = (s32[]{:T(128)}, f32[1000]{0:T(1024)}) tuple(%i, %exp_fusion)
}

%cond (arg.1: (s32[], f32[1000])) -> pred[] {
  %c7 = s32[]{:T(128)} constant(7)
  %arg.1 = (s32[]{:T(128)}, f32[1000]{0:T(1024)}) parameter(0)
  %i.1 = s32[]{:T(128)} get-tuple-element(%arg.1), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i.1, %c7), direction=LT
}

ENTRY %main (q: bf16[32,12,2,16], k: bf16[32,17,2,16], v: f32[1000]) -> f32[32,2,12,17] {
  %q = bf16[32,12,2,16]{1,3,2,0:T(8,128)(2,1)} parameter(0)
  %k = bf16[32,17,2,16]{1,3,2,0:T(8,128)(2,1)} parameter(1)
  %v = f32[1000]{0:T(1024)} parameter(2)
  %copy-start = (bf16[32,17,2,16]{1,3,2,0:T(8,128)(2,1)S(1)}, bf16[32,17,2,16]{1,3,2,0:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%k)
  %copy-done = bf16[32,17,2,16]{1,3,2,0:T(8,128)(2,1)S(1)} copy-done(%copy-start)
  %c2 = s32[]{:T(128)} constant(2)
  %start = s32[]{:T(128)} copy(%c2)
  %t0 = (s32[]{:T(128)}, f32[1000]{0:T(1024)}) tuple(%start, %v)
  %loop = (s32[]{:T(128)}, f32[1000]{0:T(1024)}) while(%t0), condition=%cond, body=%body
  ROOT %scores = f32[32,2,12,17]{3,2,1,0:T(8,128)} fusion(%q, %copy-done), kind=kOutput, calls=%fused_scores
}
"""


def test_tpu_layouts_by_hand():
  arr = lambda text: hlo_cost.arrays(text)[0]
  # Tiles round the two most-minor dimensions (by minor_to_major) up to (8, 128).
  q = arr('bf16[64,257,12,64]{3,1,2,0:T(8,128)(2,1)}')
  assert q.bytes == 64 * 264 * 12 * 128 * 2
  assert arr('f32[1000]{0:T(1024)}').bytes == 1024 * 4
  assert arr('f32[1000,256]{1,0}').bytes == 1000 * 256 * 4  # GPU: no tiles
  # On-chip memory (VMEM, sync flags) is not device-memory traffic.
  assert arr('f32[64,256]{1,0:T(8,128)S(1)}').bytes == 0
  assert arr('u32[]{:S(2)}').bytes == 0


def test_tpu_style_hlo_kernels_by_hand():
  ks = {k.name: k for k in hlo_cost.kernels(_TPU_HLO)}
  assert sorted(ks) == ['copy-start', 'exp_fusion', 'scores', 'start']
  # The prefetch reads k once from HBM; its VMEM copy and the source alias are not traffic.
  # Layout {1,3,2,0}: dim 1 (17) is the lane dimension -> 128, dim 3 (16) the sublane one.
  assert ks['copy-start'].bytes == 32 * 128 * 2 * 16 * 2
  # einsum('bthd,bshd->bhts') written as a convolution: 2*b*h*t*s*d FLOPs; q is read from
  # HBM (12 lanes -> 128), k from VMEM, and the f32 scores written (17 lanes -> 128, 12
  # sublanes -> 16).
  scores = ks['scores']
  assert scores.flops == 2 * 32 * 2 * 12 * 17 * 16
  assert scores.bytes == 32 * 128 * 2 * 16 * 2 + 32 * 2 * 16 * 128 * 4
  # Trip count from the condition `i < 7` with i starting at copy(constant 2).
  assert ks['exp_fusion'].count == 5 and ks['exp_fusion'].bytes == 2 * 1024 * 4


def test_tpu_loop_without_a_readable_trip_count_is_a_clear_error():
  bad = _TPU_HLO.replace('direction=LT', 'direction=NE')
  with pytest.raises(ValueError, match='no known trip count'):
    hlo_cost.kernels(bad)
