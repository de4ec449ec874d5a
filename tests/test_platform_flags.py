"""jaxflow.platform's default XLA:CPU flags: YNNPACK keeps the convolutions only (see platform.DEFAULT_CPU_FLAGS)."""

import json
import os
import subprocess
import sys

from jaxflow import platform

YNN = "xla_cpu_experimental_ynn_fusion_type"


def _configure(monkeypatch, xla_flags, **kwargs):
  """configure() as if the CPU backend had not started yet; returns (result, XLA_FLAGS after)."""
  if xla_flags is None:
    monkeypatch.delenv("XLA_FLAGS", raising=False)
  else:
    monkeypatch.setenv("XLA_FLAGS", xla_flags)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setattr(platform, "_backend_initialized", lambda: False)
  out = platform.configure(cache_dir=None, **kwargs)
  return out, os.environ.get("XLA_FLAGS", "")


def test_default_flag_is_added_and_the_users_value_wins(monkeypatch):
  out, flags = _configure(monkeypatch, None)
  assert flags.split() == [f"--{YNN}=individual_convolution"]
  assert out["default_flags_applied"] and not out["flags_applied"]
  # the user's own value (here: no YNN fusions at all) is kept, not doubled
  _, flags = _configure(monkeypatch, f"--{YNN}= --xla_cpu_use_xnnpack=true")
  assert flags.split() == [f"--{YNN}=", "--xla_cpu_use_xnnpack=true"]
  # opting out adds nothing; caller flags still apply
  out, flags = _configure(monkeypatch, "", default_cpu_flags=False, cpu_flags={"xla_cpu_use_xnnpack": "true"})
  assert flags.split() == ["--xla_cpu_use_xnnpack=true"]
  assert out["flags_applied"] and not out["default_flags_applied"]


def test_not_applied_once_the_backend_started_or_off_cpu(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setattr(platform, "_backend_initialized", lambda: True)
  out = platform.configure(cache_dir=None)
  assert "XLA_FLAGS" not in os.environ and not out["default_flags_applied"]
  monkeypatch.setattr(platform, "_backend_initialized", lambda: False)
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  out = platform.configure(cache_dir=None)
  assert "XLA_FLAGS" not in os.environ and not out["default_flags_applied"]


_PROBE = r"""
import json, jax, jax.numpy as jnp
from jax import lax
from jaxflow import platform
platform.configure(cache_dir=None)
def f(a, b, k):
  conv = lax.conv_general_dilated(a, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return conv.sum() + (b @ b.T).sum()
c = jax.jit(f).lower(jnp.ones((1, 16, 16, 32)), jnp.ones((64, 64)), jnp.ones((3, 3, 32, 32))).compile()
text = c.as_text()
ynn = [line for line in text.splitlines() if "__ynn_fusion" in line and "fusion(" in line]
print(json.dumps({"ynn": len(ynn)}))
"""


def test_dots_leave_ynnpack_convolutions_stay(tmp_path):
  # A fresh interpreter (the flag is read when the backend starts): with the default, the product is XLA's own
  # dot and only the convolution is a YNN fusion; with YNNPACK's defaults (user flag) both are.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"

  def probe(extra):
    out = subprocess.run([sys.executable, "-c", _PROBE], env=dict(env, **extra), capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])

  assert probe({})["ynn"] == 1
  assert probe({"XLA_FLAGS": f"--{YNN}=individual_convolution,individual_dot"})["ynn"] == 2
