"""A converted checkpoint is accepted by every consumer: jaxflow.load, `evaluate`, `infer`, and the trainer's
init_from (fine-tuning starts from exactly the converted weights). Uses a tiny SpyNet written as Torch7 files,
so no torch is needed here."""

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import t7_writer  # noqa: E402
import train_helpers as th  # noqa: E402

from jaxflow import convert as jconvert  # noqa: E402
from jaxflow import evaluate, flow_io, infer  # noqa: E402
from jaxflow.predictor import CheckpointError, load  # noqa: E402

LEVELS = 3
WIDTHS = (8, 6, 4, 2)
KERNEL = 3


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """OUT folder of a converted 3-level SpyNet with 3x3 kernels; returns (out, {level: [(w, b)]})."""
  root = tmp_path_factory.mktemp("convert_paths")
  rng = np.random.default_rng(0)
  weights = {}
  for k in range(1, LEVELS + 1):
    convs, mods = [], []
    for i in range(len(WIDTHS) - 1):
      w = (rng.standard_normal((WIDTHS[i + 1], WIDTHS[i], KERNEL, KERNEL)) * 0.3).astype(np.float32)
      b = (rng.standard_normal(WIDTHS[i + 1]) * 0.1).astype(np.float32)
      convs.append((w, b))
      mods += [t7_writer.spatial_convolution(w, b), t7_writer.relu()]
    weights[k] = convs
    t7_writer.save(str(root / f"modelL{k}_F.t7"), t7_writer.sequential(mods[:-1]))
  out = str(root / "out")
  assert jconvert.main(["--model", "spynet", "--source", str(root / "modelL*_F.t7"), "--out", out]) == 0
  return out, weights


def test_layout_config_and_params(converted):
  out, weights = converted
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert config["model"]["name"] == "spynet" and config["model"]["levels"] == LEVELS
  assert config["model"]["channels"] == list(WIDTHS[1:-1]) and config["model"]["kernel_size"] == KERNEL
  assert config["loss"]["weights"] == [0.0] * (LEVELS - 1) + [1.0]
  assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["0"]
  predictor = load(out)
  for k, convs in weights.items():
    for i, (w, b) in enumerate(convs):
      np.testing.assert_array_equal(predictor.variables["params"][f"G{k - 1}"][f"conv{i}"]["kernel"],
                                    w.transpose(2, 3, 1, 0))
      np.testing.assert_array_equal(predictor.variables["params"][f"G{k - 1}"][f"conv{i}"]["bias"], b)


def test_refuses_to_overwrite_and_reports_errors(converted, tmp_path, capsys):
  out, _ = converted
  src = os.path.dirname(out)
  with pytest.raises(FileExistsError, match="already holds checkpoints"):
    jconvert.convert("spynet", src, out)
  assert jconvert.main(["--model", "spynet", "--source", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 1
  assert "no level files" in capsys.readouterr().err


def test_infer_cli_writes_the_predicted_flow(converted, tmp_path):
  out, _ = converted
  rng = np.random.default_rng(1)
  frames = [(rng.random((40, 56, 3)) * 255).astype(np.uint8) for _ in range(2)]
  paths = []
  for i, frame in enumerate(frames):
    paths.append(str(tmp_path / f"frame{i}.png"))
    Image.fromarray(frame).save(paths[-1])
  assert infer.main(paths + ["--workdir", out, "-o", str(tmp_path / "flows"), "--quiet"]) == 0
  written = [f for f in os.listdir(tmp_path / "flows") if f.endswith(".flo")]
  assert len(written) == 1
  flow = flow_io.read_flo(str(tmp_path / "flows" / written[0]))
  expected = load(out).predict(frames[0], frames[1])
  np.testing.assert_allclose(flow, expected, atol=1e-5)


def test_evaluate_cli_on_real_middlebury(converted, shared_data, tmp_path):
  out, _ = converted
  root = os.path.join(shared_data, "middlebury")
  json_path = str(tmp_path / "eval.json")
  assert evaluate.main(["--workdir", out, "--datasets", f"middlebury:{root}", "--max_pairs", "1", "--json",
                        json_path, "--quiet"]) == 0
  with open(json_path) as f:
    results = json.load(f)["results"]
  (method,) = results.values()
  (metrics,) = method.values()
  # Independent EPE of the first sequence (sorted: Dimetrodon) over its known-flow pixels.
  seq = os.path.join(root, "other-data", "Dimetrodon")
  im1 = np.asarray(Image.open(os.path.join(seq, "frame10.png")).convert("RGB"))
  im2 = np.asarray(Image.open(os.path.join(seq, "frame11.png")).convert("RGB"))
  gt = flow_io.read_flo(os.path.join(root, "other-gt-flow", "Dimetrodon", "flow10.flo"))
  pred = load(out).predict(im1, im2)
  valid = np.all(np.abs(gt) < 1e9, axis=-1)
  epe = np.sqrt(((pred - gt) ** 2).sum(-1))[valid].mean()
  np.testing.assert_allclose(metrics["epe"], epe, rtol=1e-4)


def test_training_init_from_starts_at_the_converted_weights(converted, tmp_path):
  out, _ = converted
  with open(os.path.join(out, "config.json")) as f:
    model = json.load(f)["model"]
  c = th.tiny_config(total_steps=1, batch_size=2, init_from=out)
  c.model = model
  c.loss.weights = (0.0,) * (LEVELS - 1) + (1.0,)
  c.loss.div_flow = 1.0
  c.optim.base_lr = 0.0  # one step that changes nothing: the state holds the initial parameters
  result = th.run(c, str(tmp_path / "finetune"))
  trained = jax.device_get(result["state"].params)
  converted_params = load(out).variables["params"]
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(jax.device_get(converted_params))):
    np.testing.assert_array_equal(a, b)
  # A checkpoint whose config describes another architecture is rejected with the parameter named.
  bad = str(tmp_path / "bad")
  shutil.copytree(out, bad)
  with open(os.path.join(bad, "config.json"), "w") as f:
    json.dump({"model": dict(model, channels=[5, 4])}, f)
  with pytest.raises(CheckpointError, match="G0/conv0"):
    load(bad)
