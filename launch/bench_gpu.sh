#!/usr/bin/env bash
# One-GPU benchmark and GPU-only checks, in one call (what README "Performance" reports).
#
#   bash launch/bench_gpu.sh [OUT_DIR]
#
# Runs the paper config at batch 64 per chip in each mode of $VARIANTS ("dtype,remat,attention"
# words), one process each (so each variant's peak memory is its own and one failure does
# not stop the rest), then the GPU-only tests (cuDNN attention vs the softmax reference).
# Results: OUT_DIR/bench.jsonl (one JSON line per variant), OUT_DIR/bench.log (summary),
# OUT_DIR/<variant>.log (each variant's whole output).
set -uo pipefail
out=${1:-bench_out}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
log="$out/bench.log"
variants=${VARIANTS:-"bfloat16,none,cudnn bfloat16,none,xla bfloat16,dots,cudnn float32,none,xla"}

{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
  $py -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, jax.devices())'
} 2>&1 | tee "$log"

for v in $variants; do
  IFS=, read -r dtype remat attn <<<"$v"
  echo "== paper batch 64 $dtype remat=$remat attention=$attn" | tee -a "$log"
  timeout "${VARIANT_TIMEOUT:-200}" $py -m codis_jax.bench --configs=paper --batch=64 \
    --steps="${STEPS:-20}" --dtype="$dtype" --remat="$remat" --attention="$attn" \
    --nopipeline --json="$out/bench.jsonl" >"$out/$dtype-$remat-$attn.log" 2>&1
  echo "exit $?" >>"$out/$dtype-$remat-$attn.log"
  grep -E '^\| paper|^\[bench|Error|^exit' "$out/$dtype-$remat-$attn.log" | tee -a "$log"
done

timeout "${TEST_TIMEOUT:-60}" $py -m pytest -q -p no:cacheprovider tests/test_attention_gpu.py \
  2>&1 | tail -8 | tee -a "$log"
