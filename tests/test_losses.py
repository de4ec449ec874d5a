"""Tests of jaxflow.losses against independent numpy computations written here from the definitions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxflow import losses

B, H, W = 2, 32, 48
LEVEL_SIZES = [(1, 1), (2, 3), (4, 6), (8, 12), (16, 24)]  # 1/32 ... 1/2 of (H, W), coarse to fine


def _np_downsample(flow: np.ndarray, valid: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """Masked block average, pixel by pixel with loops (integer factors only)."""
  h, w = size
  fy, fx = flow.shape[1] // h, flow.shape[2] // w
  out = np.zeros((flow.shape[0], h, w, 2), np.float64)
  out_valid = np.zeros((flow.shape[0], h, w), np.float64)
  for b in range(flow.shape[0]):
    for i in range(h):
      for j in range(w):
        block_valid = valid[b, i * fy:(i + 1) * fy, j * fx:(j + 1) * fx] > 0
        if block_valid.any():
          out[b, i, j] = flow[b, i * fy:(i + 1) * fy, j * fx:(j + 1) * fx][block_valid].mean(axis=0)
          out_valid[b, i, j] = 1.0
  return out, out_valid


def _np_loss(flows, flow, valid, weights, kind, reduction, div_flow=20.0, q=0.4, eps=0.01):
  total, levels = 0.0, []
  for pred, weight in zip(flows, weights):
    target, level_valid = _np_downsample(flow, valid, pred.shape[1:3])
    diff = (pred.astype(np.float64) - target) / div_flow
    if kind == "multiscale_epe":
      err = np.sqrt((diff ** 2).sum(-1))
    else:
      err = (np.abs(diff).sum(-1) + eps) ** q
    err = err * level_valid
    if reduction == "mean":
      level = err.sum() / max(level_valid.sum(), 1.0)
    else:
      level = err.reshape(err.shape[0], -1).sum(1).mean()
    levels.append(level)
    total += weight * level
  return total, levels


def _random_case(seed: int = 0):
  rng = np.random.default_rng(seed)
  flow = rng.normal(0, 5, (B, H, W, 2)).astype(np.float32)
  valid = (rng.random((B, H, W)) > 0.4).astype(np.float32)
  valid[0, :16, :16] = 0.0  # a whole 16x16 block invalid: the (2, 3) level has an invalid pixel
  valid[1] = 0.0
  valid[1, 5, 7] = 1.0  # a single valid pixel in the second example
  flows = [rng.normal(0, 5, (B, h, w, 2)).astype(np.float32) for h, w in LEVEL_SIZES]
  return flows, flow, valid


def test_default_config_fields():
  config = losses.default_config()
  assert config.kind == "multiscale_epe"
  assert tuple(config.weights) == (0.32, 0.08, 0.02, 0.01, 0.005)
  assert config.div_flow == 20.0 and config.q == 0.4 and config.eps == 0.01


def test_downsample_flow_matches_numpy_masked_pooling():
  _, flow, valid = _random_case(1)
  for size in LEVEL_SIZES:
    got_flow, got_valid = losses.downsample_flow(jnp.asarray(flow), jnp.asarray(valid), size)
    want_flow, want_valid = _np_downsample(flow, valid, size)
    np.testing.assert_array_equal(np.asarray(got_valid), want_valid)
    np.testing.assert_allclose(np.asarray(got_flow), want_flow, rtol=1e-5, atol=1e-5)
  # Values are not rescaled: a constant flow stays the same constant at every level.
  const = jnp.broadcast_to(jnp.asarray([3.0, -1.5]), (B, H, W, 2))
  down, down_valid = losses.downsample_flow(const, jnp.ones((B, H, W)), (4, 6))
  np.testing.assert_allclose(np.asarray(down), np.broadcast_to([3.0, -1.5], (B, 4, 6, 2)), rtol=0, atol=1e-6)
  assert float(down_valid.min()) == 1.0


def test_downsample_flow_fractional_factor():
  """A non-integer factor keeps constant flows exact, marks empty regions invalid and keeps valid ones."""
  valid = np.ones((1, H, W), np.float32)
  valid[:, :, 30:] = 0.0  # right part unknown
  const = jnp.broadcast_to(jnp.asarray([2.0, 4.0]), (1, H, W, 2))
  down, down_valid = losses.downsample_flow(const, jnp.asarray(valid), (10, 15))  # factor 3.2
  down, down_valid = np.asarray(down), np.asarray(down_valid)
  assert down_valid[:, :, :8].min() == 1.0 and down_valid[:, :, 11:].max() == 0.0
  np.testing.assert_allclose(down[down_valid > 0], np.broadcast_to([2.0, 4.0], down[down_valid > 0].shape),
                             rtol=1e-5)


@pytest.mark.parametrize("kind,reduction", [("multiscale_epe", "mean"), ("multiscale_epe", "sum"),
                                            ("robust", "sum"), ("robust", "mean")])
def test_compute_loss_matches_numpy(kind, reduction):
  flows, flow, valid = _random_case(2)
  weights = [0.32, 0.08, 0.02, 0.01, 0.005]
  config = losses.default_config()
  config.kind, config.reduction = kind, reduction
  full = np.random.default_rng(3).normal(0, 3, (B, H, W, 2)).astype(np.float32)
  outputs = {"flows": [jnp.asarray(f) for f in flows], "flow": jnp.asarray(full)}
  batch = {"flow": jnp.asarray(flow), "valid": jnp.asarray(valid)}
  loss, metrics = jax.jit(lambda o, b: losses.compute_loss(config, o, b))(outputs, batch)
  want, want_levels = _np_loss(flows, flow, valid, weights, kind, reduction)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  for i, level in enumerate(want_levels):
    np.testing.assert_allclose(float(metrics[f"loss_level{i}"]), level, rtol=1e-5)
  epe = np.sqrt(((full - flow) ** 2).sum(-1))
  np.testing.assert_allclose(float(metrics["epe"]), (epe * valid).sum() / valid.sum(), rtol=1e-5)
  assert float(metrics["loss"]) == float(loss)
  assert all(v.dtype == jnp.float32 and v.shape == () for v in metrics.values())


def test_robust_q_eps_and_div_flow_are_used():
  flows, flow, valid = _random_case(4)
  config = losses.default_config()
  config.kind, config.reduction, config.q, config.eps, config.div_flow = "robust", "sum", 0.7, 0.5, 5.0
  loss, _ = losses.compute_loss(config, {"flows": flows, "flow": jnp.asarray(flow)},
                                {"flow": jnp.asarray(flow), "valid": jnp.asarray(valid)})
  want, _ = _np_loss(flows, flow, valid, config.weights, "robust", "sum", div_flow=5.0, q=0.7, eps=0.5)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_perfect_prediction_gives_zero_loss_and_zero_gradient():
  _, flow, valid = _random_case(5)
  targets = [losses.downsample_flow(jnp.asarray(flow), jnp.asarray(valid), s)[0] for s in LEVEL_SIZES]
  batch = {"flow": jnp.asarray(flow), "valid": jnp.asarray(valid)}
  config = losses.default_config()

  def loss_of(flows):
    return losses.compute_loss(config, {"flows": flows, "flow": batch["flow"]}, batch)[0]

  # Eagerly the targets above and those inside the loss are bitwise equal (under jit, XLA may reassociate the
  # block average and the 1/div_flow scaling, leaving ~1e-9 rounding).
  assert float(loss_of(targets)) == 0.0
  # The end-point error has a zero (not NaN) gradient at a perfect prediction.
  grad = jax.jit(jax.grad(lambda p: losses.endpoint_error(p, targets[-1]).sum()))(targets[-1])
  assert not np.asarray(grad).any()
  # A wrong prediction gives a positive loss with finite, nonzero gradients at every level.
  loss, grads = jax.jit(jax.value_and_grad(loss_of))([t + 1.0 for t in targets])
  assert float(loss) > 0 and all(np.isfinite(np.asarray(g)).all() and np.asarray(g).any() for g in grads)


def test_bfloat16_flows_are_reduced_in_float32():
  flows, flow, valid = _random_case(6)
  batch = {"flow": jnp.asarray(flow), "valid": jnp.asarray(valid)}
  bf16 = [jnp.asarray(f).astype(jnp.bfloat16) for f in flows]
  loss, metrics = losses.compute_loss(losses.default_config(), {"flows": bf16, "flow": bf16[-1]}, {
      "flow": batch["flow"][:, ::2, ::2], "valid": batch["valid"][:, ::2, ::2]})
  assert loss.dtype == jnp.float32 and metrics["epe"].dtype == jnp.float32
  rounded = [np.asarray(f.astype(jnp.float32)) for f in bf16]
  want, _ = _np_loss(rounded, flow[:, ::2, ::2], valid[:, ::2, ::2], losses.FLOWNET_WEIGHTS, "multiscale_epe",
                     "mean")
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_missing_valid_means_all_pixels():
  flows, flow, _ = _random_case(7)
  loss, _ = losses.compute_loss(losses.default_config(), {"flows": flows, "flow": jnp.asarray(flow)},
                                {"flow": jnp.asarray(flow)})
  want, _ = _np_loss(flows, flow, np.ones((B, H, W)), losses.FLOWNET_WEIGHTS, "multiscale_epe", "mean")
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_bad_configs_and_inputs_raise():
  flows, flow, valid = _random_case(8)
  outputs = {"flows": flows, "flow": jnp.asarray(flow)}
  batch = {"flow": jnp.asarray(flow), "valid": jnp.asarray(valid)}
  config = losses.default_config()
  config.weights = [1.0, 1.0]
  with pytest.raises(ValueError, match=r"loss\.weights has 2 entries but the model returned 5 flows"):
    losses.compute_loss(config, outputs, batch)
  for field, value, pattern in (("kind", "l1", r"loss\.kind"), ("reduction", "max", r"loss\.reduction")):
    config = losses.default_config()
    config[field] = value
    with pytest.raises(ValueError, match=pattern):
      losses.compute_loss(config, outputs, batch)
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['weight'\]"):
    losses.compute_loss(ml_collections.ConfigDict({"weight": [1.0]}), outputs, batch)
  with pytest.raises(ValueError, match=r"batch\['valid'\] must have shape \(2, 32, 48\)"):
    losses.compute_loss(losses.default_config(), outputs, {"flow": batch["flow"], "valid": batch["valid"][0]})
  with pytest.raises(KeyError, match="flow"):
    losses.compute_loss(losses.default_config(), outputs, {"valid": batch["valid"]})
  with pytest.raises(ValueError, match=r"outputs\['flows'\]\[4\] must be a \(B, H, W, 2\) flow"):
    losses.compute_loss(losses.default_config(), {"flows": flows[:4] + [flows[4][..., :1]], "flow": flow}, batch)
  with pytest.raises(ValueError, match=r"outputs\['flow'\] has shape"):
    losses.compute_loss(losses.default_config(), {"flows": flows, "flow": flows[-1]}, batch)


def test_masked_epe_sum_matches_autodiff_of_the_plain_form():
  """losses.masked_epe_sum (own VJP) against sum(endpoint_error * valid) and its autodiff, with pixels where the
  difference is exactly zero (gradient 0, not NaN) and masked pixels (gradient 0); and against float64 numpy."""
  rng = np.random.default_rng(11)
  pred = rng.normal(size=(2, 5, 7, 2)).astype(np.float32)
  target = rng.normal(size=(2, 5, 7, 2)).astype(np.float32)
  target[0, 1, 2] = pred[0, 1, 2]  # zero difference
  valid = (rng.random((2, 5, 7)) > 0.3).astype(np.float32)
  valid[0, 1, 2] = 1.0
  plain = lambda p, t: jnp.sum(losses.endpoint_error(p, t) * valid)
  fused = lambda p, t: losses.masked_epe_sum(p, t, jnp.asarray(valid))
  (v1, g1), (v2, g2) = (jax.value_and_grad(f, (0, 1))(jnp.asarray(pred), jnp.asarray(target)) for f in (fused, plain))
  d = pred.astype(np.float64) - target
  norm = np.sqrt((d ** 2).sum(-1))
  np.testing.assert_allclose(float(v1), (norm * valid).sum(), rtol=1e-6)
  np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  expected = np.where(norm[..., None] > 0, d / np.where(norm > 0, norm, 1)[..., None], 0) * valid[..., None]
  np.testing.assert_allclose(np.asarray(g1[0]), expected, rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(g1[0])[0, 1, 2] == 0) and np.all(np.asarray(g1[0])[valid == 0] == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_multiscale_loss_with_and_without_the_fused_epe(reduction, monkeypatch):
  """The multiscale EPE loss and its gradient with masked_epe_sum (the default) equal autodiff of the plain form."""
  rng = np.random.default_rng(12)
  flow = jnp.asarray(rng.normal(size=(B, H, W, 2)) * 3, jnp.float32)
  valid = jnp.asarray(rng.random((B, H, W)) > 0.2, jnp.float32)
  flows = [jnp.asarray(rng.normal(size=(B, h, w, 2)) * 3, jnp.float32) for h, w in LEVEL_SIZES]
  got = {}
  for fused in (True, False):
    monkeypatch.setattr(losses, "_FUSED_EPE", fused)
    f = lambda fs: losses.multiscale_loss(fs, flow, valid, losses.FLOWNET_WEIGHTS, reduction=reduction)[0]
    got[fused] = jax.jit(jax.value_and_grad(f))(flows)  # a new function per setting: traced again
  np.testing.assert_allclose(float(got[True][0]), float(got[False][0]), rtol=1e-6)
  for a, b in zip(got[True][1], got[False][1]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)
