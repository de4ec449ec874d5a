"""Cost volume by shifted dot products (the FlowNetC / PWC-Net correlation layer) in pure JAX.

`correlation(f1, f2, max_displacement, stride)` returns, for every pixel (y, x) of f1 and every displacement
(dy, dx) of a square window, the mean over channels of f1(y, x) * f2(y + dy, x + dx); positions outside f2
contribute zero (zero padding).

Implementation: a `lax.scan` over the 2n+1 displacement rows dy, with the 2n+1 column shifts dx unrolled
inside the body, so every step is a handful of dense, fused multiply-reduce loops over (B, H, W, C) and no
intermediate of size displacements x channels x H x W is ever materialised. The backward pass is a
`jax.custom_vjp` with the same structure: both input gradients are accumulated per displacement in a
(B, H, W, C) float32 carry, and the f2 gradient is written as a correlation of the zero-padded
(g, f1) pair with the displacement window flipped, so it needs neither a scatter nor any stacked residual
(autodiff of the scan would save one (B, H, W + 2d, C) slab per displacement row).

Precision: products and sums are float32 whatever the input dtype (bfloat16 products are exact in
float32), the output is always float32 (DESIGN.md: cost-volume accumulation stays float32); gradients come
back in the dtype of each input.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32


def _check_inputs(f1: jax.Array, f2: jax.Array, max_displacement: int, stride: int) -> tuple[int, int]:
  """Validates the arguments; returns (n, d): n displacements each side, d = n * stride in pixels."""
  for label, f in (("f1", f1), ("f2", f2)):
    shape = getattr(f, "shape", None)
    if shape is None or len(shape) != 4:
      raise ValueError(f"correlation: {label} must be a 4-D (B, H, W, C) feature map, got shape {shape}")
    if not jnp.issubdtype(f.dtype, jnp.floating):
      raise TypeError(f"correlation: {label} must be floating point, got dtype {f.dtype}")
  if tuple(f1.shape) != tuple(f2.shape):
    raise ValueError(f"correlation: f1 and f2 must have the same (B, H, W, C) shape, got {f1.shape} and {f2.shape}")
  if isinstance(max_displacement, bool) or not isinstance(max_displacement, int) or max_displacement < 0:
    raise ValueError(f"correlation: max_displacement must be a non-negative Python int, got {max_displacement!r}")
  if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
    raise ValueError(f"correlation: stride must be a positive Python int, got {stride!r}")
  n = max_displacement // stride
  return n, n * stride


def _pad_hw(x: jax.Array, d: int) -> jax.Array:
  """Zero-pads axes 1 and 2 (H and W) of a (B, H, W, ...) array by d on both sides."""
  pads = [(0, 0), (d, d), (d, d)] + [(0, 0)] * (x.ndim - 3)
  return jnp.pad(x, pads)


def _forward(f1: jax.Array, f2: jax.Array, n: int, s: int) -> jax.Array:
  """Cost volume (B, H, W, K*K) float32, K = 2n+1, by a scan over displacement rows."""
  b, h, w, c = f1.shape
  k, d = 2 * n + 1, n * s
  f2p = _pad_hw(f2, d)  # (B, H + 2d, W + 2d, C)
  f1f = f1.astype(_F32)
  inv_c = 1.0 / c

  def row(_, i):
    slab = lax.dynamic_slice_in_dim(f2p, i * s, h, axis=1).astype(_F32)  # (B, H, W + 2d, C)
    cols = [jnp.sum(f1f * slab[:, :, j * s:j * s + w, :], axis=-1) for j in range(k)]
    return None, jnp.stack(cols, axis=-1) * inv_c  # (B, H, W, K): fixed dy, all dx

  _, rows = lax.scan(row, None, jnp.arange(k))  # (K_dy, B, H, W, K_dx)
  return jnp.moveaxis(rows, 0, 3).reshape(b, h, w, k * k)


def _backward(f1: jax.Array, f2: jax.Array, g: jax.Array, n: int, s: int) -> tuple[jax.Array, jax.Array]:
  """Gradients of sum(g * correlation(f1, f2)) with respect to f1 and f2, accumulated per displacement.

  With f2p = f2 zero-padded by d:  dL/df1(y, x) = 1/C sum_{i,j} g(y, x, i, j) f2p(y + i s, x + j s).
  For f2, substituting i' = K-1-i, j' = K-1-j:
    dL/df2(y, x) = 1/C sum_{i',j'} gf_p(y + i' s, x + j' s, i', j') f1p(y + i' s, x + j' s),
  where gf = g with both displacement axes reversed and gf_p, f1p are zero-padded by d: the same shifted
  products as dL/df1, read from the padded (gf, f1) pair.
  """
  b, h, w, c = f1.shape
  k, d = 2 * n + 1, n * s
  inv_c = 1.0 / c
  g = g.astype(_F32).reshape(b, h, w, k, k)
  g_rows = jnp.moveaxis(g, 3, 0)  # (K_i, B, H, W, K_j)
  gf_rows = _pad_hw(jnp.moveaxis(g[:, :, :, ::-1, ::-1], 3, 0).reshape(k * b, h, w, k), d)
  gf_rows = gf_rows.reshape(k, b, h + 2 * d, w + 2 * d, k)  # (K_i', B, H + 2d, W + 2d, K_j')
  f1p = _pad_hw(f1, d)
  f2p = _pad_hw(f2, d)

  def row(carry, xs):
    acc1, acc2 = carry
    i, g_i, gf_i = xs
    f2_slab = lax.dynamic_slice_in_dim(f2p, i * s, h, axis=1).astype(_F32)  # (B, H, W + 2d, C)
    f1_slab = lax.dynamic_slice_in_dim(f1p, i * s, h, axis=1).astype(_F32)
    gf_slab = lax.dynamic_slice_in_dim(gf_i, i * s, h, axis=1)  # (B, H, W + 2d, K)
    for j in range(k):
      sl = slice(j * s, j * s + w)
      acc1 = acc1 + g_i[..., j:j + 1] * f2_slab[:, :, sl, :]
      acc2 = acc2 + gf_slab[:, :, sl, j:j + 1] * f1_slab[:, :, sl, :]
    return (acc1, acc2), None

  zeros = jnp.zeros((b, h, w, c), _F32)
  (acc1, acc2), _ = lax.scan(row, (zeros, zeros), (jnp.arange(k), g_rows, gf_rows))
  return (acc1 * inv_c).astype(f1.dtype), (acc2 * inv_c).astype(f2.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _correlation(f1: jax.Array, f2: jax.Array, n: int, s: int) -> jax.Array:
  return _forward(f1, f2, n, s)


def _correlation_fwd(f1, f2, n, s):
  return _forward(f1, f2, n, s), (f1, f2)


def _correlation_bwd(n, s, residuals, g):
  f1, f2 = residuals
  return _backward(f1, f2, g, n, s)


_correlation.defvjp(_correlation_fwd, _correlation_bwd)


def correlation(f1: jax.Array, f2: jax.Array, max_displacement: int, stride: int = 1) -> jax.Array:
  """Cost volume: mean over channels of f1(y, x) * f2(y + dy, x + dx) for a square window of displacements.

  Args:
    f1, f2: feature maps (B, H, W, C) of the same shape and any float dtype.
    max_displacement: largest |dy|, |dx| in pixels; rounded down to a multiple of `stride` (d).
    stride: step between displacements in pixels (FlowNetC's stride2 = 2; PWC-Net 1). Output positions
      are every pixel (stride1 = 1), so the spatial size is unchanged.

  Returns:
    float32 (B, H, W, K*K), K = 2 * (max_displacement // stride) + 1. Channel (i * K + j) holds the
    displacement dy = (i - n) * stride, dx = (j - n) * stride (dy-major, dx-minor, as in the FlowNet
    correlation layer). Where (y + dy, x + dx) falls outside the image the value is 0. Accumulation is
    float32 also for bfloat16 inputs; the gradient with respect to each input has that input's dtype.

  Works under jit, vmap, grad and shard_map; no (K*K, C, H, W)-sized intermediate is materialised in
  the forward or the backward pass (see the module docstring).
  """
  n, _ = _check_inputs(f1, f2, max_displacement, stride)
  return _correlation(f1, f2, n, stride)


__all__ = ["correlation"]
