"""Tests of jaxflow.ops.warp / warp_with_mask against an independent numpy reference and exact cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxflow.ops import warp, warp_with_mask
from jaxflow.ops.warp import warp_reference
from sharding_helpers import collectives


def numpy_warp(image: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-by-pixel bilinear sampling of a zero-padded image in float64; also the in-image weight sum."""
  b, h, w, c = image.shape
  out = np.zeros(image.shape)
  weight_sum = np.zeros((b, h, w))
  for n in range(b):
    for y in range(h):
      for x in range(w):
        px = x + float(flow[n, y, x, 0])
        py = y + float(flow[n, y, x, 1])
        x0, y0 = int(np.floor(px)), int(np.floor(py))
        ax, ay = px - x0, py - y0
        for yy, wy in ((y0, 1 - ay), (y0 + 1, ay)):
          for xx, wx in ((x0, 1 - ax), (x0 + 1, ax)):
            if 0 <= yy < h and 0 <= xx < w:
              out[n, y, x] += wy * wx * image[n, yy, xx].astype(np.float64)
              weight_sum[n, y, x] += wy * wx
  return out, weight_sum


def _random(shape, seed, flow_scale=3.0):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=shape).astype(np.float32)
  flow = (rng.normal(size=shape[:3] + (2,)) * flow_scale).astype(np.float32)
  return image, flow


@pytest.mark.parametrize("shape", [(2, 9, 13, 3), (1, 16, 7, 5), (3, 5, 5, 1)])
def test_matches_numpy_reference(shape):
  image, flow = _random(shape, sum(shape))
  expected, _ = numpy_warp(image, flow)
  for fn in (warp, warp_reference, jax.jit(warp)):
    out = fn(jnp.asarray(image), jnp.asarray(flow))
    assert out.shape == shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def _shift_zero_fill(image: np.ndarray, u: int, v: int) -> np.ndarray:
  """out[y, x] = image[y + v, x + u], zero where that is outside (a shift with zero fill, no wrap-around)."""
  h, w = image.shape[1:3]
  out = np.zeros_like(image)
  ys, xs = slice(max(0, -v), min(h, h - v)), slice(max(0, -u), min(w, w - u))
  if ys.start < ys.stop and xs.start < xs.stop:
    out[:, ys, xs] = image[:, ys.start + v:ys.stop + v, xs.start + u:xs.stop + u]
  return out


@pytest.mark.parametrize("u,v", [(2, -1), (-3, 4), (0, 0), (7, 0), (0, -10), (20, 3)])
def test_integer_flow_is_an_exact_shift_with_zero_fill(u, v):
  image = np.random.default_rng(1).normal(size=(2, 10, 12, 3)).astype(np.float32)
  flow = np.broadcast_to(np.array([u, v], np.float32), (2, 10, 12, 2))
  warped, mask = warp_with_mask(jnp.asarray(image), jnp.asarray(flow))
  np.testing.assert_array_equal(np.asarray(warped), _shift_zero_fill(image, u, v))
  # Integer positions inside the image are valid, all others are not.
  np.testing.assert_array_equal(np.asarray(mask), _shift_zero_fill(np.ones((2, 10, 12, 1)), u, v)[..., 0])


def test_per_pixel_integer_flow_is_exact_indexing():
  rng = np.random.default_rng(2)
  image = rng.normal(size=(1, 8, 11, 4)).astype(np.float32)
  flow = rng.integers(-3, 4, size=(1, 8, 11, 2)).astype(np.float32)
  out = np.asarray(warp(jnp.asarray(image), jnp.asarray(flow)))
  for y in range(8):
    for x in range(11):
      sy, sx = y + int(flow[0, y, x, 1]), x + int(flow[0, y, x, 0])
      expected = image[0, sy, sx] if 0 <= sy < 8 and 0 <= sx < 11 else np.zeros(4, np.float32)
      np.testing.assert_array_equal(out[0, y, x], expected)


def test_partially_outside_sample_uses_inside_weights_only():
  image = np.arange(1, 13, dtype=np.float32).reshape(1, 3, 4, 1)
  flow = np.zeros((1, 3, 4, 2), np.float32)
  flow[0, 0, 0] = (-0.25, 0.0)   # x = -0.25: 0.75 of pixel (0, 0), 0.25 of the zero padding
  flow[0, 2, 3] = (0.5, 0.5)     # (3.5, 2.5): only the (2, 3) corner is inside, weight 0.25
  flow[0, 1, 1] = (0.5, -0.25)   # fully inside: bilinear of pixels (0..1, 1..2)
  warped, mask = warp_with_mask(jnp.asarray(image), jnp.asarray(flow))
  warped = np.asarray(warped)[0, :, :, 0]
  assert warped[0, 0] == pytest.approx(0.75 * 1.0)
  assert warped[2, 3] == pytest.approx(0.25 * 12.0)
  top = 0.5 * 2 + 0.5 * 3
  mid = 0.5 * 6 + 0.5 * 7
  assert warped[1, 1] == pytest.approx(0.25 * top + 0.75 * mid)
  mask = np.asarray(mask)[0]
  assert mask[0, 0] == 0 and mask[2, 3] == 0 and mask[1, 1] == 1
  assert mask.dtype == np.float32 and mask.shape == (3, 4)


def test_mask_rule_weight_sum_threshold():
  # The mask is 1 exactly where the in-image bilinear weights sum to >= 0.9999 (PWC-Net's rule).
  rng = np.random.default_rng(3)
  image = rng.normal(size=(2, 8, 9, 2)).astype(np.float32)
  flow = (rng.normal(size=(2, 8, 9, 2)) * 4).astype(np.float32)
  # A few positions right at the edges: the last pixel centre (in), a hair outside (in, within 1e-4 px),
  # and clearly outside.
  flow[0, 0, 0] = (0.0, -0.00005)
  flow[0, 0, 1] = (-1.0 - 0.001, 0.0)
  flow[0, 7, 8] = (0.0, 0.0)
  flow[1, 7, 8] = (0.01, 0.0)
  _, mask = warp_with_mask(jnp.asarray(image), jnp.asarray(flow))
  _, weight_sum = numpy_warp(image, flow)
  np.testing.assert_array_equal(np.asarray(mask), (weight_sum >= 0.9999).astype(np.float32))
  assert np.asarray(mask)[0, 0, 0] == 1 and np.asarray(mask)[0, 0, 1] == 0
  assert np.asarray(mask)[0, 7, 8] == 1 and np.asarray(mask)[1, 7, 8] == 0
  # Mixed in and out positions occur in this random field, so both values are exercised.
  assert 0 < float(np.asarray(mask).mean()) < 1


def test_custom_gradients_match_autodiff_reference():
  image, flow = _random((2, 10, 13, 3), 4)
  g = np.random.default_rng(5).normal(size=image.shape).astype(np.float32)
  fast = jax.jit(jax.grad(lambda i, f: jnp.sum(warp(i, f) * g), argnums=(0, 1)))(image, flow)
  ref = jax.jit(jax.grad(lambda i, f: jnp.sum(warp_reference(i, f) * g), argnums=(0, 1)))(image, flow)
  for a, r in zip(fast, ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-5)


def test_gradients_match_finite_differences_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(6)
    shape = (1, 6, 7, 2)
    image = jnp.asarray(rng.normal(size=shape))
    # Keep fractional sampling positions away from integers, where bilinear interpolation has kinks.
    base = rng.integers(-2, 3, size=shape[:3] + (2,)) + rng.uniform(0.2, 0.8, size=shape[:3] + (2,))
    flow = jnp.asarray(base)
    g = jnp.asarray(rng.normal(size=shape))
    loss = jax.jit(lambda i, f: jnp.sum(warp(i, f) * g))
    assert warp(image, flow).dtype == jnp.float64
    di, df = jax.jit(jax.grad(loss, argnums=(0, 1)))(image, flow)
    assert di.dtype == jnp.float64 and df.dtype == jnp.float64
    eps = 1e-6
    for arr, grad, which in ((image, di, 0), (flow, df, 1)):
      idxs = [tuple(int(rng.integers(0, s)) for s in arr.shape) for _ in range(8)]
      for idx in idxs:
        args_p = [image, flow]
        args_m = [image, flow]
        args_p[which] = arr.at[idx].add(eps)
        args_m[which] = arr.at[idx].add(-eps)
        fd = (loss(*args_p) - loss(*args_m)) / (2 * eps)
        np.testing.assert_allclose(float(grad[idx]), float(fd), rtol=1e-6, atol=1e-8)


def test_image_gradient_is_the_adjoint_of_sampling():
  # <warp(I, F), G> = <I, warp^T(G)>: the image gradient must equal the scatter of G by the bilinear weights.
  image, flow = _random((1, 6, 8, 2), 7)
  g = np.random.default_rng(8).normal(size=image.shape)
  grad_image = np.asarray(jax.jit(jax.grad(lambda i: jnp.sum(warp(i, jnp.asarray(flow)) * g)))(jnp.asarray(image)))
  expected = np.zeros(image.shape)
  for y in range(6):
    for x in range(8):
      px, py = x + float(flow[0, y, x, 0]), y + float(flow[0, y, x, 1])
      x0, y0 = int(np.floor(px)), int(np.floor(py))
      for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
          if 0 <= yy < 6 and 0 <= xx < 8:
            expected[0, yy, xx] += wy * wx * g[0, y, x]
  np.testing.assert_allclose(grad_image, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_image_samples_with_float32_coordinates():
  # At x = 100 a shift of 0.5 px cannot be represented in bfloat16 coordinates (100.5 rounds to 100);
  # float32 sampling coordinates give the exact midpoint.
  w = 128
  row = np.zeros((1, 2, w, 1), np.float32)
  row[0, :, 100] = 1.0
  row[0, :, 101] = 3.0
  image = jnp.asarray(row, jnp.bfloat16)
  flow = np.zeros((1, 2, w, 2), np.float32)
  flow[..., 0] = 0.5
  out = warp(image, jnp.asarray(flow))
  assert out.dtype == jnp.bfloat16
  assert float(out[0, 0, 100, 0]) == 2.0
  assert float(out[0, 0, 99, 0]) == 0.5
  # Random bf16 images agree with the float32 warp of the same (rounded) values to bf16 precision.
  img, fl = _random((2, 9, 12, 3), 9)
  b16 = jnp.asarray(img, jnp.bfloat16)
  ref = warp(b16.astype(jnp.float32), jnp.asarray(fl))
  np.testing.assert_allclose(np.asarray(warp(b16, jnp.asarray(fl)).astype(jnp.float32)), np.asarray(ref),
                             rtol=1e-2, atol=1e-2)
  grad = jax.jit(jax.grad(lambda i, f: jnp.sum(warp(i, f).astype(jnp.float32)), argnums=(0, 1)))
  gi, gf = grad(b16, jnp.asarray(fl))
  assert gi.dtype == jnp.bfloat16 and gf.dtype == jnp.float32


def test_huge_flows_sample_zero_not_garbage():
  image = jnp.ones((1, 4, 5, 2))
  flow = jnp.full((1, 4, 5, 2), 3e9)
  warped, mask = warp_with_mask(image, flow)
  np.testing.assert_array_equal(np.asarray(warped), 0)
  np.testing.assert_array_equal(np.asarray(mask), 0)


def test_vmap_matches_loop():
  rng = np.random.default_rng(10)
  image = rng.normal(size=(3, 2, 6, 7, 2)).astype(np.float32)
  flow = (rng.normal(size=(3, 2, 6, 7, 2)) * 3).astype(np.float32)
  out = jax.jit(jax.vmap(warp))(jnp.asarray(image), jnp.asarray(flow))
  for t in range(3):
    np.testing.assert_allclose(np.asarray(out[t]), numpy_warp(image[t], flow[t])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ishape,fshape,match", [
    ((1, 4, 5, 3), (1, 4, 5, 3), r"\(B, H, W, 2\)"),
    ((1, 4, 5, 3), (1, 5, 4, 2), "share"),
    ((4, 5, 3), (4, 5, 2), "4-D"),
])
def test_bad_shapes_raise_clear_errors(ishape, fshape, match):
  for fn in (warp, warp_with_mask):
    with pytest.raises(ValueError, match=match):
      fn(jnp.zeros(ishape), jnp.zeros(fshape))


def test_integer_flow_dtype_rejected():
  with pytest.raises(TypeError, match="flow must be floating"):
    warp(jnp.zeros((1, 4, 5, 3)), jnp.zeros((1, 4, 5, 2), jnp.int32))


@pytest.mark.parametrize("shape,flow_scale", [((3, 11, 9, 4), 2.5), ((1, 7, 15, 33), 6.0), ((2, 5, 6, 1), 0.4)])
def test_fast_path_matches_reference_values_and_gradients_batched(shape, flow_scale):
  # Batch > 1 (the backward runs image by image), odd sizes, many corners outside at the larger scale.
  image, flow = _random(shape, 21 + shape[0], flow_scale)
  # Converging flows: every pixel of the last column samples the same source pixel, so the scatter-add must
  # accumulate many contributions into one place.
  flow[:, :, -1, 0] = 1.3 - np.arange(shape[2])[-1]
  flow[:, :, -1, 1] = 0.6 - np.arange(shape[1])[:, None].squeeze(-1)
  g = np.random.default_rng(22).normal(size=shape).astype(np.float32)
  out_fast, vjp_fast = jax.vjp(warp, jnp.asarray(image), jnp.asarray(flow))
  out_ref, vjp_ref = jax.vjp(warp_reference, jnp.asarray(image), jnp.asarray(flow))
  np.testing.assert_allclose(np.asarray(out_fast), numpy_warp(image, flow)[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out_fast), np.asarray(out_ref), rtol=1e-6, atol=1e-6)
  for a, r in zip(vjp_fast(jnp.asarray(g)), vjp_ref(jnp.asarray(g))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-5)
  # The mask is still the in-image weight sum against MASK_THRESHOLD.
  _, mask = warp_with_mask(jnp.asarray(image), jnp.asarray(flow))
  from jaxflow.ops.warp import MASK_THRESHOLD
  np.testing.assert_array_equal(np.asarray(mask), (numpy_warp(image, flow)[1] >= MASK_THRESHOLD).astype(np.float32))


def test_bfloat16_gradients_match_reference():
  image, flow = _random((2, 9, 12, 5), 23)
  b16 = jnp.asarray(image, jnp.bfloat16)
  g = jnp.asarray(np.random.default_rng(24).normal(size=image.shape), jnp.bfloat16)
  fast = jax.vjp(warp, b16, jnp.asarray(flow))[1](g)
  ref = jax.vjp(warp_reference, b16, jnp.asarray(flow))[1](g)
  for a, r in zip(fast, ref):
    assert a.dtype == r.dtype
    np.testing.assert_allclose(np.asarray(a.astype(jnp.float32)), np.asarray(r.astype(jnp.float32)),
                               rtol=2e-2, atol=2e-2)


def test_batch_sharded_backward_loops_over_each_devices_images():
  # The trainer's data parallelism: plain jit, batch sharded on 'data'. The backward's per-image loop must run on
  # each device's own images (no all-gather of the residuals, as a lax.map over the sharded axis would need), with
  # the single-device values and gradients; and inside vmap (the custom_vmap rule) too.
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices (tests/conftest.py simulates them)")
  from jaxflow import parallel
  mesh = parallel.make_mesh(2)  # the trainer's mesh (Auto axes)
  sharding = jax.NamedSharding(mesh, jax.P("data"))
  image, flow = _random((4, 9, 11, 3), 31, 2.5)
  g = np.random.default_rng(32).normal(size=image.shape).astype(np.float32)
  loss = lambda a, f: jnp.sum(warp(a, f) * g)
  vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), in_shardings=(sharding, sharding),
               out_shardings=(None, (sharding, sharding)))
  s_image, s_flow = jax.device_put(image, sharding), jax.device_put(flow, sharding)
  hlo = vg.lower(s_image, s_flow).compile().as_text()
  assert not collectives(hlo), collectives(hlo)[:3]
  # The loop's scatter-add writes one image's (H*W, C) gradient; its operands are the device's 2 images.
  assert "while(" in hlo and "f32[2,99,3]" in hlo and "f32[4,99,3]" not in hlo
  value, (d_image, d_flow) = vg(s_image, s_flow)
  ref_value, (r_image, r_flow) = jax.value_and_grad(lambda a, f: jnp.sum(warp_reference(a, f) * g), argnums=(0, 1))(
      jnp.asarray(image), jnp.asarray(flow))
  np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(d_image), np.asarray(r_image), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(d_flow), np.asarray(r_flow), rtol=1e-5, atol=1e-5)
  # vmap over a leading axis inside the sharded jit: the custom_vmap rule adds it as one more image axis (each device
  # merges it into its own images; merging it into the sharded batch axis globally moved the residuals: 4 collectives).
  vimage, vflow = np.stack([image, image[::-1]]), np.stack([flow, -flow])
  vsharding = jax.NamedSharding(mesh, jax.P(None, "data"))
  vgrad = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))), in_shardings=(vsharding, vsharding))
  vhlo = vgrad.lower(jax.device_put(vimage, vsharding), jax.device_put(vflow, vsharding)).compile().as_text()
  assert not collectives(vhlo), collectives(vhlo)[:3]
  got = vgrad(jax.device_put(vimage, vsharding), jax.device_put(vflow, vsharding))
  for t in range(2):
    ref = jax.grad(lambda a, f: jnp.sum(warp_reference(a, f) * g), argnums=(0, 1))(vimage[t], vflow[t])
    for a, r in zip(got, ref):
      np.testing.assert_allclose(np.asarray(a[t]), np.asarray(r), rtol=1e-5, atol=1e-5)
