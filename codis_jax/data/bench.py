"""python -m codis_jax.data.bench [--source synthetic|emoji] [--image_size 256] [--workers W]

Measures the pretraining input pipeline end to end (read, decode, random resized crop,
flip, RandAugment, tokenise, batch of uint8 pixels; the model normalises on the device)
and prints images/s and images/s per CPU core. 'synthetic' writes COCO-sized (640x480)
JPEGs to a temporary folder and reads them as an ALBEF JSON source; 'emoji' reads the
bundled emoji set (136x128 PNGs). --workers W runs the per-image work in W processes
(data.workers); the CPU time then includes theirs.
"""

import argparse
import io
import json
import os
import tempfile
import time

import numpy as np


def _synthetic(folder, n=256, size=(640, 480)):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  entries = []
  for i in range(n):
    # Smooth random content, so JPEG sizes are photo-like (~40 KB), not noise-sized.
    small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.BICUBIC)
    out = io.BytesIO()
    img.save(out, format='JPEG', quality=90)
    name = f'{i:05d}.jpg'
    with open(os.path.join(folder, name), 'wb') as f:
      f.write(out.getvalue())
    entries.append({'image': name, 'caption': f'a synthetic photo number {i} of a scene'})
  path = os.path.join(folder, 'ann.json')
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(entries, f)
  return f'json:{path}@{folder}'


def cores():
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _cpu_seconds(pids):
  """User + system CPU seconds of this process and of `pids` (Linux /proc)."""
  total = time.process_time()
  tick = os.sysconf('SC_CLK_TCK')
  for pid in pids:
    with open(f'/proc/{pid}/stat', encoding='ascii') as f:
      fields = f.read().rsplit(')', 1)[1].split()
    total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
  return total


def run(source='synthetic', image_size=256, batch_size=32, batches=30, warmup=3,
        data_dir='', workers=0):
  from codis_jax.data import config, pipeline  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    if source == 'synthetic':
      cfg = config.get_data_config('emoji')
      cfg.train = _synthetic(tmp)
    else:
      cfg = config.get_data_config(source)
    if data_dir:
      cfg.data_dir = data_dir
    cfg.workers = workers
    it = pipeline.create_pipeline(cfg, split='train', global_batch_size=batch_size,
                                  image_size=image_size, text_len=25, train=True, seed=0)
    for _ in range(warmup):
      next(it)
    pids = it.worker_pids
    start, cpu0, own0 = time.perf_counter(), _cpu_seconds(pids), time.process_time()
    for _ in range(batches):
      next(it)
    wall, cpu = time.perf_counter() - start, _cpu_seconds(pids) - cpu0
    own = time.process_time() - own0
    it.close()
  n = batches * batch_size
  # The parent's CPU per image bounds its GIL time from above: the headroom left to it.
  return {'images_per_s': n / wall, 'cores': cores(),
          'images_per_s_per_core': n / wall / cores(),
          'images_per_cpu_s': n / cpu, 'parent_cpu_ms_per_image': 1e3 * own / n,
          'image_size': image_size, 'source': source, 'workers': workers}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--source', default='synthetic', choices=['synthetic', 'emoji'])
  p.add_argument('--image_size', type=int, default=256)
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--batches', type=int, default=30)
  p.add_argument('--data_dir', default='')
  p.add_argument('--workers', type=int, default=0, help='data.workers (0 = threads here)')
  a = p.parse_args(argv)
  r = run(a.source, a.image_size, a.batch_size, a.batches, data_dir=a.data_dir,
          workers=a.workers)
  print(f"{r['source']} @ {r['image_size']} px: {r['images_per_s']:.0f} images/s on "
        f"{r['cores']} cores = {r['images_per_s_per_core']:.0f} images/s per core "
        f"({r['images_per_cpu_s']:.0f} images per CPU-second, workers included), "
        f"data.workers={r['workers']}, parent CPU {r['parent_cpu_ms_per_image']:.2f} ms "
        "per image")


if __name__ == '__main__':
  main()
