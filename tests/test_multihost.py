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


def test_slurm_gets_every_gpu_of_a_one_task_node(monkeypatch):
  """JAX's SLURM default is one GPU per process (its local rank); one task on an 8-GPU
  node must get all eight, one task per GPU keeps JAX's default."""
  import jax  # pylint: disable=import-outside-toplevel
  from codis_jax import sharding  # pylint: disable=import-outside-toplevel
  eight = {'CUDA_VISIBLE_DEVICES': '0,1,2,3,4,5,6,7'}
  cases = [({**eight, 'SLURM_NTASKS_PER_NODE': '1'}, list(range(8))),
           ({**eight, 'SLURM_TASKS_PER_NODE': '1(x4)', 'SLURM_NODEID': '3'}, list(range(8))),
           ({**eight, 'SLURM_TASKS_PER_NODE': '8(x2),1', 'SLURM_NODEID': '2'}, list(range(8))),
           ({**eight, 'SLURM_TASKS_PER_NODE': '8(x2),1', 'SLURM_NODEID': '1'}, None),
           ({**eight, 'SLURM_NTASKS_PER_NODE': '8'}, None),
           ({'CUDA_VISIBLE_DEVICES': '5', 'SLURM_NTASKS_PER_NODE': '1'}, None),
           ({'SLURM_NTASKS_PER_NODE': '1'}, None)]  # no GPUs listed: JAX decides
  for env, want in cases:
    assert sharding.slurm_local_device_ids(env) == want, env
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *a, **k: calls.append(k))
  for key in ('JAX_COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(key, raising=False)
  for key, value in {**eight, 'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4',
                     'SLURM_NTASKS_PER_NODE': '1'}.items():
    monkeypatch.setenv(key, value)
  sharding.maybe_initialize_distributed()
  assert calls == [{'local_device_ids': list(range(8))}]
