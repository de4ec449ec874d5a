"""steps.eval_sums / finalize_sums (the trainer's evaluation) against an independent numpy computation and
against jaxflow.metrics (the evaluators' metrics): EPE, outlier rates, KITTI Fl and the zero-flow baseline."""

import numpy as np
import jax.numpy as jnp

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
    assert means[f"out{t}px"] == (err > t).mean()
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
  for t in (1, 3, 5):
    np.testing.assert_allclose(ours[f"out{t}px"], ref[f"outlier_{t}px"], rtol=1e-6)
