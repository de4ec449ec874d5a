"""Reading PyTorch checkpoints (state dicts) for the converters; torch is imported here only.

`load_state_dict(path)` accepts a bare state dict or a checkpoint dict holding it under `state_dict` (FlowNet2
PyTorch) / `model` / `net`, strips a DataParallel `module.` prefix and returns {name: float32 numpy}.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import numpy as np

from jaxflow.converters.common import ConversionError, as_numpy

_NESTED_KEYS = ("state_dict", "model", "net")


def require_torch(what: str) -> Any:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(f"{what} needs PyTorch to read the released checkpoint: pip install 'jaxflow[convert]' "
                      f"(or pip install torch)") from None
  return torch


def load_state_dict(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """{parameter / buffer name: float32 numpy array} from a PyTorch checkpoint file.

  Args:
    path: a file written by torch.save (a state dict, or a dict with the state dict under 'state_dict').
    trust_pickle: allow arbitrary pickled objects (torch.load(weights_only=False)); only for files you trust.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such checkpoint file")
  torch = require_torch("converting a PyTorch checkpoint")
  try:
    data = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
  except Exception as e:  # torch raises assorted types for non-checkpoints and unsafe pickles
    hint = "" if trust_pickle else (" If the file is from a source you trust and holds other Python objects, "
                                    "pass --trust_pickle.")
    raise ConversionError(f"{path}: cannot read a PyTorch checkpoint ({type(e).__name__}: {e}).{hint}") from e
  for key in _NESTED_KEYS:
    if isinstance(data, dict) and key in data and isinstance(data[key], dict):
      data = data[key]
      break
  if not isinstance(data, dict):
    raise ConversionError(f"{path}: expected a state dict (name -> tensor) or a dict with one under "
                          f"'state_dict', got {type(data).__name__}")
  out: dict[str, np.ndarray] = {}
  for name, value in data.items():
    if not hasattr(value, "shape"):
      continue
    name = str(name)
    if name.startswith("module."):
      name = name[len("module."):]
    if name.endswith("num_batches_tracked"):
      continue
    out[name] = as_numpy(value)
  if not out:
    raise ConversionError(f"{path}: the checkpoint holds no tensors")
  return out


class StateDict:
  """A name -> array mapping that records which entries were used, so leftovers can be reported."""

  def __init__(self, tensors: dict[str, np.ndarray], source: str):
    self.tensors = dict(tensors)
    self.source = source
    self.used: set[str] = set()

  def __contains__(self, name: str) -> bool:
    return name in self.tensors

  def get(self, name: str, *alternatives: str) -> np.ndarray:
    """The tensor `name` (or the first present alternative); a missing one raises naming the layer."""
    for key in (name,) + alternatives:
      if key in self.tensors:
        self.used.add(key)
        return self.tensors[key]
    raise ConversionError(f"{self.source}: no tensor {name!r} in the checkpoint (expected by the released "
                          f"architecture){self._near(name)}")

  def shape(self, name: str) -> tuple[int, ...]:
    if name not in self.tensors:
      raise ConversionError(f"{self.source}: no tensor {name!r} in the checkpoint{self._near(name)}")
    return tuple(self.tensors[name].shape)

  def _near(self, name: str) -> str:
    stem = name.split(".")[0]
    near = sorted(k for k in self.tensors if k.split(".")[0].rstrip("0123456789_") == stem.rstrip("0123456789_"))
    return f"; similar names present: {near[:8]}" if near else f"; it has {sorted(self.tensors)[:8]}..."

  def ignore(self, names: Iterable[str]) -> None:
    self.used.update(n for n in names if n in self.tensors)

  def check_all_used(self) -> None:
    left = sorted(set(self.tensors) - self.used)
    if left:
      raise ConversionError(f"{self.source}: {len(left)} tensor(s) of the checkpoint have no place in the jaxflow "
                            f"model, first {left[:6]} (shape {self.tensors[left[0]].shape}); is it a checkpoint "
                            f"of another architecture?")


__all__ = ["StateDict", "load_state_dict", "require_torch"]
