#!/usr/bin/env bash
# One host, all its local accelerators.
#   launch/single_host.sh WORKDIR [--config.batch_size=256 --config.mesh.fsdp=8 ...]
# CONFIG picks the config file/variant; by default the paper's settings, with the `gpu`
# or `tpu` variant's performance knobs when the host has NVIDIA GPUs or TPU chips.
# With several NVIDIA GPUs it starts one process per GPU (JAX multi-process over
# localhost), so that each GPU has its own input pipeline (the gpu variant's, with 8 data
# worker processes; README "Input pipeline"). PROCESSES=1 runs one process for all of
# them. TPU hosts and CPUs run one process (the tpu variant: 32 data workers).
set -euo pipefail
cd "$(dirname "$0")/.."
workdir=${1:?usage: launch/single_host.sh WORKDIR [--config.key=value ...]}; shift
python=${PYTHON:-.venv/bin/python}
gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU ' || true)
if [ -z "${CONFIG:-}" ]; then
  CONFIG=configs/pretrain.py
  if [ "$gpus" -gt 0 ]; then
    CONFIG=configs/pretrain.py:gpu
  elif compgen -G '/dev/accel[0-9]*' >/dev/null || compgen -G '/dev/vfio/[0-9]*' >/dev/null; then
    CONFIG=configs/pretrain.py:tpu  # TPU VMs: v4 exposes /dev/accel*, v5e and later vfio
  fi
  echo "single_host.sh: --config=$CONFIG" >&2
fi
# The GPUs to use: CUDA_VISIBLE_DEVICES if set, else every GPU nvidia-smi lists.
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=, read -ra devices <<< "$CUDA_VISIBLE_DEVICES"
else
  devices=()
  for ((i = 0; i < gpus; i++)); do devices+=("$i"); done
fi
procs=${PROCESSES:-${#devices[@]}}
if [ "$procs" -le 1 ] || [ "${#devices[@]}" -le 1 ]; then
  exec "$python" -m codis_jax.main --config="$CONFIG" --workdir="$workdir" "$@"
fi
if [ "$procs" -ne "${#devices[@]}" ]; then
  echo "single_host.sh: PROCESSES=$procs, but ${#devices[@]} GPUs: use 1 or ${#devices[@]}" >&2
  exit 2
fi
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
echo "single_host.sh: $procs processes, one per GPU (${devices[*]})," \
  "coordinator 127.0.0.1:$port" >&2
pids=()
for ((i = 0; i < procs; i++)); do
  CUDA_VISIBLE_DEVICES=${devices[$i]} JAX_COORDINATOR_ADDRESS=127.0.0.1:$port \
    JAX_NUM_PROCESSES=$procs JAX_PROCESS_ID=$i \
    "$python" -m codis_jax.main --config="$CONFIG" --workdir="$workdir" "$@" &
  pids+=($!)
done
stopping=0
# Preemption: pass SIGTERM/SIGINT on; each process checkpoints and exits 0.
on_signal() { interrupted=1; stopping=1; kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap on_signal TERM INT
status=0
left=$procs
while [ "$left" -gt 0 ]; do
  interrupted=0
  rc=0
  wait -n || rc=$?
  [ "$interrupted" = 1 ] && continue  # the signal woke `wait`; no process ended
  left=$((left - 1))
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    if [ "$stopping" = 0 ]; then  # the others would wait for it in a collective
      echo "single_host.sh: a process exited with $rc; stopping the others" >&2
      stopping=1
      kill -TERM "${pids[@]}" 2>/dev/null || true
    fi
  fi
done
exit "$status"
