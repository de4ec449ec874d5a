"""jaxflow.platform's XLA options: the caller's process-wide CPU flags (how configure() applies them) and the
per-program compiler options of a config (platform.compiler_options), which reach the compiled program."""

import os

import jax
import jax.numpy as jnp
import pytest

from jaxflow import platform

YNN = "xla_cpu_experimental_ynn_fusion_type"
CONV_ONLY = "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"


def _configure(monkeypatch, xla_flags, **kwargs):
  """configure() as if the CPU backend had not started yet; returns (result, XLA_FLAGS)."""
  if xla_flags is None:
    monkeypatch.delenv("XLA_FLAGS", raising=False)
  else:
    monkeypatch.setenv("XLA_FLAGS", xla_flags)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setattr(platform, "_backend_initialized", lambda: False)
  out = platform.configure(cache_dir=None, **kwargs)
  return out, os.environ.get("XLA_FLAGS", "")


def test_no_process_wide_default_flags(monkeypatch):
  out, flags = _configure(monkeypatch, None)
  assert flags == "" and not out["flags_applied"]


def test_caller_flags_are_added_and_the_users_value_wins(monkeypatch):
  out, flags = _configure(monkeypatch, None, cpu_flags={YNN: "individual_convolution"})
  assert flags.split() == [f"--{YNN}=individual_convolution"] and out["flags_applied"]
  _, flags = _configure(monkeypatch, f"--{YNN}= --xla_cpu_use_xnnpack=true", cpu_flags={YNN: "individual_convolution"})
  assert flags.split() == [f"--{YNN}=", "--xla_cpu_use_xnnpack=true"]  # kept, not doubled


def test_caller_flags_not_applied_once_the_backend_started_or_off_cpu(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setattr(platform, "_backend_initialized", lambda: True)
  out = platform.configure(cache_dir=None, cpu_flags={YNN: "individual_convolution"})
  assert "XLA_FLAGS" not in os.environ and not out["flags_applied"]
  monkeypatch.setattr(platform, "_backend_initialized", lambda: False)
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  out = platform.configure(cache_dir=None, cpu_flags={YNN: "individual_convolution"})
  assert "XLA_FLAGS" not in os.environ and not out["flags_applied"]


def test_compiler_options_from_a_config():
  assert platform.compiler_options({}) is None and platform.compiler_options(None) is None
  got = platform.compiler_options({YNN: CONV_ONLY, "xla_cpu_enable_fast_math": "FALSE", "xla_a": "True",
                                   "xla_backend_optimization_level": 2}, cpu=True)
  assert got == {YNN: CONV_ONLY, "xla_cpu_enable_fast_math": False, "xla_a": True,
                 "xla_backend_optimization_level": 2}
  with pytest.raises(ValueError, match=r"config\.compiler_options\.xla_x=\[1\]: expected a string"):
    platform.compiler_options({"xla_x": [1]}, "config.compiler_options.")
  # CPU-only options never reach an accelerator's compile; the others do.
  assert platform.compiler_options({YNN: CONV_ONLY, "xla_a": "1"}, cpu=False) == {"xla_a": "1"}
  assert platform.compiler_options({YNN: CONV_ONLY}, cpu=False) is None
  assert platform.compiler_options({YNN: CONV_ONLY}, cpu=True) == {YNN: CONV_ONLY}


def _ynn_fusions(options):
  """The number of YNNPACK fusions in the compiled program of a sum of squares over a 64x64 array's rows."""
  text = jax.jit(lambda x: jnp.sum(x * x, axis=0), compiler_options=options).lower(jnp.ones((64, 64))).compile()
  return text.as_text().count("%ynn_fusion")


def test_compiler_options_reach_the_compiled_program():
  # jaxlib 0.10.2 hands the reduction to YNNPACK by default; with YNNPACK kept to convolutions it is XLA's.
  assert _ynn_fusions(None) >= 1
  assert _ynn_fusions(platform.compiler_options({YNN: CONV_ONLY})) == 0
