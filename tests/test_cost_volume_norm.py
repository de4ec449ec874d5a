"""PWC-Net's optional cosine cost volume (model field `cost_volume_norm`): numpy reference, scale invariance,
zero features, unchanged parameters, config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxflow.models import get_model
from jaxflow.models.pwcnet import PWCNet
from test_correlation import numpy_correlation


def _numpy_cost_volume(f1: np.ndarray, f2: np.ndarray, r: int, cosine: bool) -> np.ndarray:
  """Independent reference: test_correlation's numpy loop (mean over channels, zero outside), LeakyReLU 0.1;
  with cosine, vectors divided by their RMS over channels first."""
  f1 = f1.astype(np.float64)
  f2 = f2.astype(np.float64)
  if cosine:
    f1 = f1 / np.sqrt(np.mean(f1 ** 2, axis=-1, keepdims=True) + 1e-6)
    f2 = f2 / np.sqrt(np.mean(f2 ** 2, axis=-1, keepdims=True) + 1e-6)
  out = numpy_correlation(f1, f2, r, 1)
  return np.where(out > 0, out, 0.1 * out)


def _cost_volume(norm: str, f1, f2, r: int = 2) -> np.ndarray:
  model = PWCNet(search_range=r, cost_volume_norm=norm)
  return np.asarray(model.apply({}, jnp.asarray(f1), jnp.asarray(f2), method=PWCNet.cost_volume))


@pytest.mark.parametrize("norm", ["none", "cosine"])
def test_cost_volume_matches_numpy(norm):
  rng = np.random.default_rng(0)
  f1 = rng.normal(0.3, 1.0, (2, 6, 7, 5)).astype(np.float32) * rng.uniform(0.1, 3.0, (2, 6, 7, 1)).astype(np.float32)
  f2 = rng.normal(0.3, 1.0, (2, 6, 7, 5)).astype(np.float32)
  np.testing.assert_allclose(_cost_volume(norm, f1, f2), _numpy_cost_volume(f1, f2, 2, norm == "cosine"),
                             rtol=1e-4, atol=1e-5)


def test_cosine_is_invariant_to_feature_scale_and_bounded():
  rng = np.random.default_rng(1)
  f1 = rng.normal(size=(1, 5, 6, 8)).astype(np.float32)
  f2 = rng.normal(size=(1, 5, 6, 8)).astype(np.float32)
  scale1 = rng.uniform(0.2, 5.0, (1, 5, 6, 1)).astype(np.float32)  # per-pixel scales
  base = _cost_volume("cosine", f1, f2)
  np.testing.assert_allclose(_cost_volume("cosine", f1 * scale1, 3.0 * f2), base, rtol=1e-4, atol=1e-5)
  assert np.all(base <= 1.0 + 1e-5) and np.all(base >= -0.1 - 1e-5)
  # The paper's product is not scale invariant: the same check must fail there.
  raw = _cost_volume("none", f1, f2)
  assert not np.allclose(_cost_volume("none", f1 * scale1, 3.0 * f2), raw, rtol=1e-2, atol=1e-3)
  # A feature correlated with itself at zero displacement has cosine 1 at the centre channel.
  same = _cost_volume("cosine", f1, f1)
  np.testing.assert_allclose(same[..., 12], 1.0, rtol=1e-5)  # r = 2: channel 12 is (dx, dy) = (0, 0)


def test_cosine_zero_features_stay_zero_with_finite_gradients():
  rng = np.random.default_rng(2)
  f1 = rng.normal(size=(1, 4, 4, 6)).astype(np.float32)
  f2 = np.zeros((1, 4, 4, 6), np.float32)  # e.g. warped from outside the image
  model = PWCNet(search_range=1, cost_volume_norm="cosine")
  out = model.apply({}, jnp.asarray(f1), jnp.asarray(f2), method=PWCNet.cost_volume)
  assert np.all(np.asarray(out) == 0.0)
  grads = jax.grad(lambda a, b: jnp.sum(model.apply({}, a, b, method=PWCNet.cost_volume)), argnums=(0, 1))(
      jnp.asarray(f1), jnp.asarray(f2))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_cosine_keeps_the_parameter_tree():
  """Converted and trained checkpoints load into either form: the option adds no parameter."""
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  shapes = [jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(get_model("pwcnet", cost_volume_norm=n).init,
                                                                      jax.random.key(0), images, images))
            for n in ("none", "cosine")]
  assert shapes[0] == shapes[1]


def test_unknown_cost_volume_norm_is_an_error_naming_the_field():
  images = np.zeros((1, 64, 64, 3), np.float32)
  with pytest.raises(ValueError, match="cost_volume_norm"):
    get_model("pwcnet", cost_volume_norm="l2").init(jax.random.key(0), images, images)
