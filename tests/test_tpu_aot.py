"""tpu_aot and hlo_cost on TPU programs: compiled by libtpu for TPU chips, on this CPU-only
machine, each in a subprocess (libtpu stays out of the test process).

References: the chips' datasheet figures, the train state's bytes from `jax.eval_shape`,
the step's model FLOPs, and hand counts of single einsums' FLOPs and arrays' bytes.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from codis_jax import bench
from codis_jax import roofline

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU_AOT = ROOT / '.tpu_aot'

pytestmark = pytest.mark.skipif(not (TPU_AOT / 'libtpu').is_dir(),
                                reason='libtpu not in .tpu_aot (bash launch/setup.sh)')

# Datasheet: bf16 TFLOP/s, HBM GB/s, HBM GiB per chip.
DATASHEET = {'v4': (275e12, 1228e9, 32), 'v5e': (197e12, 819e9, 16)}


def state_bytes(config):
  """Bytes of the train state and the batch, from their shapes alone."""
  _, state, batch, _ = roofline.step_args(config)
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves((state, batch)))


def _run(*args):
  """Python with libtpu importable (and JAX on the CPU), in its own process."""
  env = dict(os.environ, PYTHONPATH=f'{TPU_AOT}{os.pathsep}{ROOT}', JAX_PLATFORMS='cpu',
             TPU_SKIP_MDS_QUERY='1', ALLOW_MULTIPLE_LIBTPU_LOAD='1')
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_tiny_step_compiled_for_v5e_and_v4(tmp_path):
  out = tmp_path / 'rows.jsonl'
  proc = _run('-m', 'codis_jax.tpu_aot', '--config=tiny', '--batch=8', '--dtype=',
              '--target=v5e', '--target=v4', f'--json={out}')
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r['target'] for r in rows] == ['v5e', 'v4']
  config = bench.make_config('tiny', 8)
  raw = state_bytes(config)
  for r in rows:
    peak, bandwidth, hbm_gib = DATASHEET[r['target']]
    assert r['peak_flops'] == peak  # bench.PEAK_FLOPS found from libtpu's device kind
    assert r['hbm_gib'] == hbm_gib and r['fits'] and r['batch'] == 8
    # Arguments are the train state and the batch, in TPU layouts: minor dims padded to
    # 128 lanes, which inflates the tiny model's 32- and 64-wide arrays (~2.9x here).
    assert raw <= r['args_gib'] * 2**30 < 4 * raw
    assert r['xla_flops'] >= r['model_flops'] > 0  # XLA adds the elementwise FLOPs
    # The step reads its whole state from HBM and writes the new one back, at least.
    assert 2 * raw <= r['hbm_bytes'] < r['xla_bytes']  # XLA's count includes VMEM
    assert 0 < r['matmul_flops'] <= r['xla_flops']
    assert r['floor_s'] == pytest.approx(max(r['xla_flops'] / peak,
                                             r['hbm_bytes'] / bandwidth))
    assert r['mfu_ceiling'] == pytest.approx(r['model_flops'] / r['floor_s'] / peak)
    assert r['floor_s'] <= r['roofline_s']  # kernel by kernel: never below the floor
    assert 0 < r['mfu_roofline'] <= r['mfu_ceiling'] < 1
  assert proc.stdout.count('fits.') == 2 and 'MFU <=' in proc.stdout
  assert '| part |' in proc.stdout and '| vision backward |' in proc.stdout


_KERNELS = """
import jax, jax.numpy as jnp
from codis_jax import hlo_cost, tpu_aot
s = jax.sharding.SingleDeviceSharding(tpu_aot.compile_only_device('v5e'))
S = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=s)
scores = lambda q, k: jnp.einsum('bthd,bshd->bhts', q, k)
cases = [
    (lambda x, w: x @ w, (S(16384, 768), S(768, 3072))),
    (lambda x: jnp.exp(2 * x + 1) * 3 - x, (S(8192, 8192, dt=jnp.float32),)),
    (scores, (S(64, 257, 12, 64), S(64, 257, 12, 64))),
    (jax.grad(lambda q, k: scores(q, k).astype(jnp.float32).sum(), argnums=(0, 1)),
     (S(8, 40, 12, 64), S(8, 257, 12, 64))),
    (lambda x, w: jax.lax.conv_general_dilated(x, w, (16, 16), 'VALID',
                                               dimension_numbers=('NHWC', 'HWIO', 'NHWC')),
     (S(64, 256, 256, 3), S(16, 16, 3, 768))),
]
from codis_jax.models import tpu_attention
qkv = (S(64, 257, 12, 64),) * 3
for impl in (tpu_attention.attention, jax.nn.dot_product_attention):  # forward + backward
  loss = lambda *x, impl=impl: jnp.sum(impl(*x).astype(jnp.float32) ** 2)
  cases.append((jax.grad(loss, argnums=(0, 1, 2)), qkv))
from codis_jax.models import layers
for gather in (False, True):  # the fusion's cross-attention: 4 text rows per image
  def loss(q, k, v, i, gather=gather):
    if gather:
      k, v, i = layers.take_rows(k, i), layers.take_rows(v, i), None
    out = layers.attention(q, k, v, None, 'pallas', kv_index=i)
    return jnp.sum(out.astype(jnp.float32) ** 2)
  cases.append((jax.grad(loss, argnums=(0, 1, 2)),
                (S(256, 25, 12, 64), S(64, 257, 12, 64), S(64, 257, 12, 64),
                 S(1, 256, dt=jnp.int32))))
for f, args in cases:
  ks = hlo_cost.kernels(jax.jit(f).lower(*args).compile().as_text())
  print(sum(k.count * k.flops for k in ks), sum(k.count * k.bytes for k in ks))
"""


def test_tpu_kernels_flops_and_hbm_bytes():
  """XLA:TPU writes batched matmuls as dilated convolutions and keeps buffers in VMEM;
  hlo_cost's counts of its kernels against the einsums' FLOPs and the arrays' bytes."""
  proc = _run('-c', _KERNELS)
  (dense_f, dense_b), (ew_f, ew_b), (att_f, _), (grad_f, _), (conv_f, _), \
      (pallas_f, pallas_b), (_, xla_b), (indexed_f, indexed_b), (gathered_f, gathered_b) = [
          tuple(map(float, line.split())) for line in proc.stdout.strip().splitlines()[-9:]]
  assert dense_f == 2 * 16384 * 768 * 3072
  # Operands read once and the result written once, bf16: the least traffic there is.
  assert dense_b == (16384 * 768 + 768 * 3072 + 16384 * 3072) * 2
  assert ew_f == 0 and ew_b == 2 * 8192 * 8192 * 4  # one fused pass, f32 in and out
  assert att_f == 2 * 64 * 12 * 257 * 257 * 64
  assert grad_f == 2 * (2 * 8 * 12 * 40 * 257 * 64)  # dq and dk: one matmul each
  assert conv_f == 2 * 64 * 16 * 16 * 768 * (16 * 16 * 3)
  # The Pallas kernel (Mosaic-compiled): 2 matmuls forward, 5 backward (the scores
  # recomputed), read from its cost estimates. q, k, v come from HBM and their gradients
  # go back (program inputs and outputs), but no [64, 12, 257, 257] scores: under a
  # quarter of the bytes XLA's attention moves.
  assert pallas_f == 7 * 2 * 64 * 12 * 257 * 257 * 64
  qkv_bytes = 64 * 264 * 768 * 2  # bf16 [64, 257, 768], 257 rows tiled to 264
  assert 6 * qkv_bytes <= pallas_b < 0.25 * xla_b
  # Indexed keys and values (kv_index, 256 query rows over 64 images): read in place, their
  # gradients summed per image in VMEM. At least k and v read and dk, dv written once per
  # image; the per-row gather and its scatter-add backward move over 5x more.
  assert indexed_f == gathered_f == 7 * 2 * 256 * 12 * 25 * 257 * 64
  assert 4 * qkv_bytes <= indexed_b < 0.2 * gathered_b


_SHARDED = """
import jax, jax.numpy as jnp
from jax.experimental import topologies
from codis_jax import sharding
from codis_jax.models import tpu_attention
from configs import pretrain
topo = topologies.get_topology_desc(topology_name='v5e:2x2', platform='tpu')  # 4 chips
config = pretrain.get_config('tiny')
config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 1, 2
mesh = sharding.create_mesh(config, topo.devices)
spec = jax.sharding.PartitionSpec(('data', 'fsdp'), None, 'tensor', None)
x = jax.ShapeDtypeStruct((64, 257, 12, 64), jnp.bfloat16,
                         sharding=jax.sharding.NamedSharding(mesh, spec))
loss = lambda q, k, v: jnp.sum(tpu_attention.attention(q, k, v).astype(jnp.float32) ** 2)
with sharding.mesh_context(mesh, config):
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile().as_text()
print(hlo.count('custom_call_target="tpu_custom_call"'), 'all-gather' in hlo,
      'all-to-all' in hlo)
# The fusion's cross-attention: 256 text rows over 64 images, index groups per data shard.
put = lambda shape, dt=jnp.bfloat16, spec=spec: jax.ShapeDtypeStruct(
    shape, dt, sharding=jax.sharding.NamedSharding(mesh, spec))
loss = lambda q, k, v, i: jnp.sum(
    tpu_attention.attention(q, k, v, None, i).astype(jnp.float32) ** 2)
args = (put((256, 25, 12, 64)), put((64, 257, 12, 64)), put((64, 257, 12, 64)),
        put((2, 128), jnp.int32, jax.sharding.PartitionSpec('data', None)))
with sharding.mesh_context(mesh, config):
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
print(hlo.count('custom_call_target="tpu_custom_call"'), 'all-gather' in hlo,
      'all-to-all' in hlo)
"""


def test_pallas_attention_sharded_over_four_tpu_chips():
  """Batch over data, heads over tensor on a v5e 2x2: each chip runs the kernel on its
  shard, with and without kv_index; nothing is gathered (XLA would gather a Pallas call's
  operands whole)."""
  proc = _run('-c', _SHARDED)
  # Forward + backward kernels, plain and with keys read in place by index.
  assert proc.stdout.split()[-6:] == ['2', 'False', 'False'] * 2
