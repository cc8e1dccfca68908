"""Two real processes (jax.distributed over localhost, 4 CPU devices each) give the same
first-step losses as one process with 8 devices."""

import json
import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'multihost_worker.py')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _metrics(proc):
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


def _spawn(*args):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return subprocess.Popen([sys.executable, WORKER, *map(str, args)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_match_one():
  port = _free_port()
  workers = [_spawn(i, 2, port, 4) for i in range(2)]
  multi = [_metrics(w) for w in workers]
  single = _metrics(_spawn(0, 1, 0, 8))  # after: less CPU contention for the pair
  assert multi[0] == multi[1]  # every process sees the same global metrics
  for k, v in single.items():
    assert multi[0][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
