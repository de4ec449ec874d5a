"""parallel.per_image: a per-image computation under a batch-sharded jit runs on each device's own images (no
activations moved), gives one device's values, works under vmap, and rejects a malformed rule by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxflow import parallel
from sharding_helpers import collectives

RULE = "... n c, ... n c -> ... n c, ... n"


def _loop(x, y):
  """A loop over the images (any leading axes): per image the running sum over pixels of x * y, and x . y per
  pixel plus the image's first pixel of y (so an image only ever mixes with itself)."""
  lead = x.shape[:-2]

  def one(xy):
    a, b = xy
    return jnp.cumsum(a * b, axis=0), jnp.sum(a * b, axis=-1) + b[0, 0]

  flat = lambda a: a.reshape((-1,) + a.shape[-2:])
  s, d = jax.lax.map(one, (flat(x), flat(y)))
  return s.reshape(lead + s.shape[1:]), d.reshape(lead + d.shape[1:])


def _numpy(x, y):
  return np.cumsum(x * y, axis=-2), np.sum(x * y, axis=-1) + y[..., :1, 0]


def _data(shape, seed):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape).astype(np.float32) for _ in range(2))


def _mesh():
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices (tests/conftest.py simulates them)")
  return parallel.make_mesh(2)


def test_each_device_loops_over_its_own_images_with_one_devices_values():
  mesh = _mesh()
  sharding = parallel.data_sharding(mesh)
  x, y = _data((4, 10, 3), 1)
  sx, sy = jax.device_put(x, sharding), jax.device_put(y, sharding)
  # The plain loop under the sharded jit: XLA all-gathers the batch (what per_image is for; the check has teeth).
  plain = jax.jit(_loop, in_shardings=(sharding, sharding))
  assert collectives(plain.lower(sx, sy).compile().as_text())
  fn = jax.jit(parallel.per_image(_loop, RULE), in_shardings=(sharding, sharding))
  hlo = fn.lower(sx, sy).compile().as_text()
  assert not collectives(hlo), collectives(hlo)[:3]
  assert "while(" in hlo and "f32[2,10,3]" in hlo and "f32[4,10,3]" not in hlo  # the device's 2 images
  s, d = fn(sx, sy)
  assert s.sharding.is_equivalent_to(sharding, 3) and d.sharding.is_equivalent_to(sharding, 2)
  es, ed = _numpy(x, y)
  np.testing.assert_allclose(np.asarray(s), es, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(d), ed, rtol=1e-5, atol=1e-6)
  # One device: the same values (the wrapper inlines the loop).
  one = jax.jit(parallel.per_image(_loop, RULE))(x, y)
  np.testing.assert_array_equal(np.asarray(one[0]), np.asarray(s))
  np.testing.assert_array_equal(np.asarray(one[1]), np.asarray(d))


def test_vmap_adds_a_leading_image_axis_and_keeps_the_batch_sharding():
  mesh = _mesh()
  fn = parallel.per_image(_loop, RULE)
  x, y = _data((3, 4, 6, 2), 2)   # (vmap 3, batch 4, N, C), sharded on the batch
  by_b = jax.NamedSharding(mesh, jax.P(None, "data"))
  vm = jax.jit(jax.vmap(fn), in_shardings=(by_b, by_b))
  hlo = vm.lower(x, y).compile().as_text()
  assert not collectives(hlo), collectives(hlo)[:3]
  assert "f32[3,2,6,2]" in hlo and "f32[3,4,6,2]" not in hlo
  s, d = vm(x, y)
  es, ed = _numpy(x, y)
  np.testing.assert_allclose(np.asarray(s), es, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(d), ed, rtol=1e-5, atol=1e-6)
  # An unbatched operand is broadcast over the vmapped axis.
  s2, d2 = jax.jit(jax.vmap(fn, in_axes=(0, None)))(x, y[0])
  es2, ed2 = _numpy(x, np.broadcast_to(y[0], x.shape))
  np.testing.assert_allclose(np.asarray(s2), es2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(d2), ed2, rtol=1e-5, atol=1e-6)


def test_a_single_result_and_a_sharded_per_image_axis():
  # One result term gives an array; an operand sharded on a per-image axis is resharded to whole images.
  mesh = _mesh()
  fn = parallel.per_image(lambda x, y: _loop(x, y)[0], "... n c, ... n c -> ... n c")
  x, y = _data((2, 8, 3), 3)
  by_n = jax.NamedSharding(mesh, jax.P(None, "data"))
  out = jax.jit(fn, in_shardings=(by_n, by_n))(x, y)
  assert isinstance(out, jax.Array)
  np.testing.assert_allclose(np.asarray(out), _numpy(x, y)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule,match", [
    ("n c, ... n c -> ... n c, ... n", "'n c'"),            # a term without the image axes
    ("... n c, ... n c", "'->'"),                            # no results
    ("... n c, ... n ... c -> ... n c, ... n", "'... n ... c'"),
])
def test_a_malformed_rule_is_rejected_naming_the_term(rule, match):
  with pytest.raises(ValueError, match=match):
    parallel.per_image(_loop, rule)


def test_operands_that_do_not_fit_the_rule_are_rejected():
  fn = parallel.per_image(_loop, RULE)
  x, y = _data((2, 5, 3), 4)
  with pytest.raises(ValueError, match="takes 2 operands, got 1"):
    fn(x)
  with pytest.raises(ValueError, match="operand 1 needs at least one image axis"):
    fn(x, y[0])
  with pytest.raises(ValueError, match="image axes differ"):
    fn(x, y[:1])
