"""Winograd F(4x4, 3x3) convolution for stride-1, dilation-1, 'same'-padded 3x3 kernels (used on CPU).

A 3x3 convolution computes each 4x4 block of outputs from a 6x6 window of the input. Winograd's minimal
filtering algorithm (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016) writes it as

  Y_tile = A^T [ (G w G^T) (.) (B^T d B) ] A        (per input / output channel pair, summed over C_in)

with d the 6x6 input window, w the 3x3 kernel and constant matrices B^T (6x6), G (6x3), A^T (4x6) built on the
interpolation points 0, +-1, +-2 and infinity. Summed over channels, the 36 elementwise products become 36
independent matrix products (tiles, C_in) @ (C_in, C_out): 36 * C_in * C_out multiply-adds per 16 outputs
instead of 144 (4x fewer), at the cost of transforming the input (36 values per 16 input positions, 2.25x) and
the output.

XLA:CPU runs the products as library GEMMs. The transforms are products too (`_TRANSFORMS` 'matmul'): each
tile's 36 window values are gathered at once and multiplied by the constant kron(B^T, B^T) (36 x 36), the
products' results by kron(A^T, A^T) (16 x 36); written as 36 + 16 elementwise combinations instead ('fused'),
XLA emitted one kernel per entry (~65 per convolution, ~6 CPU-s more compile for a forward and input gradient
against ~0.5) and ran them slower (experiments/benchmarks/winograd_conv.py, 'wf'). The work runs one image at a
time (a fori_loop writing each image's output into the result in place, see `_LOOP`; a prototype measured
whole-batch transforms slower) so the gathered windows (2.25x the input) stay in the cache-sized range while each
product still has N = tiles per image rows.

Numerics: float32 throughout (kernel transform included); the result differs from a direct convolution by
rounding of the transforms' small integer and 1/6, 1/12, 1/24 coefficients: measured max |error| / max |y|
(against XLA's convolution) 1e-5 .. 2.8e-5 forward for 117 .. 565 input channels, 6e-6 .. 8e-6 for input
gradients.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# F(4x4, 3x3) on the points 0, 1, -1, 2, -2 and infinity.
_BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64)
_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
               [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64)
_AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
               np.float64)


def kernel_transform(w: jax.Array) -> jax.Array:
  """(3, 3, C_in, C_out) kernel -> (36, C_in, C_out): G w G^T per channel pair, entry (a, b) at 6 * a + b."""
  g = jnp.asarray(_G, w.dtype)
  u = jnp.einsum("ai,ijco,bj->abco", g, w, g, precision=lax.Precision.HIGHEST)
  return u.reshape(36, w.shape[2], w.shape[3])


def _direct(bt: np.ndarray, a: int, b: int, part) -> jax.Array:
  """sum_{r, c} bt[a, r] * bt[b, c] * part(r, c) over the nonzero coefficients, written out per term: no
  intermediate is shared between the (a, b) entries, so XLA fuses all of them into one loop."""
  acc = None
  for r in range(bt.shape[1]):
    for c in range(bt.shape[1]):
      coef = bt[a, r] * bt[b, c]
      if coef == 0:
        continue
      t = part(r, c)
      t = t if coef == 1 else (-t if coef == -1 else t * np.float32(coef))
      acc = t if acc is None else acc + t
  return acc


def _tiles(xp: jax.Array, u: jax.Array, th: int, tw: int) -> jax.Array:
  """xp (g, 4*th + 2, 4*tw + 2, C_in) zero-padded input, u (36, C_in, C_out) -> (g, 4*th, 4*tw, C_out)."""
  g, cin, cout = xp.shape[0], xp.shape[-1], u.shape[-1]
  # Input transform B^T d B: entry (a, b) of tile (i, j) is a combination of xp[4i + r, 4j + c], 0 <= r, c < 6.
  win = lambda r, c: xp[:, r:r + 4 * (th - 1) + 1:4, c:c + 4 * (tw - 1) + 1:4]  # (g, th, tw, C)
  v = jnp.stack([_direct(_BT, a, b, win) for a in range(6) for b in range(6)]).reshape(36, g * th * tw, cin)
  m = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)  # (36, n, O)
  m = m.reshape(6, 6, g, th, tw, cout)
  # Output transform A^T M A: output (p, q) of each tile.
  y = jnp.stack([jnp.stack([_direct(_AT, p, q, lambda i, j: m[i, j]) for q in range(4)], axis=3)
                 for p in range(4)], axis=2)  # (g, th, 4, tw, 4, O)
  return y.reshape(g, 4 * th, 4 * tw, cout)


# How the transforms run: 'matmul' (the 36 windows of each tile by one gather, both transforms as one product
# with the constant kron(B^T, B^T) (36 x 36) and kron(A^T, A^T) (16 x 36): a handful of kernels per convolution)
# or 'fused' (each of the 36 + 16 transformed entries as its own elementwise kernel: ~65 kernels per convolution,
# ~6 CPU-s more compile per forward + input gradient).
_TRANSFORMS = "matmul"


def _tiles_matmul(xp: jax.Array, u: jax.Array, th: int, tw: int) -> jax.Array:
  """`_tiles` with the transforms as matrix products (see _TRANSFORMS)."""
  g, hp, wp, cin = xp.shape
  cout = u.shape[-1]
  r, c, i, j = np.meshgrid(np.arange(6), np.arange(6), np.arange(th), np.arange(tw), indexing="ij")
  idx = ((4 * i + r) * wp + 4 * j + c).reshape(-1).astype(np.int32)  # (36 * th * tw,): window entry, tile
  p = jnp.take(xp.reshape(g, hp * wp, cin), idx, axis=1, mode="clip").reshape(g, 36, th * tw * cin)
  return _transform_multiply(p, u, g, th, tw, cin, cout)


def _transform_multiply(p: jax.Array, u: jax.Array, g: int, th: int, tw: int, cin: int, cout: int) -> jax.Array:
  """The gathered windows p (g, 36, th * tw * C_in) -> (g, 4*th, 4*tw, C_out): the input transform kron(B^T, B^T),
  the 36 products with u (36, C_in, C_out) and the output transform kron(A^T, A^T), as matrix products."""
  p = jnp.swapaxes(p, 0, 1).reshape(36, g * th * tw * cin)
  v = jnp.dot(jnp.asarray(np.kron(_BT, _BT), jnp.float32), p).reshape(36, g * th * tw, cin)
  m = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)  # (36, n, O)
  y = jnp.dot(jnp.asarray(np.kron(_AT, _AT), jnp.float32), m.reshape(36, g * th * tw * cout))  # (16, n * O)
  y = jnp.transpose(y.reshape(4, 4, g, th, tw, cout), (2, 3, 0, 4, 1, 5))  # (g, th, 4, tw, 4, O)
  return y.reshape(g, 4 * th, 4 * tw, cout)


# How the images are looped over. 'write' (default): a fori_loop whose carry is the result; each step gathers its
# images' windows straight from x (zeros for the padding by an out-of-range index, no padded copy of the batch)
# and writes its cropped output into the result in place, and the result's buffer and the kernel transform are
# computed from an element of x. 'map' (session 7, kept for benchmarks): the whole batch padded, a lax.map and
# the [:h, :w] crop of its stacked output.
# Why: XLA's scheduler may place an operation that reads no activation anywhere in the program. The zero-filled
# buffer that lax.map's stacked output starts from, and the kernel transform (read from the parameters only),
# were computed early in the forward pass: in the PWC-Net step at 192x256 b4 the input gradients' result buffers
# of the context conv0 and the level-2 estimator conv1-conv3 (565 / 469 / 373 / 245 channels, 81 MiB together)
# were alive from the start of the forward pass to their backward loops, and at the peak the padded batch of
# the context conv0's input was there twice (a layout copy of the (N, 1, ...) reshape).
_LOOP = "write"


def _window_index(h: int, w: int, th: int, tw: int) -> np.ndarray:
  """(36 * th * tw,) int32 flat positions in an (h, w) image of each tile's 6x6 window, entry (r, c) of tile
  (i, j) at ((6 * r + c) * th + i) * tw + j; positions in the 1-pixel zero border (or beyond the image, for sizes
  not a multiple of 4) get the out-of-range index h * w, which the gather fills with zero."""
  r, c, i, j = np.meshgrid(np.arange(6), np.arange(6), np.arange(th), np.arange(tw), indexing="ij")
  y, x = 4 * i + r - 1, 4 * j + c - 1
  inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
  return np.where(inside, y * w + x, h * w).reshape(-1).astype(np.int32)


def _zero_after(a: jax.Array) -> jax.Array:
  """A float32 scalar 0.0 computed from a's first element (0 for any value, NaN included): a data dependency that
  keeps XLA's scheduler from computing what uses it before a exists."""
  s = lax.slice(a, (0,) * a.ndim, (1,) * a.ndim).reshape(())
  return (s != s).astype(jnp.float32) * np.float32(0)


def _tiles_gather(xi: jax.Array, u: jax.Array, idx: np.ndarray, th: int, tw: int) -> jax.Array:
  """`_tiles_matmul` reading the windows from the unpadded images xi (g, H, W, C_in) through `_window_index`'s
  idx: (g, 4*th, 4*tw, C_out)."""
  g, h, w, cin = xi.shape
  cout = u.shape[-1]
  p = jnp.take(xi.reshape(g, h * w, cin), idx, axis=1, mode="fill", fill_value=0).reshape(g, 36, th * tw * cin)
  return _transform_multiply(p, u, g, th, tw, cin, cout)


def conv3x3_same(x: jax.Array, w: jax.Array, images_per_step: int = 1,
                 splits: Sequence[int] | None = None) -> jax.Array | tuple[jax.Array, ...]:
  """Stride-1 3x3 cross-correlation with zero padding 1 on every side, by Winograd F(4x4, 3x3).

  Same values as `lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)))` (NHWC / HWIO) up to float32
  rounding (see the module docstring). x (N, H, W, C_in) float32, any H, W >= 1; w (3, 3, C_in, C_out) float32.
  Returns (N, H, W, C_out) float32. `images_per_step` images are transformed and multiplied at a time (a
  divisor of N is used: the largest one not above it). Temporaries: one step's gathered windows, products and
  output (per image: 2.25x its input, 2.25x and 1x its output); nothing batch-sized besides the result.

  splits: output channel counts summing to C_out; then the result is a tuple of (N, H, W, C_p) arrays, the
  output's consecutive channel ranges, each written by the loop into its own buffer (no whole output that slices
  of it would keep alive).
  """
  if x.ndim != 4 or w.shape[:2] != (3, 3) or w.ndim != 4 or x.shape[-1] != w.shape[2]:
    raise ValueError(f"winograd.conv3x3_same: expected x (N, H, W, C_in) and w (3, 3, C_in, C_out), got shapes "
                     f"{x.shape} and {w.shape}")
  if x.dtype != jnp.float32 or w.dtype != jnp.float32:
    raise TypeError(f"winograd.conv3x3_same: float32 only, got {x.dtype} and {w.dtype}")
  cout = w.shape[3]
  bounds = np.cumsum([0] + ([cout] if splits is None else [int(c) for c in splits])).tolist()
  if bounds[-1] != cout or min(np.diff(bounds)) < 1:
    raise ValueError(f"winograd.conv3x3_same: splits {tuple(splits)} must be positive and add up to C_out {cout}")
  # Under a jit with the batch sharded each device loops over its own images (the loop over a sharded axis would
  # all-gather x: PWC-Net 192x256 b4 on 2 devices, 8 all-gathers); w goes to every device whole.
  from jaxflow import parallel
  parts = len(bounds) - 1
  one = lambda y: y[0] if splits is not None and parts == 1 else y   # per_image: one result term, one array
  y = parallel.per_image(lambda x_, w_: one(_conv3x3_same(x_, w_, images_per_step, splits, bounds)),
                         "... h w c, i j c k ->" + ",".join(f" ... h w k{p}" for p in range(parts)))(x, w)
  return (y,) if splits is not None and parts == 1 else y


def _conv3x3_same(x: jax.Array, w: jax.Array, images_per_step: int, splits, bounds):
  """`conv3x3_same` on x (..., H, W, C_in), the leading axes merged into one image axis for the loop."""
  lead = x.shape[:-3]
  x = x.reshape((-1,) + x.shape[-3:])
  n = x.shape[0]
  per = max(d for d in range(1, max(1, min(n, images_per_step)) + 1) if n % d == 0)
  y = _conv3x3_same_images(x, w, per, splits, bounds)
  unflat = lambda a: a.reshape(lead + a.shape[1:])
  return unflat(y) if splits is None else tuple(unflat(a) for a in y)


def _conv3x3_same_images(x: jax.Array, w: jax.Array, per: int, splits, bounds):
  """The loop over (N, H, W, C_in) images, `per` at a time (each device's part of `conv3x3_same`)."""
  n, h, wd, _ = x.shape
  th, tw = -(-h // 4), -(-wd // 4)
  if _LOOP == "map" or _TRANSFORMS != "matmul":
    y = _conv3x3_same_map(x, w, per)
    return y if splits is None else tuple(y[..., a:b] for a, b in zip(bounds[:-1], bounds[1:]))
  zero = _zero_after(x)
  u = kernel_transform(w + zero)
  idx = _window_index(h, wd, th, tw)
  step = lambda xi: _tiles_gather(xi, u, idx, th, tw)[:, :h, :wd]
  if per == n and splits is None:
    return step(x)

  def body(i, outs):
    y = step(lax.dynamic_slice_in_dim(x, i * per, per, axis=0))
    return tuple(lax.dynamic_update_slice_in_dim(o, y[..., a:b], i * per, axis=0)
                 for o, a, b in zip(outs, bounds[:-1], bounds[1:]))

  init = tuple(jnp.broadcast_to(zero, (n, h, wd, b - a)) for a, b in zip(bounds[:-1], bounds[1:]))
  outs = lax.fori_loop(0, n // per, body, init)
  return outs[0] if splits is None else outs


def _conv3x3_same_map(x: jax.Array, w: jax.Array, per: int) -> jax.Array:
  """Session 7's loop (`_LOOP` 'map', and the 'fused' transforms): the padded batch, lax.map, crop."""
  n, h, wd, _ = x.shape
  cout = w.shape[3]
  th, tw = -(-h // 4), -(-wd // 4)
  xp = jnp.pad(x, ((0, 0), (1, 4 * th + 1 - h), (1, 4 * tw + 1 - wd), (0, 0)))
  u = kernel_transform(w)
  tiles = _tiles_matmul if _TRANSFORMS == "matmul" else _tiles
  if per == n:
    y = tiles(xp, u, th, tw)
  else:
    y = lax.map(lambda xi: tiles(xi, u, th, tw), xp.reshape(n // per, per, *xp.shape[1:]))
    y = y.reshape(n, 4 * th, 4 * tw, cout)
  return y[:, :h, :wd]


def conv3x3_same_input_grad(g: jax.Array, w: jax.Array, images_per_step: int = 1,
                            splits: Sequence[int] | None = None) -> jax.Array | tuple[jax.Array, ...]:
  """Gradient of sum(g * conv3x3_same(x, w)) with respect to x: g (N, H, W, C_out) -> (N, H, W, C_in), or with
  splits (channel counts adding up to C_in) a tuple of its channel ranges, each in its own buffer.

  It is again a 'same' stride-1 3x3 convolution, of g with the kernel rotated by 180 degrees and its
  channel axes swapped: dx[n, y, x, ci] = sum g[n, y + 1 - i, x + 1 - j, co] w[i, j, ci, co]."""
  return conv3x3_same(g, jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2)), images_per_step, splits)


__all__ = ["conv3x3_same", "conv3x3_same_input_grad", "kernel_transform"]
