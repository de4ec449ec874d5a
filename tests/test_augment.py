"""Tests of data_pipelines.augment against numpy references: geometry, flow transform, warp consistency."""

import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import augment

H, W = 72, 96


def np_bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Samples img (H, W, C) at float coords (pixel centres at integers); 0 outside. Returns (values, inside)
  where inside = every corner with non-zero weight lies in the image."""
  h, w = img.shape[:2]
  x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
  ax, ay = (x - x0)[..., None], (y - y0)[..., None]
  out = np.zeros(x.shape + img.shape[2:], np.float64)
  inside = np.ones(x.shape, bool)
  for dy, wy in ((0, 1 - ay), (1, ay)):
    for dx, wx in ((0, 1 - ax), (1, ax)):
      xi, yi = x0 + dx, y0 + dy
      ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
      weight = (wx * wy)
      inside &= ok | (weight[..., 0] == 0)
      out += np.where(ok[..., None], img[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)], 0) * weight
  return out, inside


def texture(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """A smooth RGB texture defined everywhere (periods 14-40 px), values in [0, 1]."""
  r = 0.5 + 0.25 * np.sin(x / 6.0) + 0.2 * np.cos(y / 4.5)
  g = 0.5 + 0.3 * np.sin((x + y) / 7.0)
  b = 0.5 + 0.3 * np.cos((x - 2 * y) / 9.0)
  return np.stack([r, g, b], -1).astype(np.float32)


def smooth_pair(h: int = H, w: int = W) -> dict[str, np.ndarray]:
  """image2 = texture; flow smooth; image1(x) = texture(x + flow(x)) so that I1(x) = I2(x + flow(x)) exactly."""
  y, x = np.mgrid[0:h, 0:w].astype(np.float64)
  u = 3.0 + 2.5 * np.sin(y / 15.0)
  v = -2.0 + 1.5 * np.cos(x / 20.0)
  return {"image1": texture(x + u, y + v), "image2": texture(x, y),
          "flow": np.stack([u, v], -1).astype(np.float32), "valid": np.ones((h, w), np.float32)}


def identity_config():
  c = augment.default_config()
  c.translate, c.rotate, c.zoom, c.squeeze = 0.0, 0.0, (1.0, 1.0), (1.0, 1.0)
  c.relative_translate, c.relative_rotate, c.relative_zoom = 0.0, 0.0, (1.0, 1.0)
  c.photometric = False
  return c


def run(element, seed=0, index=0, config=None, crop=(H, W)):
  tf_el = {k: tf.constant(v) for k, v in element.items()}
  out = augment.augment(tf_el, seed, index, config or augment.default_config(), crop)
  return {k: v.numpy() for k, v in out.items()}


def test_projective_transform_uses_integer_pixel_centres():
  img = np.random.default_rng(0).random((6, 7, 1)).astype(np.float32)
  eye = tf.eye(2, dtype=tf.float64)
  half = augment.resample(tf.constant(img), eye, tf.constant([0.5, 0.0], tf.float64), (6, 7)).numpy()
  np.testing.assert_allclose(half[:, :6], (img[:, :6] + img[:, 1:]) / 2, rtol=1e-6)
  np.testing.assert_allclose(half[:, 6], img[:, 6] / 2, rtol=1e-6)  # right neighbour is outside: 0
  m = tf.constant([[2.0, 0.0], [0.0, 2.0]], tf.float64)
  down = augment.resample(tf.constant(img), m, tf.constant([1.0, 0.0], tf.float64), (3, 3)).numpy()
  np.testing.assert_array_equal(down, img[0:6:2, 1:7:2])


def test_identity_parameters_give_identical_pair():
  rng = np.random.default_rng(1)
  el = {"image1": rng.random((H, W, 3), np.float32), "image2": rng.random((H, W, 3), np.float32),
        "flow": (rng.standard_normal((H, W, 2)) * 7).astype(np.float32), "valid": np.ones((H, W), np.float32)}
  out = run(el, config=identity_config())
  for k in el:
    np.testing.assert_array_equal(out[k], el[k], err_msg=k)
  # A smaller crop without other changes is the centre crop, still bit-exact.
  out = run(el, config=identity_config(), crop=(64, 80))
  for k in el:
    np.testing.assert_array_equal(out[k], el[k][4:68, 8:88], err_msg=k)


def test_flow_transform_matches_numpy_formula():
  rng = np.random.default_rng(2)
  flow = (rng.standard_normal((H, W, 2)) * 4).astype(np.float32)
  valid = (rng.random((H, W)) > 0.1).astype(np.float32)
  flow[valid == 0] = 1e10  # garbage at invalid pixels must not leak
  el = {"image1": rng.random((H, W, 3), np.float32), "image2": rng.random((H, W, 3), np.float32),
        "flow": flow, "valid": valid}
  a = 0.3
  m1 = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) / 1.3
  t1 = np.array([20.0, 5.0])
  m2 = m1 @ np.array([[1.02, 0.01], [-0.02, 0.99]])
  t2 = t1 + np.array([1.5, -0.7])
  hc, wc = 40, 56
  out = augment.apply_geometric({k: tf.constant(v) for k, v in el.items()}, tf.constant(m1), tf.constant(t1),
                                tf.constant(m2), tf.constant(t2), (hc, wc))
  out = {k: v.numpy() for k, v in out.items()}
  y, x = np.mgrid[0:hc, 0:wc].astype(np.float64)
  px = m1[0, 0] * x + m1[0, 1] * y + t1[0]
  py = m1[1, 0] * x + m1[1, 1] * y + t1[1]
  f, inside = np_bilinear(np.where(valid[..., None] > 0, flow, 0).astype(np.float64), px, py)
  vs, _ = np_bilinear(valid[..., None].astype(np.float64), px, py)
  expect_valid = inside & (vs[..., 0] > 1 - 1e-6)
  qx, qy = px + f[..., 0] - t2[0], py + f[..., 1] - t2[1]
  inv = np.linalg.inv(m2)
  expect = np.stack([inv[0, 0] * qx + inv[0, 1] * qy - x, inv[1, 0] * qx + inv[1, 1] * qy - y], -1)
  np.testing.assert_array_equal(out["valid"], expect_valid.astype(np.float32))
  assert 0.3 < expect_valid.mean() < 0.95  # the test exercises both valid and invalid pixels
  np.testing.assert_allclose(out["flow"][expect_valid], expect[expect_valid], atol=2e-3)
  assert np.all(out["flow"][~expect_valid] == 0)
  im1, _ = np_bilinear(el["image1"].astype(np.float64), px, py)
  np.testing.assert_allclose(out["image1"], im1, atol=1e-5)
  im2, _ = np_bilinear(el["image2"].astype(np.float64), m2[0, 0] * x + m2[0, 1] * y + t2[0],
                       m2[1, 0] * x + m2[1, 1] * y + t2[1])
  np.testing.assert_allclose(out["image2"], im2, atol=1e-5)


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_augmented_pair_stays_warp_consistent(index):
  el = smooth_pair()
  el["occlusion"] = np.zeros((H, W), np.float32)
  c = augment.default_config()
  c.photometric = False
  c.squeeze = (0.9, 1.1)
  crop = (48, 64)
  out = run(el, seed=7, index=index, config=c, crop=crop)
  y, x = np.mgrid[0:crop[0], 0:crop[1]].astype(np.float64)
  warped, inside = np_bilinear(out["image2"].astype(np.float64), x + out["flow"][..., 0], y + out["flow"][..., 1])
  mask = (out["valid"] > 0) & (out["occlusion"] == 0) & inside
  assert mask.mean() > 0.5
  err = np.abs(warped - out["image1"])[mask].mean()
  # Bilinear resampling of the smooth texture leaves a small residual; ignoring the flow is far worse.
  zero_flow_err = np.abs(out["image2"] - out["image1"])[mask].mean()
  assert err < 0.01, err
  assert zero_flow_err > 5 * err
  # Pixels flagged out of view really have their target outside the crop.
  oov = out["occlusion"] > 0
  tx, ty = x + out["flow"][..., 0], y + out["flow"][..., 1]
  np.testing.assert_array_equal(oov, (tx < 0) | (tx > crop[1] - 1) | (ty < 0) | (ty > crop[0] - 1))


def test_default_ranges_keep_frame1_crop_inside_source():
  el = smooth_pair()
  for index in range(6):
    out = run(el, seed=3, index=index, crop=(64, 80))
    assert out["valid"].min() == 1.0, index  # fit_crop: frame 1 always has source data
    assert out["image1"].shape == (64, 80, 3) and out["flow"].shape == (64, 80, 2)


def test_without_fit_crop_out_of_source_pixels_are_invalid():
  c = identity_config()
  c.fit_crop = False
  c.translate = 0.5
  el = smooth_pair()
  seen = 0
  for index in range(8):
    p = augment.sample_params(5, index, c)
    out = run(el, seed=5, index=index, config=c)
    shift_x, shift_y = float(p["tx"]) * W, float(p["ty"]) * W
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    sx, sy = x + shift_x, y + shift_y
    inside = (sx >= 0) & (sx <= W - 1) & (sy >= 0) & (sy <= H - 1)
    np.testing.assert_array_equal(out["valid"] > 0, inside)
    seen += (~inside).sum()
  assert seen > 0


def test_photometric_matches_numpy_formula():
  rng = np.random.default_rng(4)
  img = rng.random((20, 24, 3)).astype(np.float32)
  b, c, col, g = 0.07, -0.3, np.array([0.8, 1.3, 1.1]), 1.2
  out = augment.photometric(tf.constant(img), b, c, col, g, 0.0, None).numpy()
  ref = img.astype(np.float64) * col + b
  mean = ref.mean()
  ref = np.clip(mean + (1 + c) * (ref - mean), 0, 1) ** g
  np.testing.assert_allclose(out, np.clip(ref, 0, 1), atol=1e-5)
  grey = np.full((64, 64, 3), 0.5, np.float32)
  noisy = augment.photometric(tf.constant(grey), 0.0, 0.0, np.ones(3), 1.0, 0.03, tf.constant([1, 2], tf.int64))
  noise = noisy.numpy() - 0.5
  assert abs(noise.std() - 0.03) < 0.002 and abs(noise.mean()) < 0.002


def draw_params(config, n):
  """sample_params(0, i, config) for i < n."""
  return [augment.sample_params(0, i, config) for i in range(n)]


def test_photometric_parameters_follow_config_ranges_and_symmetry():
  c = augment.default_config()
  draws = draw_params(c, 100)
  con = np.array([float(d["contrast1"]) for d in draws])
  col = np.stack([d["color1"].numpy() for d in draws])
  gam = np.array([float(d["gamma1"]) for d in draws])
  noise = np.array([float(d["noise_sigma"]) for d in draws])
  rot = np.array([float(d["rot"]) for d in draws]) * 180 / np.pi
  assert con.min() >= -0.8 and con.max() <= 0.4 and con.max() - con.min() > 1.0
  assert col.min() >= 0.5 and col.max() <= 2.0 and gam.min() >= 0.7 and gam.max() <= 1.5
  assert noise.min() >= 0 and noise.max() <= 0.04 and np.abs(rot).max() <= 17 and np.abs(rot).max() > 15
  assert all(float(d["brightness1"]) == float(d["brightness2"]) for d in draws[:5])
  c.asymmetric = True
  d = draw_params(c, 1)[0]
  assert float(d["brightness1"]) != float(d["brightness2"])
  assert abs(float(d["gamma2"]) / float(d["gamma1"]) - 1) <= 0.02


def test_stateless_determinism_and_batches():
  el = smooth_pair()
  a = run(el, seed=11, index=5, crop=(48, 64))
  b = run(el, seed=11, index=5, crop=(48, 64))
  c = run(el, seed=11, index=6, crop=(48, 64))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["image1"], c["image1"])
  batch = {k: np.stack([v, v]) for k, v in el.items()}
  out = run(batch, seed=11, index=5, crop=(48, 64))
  for k in a:
    np.testing.assert_allclose(out[k][0], a[k], atol=1e-6)
    np.testing.assert_allclose(out[k][1], c[k], atol=1e-6)
  out = run(batch, seed=11, index=np.array([6, 5], np.int64), crop=(48, 64))
  np.testing.assert_allclose(out["flow"][0], c["flow"], atol=1e-6)


def test_bad_inputs_raise_clear_errors():
  el = smooth_pair()
  with pytest.raises(KeyError, match="no 'valid'"):
    run({k: v for k, v in el.items() if k != "valid"})
  with pytest.raises(KeyError, match="unknown keys"):
    run({**el, "depth": el["valid"]})
  with pytest.raises(ValueError, match="image1 must be"):
    run({**el, "image1": el["image1"][0]})


def test_pow_unit_matches_numpy():
  x = np.concatenate([[0.0, 1e-30, 1e-8, 1e-3], np.linspace(0.0, 1.0, 5001)]).astype(np.float32)
  for g in (0.5, 0.7, 1.0, 1.2, 1.5, 2.0):
    got = augment.pow_unit(tf.constant(x), tf.constant(g, tf.float32)).numpy()
    ref = x.astype(np.float64) ** g
    np.testing.assert_allclose(got, ref, rtol=3e-5, atol=1e-12)
    assert augment.pow_unit(tf.constant([1.0]), tf.constant(g, tf.float32)).numpy()[0] == 1.0


def test_hash_normal_is_keyed_standard_noise():
  key = tf.constant([11, 12], tf.int64)
  z = augment.hash_normal(key, (300, 400)).numpy()
  assert z.shape == (300, 400) and z.dtype == np.float32
  np.testing.assert_array_equal(z, augment.hash_normal(key, (300, 400)).numpy())
  assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01
  assert abs(np.corrcoef(z[:, :-1].ravel(), z[:, 1:].ravel())[0, 1]) < 0.01  # neighbours independent
  assert abs(np.corrcoef(z[:-1].ravel(), z[1:].ravel())[0, 1]) < 0.01
  assert np.abs(z).max() < 3.5 and (np.abs(z) > 2).mean() == pytest.approx(0.0455, abs=0.01)
  for other in ([11, 13], [12, 12]):
    w = augment.hash_normal(tf.constant(other, tf.int64), (300, 400)).numpy()
    assert abs(np.corrcoef(z.ravel(), w.ravel())[0, 1]) < 0.01


def test_hash_normal_rows_of_a_key_batch_equal_single_keys():
  keys = tf.constant([[11, 12], [3, -4], [11, 13]], tf.int64)
  batch = augment.hash_normal(keys, (5, 7, 3)).numpy()
  assert batch.shape == (3, 5, 7, 3)
  for i in range(3):
    np.testing.assert_array_equal(batch[i], augment.hash_normal(keys[i], (5, 7, 3)).numpy())
  assert not np.array_equal(batch[0], batch[2])
