"""Process-wide JAX/XLA set-up for fast starts and fast steps: call `configure()` once, before the first JAX
computation (XLA reads XLA_FLAGS when the backend initialises).

    from jaxflow import platform
    platform.configure()                        # persistent compilation cache in the default directory
    platform.configure(cache_dir=None)          # no persistent cache
    platform.configure(cpu_flags={"xla_cpu_use_xnnpack": "true"})   # extra CPU-only XLA flags (process-wide)
    jax.jit(f, compiler_options=platform.compiler_options({...}))    # XLA options of one program

What it does:
  - Persistent compilation cache (`jax_compilation_cache_dir`): compiled executables (the train step, the init,
    the eval step) are stored on disk keyed by their HLO, so a second run of the same configuration skips XLA
    compilation (the time to the first step is then tracing + loading). Entries are written for compilations
    longer than `min_compile_time_secs`. The directory defaults to $JAXFLOW_COMPILATION_CACHE, else
    ~/.cache/jaxflow/xla. Its subdirectory `jaxflow_executables` holds jaxflow.exec_cache's serialized train
    step and init program (and param_init's parameter shapes), which let a warm start skip tracing and
    lowering too; disabling the compilation cache disables those as well. That subdirectory is bounded by
    $JAXFLOW_EXEC_CACHE_MAX_BYTES (default 2 GiB; least recently used entries are deleted first) and may be
    shared by concurrent processes; JAX's own cache directory is not bounded by jaxflow.
  - The caller's `cpu_flags`: appended to XLA_FLAGS only when the user has not set the same flag, only before the
    backend is initialised, and only when the platform will be the CPU (JAX_PLATFORMS empty or 'cpu'), so
    accelerators never receive CPU flags. There are no process-wide default flags: none of the XLA:CPU options of
    jaxlib 0.10.2 measured so far helps every model (YNNPACK on convolutions only helps PWC-Net's warm start but
    slowed FlowNetC's step 6-24 % and its compile ~25 %: BENCHMARKS.md, "Session 8: warm start"; XNNPACK /
    oneDNN, prefer vector width 512 and XNN graph fusion gave no reproducible speed-up, issue #8). An option for
    one model's programs goes into its config's `compiler_options` (per program, `compiler_options()` below).
    The CPU speed-up comes from jaxflow.ops.conv.

The convolution-gradient implementation is chosen per backend by jaxflow.ops.conv (matmul weight gradients on
CPU, XLA's own on GPU/TPU); `conv_impl` here overrides it process-wide.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "jaxflow", "xla")
_UNSET = object()


def _backend_initialized() -> bool:
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except Exception:  # pragma: no cover - private API moved: assume initialised (never touch XLA_FLAGS late)
    return True


def _cpu_platform() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
  return platforms in ("", "cpu") or platforms.split(",")[0] == "cpu"


def merge_xla_flags(current: str, defaults: Mapping[str, Any]) -> str:
  """`current` XLA_FLAGS plus `--name=value` for every default whose name is not already in it."""
  present = {tok.lstrip("-").split("=", 1)[0] for tok in current.split() if tok.startswith("--")}
  extra = [f"--{k}={v}" for k, v in defaults.items() if k not in present]
  return " ".join([current.strip()] + extra).strip()


def configure(cache_dir: Any = _UNSET, *, min_compile_time_secs: float = 1.0,
              cpu_flags: Mapping[str, Any] | None = None, conv_impl: str | None = None) -> dict[str, Any]:
  """Sets up the compilation cache, CPU XLA flags and the convolution implementation; idempotent.

  Args:
    cache_dir: persistent compilation cache directory; default $JAXFLOW_COMPILATION_CACHE or
      ~/.cache/jaxflow/xla; None or '' disables it.
    min_compile_time_secs: only compilations at least this long (seconds) are written to the cache.
    cpu_flags: XLA flags (name without dashes -> value) added to XLA_FLAGS when the platform is the CPU and
      the backend is not yet initialised; flags the user already set win.
    conv_impl: 'auto' | 'lax' | 'matmul' (see jaxflow.ops.conv.set_default_impl); None keeps the current.
  Returns:
    What was applied: {'cache_dir': str | None, 'xla_flags': str, 'flags_applied': bool (cpu_flags),
    'conv_impl': str}.
  """
  if cache_dir is _UNSET:
    cache_dir = os.environ.get("JAXFLOW_COMPILATION_CACHE", DEFAULT_CACHE_DIR)
  flags_applied = False
  if cpu_flags and not _backend_initialized() and _cpu_platform():
    os.environ["XLA_FLAGS"] = merge_xla_flags(os.environ.get("XLA_FLAGS", ""), cpu_flags)
    flags_applied = True
  if cache_dir:
    cache_dir = os.path.abspath(os.path.expanduser(str(cache_dir)))
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  from jaxflow.ops import conv as conv_ops
  if conv_impl is not None:
    conv_ops.set_default_impl(conv_impl)
  return {"cache_dir": cache_dir or None, "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "flags_applied": flags_applied, "conv_impl": conv_ops.get_default_impl()}


def compiler_options(options: Mapping[str, Any] | None, prefix: str = "", *,
                     cpu: bool | None = None) -> dict[str, Any] | None:
  """Per-program XLA compiler options (for `jax.jit(..., compiler_options=)` / `Lowered.compile`) from a config's
  {name: value} (strings from a command line): 'true' / 'false' in any case become bools (XLA rejects the
  lower-case strings for a bool option), other strings, ints and floats stay; None when there are none.
  Options named `xla_cpu_*` are kept only when the programs run on the CPU (`cpu`; default: JAX_PLATFORMS is
  empty or starts with 'cpu'), so an accelerator never receives them.
  A value of another type is a ValueError naming `prefix` + the option's name. Whether XLA knows the name and
  the value is checked at the compile (jaxflow.exec_cache names the option it rejects)."""
  if cpu is None:
    cpu = _cpu_platform()
  out: dict[str, Any] = {}
  for name, value in (options or {}).items():
    if isinstance(value, str) and value.lower() in ("true", "false"):
      value = value.lower() == "true"
    elif not isinstance(value, (str, bool, int, float)):
      raise ValueError(f"{prefix}{name}={value!r}: expected a string value (an XLA compiler option)")
    if cpu or not str(name).startswith("xla_cpu_"):
      out[str(name)] = value
  return out or None


def configure_from_flag(value: str | None, **kwargs: Any) -> dict[str, Any]:
  """`configure` for the command lines' `--compilation_cache` flag: None (flag not given) -> the default
  ($JAXFLOW_COMPILATION_CACHE or ~/.cache/jaxflow/xla), 'none' or '' -> no persistent cache, else that directory.
  Other keyword arguments go to `configure`."""
  if value is None:
    return configure(**kwargs)
  value = str(value).strip()
  return configure(cache_dir=None if value.lower() in ("", "none") else value, **kwargs)


__all__ = ["DEFAULT_CACHE_DIR", "compiler_options", "configure", "configure_from_flag", "merge_xla_flags"]
