"""Memory-only changes in jaxflow.models.layers: LeakyReLU's gradient taken from its output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxflow.models import layers


def _plain(x, slope):
  return jnp.where(x >= 0, x, slope * x)


def _inputs(dtype):
  rng = np.random.default_rng(0)
  special = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-30, -1e-30]
  x = np.r_[rng.standard_normal(200), special].astype(np.float32)
  g = rng.standard_normal(x.shape).astype(np.float32)
  return jnp.asarray(x, dtype), jnp.asarray(g, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("slope", [0.1, 0.2])
def test_leaky_relu_values_and_gradients_equal_the_plain_where(dtype, slope):
  # Bit for bit, including +-0, NaN and +-inf, against autodiff of the plain jnp.where.
  x, g = _inputs(dtype)
  y, vjp = jax.vjp(lambda x: layers.leaky_relu(x, slope), x)
  y_ref, vjp_ref = jax.vjp(lambda x: _plain(x, slope), x)
  assert y.dtype == dtype
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
  (dx,), (dx_ref,) = vjp(g), vjp_ref(g)
  assert dx.dtype == dtype
  np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32))
  # Expected by hand: g where x >= 0, slope * g elsewhere (NaN compares false).
  xn = np.asarray(x, np.float32)
  expect = np.where(xn >= 0, np.asarray(g, np.float32), np.asarray(slope * g, np.float32))
  np.testing.assert_array_equal(np.asarray(dx, np.float32), expect)


def test_leaky_relu_keeps_its_output_not_its_input_for_the_backward_pass():
  # The residuals of the VJP of leaky_relu(2 * x): the output y only (the pre-activation 2 * x is not kept).
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 5)), jnp.float32)
  f = lambda x: layers.leaky_relu(2.0 * x)
  y, vjp = jax.vjp(f, x)
  leaves = [np.asarray(a) for a in jax.tree.leaves(vjp) if getattr(a, "shape", None) == x.shape]
  assert leaves and all(np.array_equal(a, np.asarray(y)) for a in leaves)
  y_ref, vjp_ref = jax.vjp(lambda x: _plain(2.0 * x, 0.1), x)
  ref_leaves = [np.asarray(a) for a in jax.tree.leaves(vjp_ref) if getattr(a, "shape", None) == x.shape]
  assert not all(np.array_equal(a, np.asarray(y_ref)) for a in ref_leaves)  # the plain where keeps more


@pytest.mark.parametrize("slope", [0.0, -0.5])
def test_leaky_relu_without_a_positive_slope_is_the_plain_where(slope):
  # The output's sign no longer tells x's (slope 0: ReLU, y = 0 for x < 0): the plain gradient is used.
  x = jnp.asarray([-2.0, -0.5, 0.0, 1.5], jnp.float32)
  dx = jax.grad(lambda x: jnp.sum(layers.leaky_relu(x, slope)))(x)
  np.testing.assert_array_equal(np.asarray(dx), [slope, slope, 1.0, 1.0])


def test_leaky_relu_under_jit_and_vmap():
  x, g = _inputs(jnp.float32)
  x, g = x.reshape(3, -1)[:, :60], g.reshape(3, -1)[:, :60]
  f = jax.jit(jax.vmap(jax.grad(lambda v, w: jnp.sum(layers.leaky_relu(v) * w))))
  ref = jax.vmap(jax.grad(lambda v, w: jnp.sum(_plain(v, 0.1) * w)))
  np.testing.assert_array_equal(np.asarray(f(x, g)), np.asarray(ref(x, g)))
