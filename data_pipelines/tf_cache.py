"""TensorFlow's persistent XLA cache for the input pipeline's compiled functions (set up before TF is imported).

The synthetic generator's renderer and the augmentation run as `tf.function(jit_compile=True)`; TensorFlow
compiles them with XLA in every new process (~5 CPU-s before the first synthetic batch at the `local` size).
TensorFlow can keep those executables on disk (its `--tf_xla_persistent_cache_directory` flag, read from
TF_XLA_FLAGS when TensorFlow starts), which makes the first batch of a repeated configuration ~1 CPU-s.
`enable_xla_cache(cache_dir)` points it at `<cache_dir>/tf_xla/<tensorflow version>` (the trainer passes JAX's
compilation cache directory, so `--compilation_cache none` disables both). TensorFlow checks that a loaded
entry was compiled from the same program and writes entries by an atomic rename, so stale or concurrent
entries are safe; a damaged entry (e.g. truncated by a full disk) would make TensorFlow fail the pipeline with
"Read less bytes than requested", so entries whose protobuf framing is broken are deleted first (with a
warning naming the file) and compiled again. The directory is not size-bounded (an entry is 1-3 MB per input
configuration), like JAX's own cache.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import sys
import warnings
from typing import BinaryIO

FLAG = "tf_xla_persistent_cache_directory"


def _tf_version() -> str:
  for dist in ("tensorflow", "tensorflow-cpu", "tf-nightly"):
    try:
      return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      continue
  return "unknown"


def _varint(f: BinaryIO) -> int:
  value, shift = 0, 0
  while True:
    b = f.read(1)
    if not b or shift > 63:
      raise ValueError("truncated varint")
    value |= (b[0] & 0x7F) << shift
    if not b[0] & 0x80:
      return value
    shift += 7


def _framing_ok(f: BinaryIO, size: int) -> bool:
  """Walks the top-level fields of the protobuf in `f` (`size` bytes) by their tags and lengths, seeking over
  the values: an entry of a few MB is checked with a handful of small reads."""
  if size == 0:
    return False
  try:
    while f.tell() < size:
      tag = _varint(f)
      kind = tag & 7
      if tag >> 3 == 0:
        return False
      if kind == 0:
        _varint(f)
      elif kind == 1:  # fixed64
        f.seek(8, os.SEEK_CUR)
      elif kind == 2:  # length-delimited (seeking past the end leaves tell() > size: damaged)
        f.seek(_varint(f), os.SEEK_CUR)
      elif kind == 5:  # fixed32
        f.seek(4, os.SEEK_CUR)
      else:
        return False
  except ValueError:
    return False
  return f.tell() == size


def protobuf_framing_ok(data: bytes) -> bool:
  """True if `data` is a sequence of complete top-level protobuf fields (tags, varints, fixed and
  length-delimited values ending exactly at the end). Detects truncated or overwritten cache entries."""
  return _framing_ok(io.BytesIO(data), len(data))


def _drop_damaged(directory: str) -> None:
  for name in sorted(os.listdir(directory)):
    if not name.endswith(".pb"):
      continue
    path = os.path.join(directory, name)
    try:
      with open(path, "rb") as f:
        ok = _framing_ok(f, os.fstat(f.fileno()).st_size)
    except OSError:
      continue
    if not ok:
      warnings.warn(f"tf_cache: deleting damaged TensorFlow XLA cache entry {path} (it will be compiled again)")
      try:
        os.remove(path)
      except OSError:
        pass


def enable_xla_cache(cache_dir: str | None) -> str | None:
  """Points TensorFlow's persistent XLA cache at `<cache_dir>/tf_xla/<tensorflow version>`.

  Returns that directory, or None (nothing changed) when `cache_dir` is empty, when TensorFlow is already
  imported (its flags are read at start-up) or when TF_XLA_FLAGS already sets the cache directory (the user's
  choice wins).
  """
  if not cache_dir or "tensorflow" in sys.modules:
    return None
  flags = os.environ.get("TF_XLA_FLAGS", "")
  if FLAG in flags:
    return None
  directory = os.path.join(os.path.expanduser(cache_dir), "tf_xla", _tf_version())
  os.makedirs(directory, exist_ok=True)
  _drop_damaged(directory)
  os.environ["TF_XLA_FLAGS"] = f"{flags} --{FLAG}={directory}".strip()
  return directory
