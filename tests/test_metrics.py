"""Tests for jaxflow.metrics against an independent float64 numpy reference and constructed cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxflow import metrics


def _reference(pred, gt, valid, occ=None):
  """Dataset-level means over all valid pixels, written straight from the definitions in float64."""
  pred = np.asarray(pred, np.float64)
  gt = np.asarray(gt, np.float64)
  mask = np.asarray(valid) > 0.5
  mask &= np.all(np.isfinite(gt) & (np.abs(gt) <= 1e9), -1)
  epe = np.sqrt(((pred - np.where(mask[..., None], gt, 0)) ** 2).sum(-1))[mask]
  mag = np.sqrt((np.where(mask[..., None], gt, 0) ** 2).sum(-1))[mask]

  def mean(x):
    return float(np.mean(x)) if x.size else math.nan

  out = {
      "epe": mean(epe),
      "outlier_1px": mean(epe > 1),
      "outlier_3px": mean(epe > 3),
      "outlier_5px": mean(epe > 5),
      "fl_all": mean((epe > 3) & (epe / np.maximum(mag, 1e-30) > 0.05)),
      "s0_10": mean(epe[mag < 10]),
      "s10_40": mean(epe[(mag >= 10) & (mag < 40)]),
      "s40plus": mean(epe[mag >= 40]),
      "num_pixels": int(mask.sum()),
  }
  if occ is not None:
    occ_m = (np.asarray(occ) > 0.5)[mask]
    out["epe_occ"] = mean(epe[occ_m])
    out["epe_noc"] = mean(epe[~occ_m])
  return out


def _random_batch(seed, batch=2, height=24, width=32, scale=25.0):
  # One shape for every random batch, so the jitted metrics compile once for the whole module.
  rng = np.random.default_rng(seed)
  gt = rng.normal(scale=scale, size=(batch, height, width, 2)).astype(np.float32)
  pred = (gt + rng.normal(scale=4.0, size=gt.shape)).astype(np.float32)
  valid = (rng.random((batch, height, width)) > 0.2).astype(np.float32)
  occ = (rng.random((batch, height, width)) > 0.7).astype(np.float32)
  return pred, gt, valid, occ


def _assert_close(got, ref, rtol=1e-5):
  assert set(got) == set(ref), sorted(set(got) ^ set(ref))
  for key, value in ref.items():
    if isinstance(value, float) and math.isnan(value):
      assert math.isnan(float(got[key])), key
    else:
      assert float(got[key]) == pytest.approx(value, rel=rtol, abs=1e-6), key


def test_flow_metrics_match_numpy_reference_on_random_inputs():
  pred, gt, valid, occ = _random_batch(0)
  got = metrics.flow_metrics(pred, gt, valid, occ)
  ref = _reference(pred, gt, valid, occ)
  _assert_close(got, ref)
  # The random data exercises every band and both occlusion classes.
  sums = metrics.flow_metric_sums(pred, gt, valid, occ)
  for key in ("s0_10_count", "s10_40_count", "s40plus_count", "occ_count", "noc_count"):
    assert int(sums[key]) > 50, key
  without_occ = metrics.flow_metrics(pred, gt, valid)
  assert "epe_occ" not in without_occ and without_occ["epe"] == pytest.approx(ref["epe"], rel=1e-5)


def test_exact_constructed_cases():
  # Eight pixels with chosen ground truth and errors (along u, so EPE = |du|).
  gt_u = np.array([0.0, 5.0, 100.0, 50.0, 10.0, 39.0, 40.0, 0.0], np.float32)
  err = np.array([0.5, 1.0, 4.0, 4.0, 6.0, 3.5, 1.5, 100.0], np.float32)
  gt = np.zeros((1, 1, 8, 2), np.float32)
  gt[..., 0] = gt_u
  pred = gt.copy()
  pred[..., 0] += err
  valid = np.ones((1, 1, 8), np.float32)
  valid[..., 7] = 0  # the huge error is masked out
  got = metrics.flow_metrics(pred, gt, valid)
  kept = err[:7]
  assert got["num_pixels"] == 7 and isinstance(got["num_pixels"], int) and isinstance(got["epe"], float)
  assert got["epe"] == pytest.approx(kept.mean(), rel=1e-6)
  assert got["outlier_1px"] == pytest.approx(5 / 7)  # 1.0 is not > 1
  assert got["outlier_3px"] == pytest.approx(4 / 7)  # 4, 4, 6, 3.5
  assert got["outlier_5px"] == pytest.approx(1 / 7)  # 6
  # Fl: 4 vs 5 % of 100 = 5 -> no; 4 vs 2.5 -> yes; 6 vs 0.5 -> yes; 3.5 vs 1.95 -> yes.
  assert got["fl_all"] == pytest.approx(3 / 7)
  # Speed bands [0, 10), [10, 40), [40, inf): 10 goes to s10_40 and 40 to s40plus.
  assert got["s0_10"] == pytest.approx((0.5 + 1.0) / 2)
  assert got["s10_40"] == pytest.approx((6.0 + 3.5) / 2)
  assert got["s40plus"] == pytest.approx((4.0 + 4.0 + 1.5) / 3)


def test_empty_band_and_no_valid_pixels_give_nan():
  gt = np.ones((1, 4, 4, 2), np.float32)
  got = metrics.flow_metrics(gt + 1, gt, np.ones((1, 4, 4)))
  assert got["epe"] == pytest.approx(math.sqrt(2))
  assert math.isnan(got["s10_40"]) and math.isnan(got["s40plus"])
  got = metrics.flow_metrics(gt, gt, np.zeros((1, 4, 4)))
  assert got["num_pixels"] == 0 and math.isnan(got["epe"])


def test_unknown_ground_truth_is_excluded():
  pred, gt, valid, _ = _random_batch(1)
  gt[0, 0, 0] = [1e10, 0]
  gt[0, 1, 1] = [np.nan, 0]
  got = metrics.flow_metrics(pred, gt, valid)
  assert np.isfinite(got["epe"])
  manual_valid = valid.copy()
  manual_valid[0, 0, 0] = manual_valid[0, 1, 1] = 0
  assert got["num_pixels"] == int((manual_valid > 0.5).sum())
  _assert_close(got, _reference(pred, gt, manual_valid))


def test_sums_over_batches_give_dataset_level_mean():
  # Batches with very different numbers of valid pixels: the dataset mean is pixel-weighted.
  batches = [_random_batch(seed, scale=5.0 * (seed + 1)) for seed in range(3)]
  batches[0][2][:] = 0
  batches[0][2][:, :2, :3] = 1  # 12 valid pixels only, with much larger errors
  batches[0][0][:] = batches[0][1] + 10 * (batches[0][0] - batches[0][1])
  total = None
  for pred, gt, valid, occ in batches:
    total = metrics.accumulate_sums(total, metrics.flow_metric_sums(pred, gt, valid, occ))
  assert total["count"].dtype == np.int64 and total["epe_sum"].dtype == np.float64
  got = metrics.finalize(total)
  cat = [np.concatenate([b[i] for b in batches]) for i in range(4)]
  _assert_close(got, _reference(*cat))
  # Averaging per-batch means would be wrong (and differs measurably here).
  naive = np.mean([metrics.flow_metrics(*b)["epe"] for b in batches])
  assert abs(naive - got["epe"]) > 0.05 * got["epe"]
  with pytest.raises(ValueError, match="keys differ"):
    metrics.accumulate_sums(total, metrics.flow_metric_sums(*batches[0][:3]))


def test_jit_and_sharded_batch_give_same_sums():
  pred, gt, valid, occ = _random_batch(2)
  eager = metrics.flow_metric_sums(pred, gt, valid, occ)  # itself jitted
  jitted = jax.jit(lambda *a: metrics.flow_metric_sums(*a))(pred, gt, valid, occ)  # inside an outer jit
  mesh = jax.make_mesh((2,), ("data",))
  shard = jax.NamedSharding(mesh, jax.P("data"))
  args = [jax.device_put(x, shard) for x in (pred, gt, valid, occ)]
  sharded = jax.jit(metrics.flow_metric_sums)(*args)
  for key in eager:
    assert eager[key].dtype == (jnp.int32 if key.endswith("count") or "outlier" in key or "fl_all" in key
                                else jnp.float32), key
    np.testing.assert_allclose(np.asarray(jitted[key]), np.asarray(eager[key]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sharded[key]), np.asarray(eager[key]), rtol=1e-5)
  # finalize also works under jit on device values.
  means = jax.jit(metrics.finalize)(jitted)
  assert float(means["epe"]) == pytest.approx(_reference(pred, gt, valid)["epe"], rel=1e-5)
  # bfloat16 predictions are evaluated in float32.
  bf = metrics.flow_metrics(jnp.asarray(pred, jnp.bfloat16), gt, valid)
  ref = _reference(np.asarray(jnp.asarray(pred, jnp.bfloat16).astype(jnp.float32)), gt, valid)
  assert bf["epe"] == pytest.approx(ref["epe"], rel=1e-5)


def test_per_pixel_maps_and_per_image_epe():
  pred, gt, valid, _ = _random_batch(3, batch=3)
  epe_ref = np.sqrt(((pred.astype(np.float64) - gt) ** 2).sum(-1))
  np.testing.assert_allclose(metrics.endpoint_error(pred, gt), epe_ref, rtol=1e-6)
  np.testing.assert_array_equal(metrics.outlier_map(pred, gt, 3.0), (np.asarray(metrics.endpoint_error(pred, gt))
                                                                      > 3.0).astype(np.float32))
  mag = np.sqrt((gt.astype(np.float64) ** 2).sum(-1))
  fl_ref = (epe_ref > 3) & (epe_ref > 0.05 * mag)
  fl = np.asarray(metrics.fl_outlier_map(pred, gt))
  assert fl.dtype == np.float32 and (fl == fl_ref).mean() > 0.999  # float32 vs float64 at the boundary
  valid[1] = 0
  per_image = np.asarray(metrics.per_image_epe(pred, gt, valid))
  assert per_image.shape == (3,)
  for b in (0, 2):
    assert per_image[b] == pytest.approx(epe_ref[b][valid[b] > 0.5].mean(), rel=1e-5)
  assert math.isnan(per_image[1])


def test_shape_errors_name_the_shapes():
  pred = np.zeros((2, 8, 8, 2), np.float32)
  with pytest.raises(ValueError, match=r"pred \(2, 8, 8, 2\) and gt \(2, 8, 4, 2\)"):
    metrics.flow_metric_sums(pred, np.zeros((2, 8, 4, 2)))
  with pytest.raises(ValueError, match=r"valid has shape \(2, 8, 8, 1\), expected \(2, 8, 8\)"):
    metrics.flow_metric_sums(pred, pred, np.ones((2, 8, 8, 1)))
  with pytest.raises(ValueError, match="occlusion has shape"):
    metrics.flow_metric_sums(pred, pred, None, np.ones((8, 8)))
  with pytest.raises(ValueError, match="batched"):
    metrics.per_image_epe(pred[0], pred[0])
  with pytest.raises(ValueError, match="finalize"):
    metrics.finalize({"epe": 1.0})
  with pytest.raises(ValueError, match="scalar sums"):
    metrics.finalize({"count": np.array([3, 4]), "epe_sum": np.array([1.0, 2.0])})


def test_real_sintel_flows_with_occlusion_mask(shared_data):
  from jaxflow import flow_io  # pylint: disable=import-outside-toplevel

  sintel = shared_data / "sintel/training"
  gt = flow_io.read_flo(sintel / "flow/alley_1/frame_0002.flo")[None]
  pred = flow_io.read_flo(sintel / "flow/alley_1/frame_0001.flo")[None]  # a plausible "prediction"
  occ = (flow_io.read_png(sintel / "occlusions/alley_1/frame_0002.png")[..., 0] > 127).astype(np.float32)[None]
  invalid = (flow_io.read_png(sintel / "invalid/alley_1/frame_0002.png")[..., 0] > 127)[None]
  valid = (~invalid).astype(np.float32)
  assert 0.0 < occ.mean() < 0.2
  got = metrics.flow_metrics(pred, gt, valid, occ)
  _assert_close(got, _reference(pred, gt, valid, occ), rtol=1e-4)
  assert 0.0 < got["epe"] < 10.0 and got["epe_occ"] > got["epe_noc"]
