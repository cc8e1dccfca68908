"""Paper-scale step compiled (not run) for an 8-way FSDP mesh: memory and collectives."""

from codis_jax import scaling_report
from configs import pretrain


def test_collective_parser_reads_sizes():
  hlo = ('  %ag = f32[64,256]{1,0} all-gather(%p), dimensions={0}\n'
         '  %ar = (bf16[8]{0}, s32[2,3]{1,0}) all-reduce(%a, %b), to_apply=%sum\n'
         '  %x = f32[9]{0} add(%p, %q)\n'
         '  %cp = f32[4]{0} collective-permute-start(%p)\n')
  assert scaling_report.collectives(hlo) == [
      ('all-gather', 64 * 256 * 4, [(64, 256)]),
      ('all-reduce', 8 * 2 + 6 * 4, [(8,), (2, 3)]),
      ('collective-permute', 16, [(4,)])]


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
  queue_moves = [(k, shapes) for k, _, shapes in found
                 if any(config.queue_size in shape for shape in shapes)]
  assert not queue_moves, queue_moves
