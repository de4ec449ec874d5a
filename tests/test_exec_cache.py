"""jaxflow.exec_cache: a warm call loads the stored executable (same results, donation kept), any change of a
key component misses, a broken entry falls back to compiling, other arguments go to the plain jit; and
param_init's cached abstract variables."""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_helpers as th
from jaxflow import exec_cache, losses, optim, parallel, param_init, steps
from jaxflow.train_state import create_train_state, make_init_fn


# A constant new to every test session: the programs below are never in JAX's persistent compilation cache (which
# train_helpers turns on for the session) from an earlier run; an executable loaded from there is not stored.
_RUN = float(np.random.default_rng().integers(1, 2**20))


def _f(x, y):
  return {"out": jnp.tanh(x @ y) + 1.0, "sum": jnp.sum(x) + _RUN}


def _args(n=8, sharding=None):
  rng = np.random.default_rng(0)
  x, y = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
  if sharding is not None:
    return jax.device_put(x, sharding), jax.device_put(y, sharding)
  return jnp.asarray(x), jnp.asarray(y)


def _cached(tmp_path, parts=None, jitted=None, **kw):
  logs = []
  fn = exec_cache.CachedFunction(jitted or jax.jit(_f), "f", parts or {"what": "tanh"}, str(tmp_path),
                                 log=logs.append, **kw)
  return fn, logs


def test_miss_then_hit_same_results(tmp_path):
  mesh = parallel.make_mesh(2)
  sharding = parallel.data_sharding(mesh)
  x, y = _args(sharding=sharding)
  a, logs = _cached(tmp_path)
  ra = a(x, y)
  assert a.hit is False and "no cached executable" in logs[0]
  assert len([p for p in os.listdir(tmp_path) if p.endswith(".jaxexec")]) == 1
  b, logs_b = _cached(tmp_path)
  rb = b(x, y)
  assert b.hit is True and "load" in b.timings and "compile" not in b.timings
  assert len(logs_b) == 1 and "loaded the compiled executable" in logs_b[0]
  np.testing.assert_array_equal(np.asarray(ra["out"]), np.asarray(rb["out"]))
  np.testing.assert_allclose(np.asarray(rb["out"]), np.tanh(np.asarray(x) @ np.asarray(y)) + 1.0, rtol=1e-5,
                             atol=1e-6)
  assert rb["out"].sharding == ra["out"].sharding


@pytest.mark.parametrize("change", ["key_parts", "shape", "dtype", "sharding", "xla_flags", "source", "conv_impl",
                                    "compiler_options", "optax_version"])
def test_any_key_component_change_is_a_miss(tmp_path, monkeypatch, change):
  x, y = _args()
  first, _ = _cached(tmp_path)
  first(x, y)
  parts, kw = None, {}
  if change == "key_parts":
    parts = {"what": "tanh", "lr": 2}
  elif change == "shape":
    x, y = _args(n=16)
  elif change == "dtype":
    x = x.astype(jnp.bfloat16)
  elif change == "sharding":
    s = parallel.replicated(parallel.make_mesh(2))
    x, y = jax.device_put(x, s), jax.device_put(y, s)
  elif change == "xla_flags":
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math=false")
  elif change == "source":
    monkeypatch.setattr(exec_cache, "source_hash", lambda package_dir=None: "edited")
  elif change == "conv_impl":
    from jaxflow.ops import conv as conv_ops
    monkeypatch.setattr(conv_ops, "_default_impl", "lax")
  elif change == "compiler_options":
    kw = {"compiler_options": {"xla_backend_optimization_level": 1}}
  elif change == "optax_version":
    import optax
    monkeypatch.setattr(optax, "__version__", optax.__version__ + ".post1")
  second, logs = _cached(tmp_path, parts=parts, **kw)
  out = second(x, y)
  assert second.hit is False and second.key != first.key and "no cached executable" in logs[0]
  ref = np.tanh(np.asarray(x, np.float32) @ np.asarray(y, np.float32)) + 1.0
  np.testing.assert_allclose(np.asarray(out["out"], np.float32), ref, rtol=2e-2, atol=2e-2)


def test_broken_entry_falls_back_to_compiling(tmp_path):
  x, y = _args()
  first, _ = _cached(tmp_path)
  first(x, y)
  (name,) = [p for p in os.listdir(tmp_path) if p.endswith(".jaxexec")]
  with open(tmp_path / name, "r+b") as f:
    f.truncate(100)
  second, logs = _cached(tmp_path)
  out = second(x, y)
  assert second.hit is False and "could not load" in logs[0]
  np.testing.assert_array_equal(np.asarray(out["out"]), np.asarray(first(x, y)["out"]))
  third, _ = _cached(tmp_path)  # the entry was rewritten by the fallback
  third(x, y)
  assert third.hit is True


def test_other_arguments_go_to_the_plain_jit(tmp_path):
  fn, _ = _cached(tmp_path)
  x, y = _args()
  fn(x, y)
  x2, y2 = _args(n=4)
  out = fn(x2, y2)
  np.testing.assert_allclose(np.asarray(out["out"]), np.tanh(np.asarray(x2) @ np.asarray(y2)) + 1.0, rtol=1e-5,
                             atol=1e-6)


def test_no_cache_dir_compiles_and_writes_nothing(tmp_path):
  fn = exec_cache.CachedFunction(jax.jit(_f), "f", {}, None)
  x, y = _args()
  fn(x, y)
  assert fn.hit is False and fn.key is None and not os.listdir(tmp_path)


_LOAD_AND_RUN = r"""
import os, sys
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax, jax.numpy as jnp, numpy as np
from jaxflow import exec_cache
jax.config.update("jax_compilation_cache_dir", None)   # nothing may come from JAX's own cache here
x = jnp.asarray(np.load(sys.argv[2]))
y = jnp.asarray(np.load(sys.argv[3]))
np.save(sys.argv[4], np.asarray(exec_cache.load(sys.argv[1])(x, y)["out"]))
"""


def test_persistent_cache_hit_is_stored_from_the_persistent_entry(tmp_path):
  """A program JAX's persistent cache already holds (the HLO compiled before, e.g. before a jaxflow source edit)
  is stored from the persistent entry's bytes: a fresh process loads it and computes the same (an executable
  JAX loaded from its cache does not serialize again on XLA:CPU; before, such a start was never stored)."""
  import subprocess
  import sys
  assert jax.config.jax_compilation_cache_dir  # set by train_helpers
  before = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  try:
    unique = float(np.random.default_rng().random())  # a program no earlier run has cached
    g = lambda x, y: {"out": jnp.tanh(x @ y) * unique}
    x, y = _args()
    fresh, _ = _cached(tmp_path / "a", jitted=jax.jit(g))
    ref = np.asarray(fresh(x, y)["out"])
    jax.clear_caches()  # the next compile must come from the persistent cache, not from this process's memory
    again, logs = _cached(tmp_path / "b", jitted=jax.jit(g))
    np.testing.assert_array_equal(np.asarray(again(x, y)["out"]), ref)
    assert again.hit is False and not any("not stored" in m for m in logs)
    (entry,) = [p for p in os.listdir(tmp_path / "b") if p.endswith(".jaxexec")]
    loaded, _ = _cached(tmp_path / "b", jitted=jax.jit(g))  # in this process
    np.testing.assert_array_equal(np.asarray(loaded(x, y)["out"]), ref)
    assert loaded.hit is True
    np.save(tmp_path / "x.npy", np.asarray(x))
    np.save(tmp_path / "y.npy", np.asarray(y))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _LOAD_AND_RUN, str(tmp_path / "b" / entry), str(tmp_path / "x.npy"),
                          str(tmp_path / "y.npy"), str(tmp_path / "out.npy")], capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root), timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), ref)
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


def test_loaded_train_step_equals_compiled_and_donates(tmp_path):
  """The real train step (TinyFlow, Adam, multiscale loss) on a 2-device mesh: the loaded executable gives the
  same state and metrics as the freshly compiled one, and still donates the state."""
  model = th.TinyFlow()
  mesh = parallel.make_mesh(2)
  rep, dshard = parallel.replicated(mesh), parallel.data_sharding(mesh)
  tx = optim.make_optimizer(optim.default_config(), 10)
  loss_cfg = losses.default_config()
  loss_cfg.weights = (1.0, 0.5 + _RUN / 2**21)  # a program new to this session (see _RUN)
  init_fn = make_init_fn(model, tx, (1, 32, 32, 3))
  batch = parallel.to_global({k: np.stack([th.example(0, i)[k] for i in range(4)]) for k in th.example(0, 0)}, mesh)
  results = []
  for _ in range(2):
    state, abstract = create_train_state(init_fn, 0, rep)
    shard = jax.tree.map(lambda a: a.sharding, abstract)
    jitted = jax.jit(steps.make_train_step(model, tx, functools.partial(losses.compute_loss, loss_cfg)),
                     in_shardings=(shard, dshard), out_shardings=(shard, rep), donate_argnums=0)
    fn, _ = _cached(tmp_path, parts={"model": repr(model)}, jitted=jitted)
    old = state
    state, metrics = fn(state, batch)
    state, metrics = fn(state, batch)
    assert jax.tree.leaves(old.params)[0].is_deleted()
    results.append((fn.hit, th.params_npz(state), float(metrics["loss"])))
  (hit0, p0, l0), (hit1, p1, l1) = results
  assert (hit0, hit1) == (False, True) and l0 == l1
  for k in p0:
    np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)


def test_abstract_variables_cache_round_trip(tmp_path):
  from jaxflow.models import get_model
  model = get_model("spynet")
  shape = (1, 64, 64, 3)
  traced = param_init.abstract_variables(model, shape)
  first = param_init.abstract_variables(model, shape, cache_dir=str(tmp_path))
  (entry,) = os.listdir(tmp_path)
  cached = param_init.abstract_variables(model, shape, cache_dir=str(tmp_path))
  for got in (first, cached):
    assert jax.tree.structure(got[0]) == jax.tree.structure(traced[0])
    assert jax.tree.leaves(got[0]) == jax.tree.leaves(traced[0]) and got[1] == traced[1]
  with open(tmp_path / entry, "w") as f:
    f.write("{not json")
  again = param_init.abstract_variables(model, shape, cache_dir=str(tmp_path))
  assert again[1] == traced[1]
  other = get_model("spynet", levels=4) if "levels" in type(model).__dataclass_fields__ else None
  if other is not None:  # another model config: another entry, other shapes
    param_init.abstract_variables(other, shape, cache_dir=str(tmp_path))
    assert len(os.listdir(tmp_path)) == 2


# ---------------------------------------------------------------------------------------------------------------
# Size bound (least recently used eviction), concurrent processes, background loads.


@pytest.mark.parametrize("text,expected", [("1024", 1024), ("500M", 500 * 2**20), ("4G", 4 * 2**30), ("64k", 65536),
                                           ("2GB", 2 * 2**30), ("none", None), ("", None), ("0", 0)])
def test_parse_size(text, expected):
  assert exec_cache.parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-5M", "1.5X"])
def test_parse_size_rejects_bad_values_naming_the_variable(bad):
  with pytest.raises(ValueError, match=exec_cache.MAX_BYTES_ENV):
    exec_cache.parse_size(bad)


def test_max_bytes_from_env(monkeypatch):
  monkeypatch.delenv(exec_cache.MAX_BYTES_ENV, raising=False)
  assert exec_cache.max_bytes_from_env() == exec_cache.DEFAULT_MAX_BYTES
  monkeypatch.setenv(exec_cache.MAX_BYTES_ENV, "3M")
  assert exec_cache.max_bytes_from_env() == 3 * 2**20
  monkeypatch.setenv(exec_cache.MAX_BYTES_ENV, "none")
  assert exec_cache.max_bytes_from_env() is None


def _files(d, sizes_and_ages):
  """Files name -> (bytes, seconds ago of last use) in directory d."""
  now = time.time()
  for name, (size, age) in sizes_and_ages.items():
    p = d / name
    p.write_bytes(b"x" * size)
    os.utime(p, (now - age, now - age))


def test_evict_removes_least_recently_used_first(tmp_path):
  _files(tmp_path, {"a.jaxexec": (400, 50), "b.jaxexec": (300, 10), "c.jaxexec": (200, 30), "d.jaxexec": (100, 40)})
  # 1000 bytes in all; a bound of 550 removes the oldest-used a (400) then d (100): 500 left.
  removed = exec_cache.evict(str(tmp_path), 550)
  assert sorted(os.path.basename(p) for p in removed) == ["a.jaxexec", "d.jaxexec"]
  assert sorted(os.listdir(tmp_path)) == ["b.jaxexec", "c.jaxexec"]
  assert exec_cache.evict(str(tmp_path), 550) == []  # already within the bound
  assert exec_cache.evict(str(tmp_path), None) == []  # unbounded


def test_evict_keeps_the_given_entry_and_live_temp_files(tmp_path):
  _files(tmp_path, {"new.jaxexec": (500, 100), "old.jaxexec": (500, 5), ".tmp-live": (900, 1),
                    ".tmp-dead": (900, exec_cache.STALE_TEMP_SECS + 60)})
  removed = exec_cache.evict(str(tmp_path), 600, keep=(str(tmp_path / "new.jaxexec"),))
  assert sorted(os.path.basename(p) for p in removed) == [".tmp-dead", "old.jaxexec"]
  assert sorted(os.listdir(tmp_path)) == [".tmp-live", "new.jaxexec"]


def test_store_applies_the_bound_and_a_hit_refreshes_recency(tmp_path):
  """Three programs under a bound that holds two entries: storing the third evicts the least recently used
  one; the one loaded (hit) in between survives."""
  x, y = _args()
  fns = [jax.jit(lambda x, y, k=k: {"out": jnp.tanh(x @ y) * (k + _RUN)}) for k in range(3)]
  a, _ = _cached(tmp_path, parts={"k": 0}, jitted=fns[0])
  a(x, y)
  (entry_a,) = [p for p in os.listdir(tmp_path) if p.endswith(".jaxexec")]
  size = os.path.getsize(tmp_path / entry_a)
  bound = int(2.5 * size) + 4096  # two entries and the small .last pointers
  b, _ = _cached(tmp_path, parts={"k": 1}, jitted=fns[1], max_bytes=bound)
  b(x, y)
  past = time.time() - 100
  for p in os.listdir(tmp_path):  # both entries last used long ago, a before b
    os.utime(tmp_path / p, (past - (50 if p == entry_a else 0),) * 2)
  a2, _ = _cached(tmp_path, parts={"k": 0}, jitted=fns[0])
  a2(x, y)  # a hit: a is now the most recently used
  assert a2.hit is True
  c, logs = _cached(tmp_path, parts={"k": 2}, jitted=fns[2], max_bytes=bound)
  out = c(x, y)
  assert any("evicted" in m for m in logs)
  left = {p for p in os.listdir(tmp_path) if p.endswith(".jaxexec")}
  assert entry_a in left and len(left) == 2  # b (least recently used) went, the new entry stayed
  np.testing.assert_allclose(np.asarray(out["out"]), np.tanh(np.asarray(x) @ np.asarray(y)) * (2 + _RUN),
                             rtol=1e-5)
  b2, _ = _cached(tmp_path, parts={"k": 1}, jitted=fns[1])
  b2(x, y)
  assert b2.hit is False  # evicted: compiled again


def test_corrupt_payload_fails_the_checksum(tmp_path):
  x, y = _args()
  g = jax.jit(lambda x, y: {"out": jnp.tanh(x @ y) - _RUN})  # a program new to this session (see _RUN)
  first, _ = _cached(tmp_path, jitted=g)
  first(x, y)
  (name,) = [p for p in os.listdir(tmp_path) if p.endswith(".jaxexec")]
  import pickle
  with open(tmp_path / name, "rb") as f:
    entry = pickle.load(f)
  payload = bytearray(entry["payload"])
  payload[len(payload) // 2] ^= 0xFF
  entry["payload"] = bytes(payload)
  with open(tmp_path / name, "wb") as f:
    pickle.dump(entry, f)
  with pytest.raises(ValueError, match="checksum"):
    exec_cache.load(str(tmp_path / name))
  second, logs = _cached(tmp_path, jitted=g)
  second(x, y)
  assert second.hit is False and "checksum" in logs[0]


_WRITER = r"""
import os, sys, time
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax, jax.numpy as jnp, numpy as np
from jaxflow import exec_cache
cache_dir, run, rounds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
f = jax.jit(lambda x, y: {"out": jnp.tanh(x @ y) + run})
x = jnp.asarray(np.arange(64, dtype=np.float32).reshape(8, 8) / 64)
compiled = f.lower(x, x).compile()
path = exec_cache.entry_path(cache_dir, "f", exec_cache.cache_key("f", (x, x), {"w": 1}))
barrier, n = sys.argv[4], int(sys.argv[5])  # every writer compiled: all start storing at once
open(os.path.join(barrier, str(os.getpid())), "w").close()
while len(os.listdir(barrier)) < n:
  time.sleep(0.002)
loads = 0
for i in range(rounds):
  exec_cache.store(path, compiled)
  if os.path.exists(path):
    out = exec_cache.load(path)(x, x)  # whatever writer's version is there must be complete and right
    np.testing.assert_allclose(np.asarray(out["out"]), np.tanh(np.asarray(x) @ np.asarray(x)) + run, rtol=1e-6)
    loads += 1
print("ok", loads)
"""


def test_concurrent_writers_of_one_key_never_leave_a_partial_entry(tmp_path):
  """Three processes store and load the same key at the same time, 5 times each: every load sees a complete,
  correct entry, and no temp file is left behind."""
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
  cache, barrier = tmp_path / "cache", tmp_path / "barrier"
  cache.mkdir()
  barrier.mkdir()
  procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(cache), str(_RUN), "5", str(barrier), "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
  outs = [p.communicate(timeout=180) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
    assert out.strip() == "ok 5"
  names = os.listdir(cache)
  assert len(names) == 1 and names[0].endswith(".jaxexec"), names


def test_prefetch_loads_in_the_background_and_is_used_only_for_its_key(tmp_path):
  x, y = _args()
  g = jax.jit(lambda x, y: {"out": jnp.tanh(x @ y) + 1.0, "run": _RUN * 2})  # new to this session
  first, _ = _cached(tmp_path, jitted=g)
  ref = first(x, y)
  assert exec_cache.prefetch("f", {"what": "other"}, str(tmp_path)) is None  # never used: nothing to load
  assert exec_cache.prefetch("f", {"what": "tanh"}, None) is None
  pending = exec_cache.prefetch("f", {"what": "tanh"}, str(tmp_path))
  assert pending is not None and pending.key == first.key
  second, logs = _cached(tmp_path, jitted=g, prefetched=pending)
  out = second(x, y)
  assert second.hit is True and "in the background" in logs[0] and "load_background" in second.timings
  np.testing.assert_array_equal(np.asarray(out["out"]), np.asarray(ref["out"]))
  # Other arguments (another key) than the entry used last: the prefetched executable is not used.
  pending = exec_cache.prefetch("f", {"what": "tanh"}, str(tmp_path))
  third, logs = _cached(tmp_path, jitted=g, prefetched=pending)
  x4, y4 = _args(n=4)
  out4 = third(x4, y4)
  assert third.hit is False and third.key != pending.key and "no cached executable" in logs[0]
  np.testing.assert_allclose(np.asarray(out4["out"]), np.tanh(np.asarray(x4) @ np.asarray(y4)) + 1.0, rtol=1e-5,
                             atol=1e-6)
  # The 4x4 entry is now the one used last.
  assert exec_cache.prefetch("f", {"what": "tanh"}, str(tmp_path)).key == third.key


def test_lookup_parts_name_the_pointer_and_the_full_key_decides(tmp_path):
  x, y = _args()
  g = jax.jit(lambda x, y: {"out": jnp.tanh(x @ y) - 1.0, "run": _RUN * 3})  # new to this session
  lookup = {"config": "run-a"}
  first, _ = _cached(tmp_path, parts={"what": "tanh-1"}, jitted=g, lookup_parts=lookup)
  ref = first(x, y)
  # The pointer is named by the lookup parts, not by the key parts.
  assert exec_cache.prefetch("f", {"what": "tanh-1"}, str(tmp_path)) is None
  pending = exec_cache.prefetch("f", lookup, str(tmp_path))
  assert pending is not None and pending.key == first.key
  again, logs = _cached(tmp_path, parts={"what": "tanh-1"}, jitted=g, lookup_parts=lookup, prefetched=pending)
  np.testing.assert_array_equal(np.asarray(again(x, y)["out"]), np.asarray(ref["out"]))
  assert again.hit is True and "in the background" in logs[0]
  # Same lookup parts, other key parts (e.g. a model field the config did not show): the prefetched entry is not
  # used; the function compiles and the pointer then names the new entry.
  pending = exec_cache.prefetch("f", lookup, str(tmp_path))
  other, logs = _cached(tmp_path, parts={"what": "tanh-1", "field": 2}, jitted=g, lookup_parts=lookup,
                        prefetched=pending)
  out = other(x, y)
  assert other.hit is False and other.key != pending.key and "no cached executable" in logs[0]
  np.testing.assert_array_equal(np.asarray(out["out"]), np.asarray(ref["out"]))
  assert exec_cache.prefetch("f", lookup, str(tmp_path)).key == other.key


def test_prefetch_right_after_import_jax_imports_no_flax_and_starts_no_backend(tmp_path):
  # What a warm start does before anything else: it must not pull in flax / optax or start XLA on the main thread.
  import subprocess
  import sys
  code = r"""
import sys
import jax
from jaxflow import exec_cache
from jax._src import xla_bridge
assert exec_cache.prefetch("train_step", {"config": "x"}, sys.argv[1]) is None   # nothing stored yet
print(sorted(m for m in ("flax", "optax", "ml_collections") if m in sys.modules),
      xla_bridge.backends_are_initialized())
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split("\n")[0] == "[] False", out.stdout


_TREE_MODULE = r"""
import dataclasses
import sys
sys.modules["__main__"].EVENTS.append("tree classes")   # this module is imported when a tree is unpickled
import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Box:
  a: jax.Array
  b: jax.Array
"""

_ORDER_SCRIPT = r"""
import os, sys
EVENTS = []
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import serialize_executable
from jaxflow import exec_cache
mode, cache_dir, run = sys.argv[1], sys.argv[2], float(sys.argv[3])
jax.config.update("jax_compilation_cache_dir", None)
x = jnp.asarray(np.arange(16, dtype=np.float32).reshape(4, 4) / 16)
if mode == "store":
  import treemod
  f = jax.jit(lambda box: treemod.Box(jnp.tanh(box.a @ box.b) + run, box.a - run))
  arg = treemod.Box(x, x)
  path = exec_cache.entry_path(cache_dir, "box", exec_cache.cache_key("box", (arg,), {}))
  exec_cache.store(path, f.lower(arg).compile())
  print(path)
else:
  rebuild = serialize_executable._JaxPjrtUnpickler.persistent_load
  def logged(self, pid):
    EVENTS.append("xla " + pid[0])
    return rebuild(self, pid)
  serialize_executable._JaxPjrtUnpickler.persistent_load = logged
  timings = {}
  compiled = exec_cache.load(mode, timings)
  import treemod
  out = compiled(treemod.Box(x, x))
  np.testing.assert_allclose(np.asarray(out.a), np.tanh(np.asarray(x) @ np.asarray(x)) + run, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(out.b), np.asarray(x) - np.float32(run))
  print([e for e in EVENTS if e in ("xla exec", "tree classes")], sorted(timings))
"""


def test_load_rebuilds_the_executable_before_it_imports_the_tree_classes(tmp_path):
  """The trees are unpickled after XLA's rebuild of the executable, so a background load does not wait for the
  tree classes' modules (a train state's: flax / optax) to import; the loaded executable computes the same."""
  import subprocess
  import sys
  (tmp_path / "treemod.py").write_text(_TREE_MODULE)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(tmp_path), root]))

  def run(*args):
    out = subprocess.run([sys.executable, "-c", _ORDER_SCRIPT, *args, str(tmp_path), str(_RUN)], capture_output=True,
                         text=True, env=env, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().split("\n")[-1]

  path = run("store")
  assert path.endswith(".jaxexec") and os.path.exists(path)
  assert run(path) == "['xla exec', 'tree classes'] ['read', 'trees', 'xla']"
