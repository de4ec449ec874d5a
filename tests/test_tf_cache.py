"""data_pipelines.tf_cache: TensorFlow's persistent XLA cache for the pipeline's compiled functions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from data_pipelines import tf_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_protobuf_framing_accepts_messages_and_rejects_damage():
  from tensorflow.core.framework import summary_pb2
  msg = summary_pb2.Summary()
  for i in range(3):
    v = msg.value.add()
    v.tag = f"value/{i}"
    v.simple_value = 0.5 * i
  v.metadata.plugin_data.content = b"\x00" * 300  # a length > 127: multi-byte varints
  data = msg.SerializeToString()
  assert tf_cache.protobuf_framing_ok(data)
  assert not tf_cache.protobuf_framing_ok(b"")
  for cut in (1, 5, len(data) // 2, len(data) - 1):
    assert not tf_cache.protobuf_framing_ok(data[:cut]), cut
  assert not tf_cache.protobuf_framing_ok(data + b"\x0a\x10abc")  # a trailing field longer than the rest
  assert not tf_cache.protobuf_framing_ok(b"\x07\x00")  # wire type 7 does not exist


def _run(code: str, env: dict[str, str]) -> str:
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                     env={**os.environ, **env})
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout.strip().splitlines()[-1]


def test_enable_sets_the_flag_drops_damaged_entries_and_respects_the_user(tmp_path):
  cache = tmp_path / "cache"
  code = ("import json, os, warnings\nfrom data_pipelines import tf_cache\n"
          "with warnings.catch_warnings(record=True) as w:\n"
          "  warnings.simplefilter('always')\n"
          f"  d = tf_cache.enable_xla_cache({str(cache)!r})\n"
          "print(json.dumps([d, os.environ.get('TF_XLA_FLAGS', ''), [str(x.message) for x in w]]))")
  d, flags, warned = json.loads(_run(code, {"TF_XLA_FLAGS": "--tf_xla_auto_jit=0"}))
  assert d.startswith(str(cache / "tf_xla")) and os.path.isdir(d)
  assert flags == f"--tf_xla_auto_jit=0 --tf_xla_persistent_cache_directory={d}" and not warned
  good = os.path.join(d, "xla_compile_cache__1__2__XLA_CPU_JIT.pb")
  bad = os.path.join(d, "xla_compile_cache__3__4__XLA_CPU_JIT.pb")
  with open(good, "wb") as f:
    f.write(b"\x0a\x03abc\x10\x96\x01")  # field 1: 'abc'; field 2: varint 150
  with open(bad, "wb") as f:
    f.write(b"\x0a\x10abc")  # field 1 claims 16 bytes, has 3
  d2, _, warned = json.loads(_run(code, {"TF_XLA_FLAGS": ""}))
  assert d2 == d and os.path.exists(good) and not os.path.exists(bad)
  assert len(warned) == 1 and bad in warned[0]
  # The user's own cache flag wins; no cache dir, no change.
  d3, flags, _ = json.loads(_run(code, {"TF_XLA_FLAGS": "--tf_xla_persistent_cache_directory=/elsewhere"}))
  assert d3 is None and flags == "--tf_xla_persistent_cache_directory=/elsewhere"
  assert tf_cache.enable_xla_cache("") is None
  assert tf_cache.enable_xla_cache(str(cache)) is None  # TensorFlow is already imported in this process


def test_second_process_loads_the_pipelines_executables(tmp_path):
  cache = tmp_path / "cache"
  code = ("import numpy as np\nfrom data_pipelines import tf_cache\n"
          f"tf_cache.enable_xla_cache({str(cache)!r})\n"
          "from configs import flownet_s\nfrom data_pipelines import pipeline\n"
          "c = flownet_s.get_config('local')\nc.unlock(); c.data.crop_size = (64, 64); c.batch_size = 2\n"
          "c.data.synthetic.image_size = (80, 80)\n"
          "b = next(pipeline.train_iterator(c, start_step=2))\n"
          "np.savez(OUT, **b)\nprint('ok')\n")
  first = str(tmp_path / "a.npz")
  second = str(tmp_path / "b.npz")
  assert _run(code.replace("OUT", repr(first)), {"TF_XLA_FLAGS": ""}) == "ok"
  entries = sorted((cache / "tf_xla").rglob("*.pb"))
  assert entries, "TensorFlow wrote no XLA cache entries"
  stamps = {p: p.stat().st_mtime_ns for p in entries}
  assert _run(code.replace("OUT", repr(second)), {"TF_XLA_FLAGS": ""}) == "ok"
  # Loaded, not compiled and written again; and the same bytes.
  assert sorted((cache / "tf_xla").rglob("*.pb")) == entries
  assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
  a, b = np.load(first), np.load(second)
  assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)
