"""A minimal reader of the Torch7 binary serialisation format (`torch.save(path, obj)` in Lua, `.t7` files).

Enough to load released Lua Torch models (nn / cudnn modules holding tensors) without Lua or the `torchfile`
package. The format, all little-endian (as written on x86 machines):

  object  := int32 type, then by type
    0 nil
    1 number   float64
    2 string   int32 length, bytes
    3 table    int32 memo index [if already read: nothing more], int32 n, n x (object key, object value)
    4 torch    int32 memo index [if already read: nothing more], string "V <version>", string class name,
               then a tensor, a storage or (any other class, e.g. nn.SpatialConvolution) a table of fields
    5 boolean  int32 (0 / 1)
    6/7/8 functions (not supported: not needed to read weights)
  tensor  := int32 ndim, int64 sizes[ndim], int64 strides[ndim], int64 storage offset (1-based), object storage
  storage := int64 n, n elements (float32 for Float / Cuda storages, float64 for Double, ...)

Tensors become numpy arrays (copies, C order); Lua tables become `T7Table` (a dict that remembers the class
name for torch objects); objects referenced twice come back as the same Python object (memo by index).
"""

from __future__ import annotations

import os
import struct
from typing import Any, BinaryIO

import numpy as np

TYPE_NIL, TYPE_NUMBER, TYPE_STRING, TYPE_TABLE, TYPE_TORCH, TYPE_BOOLEAN = 0, 1, 2, 3, 4, 5
_FUNCTION_TYPES = (6, 7, 8)

# Storage class suffix -> element dtype (CUDA storages are serialised like their CPU counterparts).
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "CudaStorage": np.float32, "DoubleStorage": np.float64,
    "CudaDoubleStorage": np.float64, "HalfStorage": np.float16, "CudaHalfStorage": np.float16,
    "LongStorage": np.int64, "CudaLongStorage": np.int64, "IntStorage": np.int32, "CudaIntStorage": np.int32,
    "ShortStorage": np.int16, "CudaShortStorage": np.int16, "CharStorage": np.int8,
    "CudaCharStorage": np.int8, "ByteStorage": np.uint8, "CudaByteStorage": np.uint8,
}


class T7Error(ValueError):
  """The file is not a (supported) Torch7 serialisation; the message names the file and byte offset."""


class T7Table(dict):
  """A Lua table (or a torch object's fields); `torch_class` is e.g. 'nn.SpatialConvolution' or None."""

  def __init__(self, *args: Any, torch_class: str | None = None, **kwargs: Any):
    super().__init__(*args, **kwargs)
    self.torch_class = torch_class

  def __repr__(self) -> str:
    return f"T7Table({self.torch_class!r}, keys={sorted(map(str, self.keys()))})"


class _Reader:

  def __init__(self, f: BinaryIO, path: str):
    self.f = f
    self.path = path
    self.memo: dict[int, Any] = {}

  def _error(self, what: str) -> T7Error:
    return T7Error(f"{self.path}: {what} (at byte {self.f.tell()}); expected a Torch7 binary file "
                   f"(written by torch.save in Lua Torch)")

  def _unpack(self, fmt: str, size: int) -> Any:
    data = self.f.read(size)
    if len(data) != size:
      raise self._error("unexpected end of file")
    return struct.unpack("<" + fmt, data)

  def int(self) -> int:
    return self._unpack("i", 4)[0]

  def long(self) -> int:
    return self._unpack("q", 8)[0]

  def string(self) -> str:
    n = self.int()
    if n < 0 or n > 1 << 28:
      raise self._error(f"invalid string length {n}")
    data = self.f.read(n)
    if len(data) != n:
      raise self._error("unexpected end of file in a string")
    return data.decode("utf-8", errors="replace")

  def object(self) -> Any:
    kind = self.int()
    if kind == TYPE_NIL:
      return None
    if kind == TYPE_NUMBER:
      value = self._unpack("d", 8)[0]
      return int(value) if value.is_integer() and abs(value) < 2 ** 53 else value
    if kind == TYPE_STRING:
      return self.string()
    if kind == TYPE_BOOLEAN:
      return self.int() != 0
    if kind == TYPE_TABLE:
      index = self.int()
      if index in self.memo:
        return self.memo[index]
      table = T7Table()
      self.memo[index] = table
      self._fill_table(table)
      return table
    if kind == TYPE_TORCH:
      index = self.int()
      if index in self.memo:
        return self.memo[index]
      version = self.string()
      if version.startswith("V "):
        class_name = self.string()
      else:  # version-0 files write the class name directly
        class_name = version
      return self._torch_object(index, class_name)
    if kind in _FUNCTION_TYPES:
      raise self._error("a serialised Lua function (unsupported; only tables, numbers, strings, booleans and "
                        "torch tensors/modules can be read)")
    raise self._error(f"unknown object type {kind}")

  def _fill_table(self, table: T7Table) -> None:
    n = self.int()
    if n < 0:
      raise self._error(f"invalid table size {n}")
    for _ in range(n):
      key = self.object()
      table[key] = self.object()

  def _torch_object(self, index: int, class_name: str) -> Any:
    short = class_name.split(".", 1)[-1]
    if class_name.startswith("torch.") and short.endswith("Tensor"):
      storage_name = short[: -len("Tensor")] + "Storage"
      if storage_name not in _STORAGE_DTYPES:
        raise self._error(f"unsupported tensor type {class_name}")
      ndim = self.int()
      sizes = [self.long() for _ in range(ndim)]
      strides = [self.long() for _ in range(ndim)]
      offset = self.long() - 1
      storage = self.object()
      if ndim == 0 or storage is None:
        array = np.zeros((0,), _STORAGE_DTYPES[storage_name])
      else:
        itemsize = storage.itemsize
        needed = offset + 1 + sum((s - 1) * st for s, st in zip(sizes, strides)) if all(sizes) else 0
        if offset < 0 or needed > storage.size:
          raise self._error(f"{class_name} of size {sizes} (strides {strides}, offset {offset}) does not fit "
                            f"its storage of {storage.size} elements")
        array = np.lib.stride_tricks.as_strided(storage[offset:], shape=sizes,
                                                strides=[st * itemsize for st in strides]).copy()
      self.memo[index] = array
      return array
    if class_name.startswith("torch.") and short in _STORAGE_DTYPES:
      n = self.long()
      dtype = np.dtype(_STORAGE_DTYPES[short]).newbyteorder("<")
      data = self.f.read(n * dtype.itemsize)
      if len(data) != n * dtype.itemsize:
        raise self._error(f"unexpected end of file in a {class_name} of {n} elements")
      storage = np.frombuffer(data, dtype).astype(dtype.newbyteorder("="))
      self.memo[index] = storage
      return storage
    # Any other class (nn modules, ...) serialises its fields as a table object.
    fields = self.object()
    if fields is None:
      fields = T7Table()
    if not isinstance(fields, dict):
      raise self._error(f"object of class {class_name} has non-table fields {type(fields).__name__}")
    obj = T7Table(fields, torch_class=class_name)
    self.memo[index] = obj
    return obj


def load(path: str | os.PathLike) -> Any:
  """Reads a Torch7 `.t7` file: tensors -> numpy arrays, tables/modules -> T7Table, numbers, strings, bools.

  Raises FileNotFoundError for a missing file and T7Error (naming the file and offset) for malformed data.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such Torch7 file")
  with open(path, "rb") as f:
    reader = _Reader(f, path)
    obj = reader.object()
    return obj


def find_modules(obj: Any, predicate) -> list[T7Table]:
  """Depth-first, in order, every torch object (T7Table with a class) for which predicate(obj) is true.

  Containers (nn.Sequential, nn.DataParallelTable, ...) are searched through their `modules` table (in
  index order); other fields are not followed, so shared gradient buffers are not found twice.
  """
  found: list[T7Table] = []

  def walk(node: Any) -> None:
    if not isinstance(node, T7Table):
      return
    if node.torch_class is not None and predicate(node):
      found.append(node)
      return
    modules = node.get("modules")
    if isinstance(modules, dict):
      for key in sorted(k for k in modules if isinstance(k, (int, float))):
        walk(modules[key])

  walk(obj)
  return found


__all__ = ["T7Error", "T7Table", "find_modules", "load"]
