"""data.workers > 0: the per-image work in worker processes gives the same batches as
tf.data's threads, resumes exactly, survives SIGTERM, fails loudly when a worker dies, and
stops its processes on close(). The bad-record counts with workers are checked in
test_data_sources.py (parametrised over data.workers)."""

import json
import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest

from codis_jax.data import DataError, create_pipeline, tokenize
from test_data_fixtures import data_config, take, write_json_set, write_prepared_set

S, L = 32, 25


def _pipe(cfg, workers, batch=4, train=True, **kw):
  cfg = cfg.copy_and_resolve_references()
  cfg.workers = workers
  return create_pipeline(cfg, split='train', global_batch_size=batch, image_size=S,
                         text_len=L, train=train, seed=0, **kw)


def _mixed(tmp_path):
  """A JSON source (files read by the workers) and TFRecords with a corrupt image (bytes
  sent to the workers)."""
  return data_config('+'.join([
      write_json_set(str(tmp_path / 'j'), n_images=9, caps_per_image=2),
      write_prepared_set(str(tmp_path / 'p'), n_images=14, bad=('corrupt',))]),
      shuffle_buffer=8)


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_workers_give_the_threads_batches_and_resume(tmp_path):
  cfg = _mixed(tmp_path)  # RandAugment(2, 7) on: every op's randomness is compared too
  threads = _pipe(cfg, 0)
  full = take(threads, 12)  # crosses an epoch boundary
  threads.close()
  first = _pipe(cfg, 2)
  head = take(first, 5)
  assert len(first.worker_pids) == 2
  state = json.loads(json.dumps(first.get_state()))
  first.close()
  rest = _pipe(cfg, 2, state=state)
  tail = take(rest, 7)
  rest.close()
  _assert_same(full, head + tail)
  assert full[0]['image'].std() > 10  # real pixels


def test_workers_in_evaluation(tmp_path):
  cfg = _mixed(tmp_path)
  a, b = _pipe(cfg, 0, train=False), _pipe(cfg, 3, train=False, batch=5)
  want, got = list(a), list(b)
  b.close()
  keep = lambda bs: np.concatenate([x['text_ids'][x['valid']] for x in bs])
  np.testing.assert_array_equal(keep(want), keep(got))
  assert a.stats() == b.stats() and a.stats()['corrupt_image'] == 1


def test_workers_ignore_sigterm_and_close_stops_them(tmp_path):
  it = _pipe(_mixed(tmp_path), 2)
  take(it, 2)
  pids = it.worker_pids
  os.kill(pids[0], signal.SIGTERM)  # the launcher's preemption signal reaches the group
  take(it, 8)  # every chunk now needs both workers
  it.close()
  for pid in pids:  # closed and reaped: no such process any more
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)


def test_workers_stop_at_exit_without_close(tmp_path):
  spec = write_json_set(str(tmp_path), n_images=12)
  code = f"""
import sys
sys.path[:0] = {[os.path.dirname(os.path.dirname(__file__)), os.path.dirname(__file__)]!r}
from test_data_fixtures import data_config
from codis_jax.data import create_pipeline
it = create_pipeline(data_config({spec!r}, workers=2), split='train', global_batch_size=4,
                     image_size=32, text_len=25, train=True, seed=0)
next(it)
print(*it.worker_pids)
"""
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       check=True, timeout=120)
  pids = [int(p) for p in out.stdout.split()]
  assert len(pids) == 2
  for pid in pids:  # reaped by the parent's exit hook, not left to find EOF later
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)


def test_a_dead_worker_stops_the_run_with_a_clear_error(tmp_path):
  it = _pipe(_mixed(tmp_path), 2)
  take(it, 1)
  os.kill(it.worker_pids[1], signal.SIGKILL)
  with pytest.raises(DataError, match=r'data worker 1 .* died, exit code -9, with '
                                      r'data.workers=2'):
    take(it, 50)  # a few may already be prefetched
  it.close()


def test_workers_that_cannot_start_raise_a_data_error(monkeypatch):
  from codis_jax.data import workers
  monkeypatch.setattr(workers.sys, 'executable', '/bin/false')  # exits at once
  work = workers.RecordWork(tokenize.TextEncoder(L), S, True, 0, (0.2, 1.0), (2, 7))
  with pytest.raises(DataError, match=r'exited at start \(data.workers=2\)'):
    workers.WorkerPool(work, 2)


def test_a_private_tf_data_pool_gets_a_thread_per_chunk_in_flight(tmp_path):
  cfg = _mixed(tmp_path)
  cfg.num_threads = 1  # as in the demo: else one chunk at a time would reach the workers
  datasets = [_pipe(cfg, w)._dataset(0, 0) for w in (0, 3)]  # pylint: disable=protected-access
  pools = [d.options().threading.private_threadpool_size for d in datasets]
  assert pools == [1, 7]


def test_bad_workers_value(tmp_path):
  cfg = _mixed(tmp_path)
  with pytest.raises(DataError, match=r'data.workers=-1'):
    _pipe(cfg, -1)


def test_worker_imports_neither_tensorflow_nor_jax():
  code = ('import sys, codis_jax.data.workers; '
          'print(sorted({"tensorflow", "jax", "transformers"} & set(sys.modules)))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.stdout.strip() == '[]'


@pytest.mark.parametrize('sep', [False, True])
def test_text_encoder_pickles_to_the_same_tokenisation(sep):
  from transformers import BertTokenizerFast
  hf = BertTokenizerFast.from_pretrained(tokenize.default_tokenizer_dir())
  enc = pickle.loads(pickle.dumps(tokenize.TextEncoder(L, sep=sep)))
  for text in ['a man riding a wave on top of a surfboard',
               ' '.join(f'word{i}' for i in range(40)), 'café naïve façade']:
    if sep:  # BERT's [CLS] ... [SEP]
      ref = hf(text, max_length=L, padding='max_length', truncation=True)
      want, want_mask = ref['input_ids'], ref['attention_mask']
    else:  # ALBEF's [CLS] ...
      want = [hf.cls_token_id] + hf(text, add_special_tokens=False)['input_ids'][:L - 1]
      want_mask = [1] * len(want) + [0] * (L - len(want))
      want = want + [hf.pad_token_id] * (L - len(want))
    ids, mask = enc(text)
    assert ids.tolist() == want and mask.tolist() == want_mask
  assert enc.vocab_size == 30522


def test_data_bench_counts_the_workers_cpu():
  from codis_jax.data import bench
  # 40 batches: the workers' CPU is read in 10 ms clock ticks, and a few batches can be
  # decoded ahead, before the timed window (CI once measured no worker CPU over 4 batches).
  r = bench.run('synthetic', image_size=32, batch_size=8, batches=40, warmup=1, workers=2)
  assert r['workers'] == 2 and r['images_per_s'] > 0
  # The decode work happens in the workers: total CPU per image well above the parent's.
  assert 1e3 / r['images_per_cpu_s'] > 2 * r['parent_cpu_ms_per_image']
