"""parallel.per_image: a per-image computation under a batch-sharded jit runs on each device's own images (no
activations moved), gives one device's values (a result summed over the images: the devices' sums added), works
under vmap, and rejects a malformed rule by name."""

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


def _gram(x, g):
  """sum over the images of x_b^T g_b by a loop over the images (one leading axis), and per image x . g."""
  def body(t, k):
    return t + x[k].T @ g[k], None
  total, _ = jax.lax.scan(body, jnp.zeros((x.shape[-1], g.shape[-1]), x.dtype), jnp.arange(x.shape[0]))
  return total, jnp.sum(x, -1) * jnp.sum(g, -1)


GRAM = "... n c, ... n k -> c k, ... n"


def test_a_summed_result_is_each_devices_sum_added_over_the_devices():
  mesh = _mesh()
  sharding = parallel.data_sharding(mesh)
  rng = np.random.default_rng(5)
  x, g = rng.normal(size=(4, 6, 3)).astype(np.float32), rng.normal(size=(4, 6, 5)).astype(np.float32)
  fn = jax.jit(parallel.per_image(_gram, GRAM), in_shardings=(sharding, sharding))
  sx, sg = jax.device_put(x, sharding), jax.device_put(g, sharding)
  hlo = fn.lower(sx, sg).compile().as_text()
  assert not collectives(hlo), collectives(hlo)[:3]
  reduces = [line for line in hlo.splitlines() if " all-reduce(" in line or " all-reduce-start(" in line]
  assert len(reduces) == 1 and "f32[3,5]" in reduces[0], reduces   # the summed result only
  assert "f32[2,6,3]" in hlo and "f32[4,6,3]" not in hlo
  total, per = fn(sx, sg)
  assert total.sharding.is_fully_replicated and per.sharding.is_equivalent_to(sharding, 2)
  np.testing.assert_allclose(np.asarray(total), np.einsum("bnc,bnk->ck", x, g), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(per), x.sum(-1) * g.sum(-1), rtol=1e-5, atol=1e-5)
  # Replicated operands: each device has every image, nothing is added up twice.
  rep = jax.jit(parallel.per_image(_gram, GRAM), in_shardings=(parallel.replicated(mesh),) * 2)
  np.testing.assert_allclose(np.asarray(rep(x, g)[0]), np.einsum("bnc,bnk->ck", x, g), rtol=1e-5, atol=1e-5)
  # vmap: one sum per vmapped element (not over the vmapped axis), with an unbatched operand.
  vt, vp = jax.jit(jax.vmap(parallel.per_image(_gram, GRAM), in_axes=(0, None)))(np.stack([x, -2 * x]), g)
  np.testing.assert_allclose(np.asarray(vt), np.einsum("vbnc,bnk->vck", np.stack([x, -2 * x]), g), rtol=1e-5,
                             atol=1e-5)
  assert vp.shape == (2, 4, 6)


@pytest.mark.parametrize("rule,match", [
    ("n c, ... n c -> ... n c, ... n", "'n c'"),            # a first operand term without the image axes
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


def test_closed_over_constants_become_replicated_operands():
  # custom_partitioning refuses closed-over constants; a numpy gather index inside fn is passed to it instead.
  mesh = _mesh()
  sharding = parallel.data_sharding(mesh)
  order = np.arange(10)[::-1].copy()   # reverse each image's pixels
  fn = parallel.per_image(lambda x, y: _loop(jnp.take(x, order, axis=-2), y), RULE)
  x, y = _data((4, 10, 3), 6)
  jitted = jax.jit(fn, in_shardings=(sharding, sharding))
  hlo = jitted.lower(x, y).compile().as_text()
  assert not collectives(hlo), collectives(hlo)[:3]
  es, ed = _numpy(x[:, ::-1], y)
  s, d = jitted(x, y)
  np.testing.assert_allclose(np.asarray(s), es, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(d), ed, rtol=1e-5, atol=1e-6)


def test_one_device_process_calls_fn_directly(monkeypatch):
  x, y = _data((2, 5, 3), 7)
  assert "custom_partitioning" in str(jax.make_jaxpr(parallel.per_image(_loop, RULE))(x, y))
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  assert "custom_partitioning" not in str(jax.make_jaxpr(parallel.per_image(_loop, RULE))(x, y))


@pytest.mark.parametrize("mode,kernel,cin,cout", [("blocked", 3, 32, 32), ("split", 7, 16, 8),
                                                  ("winograd", 3, 64, 96)])
def test_conv_weight_gradients_are_summed_per_device(monkeypatch, mode, kernel, cin, cout):
  # conv's CPU weight gradients loop over images and row blocks; under the trainer's batch sharding each device
  # loops over its own images and only the (kh, kw, C_in, C_out) gradient is all-reduced (no all-gather), with one
  # device's values. Both conv2d and conv2d_concat (the parts path), small shapes with the thresholds lowered.
  from jaxflow.ops import conv
  from sharding_helpers import check_sharded_step
  _mesh()
  monkeypatch.setattr(conv, "_MIN_TAP_MACS", 0)
  monkeypatch.setattr(conv, "_WINOGRAD_WGRAD_MIN_POSITIONS", 64)
  pad = ((kernel // 2,) * 2,) * 2
  assert conv.weight_grad_mode(cin, cout, (1, 1), 4 * 16 * 16, (kernel, kernel), padding=pad,
                               image_positions=16 * 16, dtype=jnp.float32) == mode
  rng = np.random.default_rng(8)
  im1, im2 = (rng.normal(size=(4, 16, 16, cin // 2)).astype(np.float32) for _ in range(2))
  params = {"w": jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)) * 0.1, jnp.float32),
            "v": jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)) * 0.1, jnp.float32)}

  def loss(p, a, b):
    y = conv.conv2d(jnp.concatenate([a, b], -1), p["w"], padding=pad, impl="matmul")
    z = conv.conv2d_concat([a, b], p["v"], padding=pad, impl="matmul")
    return jnp.sum(jnp.sin(y) * z)

  hlo = check_sharded_step(loss, params, im1, im2)
  assert "all-reduce" in hlo


def test_winograd_loops_over_each_devices_images_with_the_kernel_whole():
  # winograd.conv3x3_same's loop over images (values and input gradients of the 3x3 convolutions): the kernel is
  # a whole operand (a term without '...'), x stays sharded; with output splits too; vmap with a shared kernel
  # and with a kernel per vmapped element.
  from jaxflow.ops import winograd
  mesh = _mesh()
  sharding = parallel.data_sharding(mesh)
  rng = np.random.default_rng(11)
  x = rng.normal(size=(4, 9, 10, 5)).astype(np.float32)
  w = (rng.normal(size=(3, 3, 5, 6)) * 0.2).astype(np.float32)
  ref = np.asarray(jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                dimension_numbers=("NHWC", "HWIO", "NHWC")))
  for splits in (None, (2, 4), (6,)):
    fn = jax.jit(lambda a, k: winograd.conv3x3_same(a, k, splits=splits),
                 in_shardings=(sharding, parallel.replicated(mesh)))
    hlo = fn.lower(x, w).compile().as_text()
    assert not collectives(hlo), collectives(hlo)[:3]
    out = fn(jax.device_put(x, sharding), w)
    got = np.asarray(out) if splits is None else np.concatenate([np.asarray(o) for o in out], -1)
    assert splits is None or len(out) == len(splits)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  vx = np.stack([x, -x])
  vm = jax.jit(jax.vmap(winograd.conv3x3_same, in_axes=(0, None)))(vx, w)
  np.testing.assert_allclose(np.asarray(vm), np.stack([ref, -ref]), rtol=1e-4, atol=1e-4)
  vw = jax.jit(jax.vmap(winograd.conv3x3_same))(vx, np.stack([w, 2 * w]))
  np.testing.assert_allclose(np.asarray(vw), np.stack([ref, -2 * ref]), rtol=1e-4, atol=1e-4)
