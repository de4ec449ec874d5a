"""Tests for jaxflow.flow_io: .flo, PNG codec, KITTI PNG, PFM and images, on constructed and real files."""

import pathlib
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from jaxflow import flow_io
from jaxflow.flow_io import FlowFileError


def _rng(seed=0):
  return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------- .flo


def test_flo_layout_written_by_hand_is_read(tmp_path):
  # Build a .flo by hand from the format definition: tag, int32 W, int32 H, row-major (u, v).
  height, width = 3, 5
  u = np.arange(height * width, dtype=np.float32).reshape(height, width)
  v = -10.0 * u
  body = np.stack([u, v], -1).astype("<f4").tobytes()
  path = tmp_path / "hand.flo"
  path.write_bytes(struct.pack("<f", 202021.25) + struct.pack("<ii", width, height) + body)
  flow = flow_io.read_flo(path)
  assert flow.dtype == np.float32 and flow.shape == (height, width, 2)
  np.testing.assert_array_equal(flow[..., 0], u)
  np.testing.assert_array_equal(flow[..., 1], v)
  assert flow[1, 2, 0] == 7.0  # row 1, column 2 -> index 1 * 5 + 2


def test_flo_round_trip_is_bit_exact_and_keeps_unknowns(tmp_path):
  flow = _rng().normal(scale=20, size=(37, 53, 2)).astype(np.float32)
  flow[3, 4] = [flow_io.UNKNOWN_FLOW, 0.5]
  flow[10, 11, 1] = -3e9
  path = tmp_path / "a.flo"
  flow_io.write_flo(path, flow)
  back = flow_io.read_flo(path)
  assert back.tobytes() == flow.tobytes()
  data = path.read_bytes()
  assert data[:4] == b"PIEH" and struct.unpack("<ii", data[4:12]) == (53, 37)
  assert len(data) == 12 + 8 * 37 * 53
  valid = flow_io.flow_valid_mask(back)
  expected = np.ones((37, 53), np.float32)
  expected[3, 4] = expected[10, 11] = 0
  np.testing.assert_array_equal(valid, expected)


def test_flow_valid_mask_matches_numpy_reference():
  flow = _rng(1).normal(scale=1e9, size=(20, 30, 2)).astype(np.float32)
  flow[0, 0, 0] = np.nan
  flow[1, 1, 1] = np.inf
  flow[2, 2] = [1e9, -1e9]  # exactly at the threshold: known
  ref = np.ones((20, 30), np.float32)
  for y in range(20):
    for x in range(30):
      for c in range(2):
        val = float(flow[y, x, c])
        if not np.isfinite(val) or abs(val) > 1e9:
          ref[y, x] = 0
  np.testing.assert_array_equal(flow_io.flow_valid_mask(flow), ref)
  assert ref[2, 2] == 1 and ref[0, 0] == 0 and ref[1, 1] == 0


@pytest.mark.parametrize("mutate,message", [
    (lambda d: b"PIEX" + d[4:], "tag"),
    (lambda d: d[:-5], "truncated"),
    (lambda d: d + b"\0" * 8, "trailing"),
    (lambda d: d[:4] + struct.pack("<ii", -4, 3) + d[12:], "invalid .flo size"),
    (lambda d: d[:4] + struct.pack("<ii", 0, 3) + d[12:], "invalid .flo size"),
    (lambda d: d[:4] + struct.pack("<ii", 4, 4) + d[12:], "truncated"),
    (lambda d: d[:7], "too short"),
])
def test_corrupt_flo_raises_naming_file(tmp_path, mutate, message):
  good = tmp_path / "good.flo"
  flow_io.write_flo(good, np.zeros((3, 4, 2), np.float32))
  bad = tmp_path / "corrupt_file.flo"
  bad.write_bytes(mutate(good.read_bytes()))
  with pytest.raises(FlowFileError, match=message) as info:
    flow_io.read_flo(bad)
  assert "corrupt_file.flo" in str(info.value)
  assert isinstance(info.value, ValueError)


def test_write_flo_rejects_bad_input(tmp_path):
  with pytest.raises(ValueError, match=r"\(H, W, 2\)"):
    flow_io.write_flo(tmp_path / "x.flo", np.zeros((4, 4, 3)))
  bad = np.zeros((4, 4, 2), np.float32)
  bad[1, 1, 0] = np.nan
  with pytest.raises(ValueError, match="non-finite"):
    flow_io.write_flo(tmp_path / "x.flo", bad)


def test_real_flo_files(shared_data):
  files = sorted(shared_data.rglob("*.flo"))
  assert len(files) == 7
  expected_shapes = {"flyingchairs": (384, 512, 2), "sintel": (436, 1024, 2)}
  for path in files:
    flow = flow_io.read_flo(path)
    assert flow.dtype == np.float32 and flow.ndim == 3 and flow.shape[-1] == 2
    for key, shape in expected_shapes.items():
      if key in str(path):
        assert flow.shape == shape, path
    known = flow_io.flow_valid_mask(flow) > 0
    # Plausible magnitudes for the known pixels of these datasets.
    assert 1.0 < np.abs(flow[known]).max() < 100.0, path
  mb = shared_data / "middlebury" / "other-gt-flow"
  for seq, unknown in (("Dimetrodon", True), ("RubberWhale", True), ("Venus", False)):
    flow = flow_io.read_flo(mb / seq / "flow10.flo")
    frac = 1.0 - flow_io.flow_valid_mask(flow).mean()
    if unknown:
      assert 0.005 < frac < 0.1, (seq, frac)
      assert np.all(np.abs(flow[flow_io.flow_valid_mask(flow) == 0]).max(-1) > 1e9)
    else:
      assert frac == 0.0
  assert flow_io.read_flo(mb / "Venus" / "flow10.flo").shape == (380, 420, 2)


# ------------------------------------------------------------------------------------------- PNG


def _filter_rows_by_hand(pixels: np.ndarray, bpp: int, filter_types) -> bytes:
  """Independent scalar PNG filter encoder (PNG spec section 9), one filter type per row."""
  height = pixels.shape[0]
  rows = pixels.reshape(height, -1).astype(np.int64)
  out = bytearray()
  for r in range(height):
    ft = filter_types[r % len(filter_types)]
    out.append(ft)
    for i in range(rows.shape[1]):
      x = int(rows[r, i])
      a = int(rows[r, i - bpp]) if i >= bpp else 0
      b = int(rows[r - 1, i]) if r > 0 else 0
      c = int(rows[r - 1, i - bpp]) if (r > 0 and i >= bpp) else 0
      if ft == 0:
        pred = 0
      elif ft == 1:
        pred = a
      elif ft == 2:
        pred = b
      elif ft == 3:
        pred = (a + b) // 2
      else:
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        pred = a if (pa <= pb and pa <= pc) else (b if pb <= pc else c)
      out.append((x - pred) % 256)
  return bytes(out)


def _png_file(width, height, depth, color_type, raw: bytes) -> bytes:
  def chunk(t, body):
    return struct.pack(">I", len(body)) + t + body + struct.pack(">I", zlib.crc32(t + body) & 0xFFFFFFFF)

  ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
          + chunk(b"IEND", b""))


@pytest.mark.parametrize("filters", [(0,), (1,), (2,), (3,), (4,), (0, 1, 2, 3, 4), (4, 3, 2, 1)])
def test_png_reader_decodes_every_filter_type_16bit_rgb(tmp_path, filters):
  pixels = _rng(2).integers(0, 65536, size=(9, 13, 3)).astype(np.uint16)
  raw = _filter_rows_by_hand(pixels.astype(">u2").view(np.uint8).reshape(9, -1), 6, filters)
  path = tmp_path / "f.png"
  path.write_bytes(_png_file(13, 9, 16, 2, raw))
  np.testing.assert_array_equal(flow_io.read_png(path), pixels)


@pytest.mark.parametrize("channels,dtype", [(1, np.uint8), (3, np.uint8), (4, np.uint8), (2, np.uint8),
                                            (1, np.uint16), (3, np.uint16), (4, np.uint16)])
def test_png_round_trip(tmp_path, channels, dtype):
  top = np.iinfo(dtype).max + 1
  pixels = _rng(3).integers(0, top, size=(17, 23, channels)).astype(dtype)
  path = tmp_path / "r.png"
  flow_io.write_png(path, pixels)
  np.testing.assert_array_equal(flow_io.read_png(path), pixels)
  if dtype == np.uint8:  # pillow agrees on our 8-bit files
    expected = pixels[..., 0] if channels == 1 else pixels
    np.testing.assert_array_equal(np.asarray(Image.open(path)), expected)


def test_png_reader_matches_pillow_on_pillow_files(tmp_path):
  # Pillow picks filters adaptively (typically mixing several types) for smooth + noisy content.
  yy, xx = np.mgrid[0:64, 0:96]
  smooth = np.stack([xx * 2, yy * 3, (xx + yy)], -1).astype(np.uint8)
  noisy = _rng(4).integers(0, 256, size=(64, 96, 3)).astype(np.uint8)
  img = np.where((xx < 48)[..., None], smooth, noisy).astype(np.uint8)
  for mode, arr in (("RGB", img), ("L", img[..., 1]), ("RGBA", np.concatenate([img, img[..., :1]], -1))):
    path = tmp_path / f"p_{mode}.png"
    Image.fromarray(arr, mode=mode).save(path, optimize=True)
    got = flow_io.read_png(path)
    np.testing.assert_array_equal(got.reshape(arr.shape), arr)
  gray16 = (yy * 1000 + xx * 7).astype(np.uint16)
  Image.fromarray(gray16).save(tmp_path / "g16.png")
  np.testing.assert_array_equal(flow_io.read_png(tmp_path / "g16.png")[..., 0], gray16)


def test_png_reader_matches_pillow_on_real_8bit_files(shared_data):
  for path in [shared_data / "middlebury/other-data/Venus/frame10.png",
               shared_data / "middlebury/other-data-gray/Venus/frame10.png",
               shared_data / "sintel/training/occlusions/alley_1/frame_0002.png"]:
    expected = np.asarray(Image.open(path))
    np.testing.assert_array_equal(flow_io.read_png(path).reshape(expected.shape), expected)


def test_corrupt_png_raises_naming_file(tmp_path):
  path = tmp_path / "ok.png"
  flow_io.write_png(path, np.zeros((8, 8, 3), np.uint16))
  data = path.read_bytes()
  cases = {
      "bad_crc.png": (data[:40] + bytes([data[40] ^ 0xFF]) + data[41:], "CRC"),
      "truncated.png": (data[:-20], "truncated"),
      "not_png.png": (b"GIF89a" + data[6:], "not a PNG"),
  }
  for name, (content, message) in cases.items():
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(FlowFileError, match=message) as info:
      flow_io.read_png(bad)
    assert name in str(info.value)
  pal = tmp_path / "palette.png"
  Image.fromarray(np.zeros((4, 4), np.uint8)).convert("P").save(pal)
  with pytest.raises(FlowFileError, match="colour type 3"):
    flow_io.read_png(pal)


# ------------------------------------------------------------------------------------------ KITTI


def test_kitti_reads_hand_built_png(tmp_path):
  # u = (R - 2^15) / 64, v = (G - 2^15) / 64, valid = B > 0, built with an independent filter-0 encoder.
  r = np.array([[32768, 32768 + 64, 0], [65535, 32768 - 32, 40000]], np.uint16)
  g = np.array([[32768, 32768 - 128, 65535], [0, 32768 + 1, 1]], np.uint16)
  b = np.array([[1, 1, 0], [7, 0, 1]], np.uint16)
  pixels = np.stack([r, g, b], -1)
  raw = _filter_rows_by_hand(pixels.astype(">u2").view(np.uint8).reshape(2, -1), 6, (0,))
  path = tmp_path / "k.png"
  path.write_bytes(_png_file(3, 2, 16, 2, raw))
  flow, valid = flow_io.read_kitti_flow(path)
  assert flow.dtype == np.float32 and valid.dtype == np.float32
  np.testing.assert_array_equal(flow[..., 0], [[0, 1, -512], [(65535 - 32768) / 64, -0.5, (40000 - 32768) / 64]])
  np.testing.assert_array_equal(flow[..., 1], [[0, -2, (65535 - 32768) / 64], [-512, 1 / 64, (1 - 32768) / 64]])
  np.testing.assert_array_equal(valid, [[1, 1, 0], [1, 0, 1]])


def test_kitti_round_trip_exact_for_representable_values(tmp_path):
  rng = _rng(5)
  flow = (rng.integers(0, 65536, size=(31, 47, 2)).astype(np.float64) - 32768) / 64
  flow = flow.astype(np.float32)
  valid = (rng.random((31, 47)) > 0.3).astype(np.float32)
  path = tmp_path / "k.png"
  flow_io.write_kitti_flow(path, flow, valid)
  back, back_valid = flow_io.read_kitti_flow(path)
  np.testing.assert_array_equal(back, flow)
  np.testing.assert_array_equal(back_valid, valid)
  # Pillow sees the same file as 8-bit (high bytes): an independent check of the encoding.
  high = np.asarray(Image.open(path))
  np.testing.assert_array_equal(high[..., 0], ((flow[..., 0].astype(np.float64) * 64 + 32768).astype(np.int64) >> 8))


def test_kitti_write_rounds_clips_and_masks(tmp_path):
  flow = np.array([[[0.005, -0.005], [1000.0, -1000.0], [np.nan, 1e10], [1 / 128 + 1e-4, 3 / 128]]], np.float32)
  path = tmp_path / "k.png"
  flow_io.write_kitti_flow(path, flow)  # valid from known flow: the NaN / 1e10 pixel is invalid
  back, valid = flow_io.read_kitti_flow(path)
  np.testing.assert_array_equal(valid, [[1, 1, 0, 1]])
  np.testing.assert_array_equal(back[0, 0], [0, 0])  # rounded to the nearest 1/64
  np.testing.assert_array_equal(back[0, 1], [flow_io.KITTI_MAX_FLOW, flow_io.KITTI_MIN_FLOW])  # clipped
  np.testing.assert_array_equal(back[0, 2], [0, 0])  # unknown written as zero flow
  np.testing.assert_array_equal(back[0, 3], [1 / 64, 2 / 64])  # nearest, ties to even (1.5 -> 2)
  with pytest.raises(ValueError, match="marked valid"):
    flow_io.write_kitti_flow(path, flow, valid=np.ones((1, 4)))
  with pytest.raises(ValueError, match=r"valid has shape \(4,\)"):
    flow_io.write_kitti_flow(path, flow, valid=np.ones(4))


def test_kitti_rejects_8bit_png(tmp_path):
  path = tmp_path / "eight_bit.png"
  Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(path)
  with pytest.raises(FlowFileError, match="16-bit RGB") as info:
    flow_io.read_kitti_flow(path)
  assert "eight_bit.png" in str(info.value)


def test_real_kitti_flow_pngs(shared_data):
  kitti = shared_data / "kitti"
  expected = {  # file: (shape, valid-fraction range)
      "kitti2015/training/flow_gt_occ_or_noc/000000_10.png": ((375, 1242), (0.1, 0.5)),
      "format_samples_no_images/kitti2015_devkit_flow_gt.png": ((375, 1242), (0.1, 0.5)),
      "format_samples_no_images/oft_1226x370_flow_gt.png": ((370, 1226), (0.1, 0.6)),
      "format_samples_no_images/kitti2015_devkit_flow_est.png": ((375, 1242), (0.99, 1.0)),
  }
  for name, (shape, (lo, hi)) in expected.items():
    path = kitti / name
    flow, valid = flow_io.read_kitti_flow(path)
    assert flow.shape == shape + (2,) and valid.shape == shape
    assert lo <= valid.mean() <= hi, (name, valid.mean())
    # Driving scenes: |u| up to a few hundred px, |v| smaller; all multiples of 1/64.
    assert 20 < np.abs(flow[valid > 0, 0]).max() < 400
    assert np.abs(flow[valid > 0, 1]).max() < 150
    np.testing.assert_array_equal(flow * 64, np.round(flow * 64))
    # Pillow decodes these 16-bit PNGs to 8 bits by keeping the high byte: an independent check of
    # our decoder (these files use the Sub, Up and Paeth filters).
    r_g = (flow.astype(np.float64) * 64 + 32768).astype(np.int64)
    pil = np.asarray(Image.open(path))
    np.testing.assert_array_equal(pil[..., :2], r_g >> 8)
  flow, valid = flow_io.read_kitti_flow(kitti / "kitti2015/training/flow_gt_occ_or_noc/000000_10.png")
  assert np.all(flow[valid == 0] == 0)  # invalid pixels hold R = G = 2^15 in these files


# -------------------------------------------------------------------------------------------- PFM


def test_pfm_hand_built_little_and_big_endian(tmp_path):
  data = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)  # top row first
  for scale, dtype in ((-1.0, "<f4"), (1.0, ">f4")):
    path = tmp_path / f"h{scale}.pfm"
    path.write_bytes(b"PF\n3 2\n" + f"{scale}\n".encode() + data[::-1].astype(dtype).tobytes())
    got = flow_io.read_pfm(path)
    np.testing.assert_array_equal(got, data)
    np.testing.assert_array_equal(flow_io.read_pfm_flow(path), data[..., :2])
  gray = np.array([[1.5, -2.0], [3.0, 4.0]], np.float32)
  path = tmp_path / "g.pfm"
  path.write_bytes(b"Pf\n2 2\n-1.0\n" + gray[::-1].astype("<f4").tobytes())
  np.testing.assert_array_equal(flow_io.read_pfm(path), gray)
  with pytest.raises(FlowFileError, match="3 channels"):
    flow_io.read_pfm_flow(path)


@pytest.mark.parametrize("little_endian", [True, False])
@pytest.mark.parametrize("shape", [(11, 7), (11, 7, 3)])
def test_pfm_round_trip_bit_exact(tmp_path, little_endian, shape):
  array = _rng(6).normal(scale=100, size=shape).astype(np.float32)
  array.flat[0] = np.inf  # PFM holds any float32
  path = tmp_path / "r.pfm"
  flow_io.write_pfm(path, array, little_endian=little_endian)
  data = path.read_bytes()
  header = data.split(b"\n", 3)
  assert header[0] == (b"PF" if len(shape) == 3 else b"Pf")
  assert header[1] == b"7 11"
  assert (float(header[2]) < 0) == little_endian
  assert flow_io.read_pfm(path).tobytes() == array.tobytes()


def test_pfm_flow_write_adds_zero_channel(tmp_path):
  flow = _rng(7).normal(size=(5, 6, 2)).astype(np.float32)
  path = tmp_path / "f.pfm"
  flow_io.write_pfm(path, flow)
  np.testing.assert_array_equal(flow_io.read_pfm(path)[..., 2], 0)
  assert flow_io.read_pfm_flow(path).tobytes() == flow.tobytes()
  got, valid = flow_io.read_flow(path)
  np.testing.assert_array_equal(got, flow)
  np.testing.assert_array_equal(valid, 1)


def test_corrupt_pfm_raises_naming_file(tmp_path):
  good = b"PF\n2 2\n-1.0\n" + np.zeros(12, "<f4").tobytes()
  cases = {
      "tag.pfm": (b"P6" + good[2:], "tag"),
      "trunc.pfm": (good[:-3], "truncated"),
      "extra.pfm": (good + b"\0\0\0\0", "trailing"),
      "scale.pfm": (good.replace(b"-1.0", b"0.00"), "scale"),
      "size.pfm": (good.replace(b"2 2", b"2 x"), "header values"),
      "neg.pfm": (good.replace(b"2 2", b"-2 2"), "invalid PFM size"),
      "short.pfm": (b"PF\n2", "truncated PFM header"),
  }
  for name, (content, message) in cases.items():
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(FlowFileError, match=message) as info:
      flow_io.read_pfm(path)
    assert name in str(info.value)


# ----------------------------------------------------------------------------------------- images


def test_read_write_image_round_trip(tmp_path):
  img = _rng(8).integers(0, 256, size=(20, 30, 3)).astype(np.uint8)
  for ext in ("png", "ppm"):
    path = tmp_path / f"i.{ext}"
    flow_io.write_image(path, img.astype(np.float32) / 255)
    got = flow_io.read_image(path)
    assert got.dtype == np.float32 and got.shape == (20, 30, 3)
    np.testing.assert_array_equal(np.round(got * 255).astype(np.uint8), img)
  path = tmp_path / "i.jpg"
  flow_io.write_image(path, np.full((16, 16, 3), 0.5, np.float32))
  np.testing.assert_allclose(flow_io.read_image(path), 128 / 255, atol=2 / 255)
  gray = img[..., 0]
  flow_io.write_image(tmp_path / "g.png", gray)
  got = flow_io.read_image(tmp_path / "g.png")
  assert got.shape == (20, 30, 3)
  np.testing.assert_array_equal(got[..., 0], gray / np.float32(255))
  np.testing.assert_array_equal(got[..., 0], got[..., 2])
  flow_io.write_png(tmp_path / "16.png", np.full((3, 4, 3), 65535, np.uint16))
  np.testing.assert_array_equal(flow_io.read_image(tmp_path / "16.png"), 1.0)
  with pytest.raises(ValueError, match=r"expected \(H, W\)"):
    flow_io.write_image(tmp_path / "bad.png", np.zeros((4, 4, 2)))


def test_read_image_errors_name_file(tmp_path):
  path = tmp_path / "garbage.png"
  path.write_bytes(b"this is not an image")
  with pytest.raises(FlowFileError) as info:
    flow_io.read_image(path)
  assert "garbage.png" in str(info.value)


def test_real_images(shared_data):
  color = flow_io.read_image(shared_data / "middlebury/other-data/Venus/frame10.png")
  gray = flow_io.read_image(shared_data / "middlebury/other-data-gray/Venus/frame10.png")
  assert color.shape == gray.shape == (380, 420, 3)
  assert np.array_equal(gray[..., 0], gray[..., 1]) and not np.array_equal(color[..., 0], color[..., 1])
  chairs = flow_io.read_image(shared_data / "flyingchairs/data/00001_img1.ppm")
  assert chairs.shape == (384, 512, 3) and chairs.dtype == np.float32
  assert 0.0 <= chairs.min() and chairs.max() <= 1.0 and chairs.std() > 0.05
  kitti = flow_io.read_image(shared_data / "kitti/kitti2015/training/image_2/000000_10.png")
  assert kitti.shape == (375, 1242, 3)


def test_read_flow_dispatch(tmp_path, shared_data):
  flow, valid = flow_io.read_flow(shared_data / "middlebury/other-gt-flow/RubberWhale/flow10.flo")
  np.testing.assert_array_equal(valid, flow_io.flow_valid_mask(flow))
  flow, valid = flow_io.read_flow(shared_data / "kitti/kitti2015/training/flow_gt_occ_or_noc/000000_10.png")
  assert flow.shape == (375, 1242, 2) and 0 < valid.mean() < 1
  with pytest.raises(FlowFileError, match="extension"):
    flow_io.read_flow(pathlib.Path(tmp_path) / "x.bin")


def test_io_and_viz_import_neither_tensorflow_nor_jax():
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  code = ("import sys, jaxflow.flow_io, jaxflow.viz; "
          "print(sorted(m for m in ('jax', 'tensorflow', 'matplotlib') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_read_image_16bit_gray_via_pillow_and_rejects_unknown_range(tmp_path):
  gray16 = np.array([[0, 65535], [32768, 1000]], np.uint16)
  Image.fromarray(gray16).save(tmp_path / "g16.tif")  # pillow path (not PNG): mode I;16
  got = flow_io.read_image(tmp_path / "g16.tif")
  np.testing.assert_allclose(got[..., 0], gray16 / 65535.0, rtol=1e-6)
  Image.fromarray(np.ones((2, 2), np.float32)).save(tmp_path / "f.tif")
  with pytest.raises(FlowFileError, match="f.tif"):
    flow_io.read_image(tmp_path / "f.tif")
