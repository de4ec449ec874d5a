"""Tests of jaxflow.ops.resize_flow / image_pyramid against numpy references and exact cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxflow.ops import image_pyramid, resize_flow


def numpy_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Half-pixel bilinear resize of (B, H, W, C) with border clamping, float64, by separable 1-D interpolation."""

  def axis_weights(n_in: int, n_out: int) -> np.ndarray:
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
      src = min(max((o + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1.0)
      lo = int(np.floor(src))
      hi = min(lo + 1, n_in - 1)
      m[o, lo] += 1 - (src - lo)
      m[o, hi] += src - lo
    return m

  my = axis_weights(x.shape[1], size[0])
  mx = axis_weights(x.shape[2], size[1])
  return np.einsum("yh,bhwc,xw->byxc", my, x.astype(np.float64), mx)


@pytest.mark.parametrize("src,dst", [((8, 12), (16, 24)), ((12, 16), (6, 8)), ((10, 14), (7, 23)), ((9, 5), (9, 11))])
def test_resize_flow_matches_numpy_and_rescales(src, dst):
  flow = np.random.default_rng(sum(src + dst)).normal(size=(2,) + src + (2,)).astype(np.float32)
  out = resize_flow(jnp.asarray(flow), dst)
  assert out.shape == (2,) + dst + (2,) and out.dtype == jnp.float32
  expected = numpy_bilinear(flow, dst) * np.array([dst[1] / src[1], dst[0] / src[0]])
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_constant_flow_is_rescaled_exactly():
  flow = np.broadcast_to(np.array([3.0, -2.0], np.float32), (1, 8, 12, 2))
  out = np.asarray(resize_flow(jnp.asarray(flow), (16, 18)))
  np.testing.assert_allclose(out[..., 0], 3.0 * 18 / 12, rtol=1e-6)
  np.testing.assert_allclose(out[..., 1], -2.0 * 16 / 8, rtol=1e-6)


def test_downsample_by_two_is_block_mean_and_works_with_leading_dims():
  flow = np.random.default_rng(1).normal(size=(3, 2, 8, 10, 2)).astype(np.float32)
  out = np.asarray(jax.jit(resize_flow, static_argnums=1)(jnp.asarray(flow), (4, 5)))
  block = flow.reshape(3, 2, 4, 2, 5, 2, 2).mean(axis=(3, 5))
  np.testing.assert_allclose(out, block * 0.5, rtol=1e-5, atol=1e-6)


def test_same_size_is_identity():
  flow = jnp.asarray(np.random.default_rng(2).normal(size=(1, 5, 7, 2)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(resize_flow(flow, (5, 7))), np.asarray(flow))


@pytest.mark.parametrize("shape,size,match", [((1, 4, 5, 3), (2, 2), r"\(\.\.\., H, W, 2\)"),
                                              ((1, 4, 5, 2), (0, 3), "positive"),
                                              ((1, 4, 5, 2), (2, 2, 2), "positive"),
                                              ((1, 4, 5, 2), (2.5, 2), "positive")])
def test_resize_flow_bad_input(shape, size, match):
  with pytest.raises(ValueError, match=match):
    resize_flow(jnp.zeros(shape), size)


def test_image_pyramid_is_repeated_block_mean():
  image = np.random.default_rng(3).uniform(size=(2, 16, 24, 3)).astype(np.float32)
  levels = image_pyramid(jnp.asarray(image), 4)
  assert [lv.shape for lv in levels] == [(2, 16, 24, 3), (2, 8, 12, 3), (2, 4, 6, 3), (2, 2, 3, 3)]
  for k, lv in enumerate(levels):
    f = 2 ** k
    expected = image.reshape(2, 16 // f, f, 24 // f, f, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(np.asarray(lv), expected, rtol=1e-5, atol=1e-6)


def test_image_pyramid_bad_input():
  with pytest.raises(ValueError, match="divisible"):
    image_pyramid(jnp.zeros((1, 12, 16, 3)), 4)
  with pytest.raises(ValueError, match="levels"):
    image_pyramid(jnp.zeros((1, 8, 8, 3)), 0)
  with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
    image_pyramid(jnp.zeros((8, 8, 3)), 2)


def _np_align_corners_1d(n_in, n_out):
  # Independent reference: PyTorch's align_corners=True source position i * (n_in - 1) / (n_out - 1).
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    p = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    lo = min(int(np.floor(p)), n_in - 1)
    hi = min(lo + 1, n_in - 1)
    m[i, lo] += 1 - (p - lo)
    m[i, hi] += p - lo
  return m


@pytest.mark.parametrize("src,dst", [((5, 7), (10, 14)), ((6, 4), (3, 9)), ((1, 3), (4, 4))])
def test_resize_flow_align_corners_matches_numpy(src, dst):
  rng = np.random.default_rng(3)
  flow = rng.normal(size=(2,) + src + (2,)).astype(np.float32)
  my, mx = _np_align_corners_1d(src[0], dst[0]), _np_align_corners_1d(src[1], dst[1])
  ref = np.einsum("Yy,byxc,Xx->bYXc", my, flow, mx) * np.array([dst[1] / src[1], dst[0] / src[0]])
  out = np.asarray(resize_flow(jnp.asarray(flow), dst, align_corners=True))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # The corner pixels coincide exactly (only the values are rescaled).
  scale = np.array([dst[1] / src[1], dst[0] / src[0]])
  np.testing.assert_allclose(out[:, 0, 0] / scale, flow[:, 0, 0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[:, -1, -1] / scale, flow[:, -1, -1], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="align_corners"):
    resize_flow(jnp.asarray(flow), dst, method="nearest", align_corners=True)
