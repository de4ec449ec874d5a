"""Tests of the on-the-fly Flying Chairs generator: consistency of images, flow and occlusion, exact motion,
determinism, motion statistics, the export CLI and config overrides. Small sizes (96 x 128, few chairs)."""

import os
import pathlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data_pipelines import synthetic_chairs as sc


def _small_config(**overrides):
  cfg = sc.default_config()
  cfg.image_size = (96, 128)
  cfg.num_chairs = (4, 6)
  cfg.sprite_size = 48
  cfg.num_procedural_backgrounds = 3
  cfg.num_chair_models = 4
  cfg.views_per_model = 3
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
  old = os.environ.get("JAXFLOW_CACHE")
  os.environ["JAXFLOW_CACHE"] = str(tmp_path_factory.mktemp("jaxflow_cache"))
  yield
  if old is None:
    os.environ.pop("JAXFLOW_CACHE")
  else:
    os.environ["JAXFLOW_CACHE"] = old


@pytest.fixture(scope="module")
def gen():
  return sc.make_generator(_small_config())


def _example(g, seed, index):
  return {k: v.numpy() for k, v in g(tf.constant(seed, tf.int64), tf.constant(index, tf.int64)).items()}


def _warp_numpy(image, flow):
  """Backward bilinear warp: out(x) = image(x + flow(x)), zero outside (independent numpy reference)."""
  h, w = flow.shape[:2]
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  x, y = xx + flow[..., 0], yy + flow[..., 1]
  x0, y0 = np.floor(x), np.floor(y)
  fx, fy = x - x0, y - y0
  out = np.zeros(image.shape, np.float64)
  for dy, wy in ((0, 1 - fy), (1, fy)):
    for dx, wx in ((0, 1 - fx), (1, fx)):
      xi, yi = (x0 + dx).astype(int), (y0 + dy).astype(int)
      ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
      out += (wy * wx * ok)[..., None] * image[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]
  return out


def test_element_contract(gen):
  ex = _example(gen, 0, 0)
  assert set(ex) == {"image1", "image2", "flow", "valid", "occlusion"}
  assert ex["image1"].shape == ex["image2"].shape == (96, 128, 3)
  assert ex["flow"].shape == (96, 128, 2)
  assert ex["valid"].shape == ex["occlusion"].shape == (96, 128)
  for v in ex.values():
    assert v.dtype == np.float32
  for key in ("image1", "image2"):
    assert 0.0 <= ex[key].min() and ex[key].max() <= 1.0, key
  np.testing.assert_array_equal(ex["valid"], 1.0)
  assert set(np.unique(ex["occlusion"])) <= {0.0, 1.0}


def test_warp_reproduces_frame1_except_occlusions(gen):
  nonocc, occ_errs = [], []
  for index in range(3):
    ex = _example(gen, 1, index)
    err = np.abs(_warp_numpy(ex["image2"], ex["flow"]) - ex["image1"]).mean(-1)
    occ = ex["occlusion"] > 0.5
    assert 0.0 < occ.mean() < 0.5, "chairs and motion should occlude some, but not most, pixels"
    nonocc.append(err[~occ].mean())
    occ_errs.append(err[occ].mean())
    assert nonocc[-1] < 0.02, f"index {index}: warp error on non-occluded pixels {nonocc[-1]:.4f}"
  assert np.mean(occ_errs) > 5 * np.mean(nonocc)


def test_flow_is_not_a_wrong_but_consistent_field(gen):
  # Warping with a perturbed flow must be clearly worse: the warp test above is sensitive to the flow.
  ex = _example(gen, 1, 0)
  occ = ex["occlusion"] > 0.5
  good = np.abs(_warp_numpy(ex["image2"], ex["flow"]) - ex["image1"]).mean(-1)[~occ].mean()
  bad = np.abs(_warp_numpy(ex["image2"], ex["flow"] + 1.5) - ex["image1"]).mean(-1)[~occ].mean()
  assert bad > 2 * good


def test_zero_chairs_pure_translation():
  cfg = _small_config(num_chairs=(0, 0))
  m = cfg.motion
  m.bg_rotation_sigma = (0.0, 0.0)
  m.bg_zoom_sigma = 0.0
  m.bg_squeeze_sigma = 0.0
  g = sc.make_generator(cfg)
  params = sc.draw_parameters(cfg, 3, 12, tf.constant(5, tf.int64), tf.constant(2, tf.int64))
  np.testing.assert_allclose(params["bg_a"].numpy(), np.eye(2), atol=0)
  t = params["bg_b"].numpy()
  assert np.abs(t).max() > 0.05
  ex = _example(g, 5, 2)
  np.testing.assert_allclose(ex["flow"], np.broadcast_to(t, ex["flow"].shape), atol=1e-4)
  # Occlusion is exactly "moves out of view" (nearest target pixel outside the frame).
  h, w = cfg.image_size
  yy, xx = np.mgrid[0:h, 0:w]
  rx, ry = np.round(xx + t[0]), np.round(yy + t[1])
  out = (rx < 0) | (rx > w - 1) | (ry < 0) | (ry > h - 1)
  np.testing.assert_array_equal(ex["occlusion"] > 0.5, out)


def test_same_index_same_bytes_and_different_indices_differ(gen):
  a = _example(gen, 3, 7)
  b = _example(gen, 3, 7)
  for k in a:
    assert a[k].tobytes() == b[k].tobytes(), k
  c = _example(gen, 3, 8)
  d = _example(gen, 4, 7)
  assert not np.array_equal(a["image1"], c["image1"])
  assert not np.array_equal(a["flow"], c["flow"])
  assert not np.array_equal(a["image1"], d["image1"])


def test_tf_data_pipeline_parallelism_does_not_change_bytes(gen):
  direct = {i: _example(gen, 3, i) for i in (5, 6, 7)}
  ds = tf.data.Dataset.from_tensor_slices(tf.constant([7, 6, 5], tf.int64))
  ds = ds.map(lambda i: (i, gen(tf.constant(3, tf.int64), i)), num_parallel_calls=2, deterministic=False)
  seen = set()
  for i, ex in ds.as_numpy_iterator():
    seen.add(int(i))
    for k, v in ex.items():
      assert v.tobytes() == direct[int(i)][k].tobytes(), (int(i), k)
  assert seen == {5, 6, 7}


def test_motion_defaults_are_heavy_tailed():
  """Default motions at 512 x 384: most displacements under 10 px, a tail past 100 px (from the parameters)."""
  cfg = sc.default_config()
  draw = tf.function(lambda i: sc.draw_parameters(cfg, 10, 100, tf.constant(0, tf.int64), i))
  rng = np.random.default_rng(0)
  mags = []
  for i in range(300):
    p = {k: v.numpy() for k, v in draw(tf.constant(i, tf.int64)).items()}
    pts = rng.uniform([0, 0], [512, 384], (40, 2))
    mags.append(np.linalg.norm(pts @ p["bg_a"].T + p["bg_b"] - pts, axis=1))
    centre = p["c1_b"] + p["c1_a"] @ np.full(2, (cfg.sprite_size - 1) / 2)
    moved = np.einsum("kij,kj->ki", p["g_a"], centre) + p["g_b"]
    mags.append(np.linalg.norm(moved - centre, axis=1)[p["active"]])
    assert cfg.num_chairs[0] <= p["active"].sum() <= cfg.num_chairs[1]
    assert sorted(p["rank"].tolist()) == list(range(cfg.num_chairs[1]))
  m = np.concatenate(mags)
  assert np.median(m) < 10.0
  assert (m < 10).mean() > 0.5
  assert 0.0005 < (m > 100).mean() < 0.05


def test_export_cli_flying_chairs_layout(tmp_path, gen):
  sc.main(["--out", str(tmp_path), "--num", "2", "--seed", "3", "--start", "5", "--config.image_size=96,128",
           "--config.num_chairs=4,6", "--config.sprite_size=48", "--config.num_procedural_backgrounds=3",
           "--config.num_chair_models=4", "--config.views_per_model=3"])
  names = sorted(p.name for p in tmp_path.iterdir())
  assert names == ["00006_flow.flo", "00006_img1.ppm", "00006_img2.ppm", "00006_occ.png",
                   "00007_flow.flo", "00007_img1.ppm", "00007_img2.ppm", "00007_occ.png"]
  ex = _example(gen, 3, 5)  # File 00006 is example index 5.
  raw = (tmp_path / "00006_flow.flo").read_bytes()
  assert raw[:4] == b"PIEH"
  w, h = np.frombuffer(raw[4:12], "<i4")
  assert (h, w) == (96, 128)
  flow = np.frombuffer(raw[12:], "<f4").reshape(h, w, 2)
  np.testing.assert_array_equal(flow, ex["flow"])
  with Image.open(tmp_path / "00006_img1.ppm") as im:
    assert im.format == "PPM" and im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), np.round(ex["image1"] * 255).astype(np.uint8))
  with Image.open(tmp_path / "00006_img2.ppm") as im:
    np.testing.assert_array_equal(np.asarray(im), np.round(ex["image2"] * 255).astype(np.uint8))
  with Image.open(tmp_path / "00006_occ.png") as im:
    np.testing.assert_array_equal(np.asarray(im), (ex["occlusion"] > 0.5).astype(np.uint8) * 255)


def test_config_overrides():
  cfg = sc.default_config()
  sc.apply_overrides(cfg, ["--config.image_size=64,80", "--config.motion.chair_zoom_sigma=0.1",
                           "--config.chairs_dir=/x"])
  assert tuple(cfg.image_size) == (64, 80)
  assert cfg.motion.chair_zoom_sigma == 0.1
  assert cfg.chairs_dir == "/x"
  with pytest.raises(KeyError, match="no_such_key"):
    sc.apply_overrides(cfg, ["--config.no_such_key=1"])
  with pytest.raises(KeyError, match="motion.nope"):
    sc.apply_overrides(cfg, ["--config.motion.nope=1"])
  with pytest.raises(ValueError, match="image_size"):
    sc.apply_overrides(cfg, ["--config.image_size=64"])
  with pytest.raises(SystemExit):
    sc.main(["--out", "/tmp/unused", "--config.bogus=3"])


def test_bad_config_is_an_error():
  with pytest.raises(ValueError, match="image_size"):
    sc.make_generator(_small_config(image_size=(32, 128)))
  with pytest.raises(ValueError, match="num_chairs"):
    sc.make_generator(_small_config(num_chairs=(5, 2)))


# ------------------------------------------------------------------------------------------------------------
# The augmented crop rendered directly (make_generator(config, augment, crop_size)).


def _aug_config(**overrides):
  from data_pipelines import augment
  a = augment.default_config()
  for key, value in overrides.items():
    a[key] = value
  return a


def test_augmented_generator_is_warp_consistent():
  cfg = _small_config()
  g = sc.make_generator(cfg, _aug_config(photometric=False), (64, 96))
  nonocc, occ_errs = [], []
  for index in range(3):
    ex = _example(g, 1, index)
    assert ex["image1"].shape == (64, 96, 3) and ex["flow"].shape == (64, 96, 2)
    np.testing.assert_array_equal(ex["valid"], 1.0)
    err = np.abs(_warp_numpy(ex["image2"], ex["flow"]) - ex["image1"]).mean(-1)
    occ = ex["occlusion"] > 0.5
    assert 0.0 < occ.mean() < 0.6
    nonocc.append(err[~occ].mean())
    occ_errs.append(err[occ].mean())
    assert nonocc[-1] < 0.02, f"index {index}: warp error on non-occluded pixels {nonocc[-1]:.4f}"
  assert np.mean(occ_errs) > 5 * np.mean(nonocc)


def test_augmented_generator_with_a_crop_shift_equals_a_crop_of_the_plain_render():
  # Geometric augmentation reduced to an integer crop offset (no rotation, zoom or relative motion): the
  # directly rendered crop must be the same window of the full-frame render, and so must its flow.
  cfg = _small_config()
  a = _aug_config(photometric=False, rotate=0.0, zoom=(1.0, 1.0), relative_translate=0.0,
                  relative_rotate=0.0, relative_zoom=(1.0, 1.0), translate=0.0)
  crop = (64, 96)  # Source 96 x 128: the centred crop starts at (16, 16) exactly.
  full = _example(sc.make_generator(cfg), 2, 4)
  cut = _example(sc.make_generator(cfg, a, crop), 2, 4)
  window = (slice(16, 80), slice(16, 112))
  # Float rounding of the composed maps may flip a chair-edge pixel or a 1/64-pixel weight step: compare on
  # (almost) all pixels, exactly enough to catch any offset, scale or layer-order error.
  flow_ok = np.abs(cut["flow"] - full["flow"][window]).max(-1) < 2e-4
  img_ok = (np.abs(cut["image1"] - full["image1"][window]).max(-1) < 1e-3) & \
      (np.abs(cut["image2"] - full["image2"][window]).max(-1) < 1e-3)
  assert flow_ok.mean() > 0.995 and img_ok.mean() > 0.99, (flow_ok.mean(), img_ok.mean())
  # Occlusion: the full frame's, plus targets that leave the crop (out of view in the cropped frame 2).
  h, w = crop
  yy, xx = np.mgrid[0:h, 0:w]
  tx, ty = np.floor(xx + cut["flow"][..., 0] + 0.5), np.floor(yy + cut["flow"][..., 1] + 0.5)
  out = (tx < 0) | (tx > w - 1) | (ty < 0) | (ty > h - 1)
  expected = out | (full["occlusion"][window] > 0.5)
  assert ((cut["occlusion"] > 0.5) == expected).mean() > 0.995
  assert out.any() and (expected & ~out).any()


def test_augmented_generator_is_deterministic_and_photometric_changes_only_images():
  cfg = _small_config()
  g = sc.make_generator(cfg, _aug_config(), (64, 96))
  g_geo = sc.make_generator(cfg, _aug_config(photometric=False), (64, 96))
  a, b = _example(g, 5, 9), _example(g, 5, 9)
  for k in a:
    assert a[k].tobytes() == b[k].tobytes(), k
  assert not np.array_equal(a["image1"], _example(g, 5, 10)["image1"])
  plain = _example(g_geo, 5, 9)
  np.testing.assert_array_equal(a["flow"], plain["flow"])
  np.testing.assert_array_equal(a["occlusion"], plain["occlusion"])
  assert 0.0 <= a["image1"].min() and a["image1"].max() <= 1.0
  assert np.abs(a["image1"] - plain["image1"]).mean() > 0.01


def test_row_spans_cover_every_pixel_of_the_quadrilateral_and_little_more():
  # The coverage loop tests only the tiles of each band's span: a span missing a pixel centre inside the mapped
  # opaque box would cut the chair (undetectable by the warp tests, which share the layer map). Numpy reference:
  # every pixel centre inside each random rotated, sheared box, per band of 8 rows.
  rng = np.random.default_rng(0)
  k, rows, tile, h, w = 40, 12, 8, 96, 128
  quads, boxes = [], []
  for i in range(k):
    a = rng.normal(size=(2, 2)) * rng.uniform(0.2, 3.0)
    b = rng.uniform([-20, -20], [w + 20, h + 20])
    sx, sy = rng.uniform(2, 40, size=2)
    corners = np.array([[0, 0], [sx, 0], [0, sy], [sx, sy]], np.float64) - [sx / 2, sy / 2]
    q = corners @ a.T + b
    quads.append(q)
    lo, hi = np.floor(q.min(0)).astype(int), np.ceil(q.max(0)).astype(int)
    boxes.append([max(lo[0], 0), max(lo[1], 0), min(hi[0], w - 1), min(hi[1], h - 1)])
  quads, boxes = np.array(quads, np.float32), np.array(boxes, np.int32)
  lo, hi = (t.numpy() for t in sc._row_spans(tf.constant(quads), tf.constant(boxes), rows, tile))
  yy, xx = np.mgrid[0:rows * tile, 0:w]
  for i in range(k):
    ring = quads[i][[0, 1, 3, 2]].astype(np.float64)
    inside = np.ones(xx.shape, bool)
    sign = np.sign(np.cross(ring[1] - ring[0], ring[2] - ring[1]))
    for j in range(4):
      p, q = ring[j], ring[(j + 1) % 4]
      inside &= sign * ((q[0] - p[0]) * (yy - p[1]) - (q[1] - p[1]) * (xx - p[0])) >= 0
    inside &= (xx >= boxes[i, 0]) & (xx <= boxes[i, 2]) & (yy >= boxes[i, 1]) & (yy <= boxes[i, 3])
    for r in range(rows):
      cols = np.nonzero(inside[r * tile:(r + 1) * tile].any(0))[0]
      if cols.size:
        assert lo[i, r] <= cols[0] and cols[-1] <= hi[i, r], (i, r, cols[0], cols[-1], lo[i, r], hi[i, r])
  # The spans save work: for these rotated, sheared boxes they hold far fewer pixels than the bounding boxes.
  rows_of_box = [(boxes[:, 1] <= r * tile + tile - 1) & (boxes[:, 3] >= r * tile) for r in range(rows)]
  box_px = sum(((boxes[:, 2] - boxes[:, 0] + 1) * m).sum() for m in rows_of_box)
  span_px = sum((np.maximum(hi[:, r] - lo[:, r] + 1, 0) * rows_of_box[r]).sum() for r in range(rows))
  assert span_px < 0.8 * box_px, (span_px, box_px)
  # Quads entirely outside a band's rows give empty spans.
  far = np.array([[[10, 500], [20, 500], [10, 510], [20, 510]]], np.float32)
  lo, hi = (t.numpy() for t in sc._row_spans(tf.constant(far), tf.constant([[0, 0, w - 1, h - 1]], tf.int32),
                                             rows, tile))
  assert (lo > hi).all()


def test_packed_bilinear_samples_equal_a_numpy_bilinear_of_the_int32_table():
  # The renderer gathers 4-byte texels (r + 256 g + 65536 b) and accumulates the three channels in 21-bit lanes
  # of one int64: decoded, it must equal a plain per-channel numpy bilinear interpolation with the same 1/64 pixel
  # weight quantisation (exact integers), for two images stored one after the other in the table, at the image
  # borders (clamped coordinates) and with colour values up to 255 in every channel (no carry between lanes).
  rng = np.random.default_rng(3)
  images = [rng.integers(0, 256, (7, 9, 3), dtype=np.uint8), rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)]
  images[0][0, 0] = 255
  table = np.concatenate([sc._pack_rgb(im[None]).reshape(-1) for im in images])
  assert table.dtype == np.int32
  n = 400
  which = rng.integers(0, 2, n)
  heights = np.array([im.shape[0] for im in images])[which]
  widths = np.array([im.shape[1] for im in images])[which]
  bases = np.array([0, images[0].shape[0] * images[0].shape[1]])[which]
  x = rng.uniform(-1.5, widths + 0.5).astype(np.float32)
  y = rng.uniform(-1.5, heights + 0.5).astype(np.float32)
  x[:4], y[:4] = [0, widths[1] - 1, 3.999, 2.0], [0, heights[1] - 1, 0.001, 2.5]
  packed = sc._bilinear_packed(tf.constant(table), tf.constant(bases, tf.int32), tf.constant(heights, tf.int32),
                               tf.constant(widths, tf.int32), tf.constant(x), tf.constant(y))
  got = sc.unpack_rgb(packed).numpy()
  for i in range(n):
    im = images[which[i]].astype(np.int64)
    h, w = im.shape[:2]
    xc, yc = np.clip(x[i], 0, w - 1), np.clip(y[i], 0, h - 1)
    x0, y0 = int(np.floor(xc)), int(np.floor(yc))
    wx, wy = int(np.floor((xc - x0) * 64 + 0.5)), int(np.floor((yc - y0) * 64 + 0.5))
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    acc = (im[y0, x0] * (64 - wx) * (64 - wy) + im[y0, x1] * wx * (64 - wy) + im[y1, x0] * (64 - wx) * wy
           + im[y1, x1] * wx * wy)
    np.testing.assert_allclose(got[i], acc / (255 * 4096), rtol=0, atol=1e-7, err_msg=str(i))


def test_opaque_strips_cover_every_opaque_texel_and_do_not_change_the_output(monkeypatch):
  # Coverage tests only the tiles meeting the strips of each sprite's opaque box: the strips must hold every
  # opaque texel (else a chair would be cut, which the warp tests cannot see), stay inside the box, and rendering
  # with them must give the same bytes as with the whole box (one strip).
  rng = np.random.default_rng(5)
  sprites = np.zeros((3, 20, 20, 4), np.uint8)
  sprites[0, 3:15, 4:9, 3] = 255  # a back
  sprites[0, 12:15, 4:17, 3] = 255  # a seat
  sprites[0, 15:19, 5, 3] = 200  # a leg
  sprites[1, ..., 3] = (rng.random((20, 20)) > 0.7) * 255
  boxes = sc._sprite_boxes(sprites, strips=5)
  assert boxes.shape == (3, 6, 4)
  np.testing.assert_array_equal(boxes[2], np.tile([1, 1, 0, 0], (6, 1)))  # no opaque texel
  for i in range(2):
    ys, xs = np.nonzero(sprites[i, ..., 3] > 127)
    np.testing.assert_array_equal(boxes[i, 0], [xs.min(), ys.min(), xs.max(), ys.max()])
    strips = boxes[i, 1:]
    assert (strips[:, :2] >= boxes[i, 0, :2]).all() and (strips[:, 2:] <= boxes[i, 0, 2:]).all()
    held = np.zeros(len(xs), bool)
    for x0, y0, x1, y1 in strips:
      held |= (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    assert held.all()
  assert (boxes[0, 1:, 2] - boxes[0, 1:, 0]).min() < boxes[0, 0, 2] - boxes[0, 0, 0]  # tighter than the box

  cfg = _small_config(num_chairs=(8, 10))
  outputs = []
  for strips in (1, sc._STRIPS):
    monkeypatch.setattr(sc, "_STRIPS", strips)
    monkeypatch.setattr(sc, "_GENERATORS", {})
    g = sc.make_generator(cfg)
    outputs.append([_example(g, 2, i) for i in range(3)])
  for a, b in zip(*outputs):
    for k in a:
      assert a[k].tobytes() == b[k].tobytes(), k


# ------------------------------------------------------------------------------------------------------------
# Batches rendered in one call (Generator.draw per example, Generator.render per batch).


def test_batch_rows_have_the_bytes_of_examples_rendered_alone():
  # The training pipeline renders a whole batch per call; every row must be the example rendered alone (the
  # per-process batches of a step concatenate to the one-process batch only if rows ignore the batch size).
  cfg = _small_config()
  for g in (sc.make_generator(cfg), sc.make_generator(cfg, _aug_config(), (64, 96))):
    indices = [9, 2, 5]
    batch = {k: v.numpy() for k, v in g.batch(tf.constant(4, tf.int64), tf.constant(indices, tf.int64)).items()}
    assert batch["image1"].shape[0] == 3
    for row, index in enumerate(indices):
      alone = _example(g, 4, index)
      for k in alone:
        assert batch[k][row].tobytes() == alone[k].tobytes(), (row, k)
    assert not np.array_equal(batch["image1"][0], batch["image1"][1])


def test_photometric_colour_stage_follows_the_flowNet_formula():
  # The generator's colour stage (exact integer mean, batched parameters) against a float64 numpy evaluation of
  # augment.photometric's order on the same geometric render: colour, brightness, contrast about the mean grey
  # level (of every 4th row and column), clip, gamma, hash noise, clip.
  from data_pipelines import augment
  cfg = _small_config()
  g = sc.make_generator(cfg, _aug_config(), (64, 96))
  plain = sc.make_generator(cfg, _aug_config(photometric=False), (64, 96))
  seed = tf.constant(6, tf.int64)
  checked = 0
  for index in range(4):
    d = g.draw(seed, tf.constant(index, tf.int64))
    photo, keys = d["photo"].numpy().astype(np.float64), d["noise_keys"]
    got, ref = _example(g, 6, index), _example(plain, 6, index)
    for f in range(2):
      bright, con, col, gamma, sigma = photo[f, 0], photo[f, 1], photo[f, 2:5], photo[f, 5], photo[f, 6]
      img = ref[f"image{f + 1}"].astype(np.float64) * col + bright
      mean = img[::4, ::4].mean()
      img = np.clip(mean + (1 + con) * (img - mean), 0, 1) ** gamma
      img = img + augment.hash_normal(keys[f], (64, 96, 3)).numpy() * sigma
      np.testing.assert_allclose(got[f"image{f + 1}"], np.clip(img, 0, 1), rtol=0, atol=2e-4)
      checked += sigma > 0.005 and abs(con) > 0.1
  assert checked >= 2  # noise and contrast really exercised
