"""Paper-scale step compiled (not run) for an 8-way FSDP mesh: memory and collectives."""

from codis_jax import scaling_report
from configs import pretrain


def test_collective_parser_reads_sizes():
  hlo = ('  %ag = f32[64,256]{1,0} all-gather(%p), dimensions={0}\n'
         '  %ar = (bf16[8]{0}, s32[2,3]{1,0}) all-reduce(%a, %b), to_apply=%sum\n'
         '  %x = f32[9]{0} add(%p, %q)\n'
         '  %cp = f32[4]{0} collective-permute-start(%p)\n')
  assert scaling_report.collectives(hlo) == [
      ('all-gather', 64 * 256 * 4), ('all-reduce', 8 * 2 + 6 * 4), ('collective-permute', 16)]


def test_paper_step_on_8way_fsdp():
  config = pretrain.get_config('paper')
  compiled = scaling_report.compile_step(config, 8, 'fsdp')
  # One device holds the whole state; 8-way FSDP must hold at most 1/6 of it per device
  # (arguments = state + this device's slice of the batch).
  one_device = scaling_report.state_bytes(config)
  per_device = compiled.memory_analysis().argument_size_in_bytes
  assert per_device <= one_device / 6, (per_device / 2**30, one_device / 2**30)
  # No collective moves a whole queue (65,536 x 256 float32 = 64 MiB).
  queue_bytes = config.queue_size * config.model.embed_dim * 4
  found = scaling_report.collectives(compiled.as_text())
  assert found, 'an FSDP step must communicate'
  too_big = [(k, s) for k, s in found if s >= queue_bytes]
  assert not too_big, too_big
