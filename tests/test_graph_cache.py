"""data_pipelines.graph_cache: a stored tf.data graph rebuilds the same stream; damaged entries are rebuilt."""

from __future__ import annotations

import hashlib
import json
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import graph_cache, pipeline


def synthetic_config(start_crop=(32, 48)) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 5
  c.batch_size = 2
  c.data = pipeline.default_config()
  c.data.train = "synthetic_chairs"
  c.data.crop_size = start_crop
  s = c.data.synthetic
  s.image_size, s.num_chairs, s.sprite_size = (64, 80), (2, 3), 32
  s.num_procedural_backgrounds, s.num_chair_models, s.views_per_model = 2, 2, 2
  return c


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
      assert x[k].tobytes() == y[k].tobytes(), k


@pytest.fixture
def counted_builds(monkeypatch):
  calls = []
  real = pipeline._build_train_dataset

  def counting(*args):
    calls.append(args[1:])
    return real(*args)

  monkeypatch.setattr(pipeline, "_build_train_dataset", counting)
  return calls


def test_stored_graph_gives_the_same_stream_and_skips_building(monkeypatch, tmp_path, counted_builds):
  monkeypatch.setenv("JAXFLOW_CACHE", str(tmp_path / "assets"))
  c = synthetic_config()
  cache = str(tmp_path / "graphs")
  plain = take(pipeline.train_iterator(c, start_step=1), 2)
  assert len(counted_builds) == 1
  miss = take(pipeline.train_iterator(c, start_step=1, graph_cache_dir=cache), 2)
  assert len(counted_builds) == 2
  entries = os.listdir(cache)
  assert len(entries) == 1 and entries[0].endswith(graph_cache.SUFFIX)
  hit = take(pipeline.train_iterator(c, start_step=1, graph_cache_dir=cache), 2)
  assert len(counted_builds) == 2  # rebuilt from the stored graph, not traced
  assert_same_batches(plain, miss)
  assert_same_batches(plain, hit)
  # Another start step (resume) or another setting is another entry, never the stored stream.
  other = take(pipeline.train_iterator(c, start_step=2, graph_cache_dir=cache), 1)
  assert len(counted_builds) == 3 and len(os.listdir(cache)) == 2
  assert_same_batches(other, plain[1:])


def read(path):
  with open(path, "rb") as f:
    return f.read()


def write(path, data):
  with open(path, "wb") as f:
    f.write(data)


def test_damaged_entry_is_deleted_with_a_warning_and_rebuilt(monkeypatch, tmp_path, counted_builds):
  monkeypatch.setenv("JAXFLOW_CACHE", str(tmp_path / "assets"))
  c = synthetic_config()
  cache = str(tmp_path / "graphs")
  first = take(pipeline.train_iterator(c, graph_cache_dir=cache), 1)
  (name,) = os.listdir(cache)
  path = os.path.join(cache, name)
  data = read(path)
  write(path, data[: len(data) // 2])  # e.g. a full disk
  with pytest.warns(UserWarning, match=f"damaged tf.data graph entry {path}"):
    again = take(pipeline.train_iterator(c, graph_cache_dir=cache), 1)
  assert len(counted_builds) == 2
  assert_same_batches(first, again)
  graph_cache._read(path)  # written again, whole (the graph's function names differ from build to build)


def test_every_kind_of_damage_is_caught(tmp_path):
  cache = str(tmp_path)
  build = lambda: tf.data.Dataset.range(3).map(lambda i: {"x": tf.fill([2], i)})
  graph_cache.load_or_build(build, {"k": 1}, cache)
  (path,) = [os.path.join(cache, n) for n in os.listdir(cache)]
  data = read(path)
  header, graph = data.split(b"\n", 1)
  flipped = bytearray(graph)
  flipped[len(flipped) // 2] ^= 0xFF
  for damaged, why in ((data[:-7], "truncated"), (header + b"\n" + bytes(flipped), "SHA-256"),
                       (b"{not json\n" + graph, "unreadable header"), (b"", "unreadable header"),
                       (header.replace(b'"format": 1', b'"format": 9') + b"\n" + graph, "format-1")):
    write(path, damaged)
    with pytest.raises(ValueError, match=why):
      graph_cache._read(path)
    with pytest.warns(UserWarning, match=f"damaged tf.data graph entry {path}"):
      ds = graph_cache.load_or_build(build, {"k": 1}, cache)
    assert [int(e["x"][0]) for e in ds.as_numpy_iterator()] == [0, 1, 2]
    graph_cache._read(path)
  # A well-formed entry whose graph TensorFlow rejects is rebuilt the same way.
  bad = b"\x0a\x05hello" * 3
  meta = {"format": 1, "sha256": hashlib.sha256(bad).hexdigest(), "size": len(bad), "spec": {"x": [[2], "int64"]}}
  write(path, json.dumps(meta).encode() + b"\n" + bad)
  with pytest.warns(UserWarning, match="damaged tf.data graph entry"):
    ds = graph_cache.load_or_build(build, {"k": 1}, cache)
  assert [int(e["x"][1]) for e in ds.as_numpy_iterator()] == [0, 1, 2]


def test_key_covers_the_settings_assets_and_source(monkeypatch, tmp_path):
  monkeypatch.setenv("JAXFLOW_CACHE", str(tmp_path / "assets"))
  from data_pipelines import synthetic_chairs
  c = synthetic_config()
  digest = synthetic_chairs.asset_digest(c.data.synthetic)
  c2 = synthetic_config()
  c2.data.synthetic.num_procedural_backgrounds = 3
  assert synthetic_chairs.asset_digest(c2.data.synthetic) != digest
  key = {"data": c.data.to_dict(), "assets": digest}
  base = graph_cache.entry_path(key, "/x")
  assert graph_cache.entry_path(dict(key), "/x") == base
  assert graph_cache.entry_path({**key, "start_step": 1}, "/x") != base
  monkeypatch.setattr(graph_cache, "_SOURCE_DIGEST", "edited source")
  assert graph_cache.entry_path(key, "/x") != base


def test_only_flat_dicts_without_external_state_are_stored_and_old_entries_evicted(tmp_path):
  cache = str(tmp_path)
  make = lambda k: (lambda: tf.data.Dataset.range(4).map(lambda i: {"x": tf.fill([3], i * k)}))
  for k in range(4):
    ds = graph_cache.load_or_build(make(k), {"k": k}, cache, max_entries=2)
    assert [int(e["x"][0]) for e in ds.as_numpy_iterator()] == [0, k, 2 * k, 3 * k]
  assert len(os.listdir(cache)) == 2  # the two most recently used
  hit = graph_cache.load_or_build(lambda: pytest.fail("built on a hit"), {"k": 3}, cache, max_entries=2)
  assert [int(e["x"][1]) for e in hit.as_numpy_iterator()] == [0, 3, 6, 9]
  # A tuple element, or a py_function (state outside the graph): built every time, nothing stored.
  graph_cache.load_or_build(lambda: tf.data.Dataset.range(2).map(lambda i: (i, i)), {"t": 1}, cache)
  py = lambda: tf.data.Dataset.range(2).map(lambda i: {"x": tf.py_function(lambda v: v + 1, [i], tf.int64)})
  ds = graph_cache.load_or_build(py, {"t": 2}, cache)
  assert len(os.listdir(cache)) == 2
  assert [int(e["x"]) for e in ds.as_numpy_iterator()] == [1, 2]
  assert graph_cache.cache_dir_for(None) is None
  assert graph_cache.cache_dir_for(str(tmp_path)) == os.path.join(str(tmp_path), "tf_data", tf.__version__)
