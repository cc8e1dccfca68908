"""The step breakdown's parts do the step's work: their FLOPs add up to the step's."""

import pytest

from codis_jax import bench
from codis_jax import step_parts


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_parts_cover_the_step(remat):
  # With remat on, the parts' FLOPs must still be counted without the recompute, as the
  # step's are (else they would exceed the step's by ~20% and "rest" would be negative).
  config = bench.make_config('tiny', batch=8, remat=remat)
  rows = {r['part']: r for r in step_parts.measure(config, steps=1)}
  assert set(rows) == {'step', 'vision_student', 'vision_teacher', 'text_student',
                       'text_teacher', 'fusion_student', 'fusion_teacher', 'update', 'ipot',
                       'rest (step - parts)'}
  step = rows.pop('step')
  rest = rows.pop('rest (step - parts)')
  # What no part holds: the losses' matmuls (queue similarities [B, Q], ITM head), a few
  # percent on tiny. A part at the wrong rows (e.g. fusion on 2B instead of 4B) or without
  # its backward would leave 10-50% of the step's FLOPs here.
  assert 0 <= rest['gflops'] < 0.05 * step['gflops'], (rest['gflops'], step['gflops'])
  # Forward + backward is ~3x the forward alone (teacher vs student, same rows); a bit
  # less here because no gradient flows into the images (the patch conv's input): 2.76 on
  # tiny. A backward into the params only, or none, would give ~2 or 1.
  ratio = rows['vision_student']['gflops'] / rows['vision_teacher']['gflops']
  assert 2.6 < ratio <= 3.0, ratio
  assert all(r['ms'] > 0 for r in rows.values()) and step['ms'] > 0
  assert abs(sum(r['share'] for r in rows.values()) + rest['share'] - 1) < 1e-9
  assert '| fusion_student |' in step_parts.format_rows([step, *rows.values(), rest])
