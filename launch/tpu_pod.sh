#!/usr/bin/env bash
# Cloud TPU VM pod (v4-128, v5e-256, ...): the same command runs on ALL workers; JAX finds
# the other hosts through the TPU metadata, so no coordinator address is needed.
#   launch/tpu_pod.sh TPU_NAME ZONE gs://bucket/workdir --config.mesh.fsdp=16 \
#     --config.init.vit=/weights/deit_base_patch16_224 --config.init.bert=/weights/bert-base-uncased
# (the paper starts from DeiT-B/16 and BERT-base: without init.* the towers start random)
# The repo must already be on every worker (e.g. git clone + launch/setup.sh through the
# same --worker=all ssh). Checkpoints and logs go to the gs:// workdir; data paths may be
# gs:// too. Preemption sends SIGTERM: the program checkpoints and exits 0. CONFIG defaults
# to the paper's settings with the TPU variant's knobs (bf16, Pallas attention).
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE WORKDIR [--config.key=value ...]}
zone=${2:?zone}; workdir=${3:?workdir}; shift 3
overrides=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd ~/codis_jax && .venv/bin/python -m codis_jax.main \
    --config=${CONFIG:-configs/pretrain.py:tpu} --workdir=$workdir $overrides"
