"""steps.eval_sums / finalize_sums (the trainer's evaluation) against an independent numpy computation and
against jaxflow.metrics (the evaluators' metrics): EPE, outlier rates, KITTI Fl, speed bands, the occluded /
non-occluded split and the zero-flow baseline; host accumulation exact where float32 sums are not."""

import numpy as np
import jax.numpy as jnp
import pytest

from jaxflow import metrics, steps


def _case(seed=0):
  rng = np.random.default_rng(seed)
  gt = rng.normal(0, 20, (2, 17, 23, 2)).astype(np.float32)
  # Errors spread over 0-12 px so every threshold (1, 3, 5 px; Fl's 3 px and 5 %) splits the pixels.
  pred = gt + rng.normal(0, 4, gt.shape).astype(np.float32)
  valid = (rng.random(gt.shape[:3]) > 0.3).astype(np.float32)
  # Fast pixels: 5 % of |gt| (~14 px) exceeds their error, so they are 3-px outliers but not Fl outliers.
  gt[0, :6, :6] = 200.0
  pred[0, :6, :6] = 200.0 + rng.normal(0, 4, (6, 6, 2))
  return pred, gt, valid


def test_eval_sums_match_numpy():
  pred, gt, valid = _case()
  means = steps.finalize_sums({k: np.asarray(v) for k, v in steps.eval_sums(jnp.asarray(pred), jnp.asarray(gt),
                                                                             jnp.asarray(valid)).items()})
  m = valid > 0.5
  err = np.sqrt(((pred.astype(np.float64) - gt) ** 2).sum(-1))[m]
  speed = np.sqrt((gt.astype(np.float64) ** 2).sum(-1))[m]
  np.testing.assert_allclose(means["epe"], err.mean(), rtol=1e-5)
  np.testing.assert_allclose(means["zero_epe"], speed.mean(), rtol=1e-5)
  for t in (1, 3, 5):
    assert means[f"outlier_{t}px"] == (err > t).mean()
  for name, lo, hi in (("s0_10", 0, 10), ("s10_40", 10, 40), ("s40plus", 40, np.inf)):
    np.testing.assert_allclose(means[name], err[(speed >= lo) & (speed < hi)].mean(), rtol=1e-5)
  assert means["num_pixels"] == m.sum()
  assert "epe_occ" not in means  # no occlusion given
  fl = ((err > 3.0) & (err > 0.05 * speed)).mean()
  assert 0.05 < fl < 0.95  # the case exercises both sides of the rule
  assert means["fl_all"] == fl
  assert (err > 3.0).mean() != fl  # the relative part of the rule matters on this case


def test_eval_sums_agree_with_metrics_module():
  pred, gt, valid = _case(1)
  ours = steps.finalize_sums({k: np.asarray(v) for k, v in steps.eval_sums(jnp.asarray(pred), jnp.asarray(gt),
                                                                             jnp.asarray(valid)).items()})
  ref = metrics.flow_metrics(pred, gt, valid)
  np.testing.assert_allclose(ours["epe"], ref["epe"], rtol=1e-5)
  np.testing.assert_allclose(ours["fl_all"], ref["fl_all"], rtol=1e-6)
  assert set(ours) == set(ref) | {"zero_epe"}
  for k, v in ref.items():
    np.testing.assert_allclose(ours[k], v, rtol=1e-6)


def test_eval_sums_occlusion_split_and_unknown_flow():
  pred, gt, valid = _case(2)
  occ = (np.random.default_rng(3).random(valid.shape) > 0.6).astype(np.float32)
  gt[1, 0, :5] = 1e10  # unknown ground truth (the .flo convention): never evaluated, not even by zero_epe
  sums = steps.eval_sums(jnp.asarray(pred), jnp.asarray(gt), jnp.asarray(valid), jnp.asarray(occ))
  means = steps.finalize_sums(metrics.accumulate_sums(None, sums))
  m = (valid > 0.5) & (np.abs(gt) < 1e9).all(-1)
  err = np.sqrt(((pred.astype(np.float64) - gt) ** 2).sum(-1))
  speed = np.sqrt((gt.astype(np.float64) ** 2).sum(-1))
  np.testing.assert_allclose(means["epe_occ"], err[m & (occ > 0.5)].mean(), rtol=1e-5)
  np.testing.assert_allclose(means["epe_noc"], err[m & (occ <= 0.5)].mean(), rtol=1e-5)
  np.testing.assert_allclose(means["zero_epe"], speed[m].mean(), rtol=1e-5)
  assert means["num_pixels"] == m.sum()


def test_host_accumulation_is_exact_past_float32():
  # 2^24 + 1 pixels in float32 running sums would lose the last one; the trainer sums on the host in int64.
  one = {"count": np.int32(2 ** 24), "epe_sum": np.float32(2 ** 24), "zero_epe_sum": np.float32(0)}
  total = metrics.accumulate_sums(None, one)
  total = metrics.accumulate_sums(total, {"count": np.int32(1), "epe_sum": np.float32(3), "zero_epe_sum": np.float32(0)})
  assert np.float32(2 ** 24) + np.float32(1) == np.float32(2 ** 24)  # what a float32 total would do
  assert int(total["count"]) == 2 ** 24 + 1
  assert steps.finalize_sums(total)["epe"] == (2 ** 24 + 3) / (2 ** 24 + 1)


def test_finalize_sums_rejects_an_empty_evaluation():
  sums = steps.eval_sums(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 4, 4)))
  with pytest.raises(ValueError, match="no valid pixels"):
    steps.finalize_sums(metrics.accumulate_sums(None, sums))
