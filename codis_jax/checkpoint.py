"""Orbax checkpoints of a training run: save, restore (sharded), resume, and a raw reader.

A checkpoint is WORKDIR/checkpoints/STEP/ with three items:
  state   the TrainState as a nested dict (flax.serialization.to_state_dict): step,
          params, ema_params, opt_state, image_queue, text_queue, queue_ptr; not its
          weight copy, which is derived from the weights (`state.refresh_weight_copy`)
  extra   JSON: the base RNG key as raw key data, every host's data-iterator position, the
          non-finite guard's counters, wall-clock time used so far
  config  JSON: the config the run was started with
Saves are asynchronous (the device->host copy happens in `save`; writing to disk runs in
the background) and atomic (Orbax renames a finished temporary directory), so a killed
process leaves the previous checkpoint intact.
"""

import json
import os

from flax import serialization
from flax import traverse_util
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

STATE, EXTRA, CONFIG = 'state', 'extra', 'config'
_MAX_LISTED = 8  # shape differences named in an error message


class CheckpointError(ValueError):
  """A checkpoint that cannot be used (missing, or written by an incompatible config)."""


def _handlers():
  return {STATE: ocp.StandardCheckpointHandler(), EXTRA: ocp.JsonCheckpointHandler(),
          CONFIG: ocp.JsonCheckpointHandler()}


def _saved_tree(state) -> dict:
  """The state's nested dict as saved: without the derived weight copy."""
  tree = serialization.to_state_dict(state)
  tree.pop('weight_copy', None)
  return tree


def config_to_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())


class Checkpointer:
  """An `ocp.CheckpointManager` for WORKDIR/checkpoints, keeping the newest `keep`."""

  def __init__(self, directory, *, keep=3, async_save=True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=_handlers())

  def latest_step(self):
    return self._manager.latest_step()

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def restore_extra(self, step) -> dict:
    out = self._manager.restore(step, args=ocp.args.Composite(
        **{EXTRA: ocp.args.JsonRestore(), CONFIG: ocp.args.JsonRestore()}))
    return {**out[EXTRA], 'config': out[CONFIG]}

  def restore_state(self, step, abstract_state, config=None):
    """Restores `step` into the layout of `abstract_state` (ShapeDtypeStructs with
    shardings), after checking that every saved shape matches it. A weight copy comes
    back as None: `state.refresh_weight_copy` rebuilds it."""
    has_copy = hasattr(abstract_state, 'weight_copy')  # TrainState's; not in the files
    if has_copy:
      abstract_state = abstract_state.replace(weight_copy=None)
    target = _saved_tree(abstract_state)
    saved = self._manager.item_metadata(step)[STATE]
    check_compatible(getattr(saved, 'tree', saved), target,
                     where=os.path.join(self.directory, str(step)),
                     saved_config=self.restore_extra(step)['config'], config=config)
    out = self._manager.restore(step, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(target)}))
    tree = {**out[STATE], 'weight_copy': None} if has_copy else out[STATE]
    return serialization.from_state_dict(abstract_state, tree)

  def save(self, step, state, extra: dict, config) -> None:
    self._manager.save(step, force=True, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(_saved_tree(state)),
        EXTRA: ocp.args.JsonSave(extra),
        CONFIG: ocp.args.JsonSave(config_to_dict(config))}))

  def reached_preemption(self, step) -> bool:
    """True on every host once JAX's distributed runtime saw a preemption notice."""
    return self._manager.reached_preemption(step)

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


def _flat_shapes(tree) -> dict:
  flat = traverse_util.flatten_dict(tree, sep='/') if isinstance(tree, dict) else {}
  return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flat.items()}


def _config_diff(saved: dict, current: dict, prefix='') -> list:
  out = []
  for k in sorted(set(saved) | set(current)):
    a, b = saved.get(k), current.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _config_diff(a, b, f'{prefix}{k}.')
    elif a != b and (prefix.startswith('model.') or k in ('queue_size', 'text_len')):
      out.append(f'{prefix}{k}: {a!r} -> {b!r}')
  return out


def check_compatible(saved_tree, target_tree, *, where='', saved_config=None,
                     config=None):
  """Raises CheckpointError naming the leaves whose shape/dtype differ (or that one side
  lacks) between a saved state tree and the tree this config builds."""
  saved, want = _flat_shapes(saved_tree), _flat_shapes(target_tree)
  diffs = []
  for k in sorted(set(saved) | set(want)):
    if k not in saved:
      diffs.append(f'{k}: not in the checkpoint (config wants {want[k][0]})')
    elif k not in want:
      diffs.append(f'{k}: in the checkpoint {saved[k][0]} but not in this config')
    elif saved[k][0] != want[k][0]:
      diffs.append(f'{k}: checkpoint {saved[k][0]} vs config {want[k][0]}')
    elif saved[k][1] != want[k][1]:
      diffs.append(f'{k}: checkpoint dtype {saved[k][1]} vs config {want[k][1]}')
  if not diffs:
    return
  more = f' (and {len(diffs) - _MAX_LISTED} more)' if len(diffs) > _MAX_LISTED else ''
  msg = (f'checkpoint {where} does not fit this config: {len(diffs)} shape(s) differ: '
         + '; '.join(diffs[:_MAX_LISTED]) + more)
  if saved_config is not None and config is not None:
    changed = _config_diff(saved_config, config_to_dict(config))
    if changed:
      msg += '. Config changes: ' + ', '.join(changed[:_MAX_LISTED])
  raise CheckpointError(msg + '. Use a new --workdir, or the config the checkpoint was '
                        'written with (its config.json).')


# ----------------------------------------------------------------------- raw restore

def _step_dir(path) -> str:
  """A workdir, its checkpoints/ folder, or one step's folder -> that step's folder."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, STATE)):
    return path
  for root in (os.path.join(path, 'checkpoints'), path):
    if os.path.isdir(root):
      steps = [int(d) for d in os.listdir(root)
               if d.isdigit() and os.path.isdir(os.path.join(root, d, STATE))]
      if steps:
        return os.path.join(root, str(max(steps)))
  raise CheckpointError(f'no checkpoint found at {path} (expected a workdir, its '
                        'checkpoints/ folder, or a step folder holding state/)')


def restore_raw(path) -> dict:
  """{'state': nested dicts of numpy arrays, 'config': ConfigDict, 'extra': dict,
  'path': the step folder read}. Needs no devices, mesh or model code: for exporters."""
  step_dir = _step_dir(path)
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(os.path.join(step_dir, STATE))
  meta = getattr(getattr(meta, 'item_metadata', meta), 'tree', meta)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  state = ckptr.restore(os.path.join(step_dir, STATE),
                        args=ocp.args.PyTreeRestore(restore_args=restore_args))
  json_ckptr = ocp.Checkpointer(ocp.JsonCheckpointHandler())
  read = lambda item: json_ckptr.restore(os.path.join(step_dir, item))
  return {'state': state, 'config': ml_collections.ConfigDict(read(CONFIG)),
          'extra': read(EXTRA), 'path': step_dir}
