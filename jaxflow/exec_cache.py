"""A disk cache of compiled executables, so a warm start skips Python tracing, lowering and XLA entirely.

JAX's persistent compilation cache is keyed by the lowered HLO, so even a hit re-traces the step in Python and
re-lowers it (PWC-Net's train step: tens of seconds of tracing on the loaded 2-core CPU). `CachedFunction`
wraps a jitted function; on its first call it computes a key from the arguments' *abstract* signature (tree
structure, shapes, dtypes, shardings: no tracing) plus everything else the program depends on:

  - `key_parts` given by the caller (the model's repr with all its fields, the loss / optimiser config, ...);
  - a hash of every .py file of the jaxflow package (any code change is a miss);
  - jax / jaxlib / flax / optax versions (the step's code is theirs too), the backend's platform and version, the devices (ids, kinds) and process layout;
  - XLA_FLAGS, LIBTPU_INIT_ARGS and the jax config values that change tracing or compilation (x64,
    matmul precision, PRNG implementation, ...), jaxflow.ops.conv's process-wide implementation choice,
    the C++ cost-volume kernel the program calls (jaxflow.ops.correlation_ffi; registered before any load);
  - the compiler options passed.

A hit loads the serialized executable (jax.experimental.serialize_executable) and uses it; a miss (or any load
error: truncated file, unpickling error, version skew) logs one line and takes the normal path (lower +
compile, which itself uses the persistent compilation cache), then writes the entry (atomically: temp file +
rename). When that compile was itself a hit of JAX's persistent cache (the same HLO compiled before, e.g. after a
jaxflow source edit that left the program unchanged), the executable JAX loaded does not serialize again on
XLA:CPU (jaxlib 0.10.2: the entry would fail at run time with "Function ... not found"), so the entry is written
from the persistent cache's own bytes of that executable (the serialization XLA wrote at the original compile;
`_persistent_hits`); if those cannot be read (another jax version's internals) nothing is stored and the next start
takes this path again. A later call whose arguments do not have the first call's signature goes to the plain jitted
function.
Only single-process runs use the cache (a multi-process executable must be compiled collectively).

Size bound: after every store, the oldest-used entries of the directory are deleted until it holds at most
`max_bytes` (default 2 GiB; $JAXFLOW_EXEC_CACHE_MAX_BYTES, e.g. '500M', '4G', 'none' for no bound). A hit marks
its entry as used (mtime), so eviction is least-recently-used; the entry just written is never evicted.

Several processes may share a directory (a sweep, concurrent runs): every write goes to a private temp file that
is fsynced and renamed over the entry (a reader sees the old or the new complete file, never a partial one; of
concurrent writers of one key the last rename wins), a payload checksum guards the load, and an entry deleted
by another process's eviction between the lookup and the read is a plain miss.

Background load (`prefetch`): XLA:CPU's load of an executable costs ~0.8 ms CPU per kernel object file it holds
(PWC-Net's train step: ~900, 1.4-1.5 CPU-s) and releases the GIL, so a caller that knows the name and key parts early starts the load in a thread
(`prefetch(...)`), builds its state meanwhile, and hands the handle to `CachedFunction(prefetched=...)`: the
entry the same (name, key parts, environment) used last is loaded and used if the arguments' key matches.
An entry keeps the argument / result trees apart from the executable and `load` unpickles them last, so XLA's
rebuild starts right after `import jax`, not after the tree classes' modules (flax, optax) have been imported.

Entries are pickles of executables: load only from a directory you trust (as with JAX's own cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
import threading
import time
from typing import Any, Callable, Mapping

import jax

from jaxflow.ops import correlation_ffi

FORMAT = 4  # 4: the argument / result trees pickled apart from the executable (loaded after it)
DEFAULT_MAX_BYTES = 2 * 1024 ** 3
MAX_BYTES_ENV = "JAXFLOW_EXEC_CACHE_MAX_BYTES"
TEMP_PREFIX = ".tmp-"
# Added to a train step's options for its fast tier (config.fast_compile_steps; CPU): LLVM -O0, about half the
# compile of -O3, slower steps, and not bitwise equal to the full program (no FMA contraction).
FAST_TIER_OPTIONS = {"xla_backend_optimization_level": 0}
STALE_TEMP_SECS = 3600.0  # a temp file this old belongs to a writer that died: removed by eviction
PERSISTENT_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_CONFIG_NAMES = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl", "jax_numpy_rank_promotion",
                 "jax_threefry_partitionable", "jax_use_shardy_partitioner", "jax_dynamic_shapes",
                 "jax_numpy_dtype_promotion", "jax_platforms")
_source_hash_memo: dict[str, str] = {}


def source_hash(package_dir: str | None = None) -> str:
  """sha256 over the relative paths and bytes of every .py file under the jaxflow package (sorted)."""
  root = package_dir or os.path.dirname(os.path.abspath(__file__))
  if root in _source_hash_memo:
    return _source_hash_memo[root]
  h = hashlib.sha256()
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
    for name in sorted(filenames):
      if name.endswith(".py"):
        path = os.path.join(dirpath, name)
        h.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
          h.update(f.read() + b"\0")
  _source_hash_memo[root] = h.hexdigest()
  return _source_hash_memo[root]


def _sharding_repr(x: Any) -> str:
  s = getattr(x, "sharding", None)
  if s is None:
    return "none"
  if isinstance(s, jax.sharding.NamedSharding):
    mesh = s.mesh
    return (f"named({tuple(mesh.axis_names)},{tuple(mesh.devices.shape)},{[d.id for d in mesh.devices.flat]},"
            f"{s.spec},{getattr(s, 'memory_kind', None)})")
  if isinstance(s, jax.sharding.SingleDeviceSharding):
    return f"single({next(iter(s.device_set)).id})"
  return repr(s)


def signature(args: tuple[Any, ...]) -> str:
  """The abstract signature of call arguments: tree structure, then shape / dtype / sharding per leaf."""
  leaves, tree = jax.tree_util.tree_flatten(args)
  parts = [str(tree)]
  for x in leaves:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
      parts.append(f"py:{type(x).__name__}:{x!r}")
    else:
      parts.append(f"{tuple(x.shape)}:{dtype}:{_sharding_repr(x)}:{bool(getattr(x, 'weak_type', False))}")
  return "\n".join(parts)


def environment() -> dict[str, Any]:
  """Everything outside the arguments and the caller's key parts that determines the compiled program."""
  import flax
  import jaxlib
  import optax
  from jaxflow.ops import conv as conv_ops
  devices = jax.devices()
  config = {}
  for name in _CONFIG_NAMES:
    try:
      config[name] = str(getattr(jax.config, name))
    except AttributeError:
      config[name] = "n/a"
  return {
      "format": FORMAT, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
      "flax": flax.__version__, "optax": optax.__version__, "platform": jax.default_backend(),
      "platform_version": str(getattr(devices[0].client, "platform_version", "?")),
      "devices": [(d.id, d.platform, d.device_kind, d.process_index) for d in devices],
      "process_count": jax.process_count(), "process_index": jax.process_index(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", ""),
      "jax_config": config, "conv_impl": conv_ops.get_default_impl(), "jaxflow_source": source_hash(),
      "correlation_kernel": correlation_ffi.state(),  # the C++ cost-volume kernel (or none) the step calls
  }


def cache_key(name: str, args: tuple[Any, ...], key_parts: Mapping[str, Any],
              compiler_options: Mapping[str, Any] | None = None) -> str:
  """sha256 hex of (name, argument signature, key_parts, environment, compiler options)."""
  return _key_from_signature(name, signature(args), key_parts, compiler_options)


def _key_from_signature(name: str, sig: str | None, key_parts: Mapping[str, Any],
                        compiler_options: Mapping[str, Any] | None) -> str:
  blob = json.dumps({"name": name, "signature": sig, "key_parts": {k: str(v) for k, v in key_parts.items()},
                     "environment": environment(),
                     "compiler_options": {k: str(v) for k, v in (compiler_options or {}).items()}},
                    sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()


def entry_path(cache_dir: str, name: str, key: str) -> str:
  return os.path.join(cache_dir, f"{name}-{key[:40]}.jaxexec")


def light_environment() -> dict[str, Any]:
  """The part of `environment()` known right after `import jax`, without importing flax / optax or starting a
  backend: enough to name the entry a run used last (`prefetch`), whose full key is checked before use."""
  return {"format": FORMAT, "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", ""),
          "platforms": os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or ""),
          "jaxflow_source": source_hash(),
          # Registers the cost-volume kernel's FFI targets if built, before any prefetched executable loads.
          "correlation_kernel": correlation_ffi.light_state()}


def pointer_path(cache_dir: str, name: str, lookup_parts: Mapping[str, Any],
                 compiler_options: Mapping[str, Any] | None = None) -> str:
  """The small file naming what (name, lookup parts, light environment, options) led to last (any arguments):
  the entry key a CachedFunction used (read by `prefetch`), or param_init's abstract variables. It only points:
  what it names is used when the full key is the caller's."""
  blob = json.dumps({"name": name, "lookup_parts": {k: str(v) for k, v in lookup_parts.items()},
                     "environment": light_environment(),
                     "compiler_options": {k: str(v) for k, v in (compiler_options or {}).items()}}, sort_keys=True)
  return os.path.join(cache_dir, f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:40]}.last")


def parse_size(text: str | int | None) -> int | None:
  """Bytes from '2147483648', '500M', '4G', '64k' (binary units); None for None, '', 'none', 'unbounded'."""
  if text is None or isinstance(text, int):
    return text
  t = str(text).strip().lower()
  if t in ("", "none", "unbounded", "inf"):
    return None
  units = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4}
  mult = 1
  if t[-1:] == "b":
    t = t[:-1]
  if t[-1:] in units:
    mult, t = units[t[-1]], t[:-1]
  try:
    value = float(t) * mult
  except ValueError:
    raise ValueError(f"{MAX_BYTES_ENV}={text!r}: expected a size like 2147483648, 500M or 4G, or 'none'") from None
  if value < 0:
    raise ValueError(f"{MAX_BYTES_ENV}={text!r}: a size must not be negative")
  return int(value)


def max_bytes_from_env() -> int | None:
  """The cache's size bound: $JAXFLOW_EXEC_CACHE_MAX_BYTES if set, else DEFAULT_MAX_BYTES (None: unbounded)."""
  raw = os.environ.get(MAX_BYTES_ENV)
  return DEFAULT_MAX_BYTES if raw is None else parse_size(raw)


def touch(path: str) -> None:
  """Marks an entry as just used (its mtime orders least-recently-used eviction); gone or read-only: ignored."""
  try:
    os.utime(path)
  except OSError:
    pass


def evict(cache_dir: str, max_bytes: int | None, keep: tuple[str, ...] = ()) -> list[str]:
  """Deletes the least recently used files of `cache_dir` (oldest mtime first) until the rest total at most
  `max_bytes`; never the paths in `keep`. Temp files of writers dead for over STALE_TEMP_SECS go too. Safe
  against other processes evicting or writing at the same time (a file already gone is skipped).
  Returns the removed paths."""
  removed = []
  entries = []
  now = time.time()
  keep_abs = {os.path.abspath(k) for k in keep}
  try:
    names = os.listdir(cache_dir)
  except FileNotFoundError:
    return removed
  for name in names:
    path = os.path.join(cache_dir, name)
    try:
      st = os.stat(path)
    except FileNotFoundError:
      continue
    if not os.path.isfile(path):
      continue
    if name.startswith(TEMP_PREFIX):
      if now - st.st_mtime > STALE_TEMP_SECS:
        _unlink(path, removed)
      continue  # a live writer's file: neither counted nor deleted
    entries.append((st.st_mtime, name, path, st.st_size))
  if max_bytes is None:
    return removed
  total = sum(e[3] for e in entries)
  for _, _, path, size in sorted(entries):
    if total <= max_bytes:
      break
    if os.path.abspath(path) in keep_abs:
      continue
    if _unlink(path, removed):
      total -= size
  return removed


def _unlink(path: str, removed: list[str]) -> bool:
  try:
    os.unlink(path)
  except FileNotFoundError:
    return False
  removed.append(path)
  return True


class Prefetch:
  """A background load of the entry (name, key parts, environment, options) used last; see `prefetch`."""

  def __init__(self, name: str, lookup_parts: Mapping[str, Any], cache_dir: str,
               compiler_options: Mapping[str, Any] | None = None):
    self.name, self.cache_dir = name, cache_dir
    self.key: str | None = None
    self.compiled: Any = None
    self.error: BaseException | None = None
    self.seconds = 0.0
    self.phases: dict[str, float] = {}  # load's 'read', 'xla', 'trees' seconds
    self._thread: threading.Thread | None = None
    last = pointer_path(cache_dir, name, lookup_parts, compiler_options)
    try:
      with open(last) as f:
        self.key = f.read().strip() or None
    except OSError:
      return
    path = entry_path(cache_dir, name, self.key)
    if not os.path.exists(path):
      self.key = None
      return

    def run() -> None:
      t = time.perf_counter()
      try:
        self.compiled = load(path, self.phases)
      except BaseException as e:  # noqa: BLE001 - reported by result(); the caller compiles instead
        self.error = e
      self.seconds = time.perf_counter() - t

    self._thread = threading.Thread(target=run, daemon=True, name=f"jaxflow-exec-load-{name}")
    self._thread.start()

  def result(self, key: str) -> Any:
    """The loaded executable if it is the entry of `key` (waits for the load), else None."""
    if self._thread is None or key != self.key:
      return None
    self._thread.join()
    return self.compiled


def prefetch(name: str, lookup_parts: Mapping[str, Any], cache_dir: str | None,
             compiler_options: Mapping[str, Any] | None = None) -> Prefetch | None:
  """Starts loading, in a thread, the executable that `CachedFunction(jitted, name, key_parts, cache_dir,
  compiler_options, lookup_parts=lookup_parts)` used last in this environment (None without a cache dir, in
  multi-process runs, or when there is nothing to load). Pass the result as CachedFunction(prefetched=...): used
  only if the call's key is the same.

  `lookup_parts` (default of CachedFunction: its key_parts) only names the pointer to the entry used last, so a
  caller may start the load right after `import jax` from what it knows then (e.g. its config), before it
  imports flax / optax or builds the model; no backend is started here (the load thread starts it)."""
  if not cache_dir or _multi_process_env():
    return None
  p = Prefetch(name, lookup_parts, cache_dir, compiler_options)
  return p if p.key is not None else None


def _multi_process_env() -> bool:
  """True when this process is (or will be) one of several JAX processes: jax.distributed already initialised,
  or the usual launcher variables. (jax.process_count() would start the backend on this thread.)"""
  try:
    from jax._src import distributed
    if distributed.global_state.client is not None:
      return True
  except Exception:  # noqa: BLE001 - private API moved: fall back to the public call
    return jax.process_count() != 1
  return False


def default_dir() -> str | None:
  """<jax_compilation_cache_dir>/jaxflow_executables when JAX's persistent cache is configured, else None."""
  base = jax.config.jax_compilation_cache_dir
  return os.path.join(base, "jaxflow_executables") if base else None


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"exec_cache: {msg}", flush=True)


class CachedFunction:
  """A jitted function whose first compilation goes through the executable cache (see the module docstring).

  Attributes after the first call: `hit` (True: loaded from disk), `key` (hex), `timings` (seconds: 'key',
  'load' (on a prefetched hit: the wait for the background load; 'load_background' its whole duration) or
  'lower' + 'compile' + 'store').
  max_bytes: the directory's size bound applied after a store (default: max_bytes_from_env()).
  prefetched: a `prefetch(name, lookup_parts, cache_dir, compiler_options)` handle started earlier.
  lookup_parts: what names this function's pointer to the entry it used last, for a later process's `prefetch`
    (default: key_parts). Something the caller knows before it can build key_parts (its config), so the next
    start can begin loading earlier; the entry is still used only when its full key matches.
  compiler_options: XLA options of this program's compile (part of the key and of the pointer's name); one XLA
    rejects is a ValueError naming it as `options_prefix` + its name.
  """

  def __init__(self, jitted: Any, name: str, key_parts: Mapping[str, Any], cache_dir: str | None,
               compiler_options: Mapping[str, Any] | None = None, log: Callable[[str], None] = _log,
               max_bytes: int | None | str = "env", prefetched: Prefetch | None = None,
               lookup_parts: Mapping[str, Any] | None = None, options_prefix: str = "",
               keep_lowered: bool = False, lowered_from: "CachedFunction | None" = None):
    self.options_prefix = options_prefix
    # keep_lowered: a miss keeps its lowering in `lowered` for another CachedFunction of the same jitted function
    # (lowered_from=this one), which then compiles it with its own options instead of tracing and lowering again
    # (the trainer's O0 and full tiers of one train step; drop it with `release_lowered()`).
    self.keep_lowered = keep_lowered
    self.lowered_from = lowered_from
    self.lowered: Any = None
    self.max_bytes = max_bytes_from_env() if max_bytes == "env" else parse_size(max_bytes)
    self.lookup_parts = dict(lookup_parts if lookup_parts is not None else key_parts)
    self.prefetched = prefetched
    self.jitted = jitted
    self.name = name
    self.key_parts = dict(key_parts)
    self.cache_dir = cache_dir
    self.compiler_options = dict(compiler_options) if compiler_options else None
    self.log = log
    self.compiled: Any = None
    self.hit: bool | None = None
    self.key: str | None = None
    self.timings: dict[str, float] = {}
    self._signature: str | None = None
    # defer_store: a miss keeps its entry for `flush_store()` instead of writing it before returning (the
    # trainer's O0 tier: its write is taken off the path to the first step).
    self.defer_store = False
    self._pending_store: tuple[str, Any, bytes | None] | None = None

  def __call__(self, *args: Any) -> Any:
    if self.compiled is None:
      self.compiled = self.compile(*args)
    try:
      return self.compiled(*args)
    except (TypeError, ValueError):
      # The executable checks its arguments before running (nothing donated yet): other shapes, dtypes or
      # shardings than the first call's go to the plain jitted function (which traces them as usual).
      if signature(args) == self._signature:
        raise
      return self.jitted(*args)

  def compile(self, *args: Any) -> Any:
    """The compiled executable for `args` (concrete arrays or ShapeDtypeStructs with shardings)."""
    t = time.perf_counter()
    self._signature = signature(args)
    enabled = bool(self.cache_dir) and jax.process_count() == 1
    path = None
    if enabled:
      self.key = cache_key(self.name, args, self.key_parts, self.compiler_options)
      path = entry_path(self.cache_dir, self.name, self.key)
    self.timings["key"] = time.perf_counter() - t
    tried = False
    if path and self.prefetched is not None and self.prefetched.key == self.key:
      t = time.perf_counter()
      compiled = self.prefetched.result(self.key)
      tried = True
      if compiled is not None:
        self.timings["load"] = time.perf_counter() - t
        self.timings["load_background"] = self.prefetched.seconds
        self.timings.update({f"load_{k}": v for k, v in self.prefetched.phases.items()})
        self.hit = True
        touch(path)
        self.log(f"{self.name}: loaded the compiled executable {os.path.basename(path)} in the background "
                 f"({self.prefetched.seconds:.1f} s, waited {self.timings['load']:.1f} s; no tracing or compiling)")
        return compiled
      e = self.prefetched.error
      self.log(f"{self.name}: could not load {path} ({type(e).__name__}: {e}); compiling instead")
    if path and not tried and os.path.exists(path):
      t = time.perf_counter()
      try:
        compiled = load(path)
        self.timings["load"] = time.perf_counter() - t
        self.hit = True
        touch(path)
        self._remember()
        self.log(f"{self.name}: loaded the compiled executable {os.path.basename(path)} "
                 f"({self.timings['load']:.1f} s; no tracing or compiling)")
        return compiled
      except Exception as e:  # noqa: BLE001 - any load failure (also: evicted by another process) compiles
        self.log(f"{self.name}: could not load {path} ({type(e).__name__}: {e}); compiling instead")
    elif path and not tried:
      self.log(f"{self.name}: no cached executable ({os.path.basename(path)}); compiling")
    self.hit = False
    t = time.perf_counter()
    source = self.lowered_from
    if source is not None and source.lowered is not None and source._signature == self._signature:
      lowered = source.lowered
    else:
      lowered = self.jitted.lower(*args)
    if self.keep_lowered:
      self.lowered = lowered
    self.timings["lower"] = time.perf_counter() - t
    t = time.perf_counter()
    persistent_hits: list[str] = []
    thread = threading.get_ident()

    def listener(event: str, **kwargs: Any) -> None:
      # Only this thread's compile (another thread may compile at the same time: the trainer's background tier).
      if event == PERSISTENT_CACHE_HIT_EVENT and threading.get_ident() == thread:
        persistent_hits.append(event)

    jax.monitoring.register_event_listener(listener)
    try:
      with _persistent_hits() as read_hits:
        compiled = _compile(lowered, self.compiler_options, self.options_prefix)
    finally:
      jax.monitoring.unregister_event_listener(listener)
    self.timings["compile"] = time.perf_counter() - t
    executable_bytes = None
    if path and persistent_hits:
      # An executable that JAX itself loaded from its persistent cache does not serialize again on XLA:CPU
      # (jaxlib 0.10.2: the stored entry fails at run time with "Function ... not found"): the entry is written
      # from the persistent cache's bytes of it instead (those XLA serialized at the original compile).
      hits = read_hits()
      executable_bytes = hits[0] if len(hits) == 1 else None
      if executable_bytes is None:
        self.log(f"{self.name}: not stored (the executable came from JAX's persistent compilation cache, whose "
                 "entry could not be read)")
        path = None
    if path and self.defer_store:
      self._pending_store = (path, compiled, executable_bytes)
    elif path:
      self._store(path, compiled, executable_bytes)
    return compiled

  def flush_store(self) -> None:
    """Writes the entry a `defer_store` miss kept (nothing when there is none)."""
    pending, self._pending_store = self._pending_store, None
    if pending is not None:
      self._store(*pending)

  def _store(self, path: str, compiled: Any, executable_bytes: bytes | None) -> None:
    t = time.perf_counter()
    try:
      store(path, compiled, executable_bytes)
      self._remember()
      removed = evict(self.cache_dir, self.max_bytes, keep=(path,))
      if removed:
        self.log(f"{self.name}: evicted {len(removed)} least recently used entries (bound "
                 f"{self.max_bytes / 2**20:.0f} MiB)")
    except Exception as e:  # noqa: BLE001 - a cache that cannot be written only costs the next start
      self.log(f"{self.name}: could not store the executable in {path} ({type(e).__name__}: {e})")
    self.timings["store"] = time.perf_counter() - t

  def release_lowered(self) -> None:
    self.lowered = None

  def _remember(self) -> None:
    """Records this key as the one (name, key parts, environment) used last, for `prefetch`."""
    try:
      write_atomic(pointer_path(self.cache_dir, self.name, self.lookup_parts, self.compiler_options),
                    self.key.encode())
    except OSError:
      pass


def abstract_args(args: Any) -> Any:
  """The arrays of `args` as ShapeDtypeStructs with their shardings (what a compile needs; other leaves as given)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding,
                                                     weak_type=bool(getattr(x, "weak_type", False)))
                      if isinstance(x, jax.Array) else x, args)


def first_entry(name: str, options: Mapping[str, Any] | None, tiered: bool) -> tuple[str, dict[str, Any] | None]:
  """The (entry name, compiler options) of the executable a start needs first (what to `prefetch`): a tiered
  step's fast tier (`name`_o0, the options plus FAST_TIER_OPTIONS), else `name` with its options."""
  if tiered:
    return f"{name}_o0", {**(options or {}), **FAST_TIER_OPTIONS}
  return name, (dict(options) if options else None)


class TieredStep:
  """jaxflow.trainer's train step of a run whose global steps < `switch` use the fast (O0) tier: the fast executable is
  compiled (or loaded) on the caller's thread at the first call, and the first step runs on it to completion (its
  executable's cache entry is written after it, not before); then a background thread writes that entry and
  compiles (or loads) the full executable, which the caller takes, waiting for it only there, at the first step
  >= `switch`. So a step's executable depends only on its global step and the config, never on timing or the
  cache's state. Running the first step before the full compile starts puts it on both cores alone (PWC-Net
  128x128 b4: ~1.2 s with the compile beside it); the compile's CPU work is the same either way."""

  def __init__(self, fast: CachedFunction, full: CachedFunction, switch: int):
    self.fast, self.full, self.switch = fast, full, switch
    fast.defer_store = True
    self._thread = None
    self._error: BaseException | None = None
    self.tiers: list[tuple[int, str]] = []  # (first global step, "fast" | "full"): the switch points taken

  @classmethod
  def build(cls, jitted: Any, name: str, key_parts: Mapping[str, Any], cache_dir: str | None,
            compiler_options: Mapping[str, Any] | None, switch: int, prefetched: Prefetch | None = None,
            **kwargs: Any) -> "TieredStep":
    """The two tiers of one jitted step: the fast one (`first_entry`; given the prefetch, keeping its lowering)
    and the full one (`name`, the options, compiled from that lowering); kwargs go to both CachedFunctions."""
    fast_name, fast_options = first_entry(name, compiler_options, True)
    fast = CachedFunction(jitted, fast_name, key_parts, cache_dir, fast_options, prefetched=prefetched,
                          keep_lowered=True, **kwargs)
    full = CachedFunction(jitted, name, key_parts, cache_dir, compiler_options, lowered_from=fast, **kwargs)
    return cls(fast, full, switch)

  def start_full(self, abstract: tuple[Any, ...]) -> None:
    """Starts the background thread (the fast tier's deferred cache write, then the full compile) for arguments
    with these shapes / dtypes / shardings (`abstract_args` of the step's arguments, taken before they were
    donated)."""
    abstract = abstract_args(abstract)

    def run() -> None:
      try:
        self.fast.flush_store()
        self.full.compiled = self.full.compile(*abstract)
      except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread at the switch
        self._error = e
      finally:
        self.fast.release_lowered()

    self._thread = threading.Thread(target=run, daemon=True, name="jaxflow-full-train-step")
    self._thread.start()

  def wait_full(self) -> None:
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._error is not None:
      raise self._error

  def __call__(self, step: int, state: Any, batch: Any) -> Any:
    if step < self.switch:
      if not self.tiers or self.tiers[-1][1] != "fast":
        self.tiers.append((step, "fast"))
      if self.fast.compiled is None:
        self.fast.compiled = self.fast.compile(state, batch)
        abstract = abstract_args((state, batch))
        out = jax.block_until_ready(self.fast(state, batch))  # the run's one wait outside the switch
        self.start_full(abstract)
        return out
      return self.fast(state, batch)
    if self.full.compiled is None or self._thread is not None:
      self.wait_full()
    if not self.tiers or self.tiers[-1][1] != "full":
      self.tiers.append((step, "full"))
    return self.full(state, batch)


def store(path: str, compiled: Any, executable_bytes: bytes | None = None) -> None:
  """Writes a compiled executable (with its argument / result trees) to `path` atomically.

  The trees are pickled apart from the executable (`trees`, bytes): unpickling them imports the classes of
  their nodes (the train state's: flax, optax, jaxflow.train_state, ~0.3-0.5 CPU-s), which `load` does only
  after XLA has rebuilt the executable, so a background load starts XLA's work right after `import jax`.
  executable_bytes: XLA's serialization of `compiled`'s executable to store instead of serializing it now (an
  executable loaded from JAX's persistent cache: its entry's bytes, see `_persistent_hits`)."""
  from jax.experimental import serialize_executable
  if executable_bytes is None:
    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
  else:
    payload, in_tree, out_tree = _serialize_with(compiled, executable_bytes)
  # The devices the executable runs on, in its order (deserialize_and_load would otherwise assume all devices).
  device_ids = [d.id for d in compiled._executable.xla_executable.local_devices()]
  blob = pickle.dumps({"format": FORMAT, "payload": payload, "payload_sha256": hashlib.sha256(payload).hexdigest(),
                       "trees": pickle.dumps((in_tree, out_tree)), "device_ids": device_ids})
  write_atomic(path, blob)


def _compile(lowered: Any, compiler_options: Mapping[str, Any] | None, options_prefix: str = "") -> Any:
  """lowered.compile(compiler_options=...); an option XLA rejects (unknown name, bad value) is a ValueError
  naming it as `options_prefix` + its name (e.g. 'config.compiler_options.') with the value and XLA's reason."""
  try:
    return lowered.compile(compiler_options=compiler_options)
  except Exception as e:  # noqa: BLE001 - re-raised unchanged unless an option is the cause
    msg = str(e)
    if compiler_options and "INVALID_ARGUMENT" in msg:
      for name, value in compiler_options.items():
        if f"option {name}," in msg or f"option: '{name}'" in msg:
          raise ValueError(f"{options_prefix}{name}={value!r}: XLA rejected this compiler option ({msg.strip()})") \
              from e
    raise


_hit_recorder = threading.local()
_hook_lock = threading.Lock()
_hook_installed = False


class _persistent_hits:
  """Within this context, records on this thread the executables JAX's persistent compilation cache returns;
  `with _persistent_hits() as read: ...; read()` gives XLA's serialized bytes of each (as written at the
  original compile), or [] when jax's cache internals (jax._src.compilation_cache, jax 0.10) are not as
  expected. The hook around `get_executable_and_time` is installed once and passes every call through."""

  def __enter__(self) -> Callable[[], list[bytes]]:
    self.keys: list[tuple[str, Any]] = []
    _install_hit_hook()
    self._previous = getattr(_hit_recorder, "keys", None)
    _hit_recorder.keys = self.keys
    return self.read

  def __exit__(self, *exc: Any) -> bool:
    _hit_recorder.keys = self._previous
    return False

  def read(self) -> list[bytes]:
    out = []
    try:
      from jax._src import compilation_cache as cc
      for key, backend in self.keys:
        raw = cc._get_cache(backend).get(key)
        if raw is None:
          return []
        serialized, _ = cc.extract_executable_and_time(cc.decompress_executable(raw))
        out.append(serialized)
    except Exception:  # noqa: BLE001 - internals moved or the entry went away: nothing to store
      return []
    return out


def _install_hit_hook() -> None:
  global _hook_installed
  with _hook_lock:
    if _hook_installed:
      return
    _hook_installed = True
    try:
      from jax._src import compilation_cache as cc
      original = cc.get_executable_and_time
    except (ImportError, AttributeError):
      return

    def get_executable_and_time(cache_key, compile_options, backend, executable_devices):
      executable, compile_time = original(cache_key, compile_options, backend, executable_devices)
      keys = getattr(_hit_recorder, "keys", None)
      if executable is not None and keys is not None:
        keys.append((cache_key, backend))
      return executable, compile_time

    cc.get_executable_and_time = get_executable_and_time


def _serialize_with(compiled: Any, executable_bytes: bytes) -> tuple[bytes, Any, Any]:
  """What serialize_executable.serialize(compiled) returns (payload, in_tree, out_tree), with `executable_bytes`
  as the executable's serialization (jax 0.10's steps of `serialize`)."""
  import io

  from jax._src.lib import _jax
  from jax._src.lib import xla_client as xc
  from jax.experimental import serialize_executable

  class Pickler(serialize_executable._JaxPjrtPickler):
    def persistent_id(self, obj: Any) -> Any:
      if isinstance(obj, (xc.LoadedExecutable, _jax.Executable)):
        return ("exec", executable_bytes)
      return super().persistent_id(obj)

  unloaded = getattr(compiled._executable, "_unloaded_executable", None)
  if unloaded is None or compiled._params.const_args:
    raise ValueError("this executable cannot be serialized")
  args_info_flat, in_tree = jax.tree_util.tree_flatten(compiled.args_info)
  with io.BytesIO() as f:
    Pickler(f).dump((unloaded, args_info_flat, compiled._no_kwargs))
    return f.getvalue(), in_tree, compiled.out_tree


def write_atomic(path: str, blob: bytes) -> None:
  """Writes `blob` to a private temp file in path's directory, fsyncs it and renames it over `path`: readers
  (in any process) see the previous file or the complete new one; concurrent writers: the last rename wins."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=TEMP_PREFIX)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(blob)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def load(path: str, timings: dict[str, float] | None = None) -> Any:
  """The compiled executable stored at `path` (raises on any problem).

  Order: the entry's outer pickle (plain bytes and lists: no imports), the payload's checksum, XLA's rebuild of
  the executable (the bulk of the time; it releases the GIL), and only then the argument / result trees (whose
  classes may import flax / optax). `timings` (optional) receives 'read', 'xla' and 'trees' seconds."""
  from jax.experimental import serialize_executable
  t = time.perf_counter()
  with open(path, "rb") as f:
    entry = pickle.load(f)
  if not isinstance(entry, dict) or entry.get("format") != FORMAT:
    raise ValueError(f"{path}: not a jaxflow executable cache entry of format {FORMAT}")
  if hashlib.sha256(entry["payload"]).hexdigest() != entry.get("payload_sha256"):
    raise ValueError(f"{path}: the payload's checksum does not match (corrupt entry)")
  by_id = {d.id: d for d in jax.devices()}
  missing = [i for i in entry["device_ids"] if i not in by_id]
  if missing:
    raise ValueError(f"{path}: compiled for device ids {entry['device_ids']}, {missing} not present")
  devices = [by_id[i] for i in entry["device_ids"]]
  backend = devices[0].client
  t_read = time.perf_counter()
  unpickler = getattr(serialize_executable, "_JaxPjrtUnpickler", None)
  rebuilt = None
  if unpickler is not None and hasattr(jax.stages, "Compiled"):
    # deserialize_and_load's own steps, with the trees unpickled last (jax 0.10: payload -> unloaded
    # executable -> loaded -> Compiled); another jax version without these internals takes the public call.
    import io
    unloaded, args_info_flat, no_kwargs = unpickler(io.BytesIO(entry["payload"]), backend, devices).load()
    rebuilt = (unloaded.load(), args_info_flat, no_kwargs)
  t_xla = time.perf_counter()
  in_tree, out_tree = pickle.loads(entry["trees"])
  if rebuilt is None:
    compiled = serialize_executable.deserialize_and_load(entry["payload"], in_tree, out_tree, backend=backend,
                                                         execution_devices=devices)
  else:
    loaded, args_info_flat, no_kwargs = rebuilt
    compiled = jax.stages.Compiled(loaded, [], in_tree.unflatten(args_info_flat), out_tree, no_kwargs=no_kwargs)
  if timings is not None:
    timings.update(read=t_read - t, xla=t_xla - t_read, trees=time.perf_counter() - t_xla)
  return compiled


__all__ = ["CachedFunction", "DEFAULT_MAX_BYTES", "MAX_BYTES_ENV", "Prefetch", "cache_key", "default_dir",
           "entry_path", "environment", "evict", "light_environment", "load", "max_bytes_from_env", "parse_size",
           "pointer_path", "prefetch", "signature", "source_hash", "store", "touch", "write_atomic"]
