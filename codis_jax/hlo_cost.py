"""Kernel-by-kernel cost of a compiled XLA program, read from its optimised HLO text.

Every instruction of the entry computation that is not bookkeeping (parameter, tuple,
bitcast, ...) is one kernel launch; a while loop's body counts its trip count of times
(XLA:GPU's `known_trip_count`, or XLA:TPU's `i < N` condition; the condition is not run).
For each kernel: FLOPs of its matmuls and convolutions (`hlo_flops`; Pallas kernels from
their cost estimates), and the bytes it moves through device memory (operands read plus
results written). A fusion reads only the slices it takes of an operand, and a
dynamic-update-slice fusion writes only its update in place, as XLA's own GPU cost model
counts them. On TPUs arrays are stored tile by tile (each tiled dimension rounded up to
its tile), and buffers that XLA:TPU placed in on-chip memory (VMEM) move no HBM bytes;
its async copies between HBM and VMEM move their destination's size.

`roofline_seconds` turns one kernel into time on a device: max(compute at peak, bytes at
peak bandwidth) plus a fixed launch cost. Summed over a step it is an estimate of what
the step would take if every kernel ran at the device's limit: a lower bound that says
which kernels and how many bytes a change removes, not a measurement.
"""

import dataclasses
import math
import re

from codis_jax import hlo_flops

_DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 'f8e4m3fn': 1,
                'f8e5m2': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4,
                'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}
_ARRAY = re.compile(r'\b([a-z][a-z0-9]*)\[([\d,]*)\](?:\{([^}]*)\})?')
# Instructions that launch nothing: they name, regroup or reinterpret existing buffers.
_FREE = {'parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant', 'after-all',
         'partition-id', 'replica-id', 'opt-barrier', 'add-dependency'}
_ASYNC_DONE = re.compile(r'-(done|update)$')
_SLICES = {'slice', 'dynamic-slice'}
# Async copies: where the destination sits in the flattened result tuple.
_ASYNC_COPIES = {'copy-start': 0, 'slice-start': 1}


@dataclasses.dataclass(frozen=True)
class Array:
  dtype: str
  shape: tuple
  minor_to_major: tuple = ()  # the layout, where the HLO text gives one
  tile: tuple = ()            # XLA:TPU: the layout's first tile, over the most-minor dims
  space: int = 0              # memory space: 0 is device memory (HBM); XLA:TPU's S(1)
                              # is on-chip VMEM, S(2)/S(6) sync flags and scalar memory

  @property
  def bytes(self) -> int:
    """Bytes the array takes in device memory: each tiled dimension rounded up to its
    tile (TPU arrays are stored tile by tile), none when it lives in on-chip memory."""
    if self.space:
      return 0
    shape = list(self.shape)
    if self.tile and len(self.minor_to_major) == len(shape):
      for dim, size in zip(self.minor_to_major, reversed(self.tile)):
        shape[dim] = -(-shape[dim] // size) * size
    return int(math.prod(shape) * _DTYPE_BYTES[self.dtype])


@dataclasses.dataclass
class Instr:
  name: str
  arrays: list      # the result's arrays (several for a tuple)
  op: str
  operands: list    # names of the operand instructions
  args: str         # the operand list as written ('0' for parameter(0))
  attrs: str        # everything after the operand list
  root: bool = False


@dataclasses.dataclass
class Kernel:
  name: str
  op: str           # 'fusion', 'custom-call', 'copy', ...
  kind: str         # fusion kind or custom-call target, for grouping
  op_name: str      # JAX op path from the metadata (XLA-made ops: first named operand's)
  flops: float      # per launch
  bytes: float      # per launch
  count: int        # launches per program run (while loops multiply)
  f32_matmul: bool  # matmul with float32 operands (TF32 on NVIDIA GPUs)


def _array(dtype: str, dims: str, layout: str) -> Array:
  shape = tuple(int(d) for d in dims.split(',') if d)
  order, _, rest = layout.partition(':')
  tile = re.match(r'T\(([\d,]+)\)', rest)
  space = re.search(r'S\((\d+)\)', rest)
  return Array(dtype, shape, tuple(int(d) for d in order.split(',') if d),
               tuple(int(t) for t in tile.group(1).split(',')) if tile else (),
               int(space.group(1)) if space else 0)


def arrays(type_text: str) -> list:
  """'(bf16[2,3]{1,0}, s8[64]{0})' -> [Array('bf16', (2, 3), (1, 0)),
  Array('s8', (64,), (0,))]."""
  return [_array(*m) for m in _ARRAY.findall(type_text) if m[0] in _DTYPE_BYTES]


def _closing(text: str, start: int) -> int:
  """Index of the parenthesis closing the one at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    depth += {'(': 1, ')': -1}.get(text[i], 0)
    if depth == 0:
      return i
  raise ValueError(f'unbalanced parentheses in HLO line: {text[:200]}')


def _instr(line: str):
  m = re.match(r'\s*(ROOT )?%(\S+) = (.*)$', line)
  if not m:
    return None
  root, name, rest = m.groups()
  if rest.startswith('('):
    end = _closing(rest, 0)
    type_text, rest = rest[:end + 1], rest[end + 2:]
  else:
    type_text, _, rest = rest.partition(' ')
  open_at = rest.index('(')
  close_at = _closing(rest, open_at)
  args = rest[open_at + 1:close_at]
  return Instr(name, arrays(type_text), rest[:open_at], re.findall(r'%([\w.\-]+)', args),
               args, rest[close_at + 1:], root is not None)


def parse(hlo_text: str):
  """Optimised HLO module text -> ({computation: [Instr]}, entry computation name)."""
  comps, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    if current is None:
      m = re.match(r'(ENTRY )?%(\S+) \(', line)
      if m and line.rstrip().endswith('{'):
        current = comps.setdefault(m.group(2), [])
        entry = m.group(2) if m.group(1) else entry
    elif line.startswith('}'):
      current = None
    else:
      ins = _instr(line)
      if ins is not None:
        current.append(ins)
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')
  return comps, entry


def _fused_flops(called: list, comps: dict):
  """(matmul and convolution FLOPs, has f32 matmul) of a fused computation, with the
  fusions nested in it (XLA:TPU nests them)."""
  local = {i.name: i.arrays for i in called}
  flops, f32 = 0.0, False
  for i in called:
    if i.op == 'dot':
      lhs = local[i.operands[0]][0]
      flops += hlo_flops.matmul(i.arrays[0], lhs, i.attrs)
      f32 |= lhs.dtype == 'f32'
    elif i.op == 'convolution':
      flops += hlo_flops.convolution(i.arrays[0], local[i.operands[0]][0],
                                     local[i.operands[1]][0], i.attrs)
    elif i.op == 'fusion':
      inner = _fused_flops(comps[re.search(r'calls=%([\w.\-]+)', i.attrs).group(1)], comps)
      flops, f32 = flops + inner[0], f32 or inner[1]
  return flops, f32


def _fusion_cost(ins: Instr, comps: dict, types: dict):
  """(flops, bytes read, bytes written, has f32 matmul) of one fusion."""
  called = comps[re.search(r'calls=%([\w.\-]+)', ins.attrs).group(1)]
  local = {i.name: i.arrays for i in called}
  users = {}  # name -> [(user, operand position)]
  for i in called:
    for pos, o in enumerate(i.operands):
      users.setdefault(o, []).append((i, pos))
  flops, f32 = _fused_flops(called, comps)
  params = {int(i.args): i for i in called if i.op == 'parameter'}
  root = next(i for i in called if i.root)
  roots = [i for i in called if i.name in root.operands] if root.op == 'tuple' else [root]
  in_place = {r.operands[0] for r in roots if r.op == 'dynamic-update-slice'}
  read = 0.0
  for n, operand in enumerate(ins.operands):
    p = params.get(n)
    full = sum(a.bytes for a in types.get(operand, []))
    if p is None:
      read += full
    elif p.name in in_place:
      continue  # updated in place: only the update is read and written
    else:
      us = users.get(p.name, [])
      if us and all(u.op in _SLICES and pos == 0 for u, pos in us):
        read += sum(u.arrays[0].bytes for u, _ in us)  # only the slices are read
      else:
        read += full
  written = 0.0
  for r in roots:
    if r.op == 'dynamic-update-slice':
      written += local[r.operands[1]][0].bytes
    else:
      written += sum(a.bytes for a in r.arrays)
  return flops, read, written, f32


def _trip_count(ins: Instr, comps: dict, local: dict) -> int:
  """Runs of a while body: XLA:GPU writes `known_trip_count`; XLA:TPU does not, so it is
  read from a condition `i < N` on a tuple element that starts at a constant (local: the
  calling computation's instructions by name)."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
  if m is not None:
    return int(m.group(1))
  cond = {i.name: i for i in comps[re.search(r'condition=%([\w.\-]+)', ins.attrs).group(1)]}
  root = next(i for i in cond.values() if i.root)
  init = local.get(ins.operands[0]) if ins.operands else None
  if root.op == 'compare' and 'direction=LT' in root.attrs and init and init.op == 'tuple':
    counter, bound = (cond.get(o) for o in root.operands)
    if (counter and bound and counter.op == 'get-tuple-element' and bound.op == 'constant'):
      start = local.get(init.operands[int(re.search(r'index=(\d+)', counter.attrs).group(1))])
      while start is not None and start.op == 'copy':
        start = local.get(start.operands[0])
      if start is not None and start.op == 'constant':
        return max(int(bound.args) - int(start.args), 0)
  raise ValueError(f'while loop {ins.name} has no known trip count in its backend_config '
                   'and no `counter < constant` condition')


def _branches(ins: Instr) -> list:
  m = re.search(r'branch_computations=\{([^}]*)\}', ins.attrs)
  if m:
    return re.findall(r'%([\w.\-]+)', m.group(1))
  return [re.search(key + r'=%([\w.\-]+)', ins.attrs).group(1)
          for key in ('true_computation', 'false_computation')]


def kernels(hlo_text: str) -> list:
  """The kernels one run of the program launches, as [Kernel] (while bodies unrolled by
  their trip counts into `count`). A conditional runs one branch, which the text does not
  say: the branch that moves the most bytes is counted (for a guard's `cond(ok, update,
  keep)`, the update)."""
  comps, entry = parse(hlo_text)

  def walk(comp_name, count, out):
    local = {i.name: i for i in comps[comp_name]}
    types = {n: i.arrays for n, i in local.items()}
    names = {}  # JAX op path per instruction; XLA-made ones take a named operand's
    for ins in comps[comp_name]:
      m = re.search(r'op_name="([^"]*)"', ins.attrs)
      names[ins.name] = m.group(1) if m else next(
          (names[o] for o in ins.operands if names.get(o)), '')
    for ins in comps[comp_name]:
      if ins.op in _FREE or _ASYNC_DONE.search(ins.op):
        continue
      if ins.op == 'while':
        # With a known trip count XLA:GPU runs the body that many times and never the
        # condition (its WhileThunk; no predicate goes back to the host).
        body = re.search(r'body=%([\w.\-]+)', ins.attrs).group(1)
        walk(body, count * _trip_count(ins, comps, local), out)
        continue
      if ins.op in ('call', 'async-start'):
        walk(re.search(r'(?:to_apply|calls)=%([\w.\-]+)', ins.attrs).group(1), count, out)
        continue
      if ins.op == 'conditional':
        taken = [walk(b, count, []) for b in _branches(ins)]
        out.extend(max(taken, key=lambda ks: (sum(k.count * k.bytes for k in ks),
                                              sum(k.count * k.flops for k in ks))))
        continue
      target = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
      kind = target.group(1) if target else ins.op
      result = ins.arrays
      if target and len(result) > 1 and result[-1].dtype in ('s8', 'u8'):
        result = result[:-1]  # cuBLAS / cuDNN scratch space, not data
      flops, f32 = 0.0, False
      read = sum(a.bytes for o in ins.operands for a in types.get(o, []))
      written = sum(a.bytes for a in result)
      if ins.op in _ASYNC_COPIES:
        # XLA:TPU's copies between HBM and VMEM: the result tuple holds the destination
        # beside aliases of the source and a sync flag; only the destination's size moves.
        dest = result[_ASYNC_COPIES[ins.op]]
        source_in_hbm = all(a.space == 0 for o in ins.operands for a in types.get(o, []))
        read = dataclasses.replace(dest, space=0).bytes if source_in_hbm else 0
        written = dest.bytes
      if ins.op == 'fusion':
        kind = re.search(r'kind=(\w+)', ins.attrs).group(1)
        flops, read, written, f32 = _fusion_cost(ins, comps, types)
      elif ins.op == 'dot' or (target and ('gemm' in kind or 'matmul' in kind)):
        lhs = types[ins.operands[0]][0]
        flops, f32 = hlo_flops.matmul(result[0], lhs, ins.attrs), lhs.dtype == 'f32'
      elif ins.op == 'convolution' or (target and 'conv' in kind):
        flops = hlo_flops.convolution(result[0], types[ins.operands[0]][0],
                                      types[ins.operands[1]][0], ins.attrs)
      elif target and 'fmha' in kind.lower():
        flops = hlo_flops.cudnn_attention(*(types[n][0] for n in ins.operands[:2]),
                                          ins.attrs)
      elif target and (estimate := hlo_flops.pallas_estimate(ins.attrs)) is not None:
        flops = estimate
      out.append(Kernel(ins.name, ins.op, kind, names[ins.name], flops, read + written,
                        count, f32))
    return out

  return walk(entry, 1, [])


@dataclasses.dataclass(frozen=True)
class Device:
  """A chip's limits for `roofline_seconds`: dense bf16 and float32-matmul FLOP/s (TF32 on
  NVIDIA), memory bandwidth in bytes/s, and a fixed cost per kernel launch."""
  name: str
  bf16_flops: float
  f32_matmul_flops: float
  bandwidth: float
  launch_s: float = 2e-6


# Vendor datasheet peaks (dense). The launch cost is the usual back-to-back gap between
# small kernels on these GPUs (1-3 us; XLA's CUDA graphs shorten it); it is a parameter.
DEVICES = {
    'a100': Device('A100 SXM 80GB', 312e12, 156e12, 2.039e12),
    'h100': Device('H100 SXM', 989e12, 494e12, 3.35e12),
    'h200': Device('H200 SXM', 989e12, 494e12, 4.8e12),
}


def device_for(device_kind: str):
  """The `DEVICES` entry for a JAX device_kind ('NVIDIA H200' -> h200), or None."""
  for key in DEVICES:
    if key in device_kind.lower():
      return DEVICES[key]
  return None


def _peak(k: Kernel, device: Device) -> float:
  return device.f32_matmul_flops if k.f32_matmul else device.bf16_flops


def roofline_seconds(k: Kernel, device: Device) -> float:
  """Time of all of k's launches if each ran at the device's compute or memory limit."""
  return k.count * (max(k.flops / _peak(k, device), k.bytes / device.bandwidth)
                    + device.launch_s)


def summary(ks: list, device: Device) -> dict:
  """Totals of one program run: launches, FLOPs, bytes, and the roofline time with its
  compute-bound and memory-bound parts."""
  bound = [(k.count * k.flops / _peak(k, device), k.count * k.bytes / device.bandwidth)
           for k in ks]
  return dict(
      launches=sum(k.count for k in ks),
      flops=sum(k.count * k.flops for k in ks),
      bytes=sum(k.count * k.bytes for k in ks),
      seconds=sum(roofline_seconds(k, device) for k in ks),
      compute_bound_s=sum(c for c, m in bound if c >= m),
      memory_bound_s=sum(m for c, m in bound if m > c),
      launch_s=sum(k.count for k in ks) * device.launch_s)


def group_by(ks: list, key, device: Device) -> list:
  """[(group, launches, flops, bytes, roofline seconds)] by key(kernel), slowest first."""
  groups = {}
  for k in ks:
    g = groups.setdefault(key(k), [0, 0.0, 0.0, 0.0])
    g[0] += k.count
    g[1] += k.count * k.flops
    g[2] += k.count * k.bytes
    g[3] += roofline_seconds(k, device)
  return sorted(((name, *v) for name, v in groups.items()), key=lambda r: -r[4])

