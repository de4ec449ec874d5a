"""jaxflow.ops.conv (matmul weight gradients) against lax's convolution and its autodiff, and a numpy reference;
jaxflow.platform's flag merging and cache set-up."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxflow import platform
from jaxflow.models import layers
from jaxflow.ops import conv as conv_ops

DN = ("NHWC", "HWIO", "NHWC")


def lax_conv(x, w, s, pad, d):
  return lax.conv_general_dilated(x, w, (s, s), ((pad, pad), (pad, pad)), rhs_dilation=(d, d),
                                  dimension_numbers=DN)


def numpy_weight_grad(x, g, k, s, pad, d):
  """dW[i, j] = sum_{n,y,x} xp[n, s*y + d*i, s*x + d*j]^T g[n, y, x] by explicit slicing, float64."""
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  g = np.asarray(g, np.float64)
  ho, wo = g.shape[1:3]
  out = np.zeros((k, k, x.shape[-1], g.shape[-1]))
  for i in range(k):
    for j in range(k):
      win = xp[:, d * i: d * i + s * (ho - 1) + 1: s, d * j: d * j + s * (wo - 1) + 1: s]
      out[i, j] = np.einsum("nhwc,nhwo->co", win, g)
  return out


# (H, W, C_in, C_out, kernel, stride, pad, dilation): PWC-Net's kinds (3x3 s1 / s2, dilated context), odd sizes,
# 1x1, and a 5x5 stride-3 dilation-2 case for the phase bookkeeping.
CASES = [(8, 10, 3, 5, 3, 1, 1, 1), (8, 10, 3, 5, 3, 2, 1, 1), (9, 11, 4, 6, 3, 2, 1, 1), (16, 16, 4, 3, 3, 1, 4, 4),
         (7, 9, 2, 3, 1, 1, 0, 1), (10, 12, 3, 2, 5, 3, 3, 2), (12, 12, 6, 2, 3, 1, 2, 2),
         (9, 11, 3, 4, 7, 1, 3, 1)]  # SpyNet's 7x7


# The concat, blocked and split modes are for stride 1 only (mode selection never picks them otherwise).
MODE_CASES = [(case, mode) for case in CASES for mode in ("scan", "unrolled", "concat", "blocked", "split")
              if mode not in ("concat", "blocked", "split") or case[5] == 1]


@pytest.mark.parametrize("case,mode", MODE_CASES)
def test_weight_grad_matches_numpy(case, mode):
  h, w, cin, cout, k, s, pad, d = case
  rng = np.random.default_rng(hash(case) % 2 ** 32)
  x = rng.normal(size=(2, h, w, cin)).astype(np.float32)
  ho = (h + 2 * pad - d * (k - 1) - 1) // s + 1
  wo = (w + 2 * pad - d * (k - 1) - 1) // s + 1
  g = rng.normal(size=(2, ho, wo, cout)).astype(np.float32)
  got = conv_ops.weight_grad_matmul(jnp.asarray(x), jnp.asarray(g), (k, k, cin, cout), (s, s),
                                    ((pad, pad), (pad, pad)), (d, d), mode)
  assert got.shape == (k, k, cin, cout) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), numpy_weight_grad(x, g, k, s, pad, d), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("case", CASES + [(8, 8, 40, 40, 3, 1, 1, 1), (8, 8, 40, 40, 3, 2, 1, 1),
                                          (9, 10, 20, 24, 7, 1, 3, 1), (8, 8, 16, 2, 7, 1, 3, 1)])
def test_conv2d_values_and_grads_match_lax(case, monkeypatch):
  """Forward identical to lax; (x, w) gradients of a nonlinear loss equal lax autodiff's (every wgrad mode is
  reached: small channel products -> lax, 40x40 -> blocked at stride 1 and scan at stride 2, C_out <= 8 at
  stride 1 -> concat, 7x7 20 -> 24 and 16 -> 2 -> split; the size threshold is lowered so that these small
  inputs take the matmul paths)."""
  monkeypatch.setattr(conv_ops, "_MIN_TAP_MACS", 0)
  monkeypatch.setattr(conv_ops, "_IM2COL_MAX_POSITIONS", 0)  # the patch product has its own tests
  h, w, cin, cout, k, s, pad, d = case
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, h, w, cin)), jnp.float32)
  wt = jnp.asarray(rng.normal(size=(k, k, cin, cout)) * 0.3, jnp.float32)
  padding = ((pad, pad), (pad, pad))
  np.testing.assert_array_equal(np.asarray(conv_ops.conv2d(x, wt, (s, s), padding, (d, d), impl="matmul")),
                                np.asarray(lax_conv(x, wt, s, pad, d)))
  loss = lambda impl: jax.jit(jax.grad(
      lambda x, w: jnp.sum(jnp.sin(conv_ops.conv2d(x, w, (s, s), padding, (d, d), impl=impl))), (0, 1)))
  (gx, gw), (rx, rw) = loss("matmul")(x, wt), loss("lax")(x, wt)
  np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), rtol=2e-5, atol=2e-4)


def test_weight_grad_mode_selection():
  assert conv_ops.weight_grad_mode(565, 2, (1, 1)) == "concat"
  assert conv_ops.weight_grad_mode(565, 2, (2, 2)) == "scan"
  assert conv_ops.weight_grad_mode(16, 32, (2, 2)) == "lax"
  assert conv_ops.weight_grad_mode(117, 128, (1, 1)) == "blocked"
  assert conv_ops.weight_grad_mode(117, 128, (1, 1), 4 * 48 * 64) == "blocked"
  assert conv_ops.weight_grad_mode(117, 128, (2, 2), 4 * 48 * 64) == "scan"
  assert conv_ops.weight_grad_mode(32, 32, (1, 1), 4 * 48 * 64) == "lax"  # small problem: XLA's is faster


def test_weight_grad_mode_selection_for_large_kernels_and_split(monkeypatch):
  # 7x7 at stride 1 (SpyNet): the split product, also for C_out 2 and for any size; XLA's for inputs under 16
  # channels; stride 2 keeps the scan.
  for cin, cout in ((32, 64), (64, 32), (32, 16), (16, 2)):
    assert conv_ops.weight_grad_mode(cin, cout, (1, 1), 4 * 8 * 8, (7, 7)) == "split"
  assert conv_ops.weight_grad_mode(8, 32, (1, 1), 4 * 128 * 128, (7, 7)) == "lax"
  assert conv_ops.weight_grad_mode(32, 64, (2, 2), 4 * 128 * 128, (7, 7)) == "scan"
  # 3x3 (PWC-Net) keeps blocked / concat; without split (session 5's path) 7x7 takes them too.
  assert conv_ops.weight_grad_mode(128, 128, (1, 1), None, (3, 3)) == "blocked"
  assert conv_ops.weight_grad_mode(565, 2, (1, 1), None, (3, 3)) == "concat"
  monkeypatch.setattr(conv_ops, "_SPLIT", False)
  assert conv_ops.weight_grad_mode(32, 64, (1, 1), None, (7, 7)) == "blocked"
  assert conv_ops.weight_grad_mode(16, 2, (1, 1), None, (7, 7)) == "concat"


def test_block_rows_divide_the_height_and_bound_the_block():
  assert conv_ops._block_rows(48, 64) == 8  # 512 positions
  assert conv_ops._block_rows(96, 128) == 4
  assert conv_ops._block_rows(12, 16) == 12  # the whole image: 192 positions
  assert conv_ops._block_rows(13, 64) == 1  # a prime height: one row per block
  assert conv_ops._block_rows(7, 1000) == 1  # a row wider than a block is still one block


@pytest.mark.parametrize("mode", ["blocked", "split"])
@pytest.mark.parametrize("padding,d", [(((1, 1), (1, 1)), 1), (((2, 0), (0, 1)), 1), (((3, 2), (4, 1)), 2)])
def test_blocked_weight_grad_over_many_blocks_matches_lax(padding, d, mode, monkeypatch):
  """Several blocks per image (block size lowered to 2-3 rows) and asymmetric padding: the blocked and the
  split weight gradients equal lax autodiff's."""
  monkeypatch.setattr(conv_ops, "_BLOCK_POSITIONS", 30)
  monkeypatch.setattr(conv_ops, "_WHOLE_SPLIT_BYTES", 0)  # 'split' loops over the blocks however small
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(3, 9, 11, 5)), jnp.float32)  # rows per block: 1 (9 = 3 * 3, 3 * 11 > 30)
  x2 = jnp.asarray(rng.normal(size=(2, 8, 10, 5)), jnp.float32)  # rows per block: 2
  for xx in (x, x2):
    assert xx.shape[1] // conv_ops._block_rows(xx.shape[1], xx.shape[2]) > 1
    wt = jnp.asarray(rng.normal(size=(3, 3, 5, 7)), jnp.float32)
    f = lambda w_: lax.conv_general_dilated(xx, w_, (1, 1), padding, rhs_dilation=(d, d), dimension_numbers=DN)
    y, vjp = jax.vjp(f, wt)
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    got = conv_ops.weight_grad_matmul(xx, g, wt.shape, (1, 1), padding, (d, d), mode)
    np.testing.assert_allclose(np.asarray(got), np.asarray(vjp(g)[0]), rtol=2e-5, atol=2e-4)
    # Windows by a slice per tap instead of one gather: bitwise the same.
    monkeypatch.setattr(conv_ops, "_GATHER_TAPS", False)
    sliced = conv_ops.weight_grad_matmul(xx, g, wt.shape, (1, 1), padding, (d, d), mode)
    monkeypatch.setattr(conv_ops, "_GATHER_TAPS", True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(sliced))
    # The input as channel parts (conv2d_concat's backward pass): the same gradient, rows per part.
    parts = [xx[..., :2], xx[..., 2:3], xx[..., 3:]]
    got = conv_ops._weight_grad_stride1(parts, g, wt.shape, padding, (d, d), mode, jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(vjp(g)[0]), rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("padding,d", [(((3, 3), (3, 3)), 1), (((2, 0), (0, 4)), 1), (((3, 2), (4, 1)), 2)])
def test_split_weight_grad_gather_equals_slices(padding, d, monkeypatch):
  """'split' takes each block's windows by one gather (zero fill outside x's columns) or by a slice per tap:
  the same elements, so bitwise the same gradient, and both equal lax's (7x7, several blocks, channel parts)."""
  monkeypatch.setattr(conv_ops, "_BLOCK_POSITIONS", 30)
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, 10, 9, 5)), jnp.float32)
  wt = jnp.asarray(rng.normal(size=(7, 7, 5, 3)), jnp.float32)
  f = lambda w_: lax.conv_general_dilated(x, w_, (1, 1), padding, rhs_dilation=(d, d), dimension_numbers=DN)
  y, vjp = jax.vjp(f, wt)
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  got = {}
  monkeypatch.setattr(conv_ops, "_WHOLE_SPLIT_BYTES", 0)  # the loop over blocks
  for gather in (True, False):
    monkeypatch.setattr(conv_ops, "_GATHER_TAPS", gather)
    got[gather] = np.asarray(conv_ops._weight_grad_stride1([x[..., :2], x[..., 2:]], g, wt.shape, padding, (d, d),
                                                           "split", jnp.float32))
  np.testing.assert_array_equal(got[True], got[False])
  np.testing.assert_allclose(got[True], np.asarray(vjp(g)[0]), rtol=2e-5, atol=2e-4)
  # Small enough for one gather over all images and no loop (the default's threshold): lax's gradient too, and
  # per part; the loop is not traced (no scan in the program).
  monkeypatch.setattr(conv_ops, "_GATHER_TAPS", True)
  monkeypatch.setattr(conv_ops, "_WHOLE_SPLIT_BYTES", conv_ops.WHOLE_SPLIT_BYTES)
  whole = lambda g_: conv_ops._weight_grad_stride1([x[..., :2], x[..., 2:]], g_, wt.shape, padding, (d, d), "split",
                                                   jnp.float32)
  assert "scan" not in str(jax.make_jaxpr(whole)(g)) and "scan" in str(jax.make_jaxpr(
      lambda g_: conv_ops._split_blocks([x], jnp.pad(g_, ((0, 0), (7, 7), (0, 0), (0, 0))), None, None, (7, 7, 3),
                                        (7, 0, 3, 3), (1, 1), 5, jnp.float32))(g))
  np.testing.assert_allclose(np.asarray(whole(g)), np.asarray(vjp(g)[0]), rtol=2e-5, atol=2e-4)
  # (N * H * Wo positions) x (kw * C_in + kh * C_out) float32: one byte too few for the whole arrays.
  monkeypatch.setattr(conv_ops, "_WHOLE_SPLIT_BYTES", 2 * 10 * g.shape[2] * (7 * 5 + 7 * 3) * 4 - 1)
  assert "scan" in str(jax.make_jaxpr(lambda g_: whole(g_))(g))  # a new function: traced again


def test_bfloat16_gradient_dtype_and_value():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 40)), jnp.bfloat16)
  wt = jnp.asarray(rng.normal(size=(3, 3, 40, 40)) * 0.1, jnp.bfloat16)
  f = lambda impl: jax.grad(lambda w: jnp.sum(conv_ops.conv2d(x, w, (1, 1), ((1, 1), (1, 1)),
                                                              impl=impl).astype(jnp.float32)))(wt)
  got = f("matmul")
  assert got.dtype == jnp.bfloat16
  ref = numpy_weight_grad(np.asarray(x.astype(jnp.float32)), np.ones((2, 8, 8, 40), np.float32), 3, 1, 1, 1)
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), ref, rtol=1e-2, atol=1e-1)


def test_bad_inputs_name_the_shapes():
  x = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(ValueError, match=r"input channels 3 .*C_in 4"):
    conv_ops.conv2d(x, jnp.zeros((3, 3, 4, 2)))
  with pytest.raises(ValueError, match="padding must be explicit"):
    conv_ops.conv2d(x, jnp.zeros((3, 3, 3, 2)), padding="SAME")
  with pytest.raises(ValueError, match="impl must be one of"):
    conv_ops.set_default_impl("fast")


def test_layers_conv_same_params_and_values_as_nn_conv(monkeypatch):
  """layers.conv keeps nn.Conv's parameter tree (names, shapes, init values) and forward values; its kernel
  gradient (taken by the matmul scan here) equals the one through plain lax."""
  monkeypatch.setattr(conv_ops, "_MIN_TAP_MACS", 0)
  monkeypatch.setattr(conv_ops, "_IM2COL_MAX_POSITIONS", 0)
  assert conv_ops.weight_grad_mode(40, 48, (2, 2), 2 * 8 * 8) == "scan"
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 16, 16, 40)), jnp.float32)
  ours = layers.conv(48, 3, stride=2, name="c")
  plain = nn.Conv(48, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), kernel_init=layers.kaiming, name="c")
  v1, v2 = ours.init(jax.random.key(0), x), plain.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, v1) == jax.tree.map(jnp.shape, v2)
  for a, b in zip(jax.tree.leaves(v1), jax.tree.leaves(v2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(ours.apply(v1, x)), np.asarray(plain.apply(v2, x)))
  g1 = jax.grad(lambda v: jnp.sum(ours.apply(v, x) ** 2))(v1)
  g2 = jax.grad(lambda v: jnp.sum(plain.apply(v, x) ** 2))(v2)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-4)


def test_merge_xla_flags_keeps_the_users_value():
  merged = platform.merge_xla_flags("--xla_cpu_use_xnnpack=false --foo=1",
                                    {"xla_cpu_use_xnnpack": "true", "xla_backend_optimization_level": 1})
  assert merged.split() == ["--xla_cpu_use_xnnpack=false", "--foo=1", "--xla_backend_optimization_level=1"]
  assert platform.merge_xla_flags("", {"a": 2}) == "--a=2"


def test_configure_sets_the_compilation_cache(tmp_path):
  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  try:
    out = platform.configure(cache_dir=str(tmp_path / "cache"), min_compile_time_secs=0.5, conv_impl="lax")
    assert out["cache_dir"] == str(tmp_path / "cache") and os.path.isdir(out["cache_dir"])
    assert jax.config.jax_compilation_cache_dir == out["cache_dir"]
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.5
    assert out["conv_impl"] == "lax" and not out["flags_applied"]  # no cpu_flags given
  finally:
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    conv_ops.set_default_impl("auto")


@pytest.mark.parametrize("impl", ["matmul", "lax"])
def test_conv2d_concat_equals_conv_of_the_concatenation(impl, monkeypatch):
  """Values and the gradients of every part and of the kernel equal lax autodiff through the materialised
  concatenation (dilation 2, parts of 3, 1 and 6 channels, a blocked and a concat-mode weight gradient)."""
  monkeypatch.setattr(conv_ops, "_MIN_TAP_MACS", 0)
  rng = np.random.default_rng(5)
  parts = [jnp.asarray(rng.normal(size=(2, 9, 7, c)), jnp.float32) for c in (3, 1, 6)]
  for cout in (40, 2):
    wt = jnp.asarray(rng.normal(size=(3, 3, 10, cout)) * 0.3, jnp.float32)
    pad = ((2, 2), (2, 2))
    ours = lambda ps, w: jnp.sum(jnp.sin(conv_ops.conv2d_concat(ps, w, (1, 1), pad, (2, 2), impl=impl)))
    ref = lambda ps, w: jnp.sum(jnp.sin(lax.conv_general_dilated(jnp.concatenate(ps, -1), w, (1, 1), pad,
                                                                 rhs_dilation=(2, 2), dimension_numbers=DN)))
    np.testing.assert_allclose(float(ours(parts, wt)), float(ref(parts, wt)), rtol=1e-6)
    (gp, gw), (rp, rw) = jax.grad(ours, (0, 1))(parts, wt), jax.grad(ref, (0, 1))(parts, wt)
    assert [g.shape for g in gp] == [p.shape for p in parts]
    for a, b in zip(gp, rp):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), rtol=2e-5, atol=2e-4)


def test_conv2d_concat_saves_the_parts_not_the_concatenation():
  """The custom VJP's residuals are the parts themselves (no array with the summed channel count is kept)."""
  parts = [jnp.ones((1, 6, 6, 4)), jnp.ones((1, 6, 6, 5))]
  wt = jnp.ones((3, 3, 9, 8))
  _, res = conv_ops._concat_fwd(tuple(parts), wt, (1, 1), ((1, 1), (1, 1)), (1, 1))
  shapes = [r.shape for r in jax.tree.leaves(res)]
  assert (1, 6, 6, 9) not in shapes and shapes.count((1, 6, 6, 4)) == 1 and shapes.count((1, 6, 6, 5)) == 1


def test_conv2d_concat_bad_inputs_name_the_shapes():
  a, b = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 9, 2))
  with pytest.raises(ValueError, match=r"input 1 has shape \(1, 8, 9, 2\)"):
    conv_ops.conv2d_concat([a, b], jnp.zeros((3, 3, 5, 2)))
  with pytest.raises(ValueError, match=r"add up to 5.*\(kh, kw, 5, C_out\)"):
    conv_ops.conv2d_concat([a, jnp.zeros((1, 8, 8, 2))], jnp.zeros((3, 3, 4, 2)))
  with pytest.raises(ValueError, match="at least one input"):
    conv_ops.conv2d_concat([], jnp.zeros((3, 3, 4, 2)))


def test_concat_conv_has_nn_conv_parameters_and_values():
  """layers.ConcatConv: the parameter tree and init values of layers.conv on the concatenation, equal outputs."""
  rng = np.random.default_rng(6)
  parts = [jnp.asarray(rng.normal(size=(2, 8, 8, c)), jnp.float32) for c in (5, 7)]
  x = jnp.concatenate(parts, -1)
  ours, plain = layers.ConcatConv(6, 3, dilation=2, name="c"), layers.conv(6, 3, dilation=2, name="c")
  v1, v2 = ours.init(jax.random.key(0), parts), plain.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, v1) == jax.tree.map(jnp.shape, v2)
  for a, b in zip(jax.tree.leaves(v1), jax.tree.leaves(v2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(np.asarray(ours.apply(v1, parts)), np.asarray(plain.apply(v2, x)), rtol=1e-6,
                             atol=1e-6)


def numpy_conv(x, w, s, padding, d):
  """Cross-correlation by explicit loops over taps, float64: (N, Ho, Wo, C_out)."""
  (t, b), (l, r) = padding
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (t, b), (l, r), (0, 0)))
  kh, kw = w.shape[:2]
  ho = (xp.shape[1] - d[0] * (kh - 1) - 1) // s[0] + 1
  wo = (xp.shape[2] - d[1] * (kw - 1) - 1) // s[1] + 1
  out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
  for i in range(kh):
    for j in range(kw):
      win = xp[:, d[0] * i: d[0] * i + s[0] * (ho - 1) + 1: s[0], d[1] * j: d[1] * j + s[1] * (wo - 1) + 1: s[1]]
      out += np.einsum("nhwc,co->nhwo", win, np.asarray(w[i, j], np.float64))
  return out


def numpy_conv_transpose(x, w, s, padding):
  """lax.conv_transpose (transpose_kernel=False) by scattering: input pixel y with tap i adds x[y] @ w[i] at
  output s*y + lo - i (dropped outside), float64."""
  n, h, wd, _ = x.shape
  kh, kw, _, cout = w.shape
  (t, b), (l, r) = padding
  ho, wo = (h - 1) * s[0] + 1 + t + b - kh + 1, (wd - 1) * s[1] + 1 + l + r - kw + 1
  out = np.zeros((n, ho, wo, cout))
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  for y in range(h):
    for xx in range(wd):
      for i in range(kh):
        for j in range(kw):
          oy, ox = s[0] * y + t - i, s[1] * xx + l - j
          if 0 <= oy < ho and 0 <= ox < wo:
            out[:, oy, ox] += x[:, y, xx] @ w[i, j]
  return out


# (x shape, kernel shape, strides, padding, dilation): odd sizes, strides 1-3, asymmetric padding, dilation.
IM2COL_CASES = [((2, 5, 7, 3), (3, 3, 3, 12), (1, 1), ((1, 1), (1, 1)), (1, 1)),
                ((2, 9, 6, 4), (3, 2, 4, 10), (2, 2), ((1, 0), (2, 1)), (1, 1)),
                ((1, 8, 9, 5), (3, 3, 5, 16), (1, 1), ((2, 2), (2, 2)), (2, 2)),
                ((2, 7, 7, 3), (5, 5, 3, 9), (2, 3), ((2, 2), (0, 2)), (1, 1))]


@pytest.mark.parametrize("xs,ws,s,padding,d", IM2COL_CASES)
def test_conv2d_im2col_values_and_grads(xs, ws, s, padding, d):
  """The patch product equals a numpy loop over taps; its (x, w) gradients equal lax autodiff's."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=xs), jnp.float32)
  wt = jnp.asarray(rng.normal(size=ws) * 0.3, jnp.float32)
  got = conv_ops.conv2d_im2col(x, wt, s, padding, d)
  np.testing.assert_allclose(np.asarray(got), numpy_conv(x, wt, s, padding, d), rtol=1e-5, atol=1e-5)
  ref = lambda x_, w_: lax.conv_general_dilated(x_, w_, s, padding, rhs_dilation=d, dimension_numbers=DN)
  loss = lambda f: jax.grad(lambda x_, w_: jnp.sum(jnp.sin(f(x_, w_))), (0, 1))
  (gx, gw), (rx, rw) = loss(lambda a, b: conv_ops.conv2d_im2col(a, b, s, padding, d))(x, wt), loss(ref)(x, wt)
  np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("xs,ws,s,padding,d", IM2COL_CASES)
def test_conv2d_im2col_gathered_patches_equal_the_sliced_ones(xs, ws, s, padding, d, monkeypatch):
  """The patch matrix by one gather (the default) and by a strided slice per tap: bitwise the same values and
  (x, w) gradients (the same elements are copied; the backward pass is the slices' in both)."""
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=xs), jnp.float32)
  wt = jnp.asarray(rng.normal(size=ws) * 0.3, jnp.float32)
  got = {}
  for gather in (True, False):
    monkeypatch.setattr(conv_ops, "_GATHER_PATCHES", gather)
    jaxpr = str(jax.make_jaxpr(lambda a: conv_ops.conv2d_im2col(a, wt, s, padding, d))(x))
    assert ("gather" in jaxpr) == gather
    f = jax.jit(jax.value_and_grad(lambda x_, w_: jnp.sum(jnp.sin(conv_ops.conv2d_im2col(x_, w_, s, padding, d))),
                                   (0, 1)))
    got[gather] = jax.tree.map(np.asarray, f(x, wt))
  jax.tree.map(np.testing.assert_array_equal, got[True], got[False])


def test_concat_weight_grad_gathered_windows_equal_the_sliced_ones(monkeypatch):
  """Mode 'concat' (few output channels) takes the K shifted output-gradient windows by one gather or by a slice
  per tap: bitwise the same weight gradient, for a dilated asymmetric padding and for channel parts."""
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(2, 9, 11, 6)), jnp.float32)
  for padding, d in ((((1, 1), (1, 1)), 1), (((3, 2), (4, 1)), 2)):
    ho, wo = 9 + sum(padding[0]) - 2 * d, 11 + sum(padding[1]) - 2 * d
    g = jnp.asarray(rng.normal(size=(2, ho, wo, 2)), jnp.float32)
    got = {}
    for gather in (True, False):
      monkeypatch.setattr(conv_ops, "_GATHER_PATCHES", gather)
      got[gather] = [np.asarray(conv_ops._weight_grad_stride1(xs, g, (3, 3, 6, 2), padding, (d, d), "concat",
                                                              jnp.float32)) for xs in ([x], [x[..., :4], x[..., 4:]])]
    for a, b in zip(got[True], got[False]):
      np.testing.assert_array_equal(a, b)
    ref = jax.vjp(lambda w_: lax.conv_general_dilated(x, w_, (1, 1), padding, rhs_dilation=(d, d),
                                                      dimension_numbers=DN), jnp.zeros((3, 3, 6, 2)))[1](g)[0]
    np.testing.assert_allclose(got[True][0], np.asarray(ref), rtol=2e-5, atol=2e-4)


def test_conv2d_takes_the_patch_product_only_for_few_positions_and_many_channels(monkeypatch):
  """Selection: few output positions with C_out > 8 and C_in <= 4 C_out -> conv2d_im2col (through conv2d, same
  values as lax); conv2d_concat, more positions, C_out <= 8, a wider input, bfloat16 or impl 'lax' -> not."""
  monkeypatch.setattr(conv_ops, "_IM2COL_MIN_CHANNEL_PRODUCT", 0)  # small channels below; the default at the end
  calls = []
  orig = conv_ops.conv2d_im2col
  monkeypatch.setattr(conv_ops, "conv2d_im2col", lambda *a: calls.append(a[0].shape) or orig(*a))
  rng = np.random.default_rng(6)
  pad = ((1, 1), (1, 1))
  x = jnp.asarray(rng.normal(size=(2, 4, 6, 20)), jnp.float32)
  wt = jnp.asarray(rng.normal(size=(3, 3, 20, 16)) * 0.2, jnp.float32)
  y = conv_ops.conv2d(x, wt, (1, 1), pad, impl="matmul")
  assert calls == [(2, 4, 6, 20)]
  np.testing.assert_allclose(np.asarray(y), np.asarray(lax_conv(x, wt, 1, 1, 1)), rtol=1e-5, atol=1e-5)
  calls.clear()
  y = conv_ops.conv2d_concat([x[..., :7], x[..., 7:]], wt, (1, 1), pad, impl="matmul")
  np.testing.assert_allclose(np.asarray(y), np.asarray(lax_conv(x, wt, 1, 1, 1)), rtol=1e-5, atol=1e-5)
  conv_ops.conv2d(x, wt[..., :8], (1, 1), pad, impl="matmul")  # C_out 8
  conv_ops.conv2d(jnp.concatenate([x] * 4, -1)[..., :65], jnp.zeros((3, 3, 65, 16)), (1, 1), pad,
                  impl="matmul")  # C_in 65 > 4 * 16
  conv_ops.conv2d(x, wt, (1, 1), pad, impl="lax")
  conv_ops.conv2d(x.astype(jnp.bfloat16), wt.astype(jnp.bfloat16), (1, 1), pad, impl="matmul")  # float32 only
  monkeypatch.setattr(conv_ops, "_IM2COL_MAX_POSITIONS", 2 * 4 * 6 - 1)
  conv_ops.conv2d(x, wt, (1, 1), pad, impl="matmul")  # one position too many
  assert calls == []
  # The default channel bound: 20 x 16 (SpyNet / PWC-Net-sized) stays on XLA's convolution, 256 x 256 does not.
  monkeypatch.undo()
  monkeypatch.setattr(conv_ops, "conv2d_im2col", lambda *a: calls.append(a[0].shape) or orig(*a))
  conv_ops.conv2d(x, wt, (1, 1), pad, impl="matmul")
  assert calls == []
  big = jnp.asarray(rng.normal(size=(1, 2, 2, 256)), jnp.float32)
  conv_ops.conv2d(big, jnp.zeros((3, 3, 256, 256)), (1, 1), pad, impl="matmul")
  assert calls == [(1, 2, 2, 256)]


# (x shape, kernel shape, strides, padding): FlowNet / PWC-Net's 4x4 / 2 with padding 2 (doubles the size),
# odd sizes, asymmetric padding, stride 1 and 3, a 3x3 kernel.
TCONV_CASES = [((2, 3, 5, 4), (4, 4, 4, 3), (2, 2), ((2, 2), (2, 2))),
               ((1, 4, 3, 2), (3, 3, 2, 5), (2, 2), ((1, 2), (2, 1))),
               ((2, 3, 3, 2), (4, 4, 2, 2), (1, 1), ((0, 3), (1, 1))),
               ((1, 3, 4, 3), (3, 4, 3, 2), (3, 2), ((0, 0), (3, 1)))]


@pytest.mark.parametrize("xs,ws,s,padding", TCONV_CASES)
def test_conv_transpose2d_matmul_values_and_grads(xs, ws, s, padding):
  """The product + overlap-add equals a numpy scatter of each input pixel's taps and lax.conv_transpose;
  its (x, w) gradients equal lax autodiff's."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=xs), jnp.float32)
  wt = jnp.asarray(rng.normal(size=ws) * 0.3, jnp.float32)
  got = conv_ops.conv_transpose2d_matmul(x, wt, s, padding)
  ref = lambda x_, w_: lax.conv_transpose(x_, w_, s, padding, dimension_numbers=DN)
  assert got.shape == ref(x, wt).shape
  np.testing.assert_allclose(np.asarray(got), numpy_conv_transpose(x, wt, s, padding), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref(x, wt)), rtol=1e-5, atol=1e-5)
  loss = lambda f: jax.grad(lambda x_, w_: jnp.sum(jnp.sin(f(x_, w_))), (0, 1))
  (gx, gw), (rx, rw) = loss(lambda a, b: conv_ops.conv_transpose2d_matmul(a, b, s, padding))(x, wt), loss(ref)(x, wt)
  np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), rtol=1e-5, atol=1e-4)


def test_layers_conv_transpose_has_nn_conv_transpose_parameters_and_values():
  """layers.deconv (layers.ConvTranspose) keeps nn.ConvTranspose's parameter tree and init values (converted
  checkpoints load), forward values and gradients; doubles the size; bad inputs name the shapes."""
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(2, 5, 6, 12)), jnp.float32)
  ours = layers.deconv(10, name="d")
  plain = nn.ConvTranspose(10, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), kernel_init=layers.kaiming,
                           name="d")
  v1, v2 = ours.init(jax.random.key(0), x), plain.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, v1) == jax.tree.map(jnp.shape, v2)
  for a, b in zip(jax.tree.leaves(v1), jax.tree.leaves(v2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  v2 = jax.tree.map(lambda a: a + 0.1, v2)  # a non-zero bias
  y = ours.apply(v2, x)
  assert y.shape == (2, 10, 12, 10)
  np.testing.assert_allclose(np.asarray(y), np.asarray(plain.apply(v2, x)), rtol=1e-5, atol=1e-5)
  g1 = jax.grad(lambda v: jnp.sum(jnp.sin(ours.apply(v, x))))(v2)
  g2 = jax.grad(lambda v: jnp.sum(jnp.sin(plain.apply(v, x))))(v2)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match=r"conv_transpose2d: .*\(2, 5, 6, 12\) and \(4, 4, 3, 10\)"):
    conv_ops.conv_transpose2d(x, jnp.zeros((4, 4, 3, 10)), (2, 2), ((2, 2), (2, 2)))


# (x shape, kernel shape, padding, dilation): predict_flow's 3x3 'same', odd sizes, dilation, asymmetric and
# cropping padding, a 7x7 kernel.
TAPS_CASES = [((2, 9, 11, 6), (3, 3, 6, 2), ((1, 1), (1, 1)), (1, 1)),
              ((1, 8, 7, 5), (3, 3, 5, 3), ((2, 2), (2, 2)), (2, 2)),
              ((2, 7, 9, 4), (3, 3, 4, 2), ((0, 1), (2, 0)), (1, 1)),
              ((1, 9, 8, 3), (7, 7, 3, 2), ((3, 3), (3, 3)), (1, 1))]


@pytest.mark.parametrize("xs,ws,padding,d", TAPS_CASES)
def test_conv2d_taps_values_and_grads(xs, ws, padding, d):
  """The tap product equals a numpy loop over taps, whole and in channel parts; its (x, w) gradients equal lax
  autodiff's."""
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.normal(size=xs), jnp.float32)
  wt = jnp.asarray(rng.normal(size=ws) * 0.3, jnp.float32)
  want = numpy_conv(x, wt, (1, 1), padding, d)
  np.testing.assert_allclose(np.asarray(conv_ops.conv2d_taps(x, wt, padding, d)), want, rtol=1e-5, atol=1e-5)
  parts = [x[..., :2], x[..., 2:]]
  np.testing.assert_allclose(np.asarray(conv_ops.conv2d_taps(parts, wt, padding, d)), want, rtol=1e-5, atol=1e-5)
  ref = lambda x_, w_: lax.conv_general_dilated(x_, w_, (1, 1), padding, rhs_dilation=d, dimension_numbers=DN)
  loss = lambda f: jax.grad(lambda x_, w_: jnp.sum(jnp.sin(f(x_, w_))), (0, 1))
  (gx, gw), (rx, rw) = loss(lambda a, b: conv_ops.conv2d_taps(a, b, padding, d))(x, wt), loss(ref)(x, wt)
  np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), rtol=1e-5, atol=1e-4)


def test_conv2d_takes_the_tap_product_for_few_output_channels(monkeypatch):
  """Selection: float32 stride-1 convolutions with C_out <= 8 and C_in >= 64 (predict_flow) compute their
  forward values by conv2d_taps (no convolution in the forward program), through conv2d and conv2d_concat (the
  parts never concatenated), with lax's values and gradients; C_out 9, C_in 63, stride 2, bfloat16 or impl 'lax'
  keep XLA's convolution."""
  rng = np.random.default_rng(10)
  pad = ((1, 1), (1, 1))
  x = jnp.asarray(rng.normal(size=(2, 6, 5, 64)), jnp.float32)
  wt = jnp.asarray(rng.normal(size=(3, 3, 64, 2)) * 0.1, jnp.float32)
  convs = lambda f, *a: str(jax.make_jaxpr(f)(*a)).count("conv_general_dilated")
  assert convs(lambda a, b: conv_ops.conv2d(a, b, (1, 1), pad, impl="matmul"), x, wt) == 0
  parts = [x[..., :40], x[..., 40:]]
  jaxpr = str(jax.make_jaxpr(lambda ps, b: conv_ops.conv2d_concat(ps, b, (1, 1), pad, impl="matmul"))(parts, wt))
  assert "conv_general_dilated" not in jaxpr and "concatenate" not in jaxpr
  for f in (lambda a, b: conv_ops.conv2d(a, b, (1, 1), pad, impl="matmul"),
            lambda a, b: conv_ops.conv2d_concat([a[..., :40], a[..., 40:]], b, (1, 1), pad, impl="matmul")):
    loss = lambda g: jax.value_and_grad(lambda a, b: jnp.sum(jnp.sin(g(a, b))), (0, 1))
    (v, (gx, gw)), (rv, (rx, rw)) = loss(f)(x, wt), loss(lambda a, b: lax_conv(a, b, 1, 1, 1))(x, wt)
    np.testing.assert_allclose(float(v), float(rv), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), rtol=1e-5, atol=1e-4)
  fwd = lambda a, b, s=(1, 1), impl="matmul": conv_ops.conv2d(a, b, s, pad, impl=impl)
  assert convs(fwd, x, jnp.zeros((3, 3, 64, 9))) == 1
  assert convs(fwd, x[..., :63], wt[:, :, :63]) == 1
  assert convs(lambda a, b: fwd(a, b, (2, 2)), x, wt) == 1
  assert convs(fwd, x.astype(jnp.bfloat16), wt.astype(jnp.bfloat16)) == 1
  assert convs(lambda a, b: fwd(a, b, impl="lax"), x, wt) == 1
