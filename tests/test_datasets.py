"""Tests of the real-dataset readers: the shared samples against numpy decodes, tiny written files in every
format, partial downloads, and clear errors for corrupt or missing files."""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data_pipelines import flying_chairs, kitti, middlebury, readers, sintel, things
from jaxflow import flow_io


def load(dataset, i=0):
  return {k: v.numpy() for k, v in dataset.element(tf.constant(i, tf.int64)).items()}


def np_flo(path):
  raw = open(path, "rb").read()
  assert np.frombuffer(raw[:4], "<f4")[0] == 202021.25
  w, h = np.frombuffer(raw[4:12], "<i4")
  return np.frombuffer(raw[12:], "<f4").reshape(h, w, 2)


def np_ppm(path):
  raw = open(path, "rb").read()
  magic, w, h, maxval, rest = raw.split(maxsplit=4)
  assert magic == b"P6" and maxval == b"255"
  return np.frombuffer(rest, np.uint8).reshape(int(h), int(w), 3).astype(np.float32) / 255


def np_png(path):
  return np.asarray(Image.open(path).convert("RGB"), np.float32) / 255


def write_flo(path, flow):
  h, w = flow.shape[:2]
  with open(path, "wb") as f:
    f.write(np.float32(202021.25).tobytes() + np.array([w, h], "<i4").tobytes() + flow.astype("<f4").tobytes())


def write_pfm(path, array, little_endian):
  """PFM: 'PF' header, rows bottom to top, negative scale = little-endian."""
  h, w = array.shape[:2]
  data = np.ascontiguousarray(array[::-1]).astype("<f4" if little_endian else ">f4")
  with open(path, "wb") as f:
    f.write(f"PF\n{w} {h}\n{-1.0 if little_endian else 1.0}\n".encode() + data.tobytes())


def write_png(path, image):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(image).save(path)


# ---------------------------------------------------------------------------------------------------------
# Shared real samples.


def test_flying_chairs_sample_matches_numpy_decode(shared_data):
  root = shared_data / "flyingchairs"
  ds = flying_chairs.list_examples(str(root), "train")  # the split file lists 22,872 pairs; 2 are present
  assert len(ds) == 2
  for i in range(2):
    el = load(ds, i)
    stem = root / "data" / f"{i + 1:05d}"
    np.testing.assert_array_equal(el["image1"], np_ppm(f"{stem}_img1.ppm"))
    np.testing.assert_array_equal(el["image2"], np_ppm(f"{stem}_img2.ppm"))
    np.testing.assert_array_equal(el["flow"], np_flo(f"{stem}_flow.flo"))
    assert el["image1"].shape == (384, 512, 3) and el["valid"].min() == 1
  with pytest.raises(FileNotFoundError, match="no complete val pair.*flyingchairs/data"):
    flying_chairs.list_examples(str(root), "val")


def test_sintel_sample_matches_numpy_decode(shared_data):
  root = shared_data / "sintel"
  ds = sintel.list_examples(str(root), "clean")  # masks exist for frame 2 only: one complete pair
  assert len(ds) == 1 and ds.files["flow"][0].endswith("frame_0002.flo")
  el = load(ds)
  t = root / "training"
  np.testing.assert_array_equal(el["image1"], np_png(t / "clean/alley_1/frame_0002.png"))
  np.testing.assert_array_equal(el["image2"], np_png(t / "clean/alley_1/frame_0003.png"))
  np.testing.assert_array_equal(el["flow"], np_flo(t / "flow/alley_1/frame_0002.flo"))
  invalid = np.asarray(Image.open(t / "invalid/alley_1/frame_0002.png").convert("L")) > 127
  occ = np.asarray(Image.open(t / "occlusions/alley_1/frame_0002.png").convert("L")) > 127
  np.testing.assert_array_equal(el["valid"], (~invalid).astype(np.float32))
  np.testing.assert_array_equal(el["occlusion"], occ.astype(np.float32))
  assert 0 < occ.mean() < 0.5
  final = sintel.list_examples(str(root), "final", masks=False)
  assert len(final) == 2 and "occlusion" not in load(final, 0)
  np.testing.assert_array_equal(load(final, 0)["image1"], np_png(t / "final/alley_1/frame_0001.png"))


def test_kitti_sample_matches_numpy_decode(shared_data):
  root = shared_data / "kitti" / "kitti2015"
  ds = kitti.list_examples(str(root), 2015, flow_dir="flow_gt_occ_or_noc")
  el = load(ds)
  flow, valid = flow_io.read_kitti_flow(root / "training/flow_gt_occ_or_noc/000000_10.png")
  np.testing.assert_allclose(el["flow"], flow * valid[..., None], atol=1e-6)
  np.testing.assert_array_equal(el["valid"], valid.astype(np.float32))
  assert 0.05 < valid.mean() < 0.95  # sparse ground truth
  np.testing.assert_array_equal(el["image1"], np_png(root / "training/image_2/000000_10.png"))
  np.testing.assert_array_equal(el["image2"], np_png(root / "training/image_2/000000_11.png"))
  with pytest.raises(FileNotFoundError, match="flow_occ"):
    kitti.list_examples(str(root), 2015, "occ")


def test_middlebury_sample_unknown_flow_is_invalid(shared_data):
  root = shared_data / "middlebury"
  ds = middlebury.list_examples(str(root))
  assert [os.path.basename(os.path.dirname(p)) for p in ds.files["flow"]] == ["Dimetrodon", "RubberWhale", "Venus"]
  for i, seq in enumerate(("Dimetrodon", "RubberWhale", "Venus")):
    el = load(ds, i)
    raw = np_flo(root / "other-gt-flow" / seq / "flow10.flo")
    known = np.all(np.abs(raw) <= 1e9, axis=-1)
    np.testing.assert_array_equal(el["valid"], known.astype(np.float32))
    np.testing.assert_array_equal(el["flow"], np.where(known[..., None], raw, 0))
    np.testing.assert_array_equal(el["image1"], np_png(root / "other-data" / seq / "frame10.png"))
    assert (known.mean() < 1) == (seq != "Venus")
  grey = load(middlebury.list_examples(str(root), gray=True), 2)
  assert np.array_equal(grey["image1"][..., 0], grey["image1"][..., 2])


# ---------------------------------------------------------------------------------------------------------
# Tiny files written here.


def test_things_pfm_both_byte_orders(tmp_path):
  rng = np.random.default_rng(0)
  flows = {}
  for seq, little in (("0000", True), ("0001", False)):
    for n in (6, 7):
      write_png(str(tmp_path / f"frames_cleanpass/TRAIN/A/{seq}/left/{n:04d}.png"),
                rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    fdir = tmp_path / f"optical_flow/TRAIN/A/{seq}/into_future/left"
    fdir.mkdir(parents=True)
    pfm = np.concatenate([rng.standard_normal((12, 16, 2)) * 5, np.zeros((12, 16, 1))], -1).astype(np.float32)
    write_pfm(fdir / "OpticalFlowIntoFuture_0006_L.pfm", pfm, little)
    write_pfm(fdir / "OpticalFlowIntoFuture_0007_L.pfm", pfm, little)  # frame 8 missing: pair skipped
    flows[seq] = pfm
  ds = things.list_examples(str(tmp_path), "clean", "TRAIN")
  assert len(ds) == 2
  for i, seq in enumerate(("0000", "0001")):
    el = load(ds, i)
    np.testing.assert_array_equal(el["flow"], flows[seq][..., :2])
    np.testing.assert_array_equal(el["image2"], np_png(tmp_path / f"frames_cleanpass/TRAIN/A/{seq}/left/0007.png"))
  grey = np.arange(12, dtype=np.float32).reshape(3, 4)
  data = b"Pf\n4 3\n-1.0\n" + np.ascontiguousarray(grey[::-1]).astype("<f4").tobytes()
  np.testing.assert_array_equal(readers.decode_pfm(tf.constant(data)).numpy()[..., 0], grey)


def test_kitti2012_written_files(tmp_path):
  rng = np.random.default_rng(1)
  train = tmp_path / "training"
  for f in ("000003_10.png", "000003_11.png"):
    write_png(str(train / "colored_0" / f), rng.integers(0, 256, (10, 14, 3), dtype=np.uint8))
  flow = np.round(rng.standard_normal((10, 14, 2)) * 64) / 64 * 8
  valid = rng.random((10, 14)) > 0.3
  (train / "flow_noc").mkdir()
  flow_io.write_kitti_flow(train / "flow_noc/000003_10.png", flow, valid)
  el = load(kitti.list_examples(str(tmp_path), 2012, "noc"))
  np.testing.assert_array_equal(el["valid"], valid.astype(np.float32))
  np.testing.assert_allclose(el["flow"], flow * valid[..., None], atol=1e-6)


def test_flying_chairs_partial_download_and_missing_split(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  img = np.zeros((8, 10, 3), np.uint8)
  for i in (2, 3):  # pair 1 absent; pair 3 has no flow
    for s in ("img1", "img2"):
      (data / f"{i:05d}_{s}.ppm").write_bytes(b"P6\n10 8\n255\n" + img.tobytes())
  write_flo(data / "00002_flow.flo", np.ones((8, 10, 2), np.float32))
  with pytest.raises(FileNotFoundError, match="FlyingChairs_train_val.txt"):
    flying_chairs.list_examples(str(tmp_path), "train")
  assert len(flying_chairs.list_examples(str(tmp_path), "all")) == 1
  (tmp_path / "FlyingChairs_train_val.txt").write_text("1\n1\n2\n")
  ds = flying_chairs.list_examples(str(tmp_path), "train")
  assert ds.files["flow"] == [str(data / "00002_flow.flo")]
  (tmp_path / "FlyingChairs_train_val.txt").write_text("1\n3\n")
  with pytest.raises(ValueError, match="line 2 is '3'"):
    flying_chairs.list_examples(str(tmp_path), "train")
  with pytest.raises(FileNotFoundError, match="no NNNNN_img1.ppm files under"):
    flying_chairs.list_examples(str(tmp_path / "data" / "nothing"), "all")


def test_corrupt_files_raise_errors_naming_the_file(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  good_ppm = b"P6\n10 8\n255\n" + np.zeros((8, 10, 3), np.uint8).tobytes()
  for s in ("img1", "img2"):
    (data / f"00001_{s}.ppm").write_bytes(good_ppm)
  flo = data / "00001_flow.flo"
  write_flo(flo, np.ones((8, 10, 2), np.float32))
  ds = flying_chairs.list_examples(str(tmp_path), "all")
  assert load(ds)["flow"].shape == (8, 10, 2)
  flo.write_bytes(flo.read_bytes()[:-4])  # truncated
  with pytest.raises(tf.errors.InvalidArgumentError, match="(?s)size does not match.*00001_flow.flo"):
    load(ds)
  with pytest.raises(tf.errors.InvalidArgumentError, match="(?s)size does not match.*00001_flow.flo"):
    next(iter(ds.as_dataset()))  # the same inside a parallel tf.data map (graph mode)
  flo.write_bytes(flo.read_bytes()[:7])
  with pytest.raises(tf.errors.InvalidArgumentError, match="(?s)not a valid .flo.*00001_flow.flo"):
    next(iter(ds.as_dataset()))
  flo.write_bytes(b"XXXX" + b"\0" * 8)
  with pytest.raises(tf.errors.InvalidArgumentError, match="(?s)wrong tag.*00001_flow.flo"):
    load(ds)
  write_flo(flo, np.ones((9, 10, 2), np.float32))  # wrong shape for the frames
  with pytest.raises(tf.errors.InvalidArgumentError, match="(?s)same H, W.*00001_flow.flo"):
    load(ds)
  write_flo(flo, np.ones((8, 10, 2), np.float32))
  (data / "00001_img1.ppm").write_bytes(b"P5\n10 8\n255\n" + bytes(80))
  with pytest.raises(tf.errors.InvalidArgumentError, match="(?s)magic.*00001_img1.ppm"):
    load(ds)
  (data / "00001_img1.ppm").write_bytes(good_ppm[:-7])
  with pytest.raises(tf.errors.InvalidArgumentError, match="(?s)size mismatch.*00001_img1.ppm"):
    load(ds)
  os.remove(data / "00001_img1.ppm")
  with pytest.raises(tf.errors.NotFoundError, match="00001_img1.ppm"):
    load(ds)


def test_missing_folders_and_masks(tmp_path):
  with pytest.raises(FileNotFoundError, match="sintel.*training/clean"):
    sintel.list_examples(str(tmp_path), "clean")
  t = tmp_path / "training"
  for n in (1, 2):
    write_png(str(t / f"clean/s/frame_{n:04d}.png"), np.zeros((6, 8, 3), np.uint8))
  (t / "flow/s").mkdir(parents=True)
  write_flo(t / "flow/s/frame_0001.flo", np.zeros((6, 8, 2), np.float32))
  with pytest.raises(FileNotFoundError, match="invalid and occlusion masks"):
    sintel.list_examples(str(tmp_path), "clean")
  assert len(sintel.list_examples(str(tmp_path), "clean", masks=False)) == 1
  with pytest.raises(ValueError, match="unknown pass 'dirty'"):
    sintel.list_examples(str(tmp_path), "dirty")
  with pytest.raises(ValueError, match="scenes \\['t'\\] not in"):
    sintel.list_examples(str(tmp_path), "clean", scenes=("t",))
  with pytest.raises(FileNotFoundError, match="middlebury.*other-data"):
    middlebury.list_examples(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="things.*frames_finalpass"):
    things.list_examples(str(tmp_path), "final")
