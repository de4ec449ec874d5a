"""jaxflow.infer: .flo + colour PNG outputs that round-trip through flow_io and viz, frame folders, progress,
and the errors of bad inputs (frames of different sizes, missing files, video without OpenCV)."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from jaxflow import flow_io, infer, predictor, viz

TINY = {"name": "spynet", "levels": 3, "channels": [8, 8], "kernel_size": 3, "dtype": "float32"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  model = predictor.build_model(TINY)
  x = np.zeros((1, 64, 64, 3), np.float32)
  variables = jax.jit(lambda k: model.init({"params": k}, x, x))(jax.random.key(2))
  predictor.save_for_inference(workdir, TINY, variables, step=4)
  return str(workdir)


def _write_frames(folder, n, shape=(64, 80)):
  """n frames of a smooth random texture moving 2 px right per frame."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  base = rng.random((shape[0], shape[1] + 2 * n, 3)).astype(np.float32)
  paths = []
  for i in range(n):
    path = os.path.join(folder, f"f{i:03d}.png")
    flow_io.write_image(path, base[:, 2 * n - 2 * i:2 * n - 2 * i + shape[1]])
    paths.append(path)
  return paths


def test_pair_writes_flo_and_its_colour_png(checkpoint, tmp_path):
  p1, p2 = _write_frames(tmp_path / "in", 2)
  assert infer.main([p1, p2, "--checkpoint", checkpoint, "-o", str(tmp_path / "out")]) == 0
  flo = tmp_path / "out" / "f000.flo"
  flow = flow_io.read_flo(flo)
  model = predictor.load(checkpoint)
  np.testing.assert_allclose(flow, model(flow_io.read_image(p1), flow_io.read_image(p2)), atol=1e-5)
  assert flow.shape == (64, 80, 2) and np.abs(flow).max() > 0
  png = flow_io.read_image(tmp_path / "out" / "f000.png")
  np.testing.assert_array_equal(np.round(png * 255).astype(np.uint8), viz.flow_to_color(flow))


def test_frame_folder_with_progress(checkpoint, tmp_path, capsys):
  _write_frames(tmp_path / "frames", 4)
  (tmp_path / "frames" / "notes.txt").write_text("not a frame")
  infer.main(["--frames", str(tmp_path / "frames"), "--workdir", checkpoint, "-o", str(tmp_path / "out")])
  assert sorted(os.listdir(tmp_path / "out")) == ["f000.flo", "f000.png", "f001.flo", "f001.png", "f002.flo",
                                                  "f002.png"]
  err = capsys.readouterr().err
  assert "3/3" in err  # the progress line reached the end
  for stem in ("f000", "f001", "f002"):
    flow = flow_io.read_flo(tmp_path / "out" / f"{stem}.flo")
    png = flow_io.read_image(tmp_path / "out" / f"{stem}.png")
    np.testing.assert_array_equal(np.round(png * 255).astype(np.uint8), viz.flow_to_color(flow))


def test_infer_pairs_with_a_known_flow(tmp_path):
  """infer_pairs writes exactly what the predict function returns (here a constant flow)."""
  paths = _write_frames(tmp_path / "in", 3)
  seen = []

  def predict(a, b):
    seen.append((a.shape, a.dtype, float(a.max())))
    return np.broadcast_to(np.float32([2.0, -0.5]), a.shape[:2] + (2,)).copy()

  written = infer.infer_pairs(predict, infer.consecutive_pairs(paths), tmp_path / "out", progress=False)
  assert [os.path.basename(f) for f, _ in written] == ["f000.flo", "f001.flo"]
  assert seen[0][:2] == ((64, 80, 3), np.float32) and seen[0][2] <= 1.0
  np.testing.assert_array_equal(flow_io.read_flo(written[1][0]), np.broadcast_to([2.0, -0.5], (64, 80, 2)))


def test_bad_inputs_are_named(checkpoint, tmp_path):
  frames = _write_frames(tmp_path / "mixed", 2)
  flow_io.write_image(os.path.join(tmp_path / "mixed", "f002.png"), np.zeros((60, 80, 3), np.float32))
  with pytest.raises(ValueError, match=r"f002.png: frame is 80x60.*f001.png is 80x64"):
    infer.main(["--frames", str(tmp_path / "mixed"), "--checkpoint", checkpoint, "-o", str(tmp_path / "o1")])
  with pytest.raises(FileNotFoundError, match="nope.png"):
    infer.main([frames[0], str(tmp_path / "nope.png"), "--checkpoint", checkpoint, "-o", str(tmp_path / "o2")])
  (tmp_path / "one").mkdir()
  flow_io.write_image(tmp_path / "one" / "a.png", np.zeros((8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="found 1 image file"):
    infer.main(["--frames", str(tmp_path / "one"), "--checkpoint", checkpoint, "-o", str(tmp_path / "o3")])
  with pytest.raises(SystemExit):  # three positional images
    infer.main([frames[0], frames[1], frames[0], "--checkpoint", checkpoint, "-o", str(tmp_path / "o4")])
  with pytest.raises(SystemExit):  # no checkpoint
    infer.main([frames[0], frames[1], "-o", str(tmp_path / "o5")])


def test_video_needs_opencv(checkpoint, tmp_path):
  try:
    import cv2  # noqa: F401
    pytest.skip("OpenCV is installed: the missing-package error cannot be shown")
  except ImportError:
    pass
  with pytest.raises(ImportError, match="opencv-python"):
    infer.main(["--video", str(tmp_path / "clip.mp4"), "--checkpoint", checkpoint, "-o", str(tmp_path / "out")])
