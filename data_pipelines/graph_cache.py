"""A persistent cache of built tf.data graphs: a repeated input configuration starts without tracing its functions.

Building the synthetic training stream traces the renderer and the draws into a graph of ~2,100 ops (2-4 s of
Python at the `local` size, in every new process). tf.data can serialise a built dataset's graph (the functions,
the asset tables as constants, the options) and rebuild the identical dataset from it (the `DatasetFromGraph`
op) in a fraction of a second. `load_or_build(build, key_parts, cache_dir)` does that for one dataset:

- the entry's name is a hash of `key_parts` (everything the caller's graph depends on: config, start step,
  process, a digest of the assets) together with the TensorFlow version and the source of every module of the
  `data_pipelines` package (so an edited pipeline never reuses a stale graph);
- a hit rebuilds the dataset from the stored graph; a miss calls `build()`, returns that dataset and stores its
  graph (written to a temporary file, then renamed, so concurrent processes and interruptions never leave a
  partial entry under the real name);
- an entry is a one-line JSON header (format, element spec, size and SHA-256 of the graph bytes) followed by the
  graph; a damaged entry (wrong size or digest, unreadable header, or a graph TensorFlow rejects) is deleted with
  a warning naming the file and the dataset is built again: never a silently different stream;
- only datasets whose elements are a flat dict of fixed-shape tensors, and whose graph holds no external state,
  are cached; others are built every time (the reason is logged once);
- at most `max_entries` entries are kept (least recently used first out): an entry holds the asset tables,
  ~20 MB at the default synthetic settings.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import pathlib
import time
import warnings
from typing import Any, Callable

import tensorflow as tf

from jaxflow import exec_cache

FORMAT = 1
SUFFIX = ".tfgraph"
MAX_ENTRIES = 8
_LOG = logging.getLogger(__name__)
_SOURCE_DIGEST: str | None = None


def source_digest() -> str:
  """SHA-256 over the source of every module of the data_pipelines package (file names and bytes)."""
  global _SOURCE_DIGEST
  if _SOURCE_DIGEST is None:
    h = hashlib.sha256()
    for path in sorted(pathlib.Path(__file__).parent.glob("*.py")):
      h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    _SOURCE_DIGEST = h.hexdigest()
  return _SOURCE_DIGEST


def entry_path(key_parts: dict[str, Any], cache_dir: str) -> str:
  """Where the graph of a dataset named by `key_parts` is stored under `cache_dir`."""
  text = json.dumps({"format": FORMAT, "tensorflow": tf.__version__, "source": source_digest(),
                     "key": key_parts}, sort_keys=True, default=str)
  return os.path.join(cache_dir, hashlib.sha256(text.encode()).hexdigest()[:40] + SUFFIX)


def _spec_to_json(spec: Any) -> dict[str, list] | None:
  if not isinstance(spec, dict) or not spec:
    return None
  out = {}
  for name, s in spec.items():
    if not isinstance(name, str) or type(s) is not tf.TensorSpec or not s.shape.is_fully_defined():
      return None
    out[name] = [list(s.shape.as_list()), s.dtype.name]
  return out


def _spec_from_json(spec: dict[str, list]) -> dict[str, tf.TensorSpec]:
  return {name: tf.TensorSpec(shape, tf.dtypes.as_dtype(dtype)) for name, (shape, dtype) in spec.items()}


def _read(path: str) -> tuple[dict[str, tf.TensorSpec], bytes]:
  """(element spec, graph bytes) of an entry; ValueError saying what is wrong with it."""
  with open(path, "rb") as f:
    header_line = f.readline(1 << 16)
    try:
      header = json.loads(header_line)
    except ValueError as e:
      raise ValueError(f"unreadable header ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
      raise ValueError(f"not a format-{FORMAT} entry")
    graph = f.read()
  if len(graph) != header.get("size"):
    raise ValueError(f"graph is {len(graph)} bytes, the header says {header.get('size')} (truncated?)")
  if hashlib.sha256(graph).hexdigest() != header.get("sha256"):
    raise ValueError("graph bytes do not match their SHA-256 (damaged)")
  return _spec_from_json(header["spec"]), graph


def _write(path: str, spec: dict[str, list], graph: bytes) -> None:
  header = json.dumps({"format": FORMAT, "spec": spec, "size": len(graph),
                       "sha256": hashlib.sha256(graph).hexdigest()}, sort_keys=True).encode() + b"\n"
  exec_cache.write_atomic(path, header + graph)


def _evict(directory: str, keep: int) -> None:
  """Deletes all but the `keep` most recently used entries, and temporary files older than an hour."""
  entries = []
  temps = glob.glob(os.path.join(directory, exec_cache.TEMP_PREFIX + "*"))  # left by interrupted writes
  for p in glob.glob(os.path.join(directory, "*" + SUFFIX)) + temps:
    try:
      entries.append((os.stat(p).st_mtime, p))
    except OSError:
      continue
  now = time.time()
  done = [(t, p) for t, p in entries if p.endswith(SUFFIX)]
  stale_tmp = [p for t, p in entries if not p.endswith(SUFFIX) and now - t > 3600]
  for p in [p for _, p in sorted(done, reverse=True)[keep:]] + stale_tmp:
    try:
      os.unlink(p)
    except OSError:
      pass


def cache_dir_for(root: str | None) -> str | None:
  """`<root>/tf_data/<tensorflow version>` (the trainer passes JAX's compilation cache directory), or None."""
  if not root:
    return None
  return os.path.join(os.path.expanduser(root), "tf_data", tf.__version__)


def load_or_build(build: Callable[[], tf.data.Dataset], key_parts: dict[str, Any], cache_dir: str | None, *,
                  max_entries: int = MAX_ENTRIES) -> tf.data.Dataset:
  """The dataset `build()` returns, rebuilt from the stored graph when `cache_dir` holds this key's entry.

  Args:
    build: builds the dataset (called on a miss, or when the entry is damaged or the dataset cannot be cached).
    key_parts: JSON-serialisable description of everything the built graph depends on besides the
      data_pipelines source and the TensorFlow version (both added here).
    cache_dir: entry directory (created if needed); None or '' builds without caching.
    max_entries: entries kept in `cache_dir` after a new one is written (least recently used are deleted).
  """
  if not cache_dir:
    return build()
  path = entry_path(key_parts, cache_dir)
  if os.path.exists(path):
    try:
      spec, graph = _read(path)
      variant = tf.raw_ops.DatasetFromGraph(graph_def=graph)
      ds = tf.data.experimental.from_variant(variant, spec)
      try:
        os.utime(path)  # most recently used
      except OSError:
        pass
      return ds
    except (ValueError, KeyError, TypeError, OSError, tf.errors.OpError) as e:
      warnings.warn(f"graph_cache: deleting damaged tf.data graph entry {path} ({e}); building the dataset again")
      try:
        os.unlink(path)
      except OSError:
        pass
  ds = build()
  spec = _spec_to_json(ds.element_spec)
  if spec is None:
    _LOG.info("graph_cache: not caching a dataset whose elements are not a flat dict of fixed-shape tensors")
    return ds
  try:
    graph = ds._as_serialized_graph(  # pylint: disable=protected-access
        external_state_policy=tf.data.experimental.ExternalStatePolicy.FAIL).numpy()
  except (tf.errors.OpError, ValueError) as e:
    _LOG.info("graph_cache: dataset graph not serialisable (%s); not cached", e)
    return ds
  try:
    _write(path, spec, graph)
    _evict(cache_dir, max_entries)
  except OSError as e:
    warnings.warn(f"graph_cache: could not write {path} ({e}); the next start builds the dataset again")
  return ds


__all__ = ["FORMAT", "MAX_ENTRIES", "cache_dir_for", "entry_path", "load_or_build", "source_digest"]
