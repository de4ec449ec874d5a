"""The CPU cost-volume kernel (jaxflow/ops/csrc/correlation.cc): build, load and register it, and call it.

The kernel is a C++ XLA FFI custom call (forward and backward of the stride-1 correlation on float32
(B, H, W, C) maps; see the .cc's header for the method). It is compiled on first use with the system C++
compiler ($CXX, else `c++`) into a cache directory ($JAXFLOW_KERNEL_CACHE, default ~/.cache/jaxflow/kernels),
under a name keyed by the source's hash, the compiler's version, the jaxlib version (its FFI headers) and the
CPU (model and flags: a home directory shared by different machines never loads a library built with another
CPU's -march=native). The build writes a private temp file and renames it into place, so concurrent processes
may build at once (the last rename wins; each file is complete). A first-ever build takes ~5 s of one core;
it runs in a background thread started when jaxflow.ops.correlation is imported (`start_build`), so only a
trace of the correlation waits for it. Later processes load the cached library (a few ms).

If the kernel is disabled ($JAXFLOW_CORRELATION_FFI=0), there is no compiler or the build fails, `available()`
is False (after one warning naming the command and its stderr) and jaxflow.ops.correlation uses its jnp path:
training never stops for the kernel and never gets a different answer.

Sharding: under shard_map each shard calls the kernel on its own images; under plain jit with operands sharded
on the leading (image) axes a custom_partitioning wrapper (`jaxflow.parallel.per_image`) makes each device run
the kernel on its own images, forward and backward, instead of XLA all-gathering the batch onto every device.

Executables that call the kernel (jaxflow.exec_cache, JAX's persistent cache) must not be loaded before the
targets are registered: `register_cached()` (no build, no compiler call beyond the cached version probe) is
called by exec_cache before any load, and `state()` is part of exec_cache's key, so a process without the
kernel never picks up an executable that calls it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform as py_platform
import shlex
import subprocess
import tempfile
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

ENV_SWITCH = "JAXFLOW_CORRELATION_FFI"
ENV_CACHE = "JAXFLOW_KERNEL_CACHE"
TARGET_FWD = "jaxflow_correlation_fwd"
TARGET_BWD = "jaxflow_correlation_bwd"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "correlation.cc")
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c++17", "-w")

_lock = threading.RLock()
_status: str | None = None  # None: not tried; 'ready'; 'off' (switched off); 'failed'
_library: ctypes.CDLL | None = None
_library_file = ""  # basename of the registered library (what `state` names)
_builder: threading.Thread | None = None
_compiler_version: dict[str, str] = {}


def enabled() -> bool:
  """False when $JAXFLOW_CORRELATION_FFI is '0', 'false', 'no' or 'off' (the kernel is then never built)."""
  return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def compiler() -> list[str]:
  """The C++ compiler command: $CXX split like a shell word list, else ['c++']."""
  return shlex.split(os.environ.get("CXX", "") or "c++")


def cache_dir() -> str:
  return os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "jaxflow", "kernels")


def _cpu_id() -> str:
  """The CPU model and feature flags (Linux /proc/cpuinfo; elsewhere the platform's processor string)."""
  model = flags = ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "CPU part") and not model:
          model = value.strip()
        elif key in ("flags", "Features") and not flags:
          flags = value.strip()
  except OSError:
    pass
  return f"{py_platform.machine()}|{model or py_platform.processor()}|{flags}"


def _version_of(cmd: list[str]) -> str:
  """`cmd --version`'s first line (memoised per command); raises OSError if the compiler cannot be run."""
  key = " ".join(cmd)
  if key not in _compiler_version:
    run = subprocess.run(cmd + ["--version"], capture_output=True, text=True, timeout=60)
    if run.returncode != 0:
      raise OSError(f"{key} --version exited with {run.returncode}: {run.stderr.strip()[:500]}")
    _compiler_version[key] = (run.stdout.strip().splitlines() or [""])[0]
  return _compiler_version[key]


def library_path(cmd: list[str] | None = None) -> str:
  """Where the library for this source, compiler, jaxlib and CPU lives (raises OSError without a compiler)."""
  import jaxlib
  cmd = compiler() if cmd is None else cmd
  with open(SOURCE, "rb") as f:
    source = f.read()
  blob = b"\0".join([source, " ".join(cmd).encode(), _version_of(cmd).encode(), jaxlib.__version__.encode(),
                     _cpu_id().encode(), " ".join(FLAGS).encode()])
  return os.path.join(cache_dir(), f"correlation-{hashlib.sha256(blob).hexdigest()[:24]}.so")


STALE_TEMP_SECONDS = 3600.0


def remove_stale_temps(directory: str, older_than: float = STALE_TEMP_SECONDS) -> list[str]:
  """Deletes `.tmp-correlation-*.so` files in `directory` last modified more than `older_than` seconds ago
  (left by a build that was killed mid-way; a concurrent build's temp file is younger, and a build takes
  ~5 s, so it is never touched). Returns the removed paths; files that vanish or resist are skipped."""
  removed = []
  now = time.time()
  try:
    names = os.listdir(directory)
  except OSError:
    return removed
  for name in names:
    if not (name.startswith(".tmp-correlation-") and name.endswith(".so")):
      continue
    path = os.path.join(directory, name)
    try:
      if now - os.stat(path).st_mtime > older_than:
        os.unlink(path)
        removed.append(path)
    except OSError:
      pass
  return removed


def _build(cmd: list[str], path: str) -> None:
  """Compiles SOURCE into `path` via a temp file + rename (first removing temp files of builds killed over
  an hour ago); raises RuntimeError with the command and stderr."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  remove_stale_temps(os.path.dirname(path))
  fd, tmp = tempfile.mkstemp(prefix=".tmp-correlation-", suffix=".so", dir=os.path.dirname(path))
  os.close(fd)
  full = cmd + list(FLAGS) + ["-I", jax.ffi.include_dir(), SOURCE, "-o", tmp]
  try:
    run = subprocess.run(full, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
      raise RuntimeError(f"command {shlex.join(full)!r} exited with {run.returncode}; stderr:\n{run.stderr.strip()[-4000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _register(path: str) -> None:
  global _library, _library_file
  lib = ctypes.CDLL(path)
  jax.ffi.register_ffi_target(TARGET_FWD, jax.ffi.pycapsule(lib.JaxflowCorrelationFwd), platform="cpu")
  jax.ffi.register_ffi_target(TARGET_BWD, jax.ffi.pycapsule(lib.JaxflowCorrelationBwd), platform="cpu")
  _library, _library_file = lib, os.path.basename(path)


def _fail(message: str) -> None:
  global _status
  _status = "failed"
  warnings.warn(f"jaxflow: the CPU cost-volume kernel is not available, the jnp correlation is used instead. "
                f"{message}", RuntimeWarning, stacklevel=3)


def _settled() -> bool | None:
  """Under _lock: whether the kernel is registered once that is decided (switched off counts as decided: False),
  None while it is still to be tried."""
  global _status
  if _status is None and not enabled():
    _status = "off"
  return None if _status is None else _status == "ready"


def register_cached() -> bool:
  """Loads and registers an already-built library (never compiles); True when the targets are registered."""
  global _status
  with _lock:
    if (settled := _settled()) is not None:
      return settled
    try:
      path = library_path()
    except (OSError, subprocess.SubprocessError):
      return False  # no compiler: `available()` warns
    if os.path.exists(path):
      try:
        _register(path)
        _status = "ready"
      except OSError:
        return False  # e.g. a corrupt file: `available()` rebuilds it
    return _status == "ready"


def available() -> bool:
  """True when the kernel is built, loaded and registered (builds it now if needed: ~5 s once per machine).

  Never raises: a missing compiler or a failed build gives one RuntimeWarning (with the command and its
  stderr) and False for the rest of the process."""
  global _status
  if _builder is not None and _builder is not threading.current_thread():
    _builder.join()
  with _lock:
    if (settled := _settled()) is not None:
      return settled
    cmd = compiler()
    try:
      path = library_path(cmd)
    except (OSError, subprocess.SubprocessError) as e:
      _fail(f"The C++ compiler {shlex.join(cmd)!r} could not be run ({e}); set $CXX or install g++ "
            f"(${ENV_SWITCH}=0 silences this).")
      return False
    try:
      if not os.path.exists(path):
        _build(cmd, path)
      _register(path)
      _status = "ready"
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
      _fail(f"Building or loading {path} failed: {e}")
    return _status == "ready"


def start_build() -> None:
  """Starts `available()` in a daemon thread (import time) unless the library is cached, switched off, or
  $JAX_PLATFORMS names platforms without 'cpu' (an accelerator run; a later CPU trace still builds it)."""
  global _builder
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  with _lock:
    if _status is not None or _builder is not None or not enabled():
      return
    if platforms and "cpu" not in platforms.split(","):
      return
    if register_cached():
      return
    _builder = threading.Thread(target=available, daemon=True, name="jaxflow-kernel-build")
    _builder.start()


def state() -> str:
  """'ffi:<library file>' when traced correlations on CPU call the kernel, else 'jnp' (part of exec_cache's
  key, so an executable calling the kernel is only used by a process that has registered the same library;
  waits for / runs the build)."""
  return f"ffi:{_library_file}" if available() else "jnp"


def light_state() -> str:
  """Registers an already-built library (no build) and says which: 'ffi:<library file>', 'ffi-pending' (not
  built yet, or failed) or 'jnp' (switched off). Part of exec_cache's pointer, computed before a prefetched
  executable is loaded: so the targets are registered before any executable that calls them is loaded."""
  if not enabled():
    return "jnp"
  if not register_cached():
    return "ffi-pending"
  return f"ffi:{_library_file}"


def _varying(*args: jax.Array) -> tuple[tuple[jax.Array, ...], jax.ShapeDtypeStruct | None]:
  """Under shard_map: the arguments cast to vary over the union of their manual mesh axes (the FFI call needs
  them equal) and the first one's aval (its mesh and manual-axis type for the results); outside: (args, None)."""
  mats = [getattr(jax.typeof(a), "mat", None) for a in args]
  varying = frozenset().union(*[m.varying for m in mats if m is not None])
  if not varying:
    return args, None
  cast = tuple(a if m.varying == varying else jax.lax.pcast(a, tuple(sorted(varying - m.varying)), to="varying")
               for a, m in zip(args, mats))
  return cast, jax.typeof(cast[0])


def _out(shape: tuple[int, ...], like) -> jax.ShapeDtypeStruct:
  """float32 `shape` with the mesh and manual-axis type of the aval `like` (shard_map), or plain."""
  if like is None:
    return jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=like.sharding, manual_axis_type=like.mat)


def _call_fwd(f1: jax.Array, f2: jax.Array, n: int, mat=None) -> jax.Array:
  """The forward custom call itself on whatever shapes it is given (one device's shard under a partitioner)."""
  k = 2 * n + 1
  out = _out(tuple(f1.shape[:-1]) + (k * k,), mat)
  return jax.ffi.ffi_call(TARGET_FWD, out, vmap_method="broadcast_all")(f1, f2, n=np.int64(n))


def _call_bwd(f1: jax.Array, f2: jax.Array, g: jax.Array, n: int, mat=None) -> tuple[jax.Array, jax.Array]:
  """The backward custom call itself (df1, df2) on whatever shapes it is given."""
  shape = _out(tuple(f1.shape), mat)
  return jax.ffi.ffi_call(TARGET_BWD, (shape, shape), vmap_method="broadcast_all")(f1, f2, g, n=np.int64(n))


# Under jit with sharded operands (no shard_map) XLA's partitioner does not know the custom calls and would
# all-gather the operands and run the whole batch on every device. So outside shard_map the calls are wrapped
# by `parallel.per_image` (a custom_partitioning whose rule keeps the leading (image) axes' sharding and needs
# H, W, C and K*K replicated; vmap adds a leading axis, which the kernel treats as images too).
_FWD_RULE = "... h w c, ... h w c -> ... h w k"
_BWD_RULE = "... h w c, ... h w c, ... h w k -> ... h w c, ... h w c"


def _partitioned(n: int, backward: bool):
  """The per_image wrapper of the forward (f1, f2) or backward (f1, f2, g) call."""
  from jaxflow import parallel
  if backward:
    return parallel.per_image(lambda f1, f2, g: _call_bwd(f1, f2, g, n), _BWD_RULE)
  return parallel.per_image(lambda f1, f2: _call_fwd(f1, f2, n), _FWD_RULE)


_wrappers: dict[tuple[int, bool], object] = {}


def _wrapper(n: int, backward: bool):
  with _lock:
    if (n, backward) not in _wrappers:
      _wrappers[(n, backward)] = _partitioned(n, backward)
    return _wrappers[(n, backward)]


def forward(f1: jax.Array, f2: jax.Array, n: int) -> jax.Array:
  """Stride-1 cost volume of float32 (..., H, W, C) maps: (..., H, W, K*K) float32, K = 2n + 1 (mean over C).

  Leading axes beyond (H, W, C) are images (vmap adds them); under jit with operands sharded on those axes
  each device computes its own images (custom_partitioning), under shard_map each shard calls the kernel."""
  (f1, f2), mat = _varying(f1, f2)
  if mat is not None:
    return _call_fwd(f1, f2, n, mat)
  return _wrapper(n, False)(f1, f2)


def backward(f1: jax.Array, f2: jax.Array, g: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """Gradients (df1, df2), float32 (..., H, W, C), of sum(g * forward(f1, f2, n)) for a float32 cotangent g
  (partitioned along the leading axes like `forward`)."""
  (f1, f2, g), mat = _varying(f1, f2, g)
  if mat is not None:
    return _call_bwd(f1, f2, g, n, mat)
  return tuple(_wrapper(n, True)(f1, f2, g))


__all__ = ["available", "backward", "enabled", "forward", "register_cached", "start_build", "state"]
