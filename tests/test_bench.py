"""The step benchmark runs, and its model FLOPs agree with XLA's own CPU count."""

from codis_jax import bench


def test_bench_tiny_model_flops_agree_with_xla_cpu_cost_analysis():
  r = bench.bench_config('tiny', batch=8, steps=1, remat='dots')
  assert r['batch'] == 8 and r['remat'] == 'dots' and r['step_s'] > 0
  assert 'mfu' not in r  # no peak is known for a CPU
  # Model FLOPs (matmuls of the jaxpr, remat off) vs XLA's count of the compiled step,
  # which adds elementwise ops and the matmuls remat=dots recomputes (measured: 0.78);
  # a missing backward pass (2/3 of the matmuls) would put it near 0.26.
  ratio = r['gflops_per_pair'] / r['compiled_gflops_per_pair']
  assert 0.6 < ratio < 1.0, ratio
