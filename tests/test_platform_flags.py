"""jaxflow.platform's default XLA:CPU flags (DEFAULT_CPU_FLAGS, empty at present): how configure() applies them."""

import os

from jaxflow import platform

YNN = "xla_cpu_experimental_ynn_fusion_type"


def _configure(monkeypatch, xla_flags, **kwargs):
  """configure() as if the CPU backend had not started yet, with one default flag; returns (result, XLA_FLAGS)."""
  if xla_flags is None:
    monkeypatch.delenv("XLA_FLAGS", raising=False)
  else:
    monkeypatch.setenv("XLA_FLAGS", xla_flags)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setattr(platform, "_backend_initialized", lambda: False)
  monkeypatch.setattr(platform, "DEFAULT_CPU_FLAGS", {YNN: "individual_convolution"})
  out = platform.configure(cache_dir=None, **kwargs)
  return out, os.environ.get("XLA_FLAGS", "")


def test_no_default_flags_at_present():
  assert platform.DEFAULT_CPU_FLAGS == {}


def test_default_flag_is_added_and_the_users_value_wins(monkeypatch):
  out, flags = _configure(monkeypatch, None)
  assert flags.split() == [f"--{YNN}=individual_convolution"]
  assert out["default_flags_applied"] and not out["flags_applied"]
  # the user's own value is kept, not doubled
  _, flags = _configure(monkeypatch, f"--{YNN}= --xla_cpu_use_xnnpack=true")
  assert flags.split() == [f"--{YNN}=", "--xla_cpu_use_xnnpack=true"]
  # opting out adds nothing; the caller's flags still apply
  out, flags = _configure(monkeypatch, "", default_cpu_flags=False, cpu_flags={"xla_cpu_use_xnnpack": "true"})
  assert flags.split() == ["--xla_cpu_use_xnnpack=true"]
  assert out["flags_applied"] and not out["default_flags_applied"]


def test_not_applied_once_the_backend_started_or_off_cpu(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setattr(platform, "DEFAULT_CPU_FLAGS", {YNN: "individual_convolution"})
  monkeypatch.setattr(platform, "_backend_initialized", lambda: True)
  out = platform.configure(cache_dir=None)
  assert "XLA_FLAGS" not in os.environ and not out["default_flags_applied"]
  monkeypatch.setattr(platform, "_backend_initialized", lambda: False)
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  out = platform.configure(cache_dir=None)
  assert "XLA_FLAGS" not in os.environ and not out["default_flags_applied"]
