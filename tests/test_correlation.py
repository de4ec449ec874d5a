"""Tests of jaxflow.ops.correlation against an independent numpy reference and exact constructed cases."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxflow.ops import correlation


def numpy_correlation(f1: np.ndarray, f2: np.ndarray, max_displacement: int, stride: int) -> np.ndarray:
  """Direct loop over pixels' displacements in float64: out[b, y, x, i*K + j] = mean_c f1[y, x] f2[y+dy, x+dx]."""
  b, h, w, c = f1.shape
  n = max_displacement // stride
  k = 2 * n + 1
  f1 = f1.astype(np.float64)
  f2 = f2.astype(np.float64)
  out = np.zeros((b, h, w, k * k))
  for i, dy in enumerate(range(-n * stride, n * stride + 1, stride)):
    for j, dx in enumerate(range(-n * stride, n * stride + 1, stride)):
      y0, y1 = max(0, -dy), min(h, h - dy)  # rows y with 0 <= y + dy < h
      x0, x1 = max(0, -dx), min(w, w - dx)
      if y0 >= y1 or x0 >= x1:
        continue
      prod = f1[:, y0:y1, x0:x1] * f2[:, y0 + dy:y1 + dy, x0 + dx:x1 + dx]
      out[:, y0:y1, x0:x1, i * k + j] = prod.mean(-1)
  return out


def _features(shape, seed):
  rng = np.random.default_rng(seed)
  return rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("shape,md,stride", [
    ((2, 12, 17, 5), 4, 1),     # PWC-Net window, non-square, C not a multiple of 8
    ((1, 9, 14, 3), 5, 2),      # max displacement not a multiple of the stride: rounds down to 4
    ((2, 16, 11, 13), 20, 2),   # FlowNetC window larger than the image: many all-zero channels
    ((1, 8, 8, 8), 0, 1),       # a single displacement: the per-pixel mean of the product
    ((3, 7, 10, 1), 3, 3),
])
def test_matches_numpy_reference(shape, md, stride):
  f1, f2 = _features(shape, sum(shape) + md)
  out = correlation(jnp.asarray(f1), jnp.asarray(f2), md, stride)
  k = 2 * (md // stride) + 1
  assert out.shape == shape[:3] + (k * k,)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), numpy_correlation(f1, f2, md, stride), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dy,dx,md,stride", [(2, -3, 4, 1), (-4, 4, 4, 1), (0, 0, 4, 1), (4, -2, 6, 2)])
def test_constant_shift_peaks_at_the_right_channel(dy, dx, md, stride):
  # f2(y, x) = f1(y - dy, x - dx), so f1(y, x) matches f2(y + dy, x + dx): the peak is at displacement (dy, dx).
  # Random +-1 features: the matching displacement gives exactly 1, any other a mean of 32 random signs.
  rng = np.random.default_rng(0)
  big = rng.choice(np.array([-1.0, 1.0], np.float32), size=(2, 40, 44, 32))
  f1 = big[:, 10:30, 10:34]
  f2 = big[:, 10 - dy:30 - dy, 10 - dx:34 - dx]
  out = np.asarray(correlation(jnp.asarray(f1), jnp.asarray(f2), md, stride))
  n = md // stride
  k = 2 * n + 1
  expected = (dy // stride + n) * k + (dx // stride + n)
  # Away from the borders the peak is exact, and its value is the mean of f1 squared.
  inner = out[:, md:-md, md:-md]
  assert np.all(np.argmax(inner, axis=-1) == expected)
  np.testing.assert_array_equal(inner[..., expected], 1.0)
  assert np.all(np.delete(inner, expected, axis=-1) < 1.0)


def test_out_of_image_displacements_are_zero():
  f1 = jnp.ones((1, 5, 6, 4))
  f2 = jnp.ones((1, 5, 6, 4))
  out = np.asarray(correlation(f1, f2, 2, 1)).reshape(1, 5, 6, 5, 5)
  # At the top-left pixel only dy >= 0 and dx >= 0 land inside: a 3 x 3 block of ones.
  expected = np.zeros((5, 5))
  expected[2:, 2:] = 1
  np.testing.assert_array_equal(out[0, 0, 0], expected)
  # Count of in-image positions for every displacement (an independent closed form).
  for i, dy in enumerate(range(-2, 3)):
    for j, dx in enumerate(range(-2, 3)):
      assert out[0, :, :, i, j].sum() == (5 - abs(dy)) * (6 - abs(dx))


@pytest.mark.parametrize("shape,md,stride", [((1, 6, 7, 3), 2, 1), ((2, 5, 9, 2), 4, 2)])
def test_gradients_match_finite_differences_float64(shape, md, stride):
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    f1 = jnp.asarray(rng.normal(size=shape))
    f2 = jnp.asarray(rng.normal(size=shape))
    k = 2 * (md // stride) + 1
    g = jnp.asarray(rng.normal(size=shape[:3] + (k * k,)))
    assert correlation(f1, f2, md, stride).dtype == jnp.float64
    loss = jax.jit(lambda a, b: jnp.sum(correlation(a, b, md, stride) * g))
    d1, d2 = jax.jit(jax.grad(loss, argnums=(0, 1)))(f1, f2)
    assert d1.dtype == jnp.float64 and d2.dtype == jnp.float64
    eps = 1e-6
    for arr, grad, which in ((f1, d1, 0), (f2, d2, 1)):
      for idx in [tuple(int(rng.integers(0, s)) for s in shape) for _ in range(6)] + [(0, 0, 0, 0)]:
        plus, minus = arr.at[idx].add(eps), arr.at[idx].add(-eps)
        args_p = (plus, f2) if which == 0 else (f1, plus)
        args_m = (minus, f2) if which == 0 else (f1, minus)
        fd = (loss(*args_p) - loss(*args_m)) / (2 * eps)
        np.testing.assert_allclose(float(grad[idx]), float(fd), rtol=1e-6, atol=1e-8)


def test_gradients_match_numpy_adjoint():
  # The loss is bilinear, so dL/df1 = dL/d out contracted with f2 shifts: check the full gradient arrays
  # against an independent numpy adjoint computed displacement by displacement.
  shape, md, stride = (2, 8, 11, 5), 3, 1
  f1, f2 = _features(shape, 3)
  k = 2 * md + 1
  g = np.random.default_rng(4).normal(size=shape[:3] + (k * k,)).astype(np.float32)
  d1, d2 = jax.jit(jax.grad(lambda a, b: jnp.sum(correlation(a, b, md, stride) * g), argnums=(0, 1)))(f1, f2)
  b, h, w, c = shape
  e1 = np.zeros(shape)
  e2 = np.zeros(shape)
  for i, dy in enumerate(range(-md, md + 1)):
    for j, dx in enumerate(range(-md, md + 1)):
      for y in range(h):
        for x in range(w):
          if 0 <= y + dy < h and 0 <= x + dx < w:
            gk = g[:, y, x, i * k + j, None] / c
            e1[:, y, x] += gk * f2[:, y + dy, x + dx]
            e2[:, y + dy, x + dx] += gk * f1[:, y, x]
  np.testing.assert_allclose(np.asarray(d1), e1, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(d2), e2, rtol=1e-4, atol=1e-5)


def test_bfloat16_inputs_accumulate_in_float32():
  shape, md = (2, 10, 12, 40), 3
  f1, f2 = _features(shape, 5)
  b1, b2 = jnp.asarray(f1, jnp.bfloat16), jnp.asarray(f2, jnp.bfloat16)
  out = correlation(b1, b2, md)
  assert out.dtype == jnp.float32
  # Products of bf16 values are exact in float32, so the result equals the float32 correlation of the
  # bf16-rounded inputs to float32 accumulation error, far tighter than a bf16 accumulation could give.
  exact = numpy_correlation(np.asarray(b1.astype(jnp.float32)), np.asarray(b2.astype(jnp.float32)), md, 1)
  np.testing.assert_allclose(np.asarray(out), exact, rtol=1e-5, atol=1e-6)
  # And it is within bf16 input rounding of the float32 result.
  np.testing.assert_allclose(np.asarray(out), numpy_correlation(f1, f2, md, 1), atol=3e-2)
  # Gradients come back in the input dtype.
  d1, d2 = jax.jit(jax.grad(lambda a, b: jnp.sum(correlation(a, b, md)), argnums=(0, 1)))(b1, b2)
  assert d1.dtype == jnp.bfloat16 and d2.dtype == jnp.bfloat16


def test_jit_vmap_grad_agree():
  shape, md, stride = (2, 8, 10, 6), 4, 2
  f1, f2 = _features(shape, 6)
  jitted = np.asarray(jax.jit(correlation, static_argnums=(2, 3))(f1, f2, md, stride))
  np.testing.assert_allclose(jitted, numpy_correlation(f1, f2, md, stride), rtol=1e-5, atol=1e-6)
  # vmap over an extra leading axis: (3, B, H, W, C) -> (3, B, H, W, K*K), each slice independent.
  stack1 = np.stack([f1, f2, f1 * 2])
  stack2 = np.stack([f2, f1, f2[:, ::-1]])
  vm = np.asarray(jax.jit(jax.vmap(lambda a, b: correlation(a, b, md, stride)))(stack1, stack2))
  for t in range(3):
    np.testing.assert_allclose(vm[t], numpy_correlation(stack1[t], stack2[t], md, stride), rtol=1e-5, atol=1e-6)
  # grad through vmap equals the per-example grad.
  loss = lambda a, b: jnp.sum(correlation(a, b, md, stride) ** 2)
  gv = jax.jit(jax.vmap(jax.grad(loss)))(stack1, stack2)
  grad_one = jax.jit(jax.grad(loss))
  for t in range(3):
    np.testing.assert_allclose(np.asarray(gv[t]), np.asarray(grad_one(stack1[t], stack2[t])), rtol=1e-5, atol=1e-6)


def test_shard_map_over_two_devices_matches_single_device():
  assert len(jax.devices()) >= 2, "tests/conftest.py should simulate 2 CPU devices"
  mesh = jax.make_mesh((2,), ("data",))
  shape, md = (4, 8, 12, 7), 4
  f1, f2 = _features(shape, 7)
  spec = jax.P("data")
  sharded = jax.jit(jax.shard_map(lambda a, b: correlation(a, b, md), mesh=mesh, in_specs=(spec, spec),
                                  out_specs=spec))
  sharding = jax.NamedSharding(mesh, spec)
  s1, s2 = jax.device_put(f1, sharding), jax.device_put(f2, sharding)
  out = sharded(s1, s2)
  np.testing.assert_allclose(np.asarray(out), np.asarray(correlation(f1, f2, md)), rtol=1e-6, atol=1e-7)
  assert len(out.sharding.device_set) == 2
  # Gradients through shard_map as well (jit under the mesh: make_mesh gives explicit axes).
  loss = lambda fn: (lambda a, b: jnp.sum(fn(a, b) ** 2))
  with jax.set_mesh(mesh):
    g_sharded = jax.jit(jax.grad(loss(sharded)))(s1, s2)
  g_single = jax.grad(loss(lambda a, b: correlation(a, b, md)))(f1, f2)
  np.testing.assert_allclose(np.asarray(g_sharded), np.asarray(g_single), rtol=1e-5, atol=1e-6)


def test_no_displacement_sized_intermediate_in_forward_or_backward():
  # Compiled temp memory must stay far below a K*K x C x H x W x B intermediate (here 81 x 64 x 24 x 32 x 2).
  shape, md = (2, 24, 32, 64), 4
  f1 = jnp.zeros(shape)
  f2 = jnp.zeros(shape)
  g = jnp.zeros(shape[:3] + (81,))

  def fwd_bwd(a, b, ct):
    out, vjp = jax.vjp(lambda x, y: correlation(x, y, md), a, b)
    return (out,) + vjp(ct)

  temp = jax.jit(fwd_bwd).lower(f1, f2, g).compile().memory_analysis().temp_size_in_bytes
  dense = 4 * 81 * np.prod(shape)
  assert temp < dense / 8, (temp, dense)


@pytest.mark.parametrize("args,match", [
    (((1, 4, 4, 3), (1, 4, 5, 3), 2, 1), "same"),
    (((4, 4, 3), (4, 4, 3), 2, 1), "4-D"),
    (((1, 4, 4, 3), (1, 4, 4, 3), -1, 1), "max_displacement"),
    (((1, 4, 4, 3), (1, 4, 4, 3), 2, 0), "stride"),
    (((1, 4, 4, 3), (1, 4, 4, 3), 2.0, 1), "max_displacement"),
])
def test_bad_input_raises_clear_error(args, match):
  s1, s2, md, stride = args
  with pytest.raises(ValueError, match=match):
    correlation(jnp.zeros(s1), jnp.zeros(s2), md, stride)


def test_integer_features_rejected():
  with pytest.raises(TypeError, match="floating"):
    correlation(jnp.zeros((1, 4, 4, 3), jnp.int32), jnp.zeros((1, 4, 4, 3), jnp.int32), 1)


@pytest.mark.parametrize("shape,md,stride", [
    ((2, 12, 17, 5), 4, 1),     # H, W not multiples of the tile side: padded tiles are cropped
    ((1, 6, 8, 196), 4, 1),     # PWC-Net's top level: a single 8 x 8 tile
    ((2, 9, 13, 6), 5, 2),      # stride 2 on odd sizes: uneven pixel phases
    ((1, 20, 22, 4), 9, 3),     # stride 3: 9 phases, windows wider than two tiles
    ((1, 40, 36, 3), 2, 1),     # a small radius, few channels: 4 x 4 tiles
])
def test_tiled_and_scan_agree_in_values_and_gradients(shape, md, stride):
  # Two structurally different implementations (tile x window matmuls with skews vs one pass per
  # displacement), each against the numpy reference, and their gradients against each other.
  f1, f2 = _features(shape, 11 + md)
  ref = numpy_correlation(f1, f2, md, stride)
  k = 2 * (md // stride) + 1
  g = np.random.default_rng(12).normal(size=shape[:3] + (k * k,)).astype(np.float32)
  results = {}
  for impl in ("tiled_gather", "tiled_reshape", "scan"):  # CPU's jnp path ("tiled" is the C++ kernel)
    fn = lambda a, b, impl=impl: correlation(a, b, md, stride, impl=impl)
    out, vjp = jax.vjp(fn, jnp.asarray(f1), jnp.asarray(f2))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6, err_msg=impl)
    results[impl] = [np.asarray(x) for x in vjp(jnp.asarray(g))]
  for a, b in zip(results["tiled_gather"], results["scan"]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)
  # On CPU 'tiled' reads the band off the blocks by a gather, 'tiled_reshape' by the pad/reshape skews: the
  # same products, so the same bits (and the backward is shared).
  for a, b in zip(results["tiled_gather"], results["tiled_reshape"]):
    np.testing.assert_array_equal(a, b)


def test_tile_side_choice_and_unknown_impl():
  tile_side = sys.modules["jaxflow.ops.correlation"]._tile_side
  assert tile_side(96, 128, 32, 4) == 8    # PWC-Net level 2
  assert tile_side(24, 32, 256, 10) == 16  # FlowNetC phases: a wider window pays for bigger tiles
  with pytest.raises(ValueError, match="impl"):
    correlation(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 4, 3)), 1, impl="fft")


def _numpy_adjoint(f1: np.ndarray, f2: np.ndarray, g: np.ndarray, md: int, stride: int):
  """float64 gradients (d f1, d f2) of sum(g * correlation(f1, f2, md, stride)), displacement by displacement
  (the correlation is bilinear, so this adjoint is exact)."""
  b, h, w, c = f1.shape
  k, n = 2 * (md // stride) + 1, md // stride
  f2p = np.pad(f2.astype(np.float64), ((0, 0), (md, md), (md, md), (0, 0)))
  e1, e2p = np.zeros(f1.shape), np.zeros(f2p.shape)
  for i in range(k):
    for j in range(k):
      dy, dx = (i - n) * stride, (j - n) * stride
      gk = g[..., i * k + j, None].astype(np.float64) / c
      e1 += gk * f2p[:, md + dy:md + dy + h, md + dx:md + dx + w]
      e2p[:, md + dy:md + dy + h, md + dx:md + dx + w] += gk * f1
  return e1, e2p[:, md:md + h, md:md + w]


@pytest.mark.parametrize("shape,md,stride", [
    ((1, 13, 19, 32), 4, 1),    # PWC-Net level-2 channels, odd H and W, batch 1
    ((3, 9, 11, 196), 4, 1),    # PWC-Net's top-level channels, batch 3
    ((2, 24, 26, 16), 20, 2),   # FlowNetC's window and stride: 12 x 13 phases, 16 x 16 tiles
    ((2, 17, 23, 7), 2, 1),     # 4 x 4 tiles
])
def test_gather_skews_match_reference_values_and_gradients(shape, md, stride):
  # The CPU default ('tiled' = 'tiled_gather') against the numpy reference and its adjoint, and bitwise
  # against the pad/reshape skews, in values and in both gradients.
  f1, f2 = _features(shape, 31 + md + shape[0])
  k = 2 * (md // stride) + 1
  g = np.random.default_rng(32).normal(size=shape[:3] + (k * k,)).astype(np.float32)
  results = {}
  for impl in ("tiled_gather", "tiled_reshape"):
    fn = lambda a, b, impl=impl: correlation(a, b, md, stride, impl=impl)
    fwd_bwd = jax.jit(lambda a, b, ct, fn=fn: (lambda o, v: (o,) + v(ct))(*jax.vjp(fn, a, b)))
    results[impl] = [np.asarray(x) for x in fwd_bwd(f1, f2, g)]
  np.testing.assert_allclose(results["tiled_gather"][0], numpy_correlation(f1, f2, md, stride), rtol=1e-5, atol=1e-6)
  # Reference gradients: the correlation is bilinear, so its adjoint is exact through the numpy forward.
  e1, e2 = _numpy_adjoint(f1, f2, g, md, stride)
  np.testing.assert_allclose(results["tiled_gather"][1], e1, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(results["tiled_gather"][2], e2, rtol=1e-4, atol=1e-5)
  for a, r in zip(results["tiled_gather"], results["tiled_reshape"]):
    np.testing.assert_array_equal(a, r)


def test_skew_gather_index_reads_the_band_of_a_constructed_block():
  # block[r, col] = 1000 r + col, so every gathered value names the position it came from.
  mod = sys.modules["jaxflow.ops.correlation"]
  for t, k in ((8, 9), (4, 5), (16, 21)):
    s = t + k - 1
    rows, cols = mod._skew_gather_index(t, k)
    block = 1000 * np.arange(t * t)[:, None] + np.arange(s * s)[None, :]
    band = block[rows, cols]
    for p, q, i, j in ((0, 0, 0, 0), (t - 1, t - 1, k - 1, k - 1), (1, t - 2, k // 2, 0), (t // 2, 3 % t, 2, k - 2)):
      assert band[p, q, i * k + j] == 1000 * (p * t + q) + (p + i) * s + (q + j)


def test_cpu_default_is_the_gather_path(monkeypatch):
  # Without the C++ kernel (jaxflow.ops.correlation_ffi, tested in test_correlation_ffi.py), 'tiled' on CPU is
  # the gather path.
  monkeypatch.setattr(sys.modules["jaxflow.ops.correlation_ffi"], "available", lambda: False)
  assert jax.default_backend() == "cpu"
  f1, f2 = _features((2, 16, 24, 8), 41)
  hlo = lambda impl: jax.jit(lambda a, b: correlation(a, b, 4, impl=impl)).lower(f1, f2).compile().as_text()
  assert " gather(" in hlo("tiled")
  assert " gather(" not in hlo("tiled_reshape")
  np.testing.assert_array_equal(np.asarray(correlation(f1, f2, 4)), np.asarray(correlation(f1, f2, 4, impl="tiled_gather")))


def test_gather_path_bfloat16_inputs():
  shape, md = (2, 11, 13, 24), 4
  f1, f2 = _features(shape, 42)
  b1, b2 = jnp.asarray(f1, jnp.bfloat16), jnp.asarray(f2, jnp.bfloat16)
  out = correlation(b1, b2, md, impl="tiled_gather")
  assert out.dtype == jnp.float32
  exact = numpy_correlation(np.asarray(b1.astype(jnp.float32)), np.asarray(b2.astype(jnp.float32)), md, 1)
  np.testing.assert_allclose(np.asarray(out), exact, rtol=1e-5, atol=1e-6)
  loss = lambda impl: jax.jit(jax.grad(lambda a, b: jnp.sum(correlation(a, b, md, impl=impl) ** 2), argnums=(0, 1)))
  for a, r in zip(loss("tiled_gather")(b1, b2), loss("tiled_reshape")(b1, b2)):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(r.astype(jnp.float32)))


@pytest.mark.parametrize("shape,md,stride,exact", [
    ((2, 13, 19, 32), 4, 1, True),     # power-of-two C: scaling the features by 1/C is exact, so the same bits
    ((1, 11, 9, 96), 4, 1, False),     # C = 96: 1/C rounds, so equal to float32 rounding
    ((2, 20, 18, 16), 20, 2, True),    # FlowNetC's window and stride (pixel phases)
])
def test_backward_scale_on_features_matches_scale_on_cotangent(monkeypatch, shape, md, stride, exact):
  # Session 8 moved the backward's 1/C from the (B, H, W, K*K) cotangent onto the per-image features inside the
  # loop; both placements give the same gradients (bitwise when 1/C is a power of two), and the numpy adjoint.
  mod = sys.modules["jaxflow.ops.correlation"]
  f1, f2 = _features(shape, 51 + shape[-1])
  k = 2 * (md // stride) + 1
  g = np.random.default_rng(52).normal(size=shape[:3] + (k * k,)).astype(np.float32)
  grads = {}
  for on_features in (True, False):
    monkeypatch.setattr(mod, "_BWD_SCALE_FEATURES", on_features)
    jax.clear_caches()
    vjp = jax.jit(lambda a, b: jax.vjp(lambda x, y: correlation(x, y, md, stride, impl="tiled_gather"), a, b)[1](g))
    grads[on_features] = [np.asarray(x) for x in vjp(f1, f2)]
  jax.clear_caches()
  for a, r in zip(grads[True], grads[False]):
    if exact:
      np.testing.assert_array_equal(a, r)
    else:
      np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)
  e1, e2 = _numpy_adjoint(f1, f2, g, md, stride)
  np.testing.assert_allclose(grads[True][0], e1, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grads[True][1], e2, rtol=1e-4, atol=1e-5)
