"""Orbax checkpoints of the TrainState under WORKDIR/checkpoints: save every N steps, keep the last K, restore.

Every process calls save/restore (orbax coordinates the multi-host write). Saves are asynchronous; a
checkpoint becomes visible only once it is complete (orbax writes into a temporary directory and renames it),
so a process killed mid-save leaves the previous checkpoints intact and the next run resumes from the latest
complete one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager for one TrainState pytree."""

  def __init__(self, workdir: str, max_to_keep: int = 3, async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    # The handler is named up front so that a fresh manager can read a step's metadata before restoring it.
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=ocp.StandardCheckpointHandler())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any) -> bool:
    """Starts saving `state` as checkpoint `step` (a no-op returning False if that step already exists)."""
    if step in self._manager.all_steps():
      return False
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    """Restores checkpoint `step` (default: the latest) into the shapes, dtypes and shardings of abstract_state."""
    if step is None:
      step = self._manager.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
    self._check_matches(abstract_state, step)
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"checkpoint {self.directory}/{step} does not match the model/optimizer of this config "
                       f"(different model fields or optimizer?): {e}") from e

  def _check_matches(self, abstract_state: Any, step: int) -> None:
    """Raises ValueError naming the first differing leaf path if checkpoint `step` does not fit abstract_state.

    Reads only the checkpoint's metadata (tree structure and array shapes), so a mismatch is reported before
    any array is read (orbax's own error comes later, from inside its asynchronous reads). A checkpoint whose
    metadata cannot be read is left to orbax's restore.
    """
    try:
      saved = _leaf_shapes(self._manager.item_metadata(step))
    except Exception:  # pylint: disable=broad-except
      return
    if not saved:
      return
    wanted = _leaf_shapes(abstract_state)
    where = f"checkpoint {self.directory}/{step} does not match the model/optimizer of this config"
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    if missing or extra:
      parts = []
      if missing:
        parts.append(f"{len(missing)} entries of the state are not in the checkpoint (first: {missing[0]})")
      if extra:
        parts.append(f"{len(extra)} checkpoint entries are not in the state (first: {extra[0]})")
      hint = "different model fields or optimizer?"
      if all(k.startswith("opt_state/") for k in missing + extra):
        fused = [any(k.startswith("opt_state/moments") for k in tree) for tree in (saved, wanted)]
        if fused[0] != fused[1]:  # jaxflow.optim's two layouts of the same Adam state
          hint = (f"the checkpoint's optimizer state is {'fused' if fused[0] else 'per-leaf'}: resume with "
                  f"--config.optim.fused_update={fused[0]}")
      raise ValueError(f"{where}: {'; '.join(parts)} ({hint})")
    # Parameters first: their names say most about what differs.
    for path, shape in sorted(wanted.items(), key=lambda kv: (not kv[0].startswith("params/"), kv[0])):
      if saved[path] != shape:
        raise ValueError(f"{where}: {path} has shape {saved[path]} in the checkpoint, {shape} in the state "
                         "(different model fields?)")

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'params/conv1/kernel': shape, ...} of a state, an abstract state or orbax tree metadata (None leaves dropped)."""
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(getattr(leaf, "shape", ()))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def restore_params(workdir: str, abstract_state: Any, step: int | None = None) -> Any:
  """Restores a whole TrainState from another run's workdir (e.g. the previous SpyNet stage)."""
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    return ckpt.restore(abstract_state, step)
  finally:
    ckpt.close()


def save_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes config.json beside the checkpoints (process 0 only); returns its path."""
  path = os.path.join(workdir, "config.json")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(path + ".tmp", path)
  return path


def load_config_json(workdir: str) -> dict[str, Any]:
  with open(os.path.join(workdir, "config.json")) as f:
    return json.load(f)
