"""launch/single_host.sh: the config variant it picks, and one process per GPU (stand-in
nvidia-smi and python record what would run; no GPU needed)."""

import glob
import json
import os
import signal
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Records its JAX/CUDA environment and arguments, then behaves as $BEHAVIOUR says: exit 0
# ('ok'); exit 7 as process 1 once process 0 waits ('fail'); or wait for SIGTERM and exit
# 0 ('wait'). "$LOG.readyN": process N has its SIGTERM trap set and waits.
_PYTHON = """#!/bin/sh
if [ "$1" = "-c" ]; then exec python3 "$@"; fi
trap 'kill $sp 2>/dev/null; echo "term $JAX_PROCESS_ID" >> "$LOG"; exit 0' TERM
echo "${JAX_PROCESS_ID:-none} ${JAX_NUM_PROCESSES:-none} ${CUDA_VISIBLE_DEVICES:-none} ${JAX_COORDINATOR_ADDRESS:-none} $*" >> "$LOG"
[ "$BEHAVIOUR" = ok ] && exit 0
if [ "$BEHAVIOUR" = fail ] && [ "$JAX_PROCESS_ID" = 1 ]; then
  while [ ! -e "$LOG.ready0" ]; do sleep 0.1; done
  exit 7
fi
sleep 60 &
sp=$!
touch "$LOG.ready$JAX_PROCESS_ID"
wait
"""


def _stand_ins(tmp_path, gpus):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  listing = ''.join(f'echo "GPU {i}: NVIDIA H200"\n' for i in range(gpus))
  (bin_dir / 'nvidia-smi').write_text(f'#!/bin/sh\n{listing}' if gpus else '#!/bin/sh\nexit 9\n')
  (bin_dir / 'python').write_text(_PYTHON)
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k not in ('CONFIG', 'CUDA_VISIBLE_DEVICES')}
  env.update(PATH=f'{bin_dir}:{env["PATH"]}', PYTHON=str(bin_dir / 'python'),
             LOG=str(tmp_path / 'log'))
  return env


def _log(tmp_path):
  with open(tmp_path / 'log', encoding='utf-8') as f:
    return sorted(f.read().splitlines())


def _launch(env, tmp_path, **kw):
  return subprocess.Popen(['bash', 'launch/single_host.sh', str(tmp_path / 'w'), '--x=1'],
                          cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, **kw)


def test_one_process_per_gpu(tmp_path):
  env = _stand_ins(tmp_path, gpus=2)
  proc = _launch({**env, 'BEHAVIOUR': 'ok'}, tmp_path)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err
  (a, b) = _log(tmp_path)
  coordinator = a.split()[3]
  assert coordinator.startswith('127.0.0.1:') and b.split()[3] == coordinator
  tail = f'-m codis_jax.main --config=configs/pretrain.py:gpu --workdir={tmp_path}/w --x=1'
  assert a == f'0 2 0 {coordinator} {tail}' and b == f'1 2 1 {coordinator} {tail}'
  assert 'single_host.sh: 2 processes, one per GPU (0 1)' in err
  # CUDA_VISIBLE_DEVICES narrows the GPUs; PROCESSES=1 runs one process for them all.
  os.remove(tmp_path / 'log')
  subprocess.run(['bash', 'launch/single_host.sh', str(tmp_path / 'w')], cwd=ROOT, check=True,
                 env={**env, 'BEHAVIOUR': 'ok', 'CUDA_VISIBLE_DEVICES': '3,5'}, timeout=60)
  assert [line.split()[:3] for line in _log(tmp_path)] == [['0', '2', '3'], ['1', '2', '5']]
  os.remove(tmp_path / 'log')
  subprocess.run(['bash', 'launch/single_host.sh', str(tmp_path / 'w')], cwd=ROOT, check=True,
                 env={**env, 'BEHAVIOUR': 'ok', 'PROCESSES': '1'}, timeout=60)
  assert [line.split()[:4] for line in _log(tmp_path)] == [['none'] * 4]


def test_a_failing_process_stops_the_others(tmp_path):
  env = _stand_ins(tmp_path, gpus=2)
  t0 = time.time()
  proc = _launch({**env, 'BEHAVIOUR': 'fail'}, tmp_path)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 7 and time.time() - t0 < 30, err
  assert 'a process exited with 7; stopping the others' in err
  assert 'term 0' in _log(tmp_path)


def test_sigterm_reaches_every_process(tmp_path):
  env = _stand_ins(tmp_path, gpus=2)
  proc = _launch({**env, 'BEHAVIOUR': 'wait'}, tmp_path)
  deadline = time.time() + 30
  while time.time() < deadline and not all(
      os.path.exists(f'{tmp_path}/log.ready{i}') for i in range(2)):
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 0, err  # each process checkpointed and exited 0
  assert {'term 0', 'term 1'} <= set(_log(tmp_path))


@pytest.mark.parametrize('gpu', [False, True])
def test_single_host_launcher_picks_the_variant_of_the_host(tmp_path, gpu):
  """launch/single_host.sh without CONFIG: the `gpu` variant where nvidia-smi lists GPUs,
  else the `tpu` one on a TPU host, else the paper's settings."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  # A stand-in nvidia-smi that lists a GPU, or fails as it does without a driver.
  (bin_dir / 'nvidia-smi').write_text(
      '#!/bin/sh\necho "GPU 0: NVIDIA H200"\n' if gpu else '#!/bin/sh\nexit 9\n')
  (bin_dir / 'nvidia-smi').chmod(0o755)
  tpu_host = bool(glob.glob('/dev/accel[0-9]*') or glob.glob('/dev/vfio/[0-9]*'))
  env = {k: v for k, v in os.environ.items() if k != 'CONFIG'}
  env['PATH'] = f'{bin_dir}:{env["PATH"]}'
  out = subprocess.run(['bash', 'launch/single_host.sh', str(tmp_path / 'w'), '--mode=config'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  variant = 'gpu' if gpu else 'tpu' if tpu_host else ''
  assert f'single_host.sh: --config=configs/pretrain.py{":" * bool(variant)}{variant}\n' in (
      out.stderr)
  written = json.load(open(tmp_path / 'w' / 'config.json', encoding='utf-8'))
  want = {'gpu': 'cudnn', 'tpu': 'pallas'}.get(variant, '')
  assert written['model']['attention_impl'] == want
