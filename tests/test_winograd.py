"""Winograd F(4x4, 3x3) convolution (jaxflow.ops.winograd) and its use by jaxflow.ops.conv on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxflow.ops import conv as conv_ops
from jaxflow.ops import winograd
from pwcnet_helpers import small_pwcnet_value_and_grad

DN = ("NHWC", "HWIO", "NHWC")
# Max |error| / max |y| against a float64 reference. Measured for Winograd at 117-565 input channels on 96x128
# inputs: 1e-5 .. 2.8e-5 forward, 6e-6 .. 7e-6 input gradient (experiments/benchmarks/winograd_conv.py); the
# transforms' coefficients (up to 8 and 1/24) make it ~10x a direct float32 convolution's. 6e-5 leaves room for
# other random draws; a wrong transform coefficient or tile offset gives errors of order 1e-2 .. 1.
TOL = 6e-5


def _ref64(x, w):
  """'same' 3x3 cross-correlation in float64 numpy: x (N, H, W, C), w (3, 3, C, O)."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  n, h, wd, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = np.zeros((n, h, wd, w.shape[3]))
  for i in range(3):
    for j in range(3):
      y += np.einsum("nhwc,co->nhwo", xp[:, i:i + h, j:j + wd], w[i, j])
  return y


def _lax(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)


def _data(n, h, w, cin, cout, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, h, w, cin)).astype(np.float32)
  k = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
  return x, k


def _rel(a, ref):
  return float(np.max(np.abs(np.asarray(a, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("n,h,w,per", [(1, 13, 10, 1), (3, 8, 12, 2), (4, 7, 5, 2), (2, 1, 3, 1)])
def test_conv3x3_same_matches_float64_reference(n, h, w, per):
  # Odd sizes and sizes not a multiple of the 4x4 tile; images_per_step 2 with N = 3 falls back to 1.
  x, k = _data(n, h, w, 24, 20)
  ref = _ref64(x, k)
  y = jax.jit(lambda x, k: winograd.conv3x3_same(x, k, per))(x, k)
  assert y.shape == (n, h, w, 20) and y.dtype == jnp.float32
  assert _rel(y, ref) < TOL
  assert _rel(_lax(x, k), ref) < TOL  # the reference itself agrees with XLA


def test_conv3x3_same_each_output_position_uses_its_own_window():
  # A single one in the input at each of a 4x4 tile's positions (and on the border): the output is the
  # kernel placed there, so a wrong tile offset or transform row moves or scales it.
  k = np.arange(1, 10, dtype=np.float32).reshape(3, 3, 1, 1)
  for (r, c) in [(0, 0), (1, 2), (3, 3), (4, 5), (6, 6)]:
    x = np.zeros((1, 7, 7, 1), np.float32)
    x[0, r, c, 0] = 1
    np.testing.assert_allclose(np.asarray(winograd.conv3x3_same(x, k))[0, ..., 0], _ref64(x, k)[0, ..., 0],
                               atol=2e-5)


@pytest.mark.parametrize("n,h,w", [(1, 9, 11), (2, 8, 8)])
def test_input_grad_matches_lax_vjp(n, h, w):
  x, k = _data(n, h, w, 20, 28, seed=1)
  g = np.random.default_rng(2).standard_normal((n, h, w, 28)).astype(np.float32)
  ref = np.asarray(jax.vjp(lambda x_: _lax(x_, k), x)[1](g)[0], np.float64)
  dx = winograd.conv3x3_same_input_grad(g, k)
  assert dx.shape == x.shape
  # Against float64: the same rotated-kernel convolution in numpy.
  ref64 = _ref64(g, np.transpose(k[::-1, ::-1], (0, 1, 3, 2)))
  assert _rel(ref, ref64) < 1e-5
  assert _rel(dx, ref64) < TOL


def test_conv3x3_same_rejects_bad_inputs():
  with pytest.raises(ValueError, match=r"\(3, 3, C_in, C_out\).*\(5, 5, 4, 2\)"):
    winograd.conv3x3_same(jnp.zeros((1, 8, 8, 4)), jnp.zeros((5, 5, 4, 2)))
  with pytest.raises(ValueError, match="C_in"):
    winograd.conv3x3_same(jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 4, 2)))
  with pytest.raises(TypeError, match="float32"):
    winograd.conv3x3_same(jnp.zeros((1, 8, 8, 4), jnp.bfloat16), jnp.zeros((3, 3, 4, 2), jnp.bfloat16))


def test_use_winograd_selection(monkeypatch):
  same = ((1, 1), (1, 1))
  sel = lambda xs, ws, s=(1, 1), p=same, d=(1, 1), dt=jnp.float32: conv_ops.use_winograd(xs, ws, s, p, d, dt)
  assert sel((8, 96, 128, 117), (3, 3, 117, 128))  # PWC-Net's level-2 estimator conv0
  assert sel((8, 96, 128, 469), (3, 3, 469, 64))
  assert sel((4, 48, 64, 565), (3, 3, 565, 128))  # context conv0 at 192x256
  assert not sel((8, 96, 128, 533), (3, 3, 533, 32))  # few output channels (0.58x)
  assert not sel((8, 96, 128, 565), (3, 3, 565, 2))  # predict_flow
  assert not sel((8, 48, 64, 64), (3, 3, 64, 64))  # small channel product (0.86x)
  assert not sel((8, 24, 32, 117), (3, 3, 117, 128))  # few positions per image
  assert not sel((8, 96, 128, 128), (3, 3, 128, 128), d=(2, 2), p=((2, 2), (2, 2)))  # dilated context convs
  assert not sel((8, 96, 128, 128), (3, 3, 128, 128), s=(2, 2))
  assert not sel((8, 96, 128, 128), (3, 3, 128, 128), p=((0, 0), (0, 0)))
  assert not sel((8, 96, 128, 128), (5, 5, 128, 128), p=((2, 2), (2, 2)))
  assert not sel((8, 96, 128, 128), (3, 3, 128, 128), dt=jnp.bfloat16)
  monkeypatch.setattr(conv_ops, "_WINOGRAD", False)
  assert not sel((8, 96, 128, 117), (3, 3, 117, 128))


def _force_winograd(monkeypatch):
  monkeypatch.setattr(conv_ops, "_WINOGRAD_MIN_POSITIONS", 1)
  monkeypatch.setattr(conv_ops, "_WINOGRAD_MIN_CHANNELS", 1)
  monkeypatch.setattr(conv_ops, "_WINOGRAD_MIN_CHANNEL_PRODUCT", 1)


@pytest.mark.parametrize("n,h,w", [(1, 11, 9), (2, 8, 12)])
def test_conv2d_with_winograd_values_and_grads_match_lax(n, h, w, monkeypatch):
  _force_winograd(monkeypatch)
  monkeypatch.setattr(conv_ops, "_MIN_TAP_MACS", 0)  # the weight gradient by 'blocked', not XLA's, too
  x, k = _data(n, h, w, 36, 32, seed=3)
  g = np.random.default_rng(4).standard_normal((n, h, w, 32)).astype(np.float32)
  same = ((1, 1), (1, 1))
  ours = lambda x, k: conv_ops.conv2d(x, k, (1, 1), same, impl="matmul")
  jaxpr = str(jax.make_jaxpr(jax.vjp(ours, x, k)[1])(g)) + str(jax.make_jaxpr(ours)(x, k))
  assert "conv_general_dilated" not in jaxpr  # forward and input gradient both by Winograd, no XLA conv
  y, vjp = jax.vjp(ours, x, k)
  y_ref, vjp_ref = jax.vjp(_lax, x, k)
  scale = float(np.max(np.abs(y_ref)))
  np.testing.assert_allclose(y, y_ref, atol=TOL * scale)
  (dx, dk), (dx_ref, dk_ref) = vjp(g), vjp_ref(g)
  np.testing.assert_allclose(dx, dx_ref, atol=TOL * float(np.max(np.abs(dx_ref))))
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(dk_ref))))


def test_conv2d_concat_with_winograd_values_and_grads_match_lax(monkeypatch):
  _force_winograd(monkeypatch)
  rng = np.random.default_rng(5)
  parts = [rng.standard_normal((2, 9, 10, c)).astype(np.float32) for c in (8, 5, 11)]
  k = (rng.standard_normal((3, 3, 24, 16)) / np.sqrt(216)).astype(np.float32)
  same = ((1, 1), (1, 1))
  ours = lambda ps, k: conv_ops.conv2d_concat(ps, k, (1, 1), same, impl="matmul")
  ref = lambda ps, k: _lax(jnp.concatenate(ps, -1), k)
  y, vjp = jax.vjp(ours, parts, k)
  y_ref, vjp_ref = jax.vjp(ref, parts, k)
  g = rng.standard_normal(y_ref.shape).astype(np.float32)
  np.testing.assert_allclose(y, y_ref, atol=TOL * float(np.max(np.abs(y_ref))))
  (dps, dk), (dps_ref, dk_ref) = vjp(g), vjp_ref(g)
  for a, b in zip(dps, dps_ref):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=TOL * float(np.max(np.abs(b))))
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(dk_ref))))


def test_fused_transforms_give_the_same_values(monkeypatch):
  # The elementwise form of the transforms (winograd._TRANSFORMS = 'fused') against the float64 reference and the
  # default matmul form.
  x, k = _data(2, 9, 14, 16, 12, seed=6)
  y_mm = winograd.conv3x3_same(x, k)
  monkeypatch.setattr(winograd, "_TRANSFORMS", "fused")
  y_fused = winograd.conv3x3_same(x, k)
  ref = _ref64(x, k)
  assert _rel(y_fused, ref) < TOL and _rel(y_mm, ref) < TOL
  np.testing.assert_allclose(y_fused, y_mm, atol=TOL * float(np.max(np.abs(ref))))


def test_small_pwcnet_with_winograd_everywhere_matches_xla(monkeypatch):
  # Every stride-1 3x3 undilated conv of a small PWC-Net by Winograd (thresholds forced to 1), forward and input
  # gradient, against the same network on XLA's convolutions: flows and parameter gradients agree.
  run, ((l_ref, flows_ref), g_ref) = small_pwcnet_value_and_grad(
      pyramid_channels=(8, 16), estimator_channels=(16, 16, 8), context_channels=(16, 8))
  _force_winograd(monkeypatch)
  monkeypatch.setattr(conv_ops, "_MIN_TAP_MACS", 0)
  calls = []
  plain = winograd.conv3x3_same
  monkeypatch.setattr(winograd, "conv3x3_same", lambda x, w, *a: calls.append(w.shape) or plain(x, w, *a))
  (l_w, flows_w), g_w = run()
  # 8 forward convs by Winograd (pyramid conv1 of both levels, estimator conv0-2 + predict_flow, context conv0 and
  # predict_flow; the dilated context conv1 stays XLA's), and input gradients by it too.
  assert len(calls) >= 16 and (3, 3, 25, 16) in calls and (3, 3, 16, 25) in calls
  for a, b in zip(flows_w, flows_ref):
    np.testing.assert_allclose(a, b, atol=1e-4 * float(np.max(np.abs(b))) + 1e-6)
  np.testing.assert_allclose(l_w, l_ref, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(g_w), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=1e-3 * float(np.max(np.abs(b))) + 1e-7)


def test_window_index_reads_each_tiles_padded_window():
  # Gathering the flat (h, w) image at _window_index (out-of-range -> 0) gives, for every tile, the 6x6 window of
  # the image zero-padded by 1 (and up to a multiple of 4) at rows / columns 4i .. 4i + 5, 4j .. 4j + 5.
  h, w = 7, 10
  th, tw = 2, 3
  img = np.arange(1, h * w + 1, dtype=np.float64).reshape(h, w)
  idx = winograd._window_index(h, w, th, tw)
  got = np.where(idx < h * w, np.r_[img.reshape(-1), 0.0][np.minimum(idx, h * w)], 0.0).reshape(6, 6, th, tw)
  padded = np.zeros((4 * th + 2, 4 * tw + 2))
  padded[1:h + 1, 1:w + 1] = img
  for i in range(th):
    for j in range(tw):
      np.testing.assert_array_equal(got[:, :, i, j], padded[4 * i:4 * i + 6, 4 * j:4 * j + 6])


def test_zero_after_is_exactly_zero_for_any_first_element():
  for v in (1.5, -0.0, np.nan, np.inf, -np.inf):
    z = jax.jit(winograd._zero_after)(jnp.full((2, 3), v, jnp.float32))
    assert z.shape == () and z.dtype == jnp.float32 and float(z) == 0.0 and not np.signbit(float(z))


@pytest.mark.parametrize("n,h,w,per", [(3, 9, 10, 1), (4, 8, 12, 2), (2, 5, 7, 2)])
def test_write_loop_equals_session7_map_loop(n, h, w, per, monkeypatch):
  # The in-place loop over images (gather from the unpadded input) and session 7's padded lax.map compute the same
  # windows, products and transforms: the same values up to float32 rounding of a differently fused program.
  x, k = _data(n, h, w, 12, 10, seed=8)
  y = jax.jit(lambda x, k: winograd.conv3x3_same(x, k, per))(x, k)
  monkeypatch.setattr(winograd, "_LOOP", "map")
  y_map = jax.jit(lambda x, k: winograd.conv3x3_same(x, k, per))(x, k)
  np.testing.assert_allclose(y, y_map, atol=1e-6 * float(np.max(np.abs(y_map))))
  assert _rel(y, _ref64(x, k)) < TOL


def test_splits_give_the_outputs_channel_ranges_in_their_own_arrays():
  x, k = _data(2, 9, 6, 10, 12, seed=9)
  g = np.random.default_rng(10).standard_normal((2, 9, 6, 12)).astype(np.float32)
  y = jax.jit(winograd.conv3x3_same)(x, k)
  ys = jax.jit(lambda x, k: winograd.conv3x3_same(x, k, splits=(5, 1, 6)))(x, k)
  assert [a.shape for a in ys] == [(2, 9, 6, 5), (2, 9, 6, 1), (2, 9, 6, 6)]
  np.testing.assert_array_equal(np.concatenate(ys, -1), y)
  dx = winograd.conv3x3_same_input_grad(g, k)
  dxs = winograd.conv3x3_same_input_grad(g, k, splits=[3, 7])
  np.testing.assert_array_equal(np.concatenate(dxs, -1), dx)
  assert _rel(dx, _ref64(g, np.transpose(k[::-1, ::-1], (0, 1, 3, 2)))) < TOL
  with pytest.raises(ValueError, match=r"splits \(5, 5\) .* C_out 12"):
    winograd.conv3x3_same(x, k, splits=(5, 5))
  with pytest.raises(ValueError, match="positive"):
    winograd.conv3x3_same(x, k, splits=(12, 0))


@pytest.mark.parametrize("winograd_path", [False, True])
def test_concat_input_gradient_per_part_matches_lax(winograd_path, monkeypatch):
  # Above _SPLIT_DX_MIN_BYTES (forced to 0) each part's input gradient is its own product (XLA: one transposed
  # convolution per part; Winograd: its loop writes each part), equal to lax's gradient of the concatenation.
  if winograd_path:
    _force_winograd(monkeypatch)
  monkeypatch.setattr(conv_ops, "_SPLIT_DX_MIN_BYTES", 0)
  rng = np.random.default_rng(11)
  parts = [rng.standard_normal((2, 8, 9, c)).astype(np.float32) for c in (6, 2, 9)]
  k = (rng.standard_normal((3, 3, 17, 12)) / np.sqrt(153)).astype(np.float32)
  same = ((1, 1), (1, 1))
  ours = lambda ps, k: conv_ops.conv2d_concat(ps, k, (1, 1), same, impl="matmul")
  ref = lambda ps, k: _lax(jnp.concatenate(ps, -1), k)
  g = rng.standard_normal((2, 8, 9, 12)).astype(np.float32)
  (dps, _), (dps_ref, _) = jax.vjp(ours, parts, k)[1](g), jax.vjp(ref, parts, k)[1](g)
  for a, b in zip(dps, dps_ref):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=TOL * float(np.max(np.abs(b))))
  if not winograd_path:  # one transposed convolution per part instead of one of the whole: 2 more
    count = lambda: str(jax.make_jaxpr(jax.vjp(ours, parts, k)[1])(g)).count("conv_general_dilated")
    per_part = count()
    monkeypatch.setattr(conv_ops, "_SPLIT_DX_MIN_BYTES", 2**62)
    assert per_part == count() + 2
