"""Winograd F(4x4, 3x3) weight gradient (jaxflow.ops.winograd_wgrad) and its selection by jaxflow.ops.conv."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxflow.ops import conv as conv_ops
from jaxflow.ops import winograd_wgrad
from pwcnet_helpers import small_pwcnet_value_and_grad

DN = ("NHWC", "HWIO", "NHWC")
SAME = ((1, 1), (1, 1))
# Max |error| / max |dw| against float64. Measured at PWC-Net's shapes (b8 96x128 117->128 and 48x64 565->128):
# 7.0e-6 and 6.5e-6, against 5.0e-7 and 4.5e-7 for the 'blocked' direct product (the transforms' coefficients up
# to 8 and 1/24); at these small test shapes ~2e-6. A wrong coefficient, tile offset or padding gives 1e-2 .. 1.
TOL = 5e-5


def _ref64(x, g):
  """dw[i, j, c, o] = sum_{n, y, x} xpad[n, y + i, x + j, c] g[n, y, x, o] in float64 numpy."""
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  n, h, w, cin = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  g2 = g.reshape(-1, g.shape[-1])
  return np.stack([np.stack([xp[:, i:i + h, j:j + w].reshape(-1, cin).T @ g2 for j in range(3)])
                   for i in range(3)])


def _data(n, h, w, cin, cout, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n, h, w, cin)).astype(np.float32),
          rng.standard_normal((n, h, w, cout)).astype(np.float32))


def _rel(a, ref):
  return float(np.max(np.abs(np.asarray(a, np.float64) - ref)) / np.max(np.abs(ref)))


def _lax_dw(x, g):
  f = lambda k: lax.conv_general_dilated(x, k, (1, 1), SAME, dimension_numbers=DN)
  return jax.linear_transpose(f, jax.ShapeDtypeStruct((3, 3, x.shape[-1], g.shape[-1]), jnp.float32))(g)[0]


@pytest.mark.parametrize("n,h,w,per", [(1, 13, 10, 1), (3, 8, 12, 1), (4, 7, 5, 2), (2, 1, 3, 1), (3, 9, 6, 2)])
def test_weight_grad_matches_float64_reference(n, h, w, per):
  # Odd sizes and sizes not a multiple of the 4x4 tile (the last tiles read zeros), batch 1 and > 1, two images per
  # loop step, and N = 3 with images_per_step 2 (falls back to 1).
  x, g = _data(n, h, w, 12, 10)
  ref = _ref64(x, g)
  dw = jax.jit(lambda x, g: winograd_wgrad.weight_grad(x, g, per))(x, g)
  assert dw.shape == (3, 3, 12, 10) and dw.dtype == jnp.float32
  assert _rel(dw, ref) < TOL
  assert _rel(_lax_dw(x, g), ref) < TOL  # the reference agrees with XLA's own gradient


def test_weight_grad_of_single_ones_is_exact_tap():
  # x one-hot at (y0, x0, c), g one-hot at (y1, x1, o): dw is 1 at tap (y0 - y1 + 1, x0 - x1 + 1) if that is a
  # tap of the 3x3 kernel, 0 everywhere else; positions on tile borders, the image border and a partial tile.
  h, w = 9, 10
  for (y0, x0), (y1, x1) in [((0, 0), (0, 0)), ((3, 4), (4, 3)), ((4, 3), (3, 4)), ((8, 9), (8, 9)), ((7, 8), (8, 9)),
                             ((5, 5), (4, 6)), ((0, 9), (1, 8)), ((2, 2), (6, 6))]:
    x = np.zeros((1, h, w, 3), np.float32)
    g = np.zeros((1, h, w, 2), np.float32)
    x[0, y0, x0, 1] = 1
    g[0, y1, x1, 0] = 1
    want = np.zeros((3, 3, 3, 2))
    i, j = y0 - y1 + 1, x0 - x1 + 1
    if 0 <= i < 3 and 0 <= j < 3:
      want[i, j, 1, 0] = 1
    np.testing.assert_allclose(winograd_wgrad.weight_grad(x, g), want, atol=1e-5)


def test_weight_grad_of_parts_equals_concatenation():
  # conv2d_concat's inputs: the parts (a 2-channel one among them, like PWC-Net's flow) give the same gradient as
  # their concatenation, in the concatenation's channel order.
  rng = np.random.default_rng(2)
  parts = [rng.standard_normal((2, 11, 7, c)).astype(np.float32) for c in (9, 2, 5)]
  g = rng.standard_normal((2, 11, 7, 6)).astype(np.float32)
  whole = np.concatenate(parts, -1)
  dw_parts = winograd_wgrad.weight_grad(parts, g)
  np.testing.assert_allclose(dw_parts, winograd_wgrad.weight_grad(whole, g), rtol=1e-6, atol=1e-6)
  assert _rel(dw_parts, _ref64(whole, g)) < TOL


def test_weight_grad_rejects_bad_shapes():
  with pytest.raises(ValueError, match=r"output gradient shape \(1, 8, 7, 4\)"):
    winograd_wgrad.weight_grad(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 7, 4)))
  with pytest.raises(ValueError, match=r"parts"):
    winograd_wgrad.weight_grad([jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 9, 2))], jnp.zeros((1, 8, 8, 4)))
  with pytest.raises(ValueError, match="needs a 3x3 kernel, stride 1"):
    conv_ops.weight_grad_matmul(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 4, 4, 4)), (3, 3, 3, 4), (2, 2),
                                SAME, (1, 1), "winograd")


def test_weight_grad_mode_selects_winograd_where_measured_faster(monkeypatch):
  def mode(x_shape, w_shape, s=(1, 1), p=SAME, d=(1, 1), dt=jnp.float32):
    n, h, w = x_shape[:3]
    return conv_ops.weight_grad_mode(w_shape[2], w_shape[3], s, n * h * w, w_shape[:2], padding=p, dilation=d,
                                     image_positions=h * w, dtype=dt)
  assert mode((8, 96, 128, 117), (3, 3, 117, 128)) == "winograd"  # PWC-Net's level-2 estimator conv0
  assert mode((8, 96, 128, 373), (3, 3, 373, 96)) == "winograd"
  assert mode((4, 48, 64, 565), (3, 3, 565, 128)) == "winograd"  # context conv0 at 192x256
  assert mode((4, 48, 64, 256), (3, 3, 256, 256)) == "winograd"  # FlowNetS conv3_1 at 192x256
  assert mode((8, 96, 128, 469), (3, 3, 469, 64)) == "blocked"  # few output channels (0.81x)
  assert mode((8, 96, 128, 533), (3, 3, 533, 32)) == "blocked"
  assert mode((8, 96, 128, 565), (3, 3, 565, 2)) == "concat"  # predict_flow
  assert mode((8, 24, 32, 565), (3, 3, 565, 128)) == "blocked"  # few positions per image
  assert mode((8, 96, 128, 128), (3, 3, 128, 128), p=((2, 2), (2, 2)), d=(2, 2)) == "blocked"  # dilated
  assert mode((8, 96, 128, 128), (3, 3, 128, 128), s=(2, 2)) == "scan"
  assert mode((8, 96, 128, 128), (3, 3, 128, 128), p=((0, 0), (0, 0))) == "blocked"
  assert mode((8, 96, 128, 128), (3, 3, 128, 128), dt=jnp.bfloat16) == "blocked"
  # Without padding / dtype / image positions (older callers) the choice is the direct one.
  assert conv_ops.weight_grad_mode(117, 128, (1, 1), 8 * 96 * 128) == "blocked"
  monkeypatch.setattr(conv_ops, "_WINOGRAD_WGRAD", False)
  assert mode((8, 96, 128, 117), (3, 3, 117, 128)) == "blocked"


def _force(monkeypatch):
  """Every float32 3x3 'same' stride-1 weight gradient by Winograd, and the forward / input gradient too."""
  monkeypatch.setattr(conv_ops, "_WINOGRAD_WGRAD_MIN_COUT", 1)
  monkeypatch.setattr(conv_ops, "_WINOGRAD_WGRAD_MIN_CIN", 1)
  monkeypatch.setattr(conv_ops, "_WINOGRAD_WGRAD_MIN_POSITIONS", 1)
  monkeypatch.setattr(conv_ops, "_MIN_TAP_MACS", 0)
  monkeypatch.setattr(conv_ops, "_WINOGRAD_MIN_POSITIONS", 1)
  monkeypatch.setattr(conv_ops, "_WINOGRAD_MIN_CHANNELS", 1)
  monkeypatch.setattr(conv_ops, "_WINOGRAD_MIN_CHANNEL_PRODUCT", 1)


def _spy(monkeypatch):
  calls = []
  plain = winograd_wgrad.weight_grad
  monkeypatch.setattr(winograd_wgrad, "weight_grad", lambda x, g, *a: calls.append(tuple(g.shape)) or plain(x, g, *a))
  return calls


@pytest.mark.parametrize("n,h,w", [(1, 11, 9), (2, 8, 12)])
def test_conv2d_weight_grad_by_winograd_matches_lax(n, h, w, monkeypatch):
  _force(monkeypatch)
  calls = _spy(monkeypatch)
  x, g = _data(n, h, w, 36, 32, seed=3)
  k = (np.random.default_rng(4).standard_normal((3, 3, 36, 32)) / np.sqrt(9 * 36)).astype(np.float32)
  ours = lambda x, k: conv_ops.conv2d(x, k, (1, 1), SAME, impl="matmul")
  _, vjp = jax.vjp(ours, x, k)
  dk = vjp(g)[1]
  assert calls == [(n, h, w, 32)]
  dk_ref = _lax_dw(x, g)
  np.testing.assert_allclose(dk, dk_ref, atol=TOL * float(np.max(np.abs(dk_ref))))
  assert _rel(dk, _ref64(x, g)) < TOL


def test_conv2d_concat_weight_grad_by_winograd_matches_lax(monkeypatch):
  _force(monkeypatch)
  calls = _spy(monkeypatch)
  rng = np.random.default_rng(5)
  parts = [rng.standard_normal((2, 9, 10, c)).astype(np.float32) for c in (20, 2, 14)]
  k = (rng.standard_normal((3, 3, 36, 32)) / np.sqrt(324)).astype(np.float32)
  ours = lambda ps, k: conv_ops.conv2d_concat(ps, k, (1, 1), SAME, impl="matmul")
  ref = lambda ps, k: lax.conv_general_dilated(jnp.concatenate(ps, -1), k, (1, 1), SAME, dimension_numbers=DN)
  y, vjp = jax.vjp(ours, parts, k)
  _, vjp_ref = jax.vjp(ref, parts, k)
  g = rng.standard_normal(y.shape).astype(np.float32)
  (dps, dk), (dps_ref, dk_ref) = vjp(g), vjp_ref(g)
  assert calls == [(2, 9, 10, 32)]
  np.testing.assert_allclose(dk, dk_ref, atol=TOL * float(np.max(np.abs(dk_ref))))
  for a, b in zip(dps, dps_ref):
    np.testing.assert_allclose(a, b, atol=1e-4 * float(np.max(np.abs(b))))


def test_small_pwcnet_with_winograd_weight_grads_matches_xla(monkeypatch):
  # Every stride-1 3x3 undilated conv of a small PWC-Net with its weight gradient (and forward and input gradient)
  # by Winograd, against the same network on XLA's convolutions: loss and parameter gradients agree.
  run, ((l_ref, _), g_ref) = small_pwcnet_value_and_grad(
      pyramid_channels=(8, 32), estimator_channels=(48, 32, 8), context_channels=(32, 8))
  _force(monkeypatch)
  calls = _spy(monkeypatch)
  (l_w, _), g_w = run()
  # The level-2 pyramid conv1 (32 -> 32, both frames at once), the estimator's conv0 (25 -> 48) and conv1
  # (73 -> 32) and the context conv0 (113 -> 32); convs with <= 8 output channels keep 'concat', the dilated
  # context conv1 'blocked', and channel products below 1,024 XLA's.
  assert sorted(calls) == [(2, 16, 16, 32), (2, 16, 16, 32), (2, 16, 16, 48), (4, 16, 16, 32)]
  np.testing.assert_allclose(l_w, l_ref, rtol=1e-4)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_w), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=1e-3 * float(np.max(np.abs(b))) + 1e-7, err_msg=str(path))
