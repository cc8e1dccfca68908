#!/usr/bin/env bash
# One host, all its local accelerators (JAX sees every GPU/TPU chip of the host).
#   launch/single_host.sh WORKDIR [--config.batch_size=256 --config.mesh.fsdp=8 ...]
# CONFIG picks the config file/variant (default: the paper's settings).
set -euo pipefail
cd "$(dirname "$0")/.."
workdir=${1:?usage: launch/single_host.sh WORKDIR [--config.key=value ...]}; shift
exec .venv/bin/python -m codis_jax.main --config="${CONFIG:-configs/pretrain.py}" \
  --workdir="$workdir" "$@"
