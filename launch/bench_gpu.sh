#!/usr/bin/env bash
# One-GPU benchmark and GPU-only checks, in one call (what README "Performance" reports).
#
#   bash launch/bench_gpu.sh [OUT_DIR]
#
# 1. The paper config at batch 64 per chip in each mode of $VARIANTS ("dtype,remat,attention"
#    words), one process each (each variant's peak memory is its own and one failure does
#    not stop the rest); the first variant also writes a jax.profiler trace of 3 steps.
# 2. The step's parts timed alone (codis_jax.step_parts) in the first variant's mode.
# 3. The GPU-only tests (cuDNN attention and its gradients vs references).
# On one H200 each paper process spent ~60 s initialising the state and ~85 s compiling
# the step, so the defaults need ~9 minutes. The whole script keeps within $BUDGET seconds
# (default 560, under a device call's 10 minutes): each phase gets at most what is left,
# and a phase that would get under 30 s is skipped and says so. PARTS=0 skips step 2.
# Results: OUT_DIR/bench.jsonl (one JSON line per variant), OUT_DIR/bench.log (summary),
# OUT_DIR/<variant>.log (each variant's whole output), OUT_DIR/parts.log, OUT_DIR/trace/.
set -uo pipefail
out=${1:-bench_out}
mkdir -p "$out"
py=${PYTHON:-python3}
# One compile cache for all the processes: step_parts reuses the first variant's step.
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/codis_bench_cache}
log="$out/bench.log"
budget=${BUDGET:-560}
# limit DEFAULT -> min(DEFAULT, seconds left in the budget); fails when under 30 s are left.
limit() {
  local left=$((budget - SECONDS))
  if [ "$left" -lt 30 ]; then echo "skipped: ${left} s of the ${budget} s budget left" | tee -a "$log" >&2; return 1; fi
  echo $(($1 < left ? $1 : left))
}
config=${CONFIG:-paper} batch=${BATCH:-64}  # e.g. CONFIG=tiny BATCH=8 for a CPU dry run
variants=${VARIANTS:-"bfloat16,none,xla bfloat16,none,cudnn"}

{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
  $py -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, jax.devices())'
} 2>&1 | tee "$log"

first=1
for v in $variants; do
  IFS=, read -r dtype remat attn <<<"$v"
  profile=""
  if [ "$first" = 1 ]; then profile="--profile_dir=$out/trace"; fi
  echo "== $config batch $batch $dtype remat=$remat attention=$attn $profile" | tee -a "$log"
  t=$(limit "${VARIANT_TIMEOUT:-200}") || continue
  timeout "$t" $py -m codis_jax.bench --configs="$config" \
    --batch="$batch" --steps="${STEPS:-20}" --dtype="$dtype" --remat="$remat" --attention="$attn" \
    --nopipeline --json="$out/bench.jsonl" $profile >"$out/$dtype-$remat-$attn.log" 2>&1
  echo "exit $?" >>"$out/$dtype-$remat-$attn.log"
  grep -E "^\| $config|^\[bench|Error|^exit" "$out/$dtype-$remat-$attn.log" | tee -a "$log"
  if [ "$first" = 1 ] && [ "${PARTS:-1}" = 1 ]; then
    echo "== step parts, $dtype remat=$remat attention=$attn" | tee -a "$log"
    t=$(limit "${PARTS_TIMEOUT:-240}") && timeout "$t" $py -m codis_jax.step_parts --config="$config" \
      --batch="$batch" --steps="${STEPS:-20}" --dtype="$dtype" --remat="$remat" --attention="$attn" \
      >"$out/parts.log" 2>&1
    echo "exit $?" >>"$out/parts.log"
    grep -E "^\\||^$config|Error|^exit" "$out/parts.log" | tee -a "$log"
  fi
  first=0
done

echo "== GPU-only tests" | tee -a "$log"
t=$(limit "${TEST_TIMEOUT:-90}") && timeout "$t" $py -m pytest -q -p no:cacheprovider tests/test_attention_gpu.py \
  2>&1 | tail -8 | tee -a "$log"
