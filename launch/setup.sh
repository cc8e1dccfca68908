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
