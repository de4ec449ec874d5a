"""Model variables without a traced, compiled init program: shapes from `jax.eval_shape`, values from numpy.

`model.init` under `jax.jit` traces the whole forward pass and compiles a program of per-parameter key
derivations and draws (PWC-Net: ~34k HLO lines, ~600 fusions; 55 s of XLA compile on the loaded 2-core machine).
Here instead:
  1. `abstract_variables` runs `model.init` under `jax.eval_shape` (Python tracing only, nothing compiled) and,
     through a flax method interceptor, records which module owns every variable, so each leaf gets an
     initialiser rule read off that module (`kernel_init`, `bias_init`, `scale_init`, ...);
  2. `host_variables` draws every leaf on the host with numpy, from a generator keyed by (seed, collection and
     parameter path): the same values in every process, on every backend, whatever the tree order;
  3. the caller places them with the state's sharding (jaxflow.train_state.create_train_state).

Distributions (exact, not approximations): the rules reproduce each initialiser's *distribution*, not jax's
random numbers (which are a function of jax's PRNG and key-splitting scheme), so initial values differ from
`model.init`'s for the same seed:
  variance_scaling(scale, mode, distribution) (He/kaiming, LeCun, Glorot, ...): fans by jax's rule (receptive
    field x in_axis / out_axis sizes); 'normal' N(0, scale / fan), 'truncated_normal' N(0, 1) truncated to
    [-2, 2] times sqrt(scale / fan) / 0.8796 (jax's constant), 'uniform' U(-1, 1) times sqrt(3 scale / fan);
  zeros, ones (flax's `nn.initializers.zeros` / `ones`), and flax's BatchNorm statistics (mean 0, var 1).
Anything else (a custom initialiser, a parameter created outside a module attribute) raises a ValueError naming
the variable's path, instead of guessing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping

import jax
import numpy as np

# flax (and jaxflow.train_state, which needs flax and optax) are imported where a model is traced, not here: the
# host draws (`prefetch_host_variables`, `host_variables`) run right after `import jax` on a warm start.

# jax.nn.initializers.variance_scaling: stddev of a standard normal truncated to (-2, 2).
TRUNCATED_NORMAL_STD = 0.87962566103423978


@dataclasses.dataclass(frozen=True)
class InitRule:
  """How one variable leaf is initialised.

  kind: 'normal' | 'truncated_normal' | 'uniform' | 'zeros' | 'ones'.
  scale: for the random kinds, the standard deviation of the (untruncated) normal, the multiplier of the
    truncated standard normal, or the half-width of the uniform interval, in the variable's units.
  """
  kind: str
  scale: float = 0.0


def _fans(shape: tuple[int, ...], in_axis: Any, out_axis: Any, batch_axis: Any) -> tuple[float, float]:
  """(fan_in, fan_out) by jax.nn.initializers' rule (receptive field = the axes not named)."""
  if len(shape) < 2 and isinstance(in_axis, int) and in_axis == -2:
    raise ValueError(f"variance scaling needs a kernel of at least 2 dimensions, got shape {shape}")
  size = lambda axes: shape[axes] if isinstance(axes, int) else int(np.prod([shape[a] for a in axes]))
  in_size, out_size, batch_size = size(in_axis), size(out_axis), size(batch_axis)
  receptive = int(np.prod(shape)) / in_size / out_size / batch_size
  return in_size * receptive, out_size * receptive


def variance_scaling_rule(fn: Any, shape: tuple[int, ...]) -> InitRule | None:
  """The rule of a jax.nn.initializers.variance_scaling(...) closure for a leaf of `shape`; None if `fn` is
  not one (read from the closure's variables: scale, mode, distribution, in_axis, out_axis, batch_axis)."""
  code = getattr(fn, "__code__", None)
  if code is None or getattr(fn, "__qualname__", "") != "variance_scaling.<locals>.init" or fn.__closure__ is None:
    return None
  cells = dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__)))
  needed = ("scale", "mode", "distribution", "in_axis", "out_axis", "batch_axis")
  if any(k not in cells for k in needed):
    return None
  fan_in, fan_out = _fans(tuple(shape), cells["in_axis"], cells["out_axis"], cells["batch_axis"])
  denominator = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2,
                 "fan_geo_avg": (fan_in * fan_out) ** 0.5}.get(cells["mode"])
  if denominator is None:
    return None
  variance = float(cells["scale"]) / denominator
  dist = cells["distribution"]
  if dist == "normal":
    return InitRule("normal", variance ** 0.5)
  if dist == "truncated_normal":
    return InitRule("truncated_normal", variance ** 0.5 / TRUNCATED_NORMAL_STD)
  if dist == "uniform":
    return InitRule("uniform", (3.0 * variance) ** 0.5)
  return None


def _rule_for(module: Any, collection: str, name: str, shape: tuple[int, ...], path: str) -> InitRule:
  import flax.linen as nn
  if module is None:
    raise ValueError(f"param_init: variable {path} (shape {shape}) was not created by a module method the "
                     "interceptor saw; its initialiser is unknown (use create_train_state(..., method='traced'))")
  if isinstance(module, nn.BatchNorm) and collection == "batch_stats":
    if name in ("mean", "var"):
      return InitRule("zeros" if name == "mean" else "ones")
  if collection == "params":
    fn = getattr(module, f"{name}_init", None)
    if fn is not None:
      if fn is nn.initializers.zeros or fn is jax.nn.initializers.zeros:
        return InitRule("zeros")
      if fn is nn.initializers.ones or fn is jax.nn.initializers.ones:
        return InitRule("ones")
      rule = variance_scaling_rule(fn, shape)
      if rule is not None:
        return rule
      raise ValueError(f"param_init: variable {path} (shape {shape}) of {type(module).__name__} uses the "
                       f"initialiser {getattr(fn, '__qualname__', fn)!r}, which param_init does not know (known: "
                       "variance_scaling normal / truncated_normal / uniform, zeros, ones); use "
                       "create_train_state(..., method='traced')")
  raise ValueError(f"param_init: variable {path} (shape {shape}) of {type(module).__name__} has no known "
                   f"initialiser (no attribute {name}_init); use create_train_state(..., method='traced')")


def path_string(collection: str, path: tuple[str, ...]) -> str:
  """'params/estimator2/conv0/kernel': the key of a leaf's random stream."""
  return "/".join((collection,) + tuple(path))


def _names(kpath: tuple[Any, ...]) -> tuple[str, ...]:
  """The names of a jax key path of a variables tree (dict keys as strings)."""
  return tuple(str(getattr(k, "key", k)) for k in kpath)


def _leaves(variables: Mapping[str, Any]):
  """(collection, names, path_string key, leaf) for every leaf of a {collection: tree} mapping."""
  for collection, tree in variables.items():
    for kpath, leaf in jax.tree_util.tree_leaves_with_path(tree):
      names = _names(kpath)
      yield collection, names, path_string(collection, names), leaf


def abstract_variables(model: Any, image_shape: tuple[int, int, int, int], cache_dir: str | None = None,
                       lookup_parts: Mapping[str, Any] | None = None
                       ) -> tuple[dict[str, Any], dict[str, InitRule]]:
  """(variables, rules): the model's variables as ShapeDtypeStructs ({'params': ..., 'batch_stats': ...}) from
  `jax.eval_shape(model.init)` on a zero image pair of `image_shape` (B, H, W, 3) (traced, not compiled), and
  one InitRule per leaf keyed by `path_string(collection, path)`. Raises ValueError naming the first leaf whose
  initialiser is unknown.

  cache_dir: a directory for a JSON copy of the result keyed by (repr(model), image_shape, the jaxflow
  sources, jax version), so a warm start skips the trace (PWC-Net: ~1.2 CPU-s). Only for models defined in
  jaxflow (the key hashes jaxflow's sources, not other code). An unreadable entry is traced again.
  lookup_parts: with cache_dir, also record which entry these parts (what the caller knows before it builds the
  model, e.g. its config) led to, so the next start's `prefetch_host_variables` can draw the values early.
  """
  path = None
  if cache_dir:
    from jaxflow import exec_cache
    key = hashlib.sha256(json.dumps([repr(model), list(image_shape), exec_cache.source_hash(), jax.__version__,
                                     1]).encode()).hexdigest()
    path = os.path.join(cache_dir, f"abstract-{key[:40]}.json")
    try:
      with open(path) as f:
        result = _from_json(json.load(f))
      _point(cache_dir, lookup_parts, path)
      return result
    except (OSError, ValueError, KeyError, TypeError):
      pass
  variables, rules = _trace_abstract_variables(model, image_shape)
  if path:
    try:
      os.makedirs(cache_dir, exist_ok=True)
      tmp = f"{path}.tmp{os.getpid()}"
      with open(tmp, "w") as f:
        json.dump(_to_json(variables, rules), f)
      os.replace(tmp, path)
      _point(cache_dir, lookup_parts, path)
    except OSError:
      pass
  return variables, rules


def _pointer_path(cache_dir: str, lookup_parts: Mapping[str, Any]) -> str:
  from jaxflow import exec_cache
  return exec_cache.pointer_path(cache_dir, "abstract", lookup_parts)


def _point(cache_dir: str, lookup_parts: Mapping[str, Any] | None, entry: str) -> None:
  """Records `entry` (an abstract-*.json path) as the one `lookup_parts` led to (only when it changed)."""
  if lookup_parts is None:
    return
  from jaxflow import exec_cache
  pointer = _pointer_path(cache_dir, lookup_parts)
  name = os.path.basename(entry)
  try:
    with open(pointer) as f:
      if f.read().strip() == name:
        return
  except OSError:
    pass
  try:
    exec_cache.write_atomic(pointer, name.encode())
  except OSError:
    pass


class HostPrefetch:
  """Host values drawn in a background thread from the abstract variables a run's lookup parts led to last;
  see `prefetch_host_variables`. `result(abstract, rules, seed)` returns them only for exactly that tree,
  those rules and that seed (else None: the caller draws)."""

  def __init__(self, rows: list[list[Any]], seed: int, threads: int | None):
    import threading
    self.rows, self.seed = rows, int(seed)
    self.used = False  # set when `result` handed the values out
    self.values: dict[str, Any] | None = None
    self.error: BaseException | None = None
    abstract, rules = _from_json(rows)

    def run() -> None:
      try:
        self.values = host_variables(abstract, rules, seed, threads)
      except BaseException as e:  # noqa: BLE001 - the caller draws instead
        self.error = e

    self._thread = threading.Thread(target=run, daemon=True, name="jaxflow-param-prefetch")
    self._thread.start()

  def result(self, abstract: Mapping[str, Any], rules: Mapping[str, InitRule], seed: int) -> dict[str, Any] | None:
    if int(seed) != self.seed or _to_json(abstract, rules) != self.rows:
      return None
    self._thread.join()
    self.used = self.values is not None
    return self.values


def prefetch_host_variables(lookup_parts: Mapping[str, Any], seed: int, cache_dir: str | None,
                            threads: int | None = None) -> HostPrefetch | None:
  """Starts drawing, in a background thread, the host values (`host_variables`) of the abstract variables that
  `abstract_variables(..., cache_dir=cache_dir, lookup_parts=lookup_parts)` returned last, for `seed`. Needs
  only numpy and jax (no flax, no model): a warm start calls it right after `import jax`, so the draws overlap
  the remaining imports and the executable load. None when nothing is recorded (or no cache_dir). Hand the
  result to create_train_state(host_prefetch=...): used only when the model's tree, rules and seed match, so
  the values are always those of `host_variables`."""
  if not cache_dir:
    return None
  try:
    with open(_pointer_path(cache_dir, lookup_parts)) as f:
      name = f.read().strip()
    with open(os.path.join(cache_dir, os.path.basename(name))) as f:
      rows = json.load(f)
    _from_json(rows)  # validates the rows before a thread is started
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return HostPrefetch(rows, seed, threads)


def _to_json(variables: Mapping[str, Any], rules: Mapping[str, InitRule]) -> list[list[Any]]:
  return [[collection, list(names), list(leaf.shape), np.dtype(leaf.dtype).name, rules[key].kind, rules[key].scale]
          for collection, names, key, leaf in _leaves(variables)]


def _from_json(rows: list[list[Any]]) -> tuple[dict[str, Any], dict[str, InitRule]]:
  variables: dict[str, Any] = {}
  rules: dict[str, InitRule] = {}
  for collection, names, shape, dtype, kind, scale in rows:
    node = variables.setdefault(collection, {})
    for n in names[:-1]:
      node = node.setdefault(n, {})
    node[names[-1]] = jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
    rules[path_string(collection, tuple(names))] = InitRule(str(kind), float(scale))
  return variables, rules


def _trace_abstract_variables(model: Any, image_shape: tuple[int, int, int, int]
                              ) -> tuple[dict[str, Any], dict[str, InitRule]]:
  import flax.linen as nn

  from jaxflow.train_state import init_variables, make_key
  modules: dict[tuple[str, ...], nn.Module] = {}

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if mod.scope is not None:
      modules.setdefault(tuple(str(p) for p in mod.path), mod)
    return next_fun(*args, **kwargs)

  def init(key):
    with nn.intercept_methods(interceptor):
      return init_variables(model, key, image_shape)

  variables = jax.eval_shape(init, make_key(0))
  variables = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), dict(variables))
  rules = {key: _rule_for(modules.get(names[:-1]), collection, names[-1], tuple(leaf.shape), key)
           for collection, names, key, leaf in _leaves(variables)}
  return variables, rules


def _leaf_rng(seed: int, key: str) -> np.random.Generator:
  digest = hashlib.sha256(key.encode()).digest()
  words = np.frombuffer(digest[:16], dtype=np.uint32).tolist()
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *words])))


def draw(rule: InitRule, shape: tuple[int, ...], dtype: Any, seed: int, key: str) -> np.ndarray:
  """One leaf's values (numpy, `dtype`) under `rule`, from the stream of (seed, key)."""
  dtype = np.dtype(dtype)
  if rule.kind == "zeros":
    return np.zeros(shape, dtype)
  if rule.kind == "ones":
    return np.ones(shape, dtype)
  rng = _leaf_rng(seed, key)
  if rule.kind == "normal":
    x = rng.standard_normal(shape, dtype=np.float32)
  elif rule.kind == "truncated_normal":
    x = rng.standard_normal(shape, dtype=np.float32)
    bad = np.abs(x) >= 2.0
    while bad.any():  # rejection: redraw the values outside (-2, 2)
      x[bad] = rng.standard_normal(int(bad.sum()), dtype=np.float32)
      bad = np.abs(x) >= 2.0
  elif rule.kind == "uniform":
    x = rng.uniform(-1.0, 1.0, shape).astype(np.float32)
  else:
    raise ValueError(f"param_init: unknown rule kind {rule.kind!r} for {key}")
  x *= np.float32(rule.scale)  # in place: no second copy of a (up to 150 MB) leaf
  return x.astype(dtype, copy=False)


def host_variables(abstract: Mapping[str, Any], rules: Mapping[str, InitRule], seed: int,
                   threads: int | None = None) -> dict[str, Any]:
  """Numpy values for every leaf of `abstract` (as returned by abstract_variables), same tree; each leaf a pure
  function of (seed, its path), so every process builds identical values.

  The leaves are drawn by `threads` threads (default: the usable cores, at most 4): numpy's generators release
  the GIL while filling, and each leaf has its own stream, so the values do not depend on the thread count.
  """
  jobs = []
  for _, _, key, s in _leaves(abstract):
    if key not in rules:
      raise ValueError(f"param_init: no rule for variable {key} (shape {s.shape})")
    jobs.append((rules[key], tuple(s.shape), s.dtype, key))
  if threads is None:
    try:
      threads = min(4, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
      threads = min(4, os.cpu_count() or 1)
  run = lambda job: draw(job[0], job[1], job[2], seed, job[3])
  if threads > 1 and len(jobs) > 1:
    from concurrent.futures import ThreadPoolExecutor
    # Largest leaves first, so one big leaf drawn last does not leave the other threads idle.
    order = sorted(range(len(jobs)), key=lambda i: -int(np.prod(jobs[i][1])))
    with ThreadPoolExecutor(threads, thread_name_prefix="jaxflow-param-init") as pool:
      drawn = dict(zip(order, pool.map(lambda i: run(jobs[i]), order)))
    values = [drawn[i] for i in range(len(jobs))]
  else:
    values = [run(job) for job in jobs]
  out = {}
  it = iter(values)
  for collection, tree in abstract.items():
    out[collection] = jax.tree.map(lambda _: next(it), tree)
  return out


__all__ = ["HostPrefetch", "InitRule", "TRUNCATED_NORMAL_STD", "abstract_variables", "draw", "host_variables",
           "path_string", "prefetch_host_variables", "variance_scaling_rule"]
