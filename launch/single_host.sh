#!/usr/bin/env bash
# One host, all its local accelerators (JAX sees every GPU/TPU chip of the host).
#   launch/single_host.sh WORKDIR [--config.batch_size=256 --config.mesh.fsdp=8 ...]
# CONFIG picks the config file/variant; by default the paper's settings, with the `gpu`
# or `tpu` variant's performance knobs when the host has NVIDIA GPUs or TPU chips.
set -euo pipefail
cd "$(dirname "$0")/.."
workdir=${1:?usage: launch/single_host.sh WORKDIR [--config.key=value ...]}; shift
if [ -z "${CONFIG:-}" ]; then
  CONFIG=configs/pretrain.py
  if nvidia-smi -L >/dev/null 2>&1; then
    CONFIG=configs/pretrain.py:gpu
  elif compgen -G '/dev/accel[0-9]*' >/dev/null || compgen -G '/dev/vfio/[0-9]*' >/dev/null; then
    CONFIG=configs/pretrain.py:tpu  # TPU VMs: v4 exposes /dev/accel*, v5e and later vfio
  fi
  echo "single_host.sh: --config=$CONFIG" >&2
fi
exec .venv/bin/python -m codis_jax.main --config="$CONFIG" --workdir="$workdir" "$@"
