"""Snippets compiled for JAX's compile-only GPU (its CUDA plugin, no GPU), each in a process
of its own: JAX must start there with the CPU platform and no fake-device flags."""

import importlib.util
import os
import subprocess
import sys

import pytest

needs_cuda_plugin = pytest.mark.skipif(
    importlib.util.find_spec('jax_cuda12_plugin') is None,
    reason="needs JAX's CUDA plugin (no GPU): launch/setup.sh --gpu-aot")


def run(code: str, timeout: int = 300) -> str:
  """stdout of `python -c code` from the repository root; a failure shows stderr's tail."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def table(code: str, n: int, timeout: int = 300) -> dict:
  """The last n lines of `run(code)`, each 'NAME MODE number...': {(NAME, MODE): numbers}."""
  lines = run(code, timeout).strip().splitlines()[-n:]
  return {tuple(line.split()[:2]): tuple(map(float, line.split()[2:])) for line in lines}
