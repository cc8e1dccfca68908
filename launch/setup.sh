#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine: system packages for the bundled data
# (Noto Color Emoji font, Fashion-MNIST), a virtualenv in .venv, and the package with its
# test extra. Idempotent: re-running is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
need=()
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || need+=(fonts-noto-color-emoji)
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
# Pillow lays out multi-codepoint emoji (ZWJ sequences, flags) through FriBiDi.
ldconfig -p 2>/dev/null | grep -q libfribidi || need+=(libfribidi0)
python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# libtpu (the one jax[tpu] pins, ~210 MB) in .tpu_aot/, for compiling the step for a TPU on
# a machine without one (python -m codis_jax.tpu_aot; its test runs in CI). --gpu-aot: JAX's
# CUDA plugin and cuDNN in .gpu_aot/ (~1.3 GB), the same for GPUs (python -m
# codis_jax.roofline). Kept out of .venv: installed there, every JAX program would try to
# start the accelerator.
libtpu=$(.venv/bin/python -c 'import importlib.metadata as m
print(next(r.split(";")[0].strip() for r in m.requires("jax") if r.startswith("libtpu")))')
if ! compgen -G ".tpu_aot/libtpu-${libtpu#libtpu==}.dist-info" >/dev/null; then
  rm -rf .tpu_aot
  .venv/bin/python -m pip install -q --no-deps --target .tpu_aot "$libtpu"
fi
for arg in "$@"; do
  case "$arg" in
    --gpu-aot)
      jax_version=$(.venv/bin/python -c 'import jax; print(jax.__version__)')
      .venv/bin/python -m pip install -q --no-deps --target .gpu_aot \
          "jax-cuda12-plugin==$jax_version" "jax-cuda12-pjrt==$jax_version" \
          'nvidia-cudnn-cu12>=9.8,<10' ;;
    *) echo "setup.sh: unknown option $arg (--gpu-aot)" >&2; exit 2 ;;
  esac
done
