"""Paper-scale step compiled (not run) for an 8-way FSDP mesh: memory and collectives; the
dtype of the cross-device gradient sums on compile-only GPUs."""

from codis_jax import scaling_report
from configs import pretrain
import compile_only


def test_collective_parser_reads_sizes():
  # XLA numbers the members of a long tuple with /*index=N*/ comments.
  hlo = ('  %ag = f32[64,256]{1,0} all-gather(%p), dimensions={0}\n'
         '  %ar = (bf16[8]{0}, s32[2,3]{1,0}) all-reduce(%a, %b), to_apply=%sum\n'
         '  %x = f32[9]{0} add(%p, %q)\n'
         '  %cp = f32[4]{0} collective-permute-start(%p)\n'
         '  %rs = (f32[2]{0}, f32[2]{0}, bf16[3]{0}, f32[2]{0}, f32[2]{0}, /*index=5*/f32[5]{0})'
         ' reduce-scatter(%a, %b, %c, %d, %e, /*index=5*/%f), dimensions={0}\n')
  found = [(k, [(a.dtype, a.shape) for a in arrays])
           for k, arrays in scaling_report.collectives(hlo)]
  assert found == [
      ('all-gather', [('f32', (64, 256))]),
      ('all-reduce', [('bf16', (8,)), ('s32', (2, 3))]),
      ('collective-permute', [('f32', (4,))]),
      ('reduce-scatter', [('f32', (2,))] * 2 + [('bf16', (3,))] + [('f32', (2,))] * 2
       + [('f32', (5,))])]
  assert scaling_report.by_kind_and_dtype(scaling_report.collectives(hlo)) == {
      'all-gather f32': [1, 64 * 256 * 4, 64 * 256 * 4], 'all-reduce bf16': [1, 16, 16],
      'all-reduce s32': [1, 24, 24], 'collective-permute f32': [1, 16, 16],
      'reduce-scatter f32': [1, 4 * 8 + 20, 52], 'reduce-scatter bf16': [1, 6, 6]}


def test_paper_step_on_8way_fsdp():
  config = pretrain.get_config('paper')
  compiled = scaling_report.compile_step(config, 8, 'fsdp')
  # One device holds the whole state; 8-way FSDP must hold at most 1/6 of it per device
  # (arguments = state + this device's slice of the batch).
  one_device = scaling_report.state_bytes(config)
  per_device = compiled.memory_analysis().argument_size_in_bytes
  assert per_device <= one_device / 6, (per_device / 2**30, one_device / 2**30)
  # No collective moves a queue: none has a result spanning the queue's length (the
  # gathered batch of features is [512, 256]; a gathered queue would be [65536, 256]).
  found = scaling_report.collectives(compiled.as_text())
  assert found, 'an FSDP step must communicate'
  queue_moves = [(k, [a.shape for a in arrays]) for k, arrays in found
                 if any(config.queue_size in a.shape for a in arrays)]
  assert not queue_moves, queue_moves


_GPU_COLLECTIVES = """
from codis_jax import bench, scaling_report
for g in ('float32', 'bfloat16'):
  # ITM groups of one device's rows (as the paper config's): no activation gradient
  # crosses devices, so what is summed across them is the parameters' gradients.
  config = bench.make_config('tiny', 16, overrides=[
      'model.dtype=bfloat16', f'model.weight_grad_dtype={g}', 'loss.itm_group_size=2'])
  for layout in ('data', 'fsdp'):
    found = scaling_report.collectives(scaling_report.compile_step(config, 8, layout,
                                                                   'h100').as_text())
    kinds = sorted({f'{k} {a.dtype}' for k, arrays in found for a in arrays
                    if k in ('all-reduce', 'reduce-scatter')})
    print(g, layout, '|'.join(kinds))
"""


@compile_only.needs_cuda_plugin
def test_gpu_gradient_sums_across_devices_are_float32():
  """The tiny bf16 step compiled for 8 compile-only H100s: XLA:GPU sums the gradients
  across devices (all-reduce with data=8, reduce-scatter with fsdp=8) in float32 only;
  with model.weight_grad_dtype=bfloat16 it sums the weight gradients in bf16. (XLA:CPU
  computes bf16 matmuls in float32, so only a GPU compile shows this.)"""
  rows = {}
  for line in compile_only.run(_GPU_COLLECTIVES, timeout=900).strip().splitlines()[-4:]:
    grad_dtype, layout, kinds = line.split(' ', 2)
    rows[grad_dtype, layout] = set(kinds.split('|'))
  assert 'all-reduce f32' in rows[('float32', 'data')], rows
  assert 'reduce-scatter f32' in rows[('float32', 'fsdp')], rows
  assert not any('bf16' in k for k in rows['float32', 'data'] | rows['float32', 'fsdp']), rows
  assert 'all-reduce bf16' in rows[('bfloat16', 'data')], rows
  assert 'reduce-scatter bf16' in rows[('bfloat16', 'fsdp')], rows
