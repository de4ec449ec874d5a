"""Test set-up shared by all modules: simulated CPU devices and the path of the shared real data."""

import os

# Must happen before JAX initialises its backend: two simulated CPU devices for sharding tests.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib

import pytest


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """Root of the real sample data (../shared/data), from $JAXFLOW_DATA; skips the test when unset."""
  root = os.environ.get("JAXFLOW_DATA")
  if not root:
    pytest.skip("JAXFLOW_DATA is not set: real-data tests skipped")
  path = pathlib.Path(root)
  if not path.is_dir():
    pytest.fail(f"JAXFLOW_DATA={root} is not a directory")
  return path
