#!/usr/bin/env bash
# One-GPU benchmark and GPU-only checks, in one call (what README "Performance" reports).
#
#   bash launch/bench_gpu.sh [OUT_DIR]
#
# 1. One bench process: the paper config at batch 64 per chip in each variant of $VARIANTS
#    (space-separated; each a comma-separated list of config overrides, "-" = as the config
#    is, after DTYPE), sharing one fresh train state (bench.StateCache: the paper state took
#    ~60 s to initialise on an H200, the step ~85 s to compile). The first variant that
#    runs also writes a jax.profiler trace of 3 steps and then times the step's parts alone
#    (codis_jax.step_parts). A variant that fails is reported and the next one runs.
# 2. The GPU-only tests (cuDNN attention and its gradients vs references).
# 3. If time is left: the input pipeline on this host's CPUs (codis_jax.data.bench), in
#    tf.data threads and with the gpu variant's 8 worker processes.
# The script keeps within $BUDGET seconds (default 560, under a device call's 10 minutes):
# the bench gets what is left but $TEST_TIMEOUT, and JSON lines are written as each
# variant ends, so a cut-short run keeps what it measured.
# Results: OUT_DIR/bench.jsonl (one JSON line per variant), OUT_DIR/bench.log (summary),
# OUT_DIR/bench_full.log (the bench's whole output), OUT_DIR/trace/ and its summary
# OUT_DIR/trace_report.md (python -m codis_jax.trace_report OUT_DIR/trace).
set -uo pipefail
out=${1:-bench_out}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/codis_bench_cache}
log="$out/bench.log"
budget=${BUDGET:-560}
test_timeout=${TEST_TIMEOUT:-90}
config=${CONFIG:-paper} batch=${BATCH:-64}  # e.g. CONFIG=tiny BATCH=8 for a CPU dry run
dtype=${DTYPE:-bfloat16}
# The gpu variant (configs/pretrain.py:gpu: cuDNN attention, image tokens padded to 264 and
# text to 26, the bf16 weight copy, the tanh GELU; what the GPU launchers run), the
# baseline (XLA attention, keys/values shared per image), the gpu variant with the exact
# GELU, then without the weight copy too, cuDNN attention alone, the baseline without the
# sharing, and the gpu variant at batch 128 (a fresh state). In the order of what matters
# most, in case the budget runs out; if cuDNN's kernel fails, the baseline gets the trace
# and the parts.
padded=model.attention_impl=cudnn,model.pad_image_tokens=8,model.pad_text_tokens=2
gpu=$padded,model.weight_copy=true,model.gelu=tanh
variants=${VARIANTS:-"$gpu - $gpu,model.gelu=erf $padded model.attention_impl=cudnn
model.share_image_kv=false $gpu,batch_size=128"}

{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
  $py -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, jax.devices())'
} 2>&1 | tee "$log"

args=()
for v in $variants; do
  [ "$v" = "-" ] && v=""
  args+=("--variant=$v")
done
left=$((budget - SECONDS - test_timeout))
echo "== $config batch $batch $dtype, variants: $variants (limit ${left} s)" | tee -a "$log"
if [ "$left" -ge 30 ]; then
  timeout "$left" $py -m codis_jax.bench --configs="$config" --batch="$batch" \
    --steps="${STEPS:-20}" --dtype="$dtype" "${args[@]}" --parts --nopipeline \
    --json="$out/bench.jsonl" --profile_dir="$out/trace" >"$out/bench_full.log" 2>&1
  echo "exit $?" >>"$out/bench_full.log"
  grep -vE "^\[bench|^\[step_parts|^I[0-9]{4} |^W[0-9]{4} " "$out/bench_full.log" | tee -a "$log"
  # The trace's summary (where the step's device time goes), in case the trace is too big
  # to bring back; bench traces 3 steps (GPU events may carry no run_id to count them by).
  timeout 60 $py -m codis_jax.trace_report "$out/trace" --steps=3 --top=30 >"$out/trace_report.md" 2>&1
  head -40 "$out/trace_report.md" | tee -a "$log"
else
  echo "bench skipped: ${left} s left" | tee -a "$log"
fi

left=$((budget - SECONDS))
echo "== GPU-only tests (limit ${left} s)" | tee -a "$log"
if [ "$left" -ge 30 ]; then
  timeout "$left" $py -m pytest -q -p no:cacheprovider tests/test_attention_gpu.py 2>&1 \
    | tail -8 | tee -a "$log"
else
  echo "skipped: ${left} s left" | tee -a "$log"
fi

for workers in 0 8; do
  left=$((budget - SECONDS))
  [ "$left" -ge 40 ] || break
  echo "== input pipeline, data.workers=$workers (limit ${left} s)" | tee -a "$log"
  timeout "$left" $py -m codis_jax.data.bench --batches 60 --workers "$workers" 2>&1 \
    | tail -1 | tee -a "$log"
done
