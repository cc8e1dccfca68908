"""FLOPs of single HLO instructions, from their operand shapes and attributes.

Shapes come as `hlo_cost.Array`s (anything with a `.shape`). Used by `hlo_cost.kernels`.
"""

import math
import re

import numpy as np


def _dims(attrs: str, key: str) -> list:
  """Dimension numbers from `lhs_contracting_dims={1,2}` or backend_config JSON."""
  m = re.search(key + r'=\{([\d,]*)\}', attrs)
  if m is None:
    m = re.search('"' + key.replace('_dims', '_dimensions') + r'":\[([^\]]*)\]', attrs)
  return [int(d) for d in re.findall(r'\d+', m.group(1))] if m else []


def matmul(out, lhs, attrs: str) -> float:
  """A dot: 2 x output elements x the contracted size."""
  k = math.prod(lhs.shape[d] for d in _dims(attrs, 'lhs_contracting_dims'))
  return 2.0 * math.prod(out.shape) * k


def _window(attrs: str, key: str, rank: int) -> list:
  m = re.search(r'\b' + key + r'=([\d_x-]+)', attrs)
  return m.group(1).split('x') if m else [None] * rank


def _taps(n: int, m: int, size: int, stride: int, lo: int, base: int, rate: int) -> int:
  """Multiply-adds along one spatial dimension, summed over its m output positions: the
  window taps that land on one of the n input elements, not on padding or on the holes
  of a base (lhs) dilation. XLA:TPU writes batched matmuls as such convolutions."""
  start = np.arange(m) * stride - lo  # input coordinate of each window's first tap
  if base == 1 and rate == 1:  # taps t with 0 <= start + t < n, counted without a grid
    return int(np.clip(np.minimum(size, n - start) - np.maximum(0, -start), 0, None).sum())
  p = start[:, None] + np.arange(size)[None, :] * rate
  return int(np.count_nonzero((p >= 0) & (p <= (n - 1) * base) & (p % base == 0)))


def convolution(out, lhs, kernel, attrs: str) -> float:
  """A convolution (XLA:TPU also writes batched matmuls as dilated convolutions)."""
  # dim_labels=b01f_01io->b01f: digits are spatial dimensions, 'i' the kernel's input
  # features (per group), 'b' and 'f' the output's batch and features.
  m = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', attrs)
  if m is None:  # no spatial dimensions written: a plain 1x1 convolution
    return 2.0 * math.prod(out.shape) * math.prod(kernel.shape) / kernel.shape[-1]
  lhs_l, ker_l, out_l = m.groups()
  digits = sorted(c for c in out_l if c.isdigit())
  size, stride, pad, base, rate = (_window(attrs, k, len(digits)) for k in
                                   ('size', 'stride', 'pad', 'lhs_dilate', 'rhs_dilate'))
  macs = out.shape[out_l.index('b')] * out.shape[out_l.index('f')]
  macs *= kernel.shape[ker_l.index('i')]
  for j, d in enumerate(digits):
    macs *= _taps(lhs.shape[lhs_l.index(d)], out.shape[out_l.index(d)],
                  kernel.shape[ker_l.index(d)], int(stride[j] or 1),
                  int(pad[j].split('_')[0]) if pad[j] else 0, int(base[j] or 1),
                  int(rate[j] or 1))
  return 2.0 * macs


def cudnn_attention(q, k, attrs: str) -> float:
  """cuDNN fused attention: q [B, T, H, D], k [B, S, H, D]. The forward is 2 matmuls; the
  backward recomputes the scores and runs 4 more (flash attention keeps no [T, S])."""
  b, t, h, d = q.shape
  per_matmul = 2.0 * b * h * t * k.shape[1] * d
  return per_matmul * (5 if 'Backward' in attrs else 2)


def pallas_estimate(attrs: str):
  """A Pallas kernel's FLOPs from the cost estimate it was given, or None without one."""
  m = re.search(r'"cost_estimate":\{"flops":"(\d+)"', attrs)
  return float(m.group(1)) if m else None
