"""jaxflow.exec_cache: a warm call loads the stored executable (same results, donation kept), any change of a
key component misses, a broken entry falls back to compiling, other arguments go to the plain jit; and
param_init's cached abstract variables."""

from __future__ import annotations

import functools
import os

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


def test_persistent_cache_hit_is_not_stored(tmp_path):
  """An executable loaded from JAX's own persistent cache does not serialize again on XLA:CPU: not stored."""
  assert jax.config.jax_compilation_cache_dir  # set by train_helpers
  before = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  try:
    unique = float(np.random.default_rng().random())  # a program no earlier run has cached
    g = lambda x, y: {"out": jnp.tanh(x @ y) * unique}
    x, y = _args()
    fresh, _ = _cached(tmp_path / "a", jitted=jax.jit(g))
    ref = fresh(x, y)
    assert os.listdir(tmp_path / "a")
    jax.clear_caches()  # the next compile must come from the persistent cache, not from this process's memory
    again, logs = _cached(tmp_path / "b", jitted=jax.jit(g))
    out = again(x, y)
    assert again.hit is False and any("not stored" in m for m in logs) and not (tmp_path / "b").exists()
    np.testing.assert_array_equal(np.asarray(out["out"]), np.asarray(ref["out"]))
    loaded, _ = _cached(tmp_path / "a", jitted=jax.jit(g))  # the freshly compiled entry loads and runs
    np.testing.assert_array_equal(np.asarray(loaded(x, y)["out"]), np.asarray(ref["out"]))
    assert loaded.hit is True
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
