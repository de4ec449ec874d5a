"""Two local processes x 2 CPU devices train together through jax.distributed and agree with one 4-device process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
HELPER = os.path.join(HERE, "train_helpers.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def test_two_processes_agree_with_one_four_device_process(tmp_path):
  port = _free_port()
  common = ["--steps", "4", "--batch", "4", "--checkpoint_every", "2"]
  procs = []
  for pid in range(2):
    cmd = [sys.executable, HELPER, str(tmp_path / "multi"), *common, "--coordinator", f"127.0.0.1:{port}",
           "--num_processes", "2", "--process_id", str(pid), "--out", str(tmp_path / f"p{pid}.npz")]
    procs.append(subprocess.Popen(cmd, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  single = subprocess.Popen([sys.executable, HELPER, str(tmp_path / "single"), *common,
                             "--out", str(tmp_path / "single.npz")],
                            env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  outputs = []
  for p in procs + [single]:
    try:
      out, _ = p.communicate(timeout=400)
    except subprocess.TimeoutExpired:
      for q in procs + [single]:
        q.kill()
      raise
    outputs.append(out)
    assert p.returncode == 0, out[-3000:]
  assert "done step 4 devices 4 processes 2" in outputs[0] and "done step 4 devices 4 processes 2" in outputs[1]
  assert "done step 4 devices 4 processes 1" in outputs[2]
  p0, p1, one = (np.load(tmp_path / f) for f in ("p0.npz", "p1.npz", "single.npz"))
  assert sorted(p0.files) == sorted(p1.files) == sorted(one.files)
  for k in p0.files:
    np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)
    np.testing.assert_allclose(p0[k], one[k], rtol=2e-5, atol=2e-6, err_msg=k)
  # Only process 0 logs; both wrote the checkpoints together.
  assert "step 4/4" in outputs[0] and "step 4/4" not in outputs[1]
  rows = [json.loads(line) for line in open(tmp_path / "multi" / "metrics.jsonl")]
  assert rows[-1]["final"] is True and rows[-1]["step"] == 4
  assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["2", "4"]
