"""Weight gradient of a stride-1 3x3 'same' convolution by Winograd F(4x4, 3x3) (used on CPU).

The forward (jaxflow.ops.winograd) computes each 4x4 output tile as

  Y_tile = A^T M A,   M[pos] = sum_ci V[pos, ci] U[pos, ci, co],   U = G w G^T,   V = B^T d B

(pos one of the 36 entries of the 6x6 transformed tile, d the tile's 6x6 input window). Everything in it is
linear, so the gradient with respect to the kernel runs the same steps backwards:

  dM[pos, tile, co] = (A dY_tile A^T)[pos]                   the 4x4 output-gradient tile mapped to 6x6,
  dU[pos, ci, co]   = sum_tiles V[pos, tile, ci] dM[pos, tile, co]   36 products (C_in, tiles) @ (tiles, C_out),
  dw[:, :, ci, co]  = G^T dU[:, :, ci, co] G                 per channel pair,

i.e. 36 * C_in * C_out multiply-adds per tile of 16 positions instead of the direct gradient's 9 taps x 16
positions (4x fewer). V is recomputed from x as in the forward (each tile's 6x6 window by one gather, times the
constant kron(B^T, B^T)); dM from the output gradient by one gather of each 4x4 tile and the constant
kron(A, A) (36 x 16). The work runs over images (a `lax.scan` whose carry is dU, (36, C_in, C_out)), so nothing
batch-sized is built: per step one image's windows (2.25x its input) and transformed gradient (2.25x its
output gradient). The input may be given as channel parts (the dense layers' `conv2d_concat`): each image's parts
are concatenated inside the loop.

Numerics: float32 products and accumulation; the transforms' coefficients (up to 8 in A, 1/24 in G, 5 in B)
make the rounding larger than a direct product's (measured in tests/test_winograd_wgrad.py and BENCHMARKS.md,
"Session 8: Winograd weight gradient"). float64 inputs are computed in float64.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxflow.ops.winograd import _AT, _BT, _G, _window_index


def _tile_index(h: int, w: int, th: int, tw: int) -> np.ndarray:
  """Flat indices into an (h * w) output gradient of every 4x4 tile's entries, ordered (entry 4 * p + q, tile):
  shape (16 * th * tw,); positions beyond the image (the last tiles of a size not a multiple of 4) get index h * w,
  an appended zero position."""
  p, q, i, j = np.meshgrid(np.arange(4), np.arange(4), np.arange(th), np.arange(tw), indexing="ij")
  y, x = 4 * i + p, 4 * j + q
  inside = (y < h) & (x < w)
  return np.where(inside, y * w + x, h * w).reshape(-1).astype(np.int32)


def weight_grad(x: jax.Array | Sequence[jax.Array], g: jax.Array, images_per_step: int = 1) -> jax.Array:
  """Gradient of sum(g * conv(x, w)) with respect to w, for the stride-1 3x3 cross-correlation with zero padding
  1 on every side (`lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)))`, NHWC / HWIO), by Winograd
  F(4x4, 3x3) (see the module docstring).

  Args:
    x: input (N, H, W, C_in), or a sequence of channel parts (N, H, W, C_p) whose concatenation is the input.
    g: output gradient (N, H, W, C_out), same dtype as x.
    images_per_step: images transformed and multiplied per loop step (the largest divisor of N not above it).
  Returns:
    (3, 3, C_in, C_out) in float32 (float64 for float64 inputs).
  """
  xs = [x] if isinstance(x, (jax.Array, np.ndarray)) else list(x)
  if not xs or any(p.ndim != 4 or p.shape[:3] != xs[0].shape[:3] for p in xs):
    raise ValueError(f"winograd_wgrad.weight_grad: expected x (N, H, W, C_in) or parts (N, H, W, C_p) with one "
                     f"(N, H, W), got shapes {[tuple(p.shape) for p in xs]}")
  n, h, w, _ = xs[0].shape
  if g.ndim != 4 or tuple(g.shape[:3]) != (n, h, w):
    raise ValueError(f"winograd_wgrad.weight_grad: output gradient shape {tuple(g.shape)} does not match the "
                     f"input's (N, H, W) = {(n, h, w)} (expected (N, H, W, C_out) for a 'same' convolution)")
  dtype = jnp.result_type(jnp.float32, g.dtype, *(p.dtype for p in xs))
  cin, cout = sum(p.shape[-1] for p in xs), g.shape[-1]
  th, tw = -(-h // 4), -(-w // 4)
  tiles = th * tw
  per = max(d for d in range(1, max(1, min(n, images_per_step)) + 1) if n % d == 0)
  win_idx = _window_index(h, w, th, tw)
  tile_idx = _tile_index(h, w, th, tw)
  kb = jnp.asarray(np.kron(_BT, _BT), dtype)  # (36, 36): window (r, c) -> transformed entry (a, b)
  ka = jnp.asarray(np.kron(_AT, _AT).T, dtype)  # (36, 16): output-gradient entry (p, q) -> (a, b)
  # Flat images (bitcasts); the loop step k reads images [k * per, (k + 1) * per).
  xflat = [p.reshape(n, h * w, p.shape[-1]) for p in xs]
  gflat = g.reshape(n, h * w, cout)

  def body(du, k):
    # The step's images with one zero position appended (index h * w: `_window_index`'s entry for the padding):
    # the concatenation of the parts is a copy of the step's input that the gather then reads.
    zero = jnp.zeros((per, 1, cin), dtype)
    parts = [lax.dynamic_slice_in_dim(p, k * per, per).astype(dtype) for p in xflat]
    xi = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
    xi = jnp.concatenate([xi, zero], axis=1)  # (per, H*W + 1, C_in)
    win = jnp.take(xi, win_idx, axis=1, mode="clip")  # (per, 36 * tiles, C_in)
    win = jnp.swapaxes(win.reshape(per, 36, tiles * cin), 0, 1).reshape(36, per * tiles * cin)
    v = jnp.dot(kb, win, preferred_element_type=dtype).reshape(36, per * tiles, cin)
    gi = lax.dynamic_slice_in_dim(gflat, k * per, per).astype(dtype)
    if tile_idx.max() >= h * w:  # tiles beyond the image's last row or column (H or W not a multiple of 4)
      gi = jnp.concatenate([gi, jnp.zeros((per, 1, cout), dtype)], axis=1)
    gt = jnp.take(gi, tile_idx, axis=1, mode="clip")  # (per, 16 * tiles, C_out)
    gt = jnp.swapaxes(gt.reshape(per, 16, tiles * cout), 0, 1).reshape(16, per * tiles * cout)
    dm = jnp.dot(ka, gt, preferred_element_type=dtype).reshape(36, per * tiles, cout)
    return du + lax.dot_general(v, dm, (((1,), (1,)), ((0,), (0,))), preferred_element_type=dtype), None

  du, _ = lax.scan(body, jnp.zeros((36, cin, cout), dtype), jnp.arange(n // per))
  gm = jnp.asarray(_G, dtype)
  return jnp.einsum("ai,abco,bj->ijco", gm, du.reshape(6, 6, cin, cout), gm, precision=lax.Precision.HIGHEST)


__all__ = ["weight_grad"]
