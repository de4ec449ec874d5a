"""A small writer of the Lua Torch7 binary serialisation (what `torch.save` writes), for the converter tests.

Writes numbers, strings, booleans, nil, tables, float tensors/storages and nn modules (a class name plus a
table of fields), with memo indices so one Python object written twice is stored once and referenced, like
Torch does. Little-endian, 8-byte longs. See jaxflow/converters/t7.py for the format.
"""

from __future__ import annotations

import struct
from typing import Any, BinaryIO

import numpy as np


class Module:
  """A torch object of class `torch_class` (e.g. 'nn.SpatialConvolution') whose fields are `fields`."""

  def __init__(self, torch_class: str, **fields: Any):
    self.torch_class = torch_class
    self.fields = fields


class Tensor:
  """A tensor with an explicit torch class (default torch.FloatTensor) and, optionally, a storage offset."""

  def __init__(self, array: np.ndarray, torch_class: str = "torch.FloatTensor", offset: int = 0):
    self.array = np.asarray(array)
    self.torch_class = torch_class
    self.offset = offset


class _Writer:

  def __init__(self, f: BinaryIO):
    self.f = f
    self.ids: dict[int, int] = {}
    self.count = 0
    self.keep: list[Any] = []  # keeps memoised objects alive so their id() stays unique

  def int(self, v: int) -> None:
    self.f.write(struct.pack("<i", v))

  def long(self, v: int) -> None:
    self.f.write(struct.pack("<q", v))

  def string(self, s: str) -> None:
    data = s.encode()
    self.int(len(data))
    self.f.write(data)

  def _memo(self, obj: Any) -> bool:
    """Writes the memo index; True if the object was already written (nothing more to write)."""
    key = id(obj)
    if key in self.ids:
      self.int(self.ids[key])
      return True
    self.count += 1
    self.ids[key] = self.count
    self.keep.append(obj)
    self.int(self.ids[key])
    return False

  def object(self, obj: Any) -> None:
    if obj is None:
      self.int(0)
    elif isinstance(obj, bool):
      self.int(5)
      self.int(int(obj))
    elif isinstance(obj, (int, float)):
      self.int(1)
      self.f.write(struct.pack("<d", float(obj)))
    elif isinstance(obj, str):
      self.int(2)
      self.string(obj)
    elif isinstance(obj, dict):
      self.int(3)
      if self._memo(obj):
        return
      self.int(len(obj))
      for k, v in obj.items():
        self.object(k)
        self.object(v)
    elif isinstance(obj, (np.ndarray, Tensor)):
      tensor = obj if isinstance(obj, Tensor) else Tensor(obj)
      self.int(4)
      if self._memo(obj):
        return
      self.string("V 1")
      self.string(tensor.torch_class)
      a = np.ascontiguousarray(tensor.array, np.float32)
      self.int(a.ndim)
      for s in a.shape:
        self.long(s)
      for st in a.strides:
        self.long(st // a.itemsize)
      self.long(tensor.offset + 1)
      if a.ndim == 0:
        self.object(None)
        return
      storage_class = tensor.torch_class.replace("Tensor", "Storage")
      # The storage: `offset` junk values, then the data.
      self.int(4)
      self.count += 1
      self.int(self.count)
      self.string("V 1")
      self.string(storage_class)
      data = np.concatenate([np.full(tensor.offset, 7.0, np.float32), a.reshape(-1)])
      self.long(data.size)
      self.f.write(data.astype("<f4").tobytes())
    elif isinstance(obj, Module):
      self.int(4)
      if self._memo(obj):
        return
      self.string("V 1")
      self.string(obj.torch_class)
      self.object(dict(obj.fields))
    else:
      raise TypeError(f"t7_writer: cannot write {type(obj).__name__}")


def save(path: str, obj: Any) -> None:
  """Writes `obj` as Torch7's torch.save would."""
  with open(path, "wb") as f:
    _Writer(f).object(obj)


def spatial_convolution(weight: np.ndarray, bias: np.ndarray, *, flat: bool = False,
                        torch_class: str = "nn.SpatialConvolution", tensor_class: str = "torch.FloatTensor"
                        ) -> Module:
  """An nn.SpatialConvolution (stride 1, 'same' padding) with weight (O, I, k, k); flat=True stores the weight
  as (O, I*k*k) like the older SpatialConvolutionMM."""
  o, i, kh, kw = weight.shape
  w = weight.reshape(o, -1) if flat else weight
  return Module(torch_class, weight=Tensor(w, tensor_class), bias=Tensor(bias, tensor_class),
                gradWeight=Tensor(np.zeros_like(w), tensor_class), nInputPlane=i, nOutputPlane=o, kW=kw, kH=kh,
                dW=1, dH=1, padW=(kw - 1) // 2, padH=(kh - 1) // 2, train=False)


def sequential(modules: list[Module]) -> Module:
  shared_output = Tensor(np.zeros((0,), np.float32))
  return Module("nn.Sequential", modules={i + 1: m for i, m in enumerate(modules)}, output=shared_output,
                gradInput=shared_output, train=False)


def relu() -> Module:
  return Module("nn.ReLU", threshold=0, val=0, inplace=True, train=False)
