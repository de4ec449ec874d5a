"""2-D convolution whose weight gradient is computed as dense matrix products (fast on XLA:CPU).

Why: on XLA:CPU the forward convolution and its input gradient run close to the speed of a matmul of the same
FLOPs, but the weight gradient (a convolution contracting over batch and space) runs at a fraction of it
(measured 3-4x slower than the equivalent matmul for PWC-Net's estimator shapes; experiments/benchmarks/
conv_grad.py). `conv2d` keeps `lax.conv_general_dilated` for the forward pass and the input gradient and
replaces the weight gradient by one matmul per kernel tap:

  dW[i, j] = sum_{n, y, x} Xp[n, s*y + d*i, s*x + d*j, :]^T  g[n, y, x, :]          (C_in, C_out)

With Xp the padded input split into its s x s stride phases and transposed once to (C_in, N*Hph*Wph), tap
(i, j) reads phase ((d*i) % s, (d*j) % s) at offset ((d*i) // s, (d*j) // s); instead of slicing the input
per tap (a copy of C_in channels), the output gradient g (C_out channels) is zero-padded by that offset onto
the phase grid, so every tap is one (C_in, L) @ (L, C_out) product with a long contraction L, which XLA:CPU
runs as a library GEMM near the machine's matmul peak. Temporaries: one transposed copy of the padded input and
one padded copy of g per tap (freed after its product); nothing tap x channel x space sized.

At stride 1 the taps are not taken one by one: `_weight_grad_blocked` copies the kh * kw shifted windows of g
side by side per block of rows (one product per block), and `_weight_grad_split` splits the shift between the
operands (x shifted along columns, g along rows: kw * C_in + kh * C_out values copied per position instead of
kh * kw * C_out), which is what SpyNet's 7x7 kernels need (2-4x faster than 'blocked' there).

Numerics: the same sums in a different order (float32 products and accumulation; bfloat16 inputs accumulate
in float32 and the gradient is returned in the kernel's dtype). Tested against lax's own gradient.

Small problems (`conv2d_im2col`): with at most _IM2COL_MAX_POSITIONS output positions, more than 8 output
channels and at least _IM2COL_MIN_CHANNEL_PRODUCT C_in x C_out (FlowNet's conv3_1-conv6 at 2x2 .. 16x16) the CPU
convolution is one product of its patch matrix with the kernel, differentiated by jax: XLA:CPU's own convolution
and its input gradient ran at 0.5-20 GFLOP per CPU-second there. Transposed convolutions (`conv_transpose2d`, the models' deconvs) are
one product and an overlap-add on CPU, for the same reason (XLA's weight gradient: 2-5 GFLOP per CPU-second).
Patch matrices and shifted windows are taken by one gather of precomputed indices, not a slice per tap: XLA:CPU
compiles every slice as a kernel of its own (~40 CPU-ms of a cold start each); the gathers' backward passes are
slices and pads, never a scatter-add.

Forward and input gradient by Winograd (`use_winograd`, jaxflow.ops.winograd): on the CPU path, float32 3x3
stride-1 undilated convolutions with padding 1, enough positions per image and channels on both sides (PWC-Net's
estimator conv0-conv3 and context conv0 at its fine levels, FlowNet's conv3_1) compute their values, and their
input gradients, by F(4x4, 3x3) (1.4-2.4x less CPU time than XLA's convolution at those shapes); their weight
gradients by F(4x4, 3x3) too (mode 'winograd', jaxflow.ops.winograd_wgrad) where the output has at least 96
channels (`weight_grad_mode`), the modes above otherwise.

Few output channels (`conv2d_taps`): the forward of float32 stride-1 convolutions with C_out <= 8 and C_in >= 64
(predict_flow) is one product of the input (or of each part of a concatenation) with the kernel's taps side by
side and a shifted sum of the taps' outputs: XLA's convolution ran those at 8.5-14 GFLOP per CPU-s on the AVX-512
machine, the product at 41-43 (session 10).

Selection: `conv2d(..., impl=None)` uses the matmul weight gradient on the CPU backend and plain lax elsewhere
(GPU/TPU convolution gradients are native and fast). `set_default_impl('lax' | 'matmul' | 'auto')` overrides it
process-wide (tests, benchmarks).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxflow.ops import winograd, winograd_wgrad

_DN = ("NHWC", "HWIO", "NHWC")
_IMPLS = ("auto", "lax", "matmul")
_default_impl = "auto"


def set_default_impl(impl: str) -> None:
  """Chooses the convolution gradient used when `impl` is not given: 'auto' (matmul on CPU, lax elsewhere),
  'lax' (XLA's own everywhere) or 'matmul' (the matmul weight gradient everywhere). Affects later traces."""
  global _default_impl
  if impl not in _IMPLS:
    raise ValueError(f"conv: impl must be one of {_IMPLS}, got {impl!r}")
  _default_impl = impl


def get_default_impl() -> str:
  return _default_impl


def _resolve(impl: str | None) -> str:
  impl = _default_impl if impl is None else impl
  if impl not in _IMPLS:
    raise ValueError(f"conv: impl must be one of {_IMPLS}, got {impl!r}")
  if impl == "auto":
    return "matmul" if jax.default_backend() == "cpu" else "lax"
  return impl


def _lax_conv(x: jax.Array, w: jax.Array, strides, padding, dilation) -> jax.Array:
  return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=_DN)


def _out_size(size: int, lo: int, hi: int, k: int, s: int, d: int) -> int:
  """Output length of a convolution along one axis (input `size`, padding lo / hi, kernel k, stride s, dilation d)."""
  return (size + lo + hi - d * (k - 1) - 1) // s + 1


def _tap_geometry(size: int, lo: int, hi: int, k: int, s: int, d: int) -> tuple[int, int, int]:
  """For one spatial axis: (output size, phase grid size, padded length trimmed to s * phase grid size)."""
  out = _out_size(size, lo, hi, k, s, d)
  grid = out + (d * (k - 1)) // s
  return out, grid, s * grid


def _pad_or_crop(x: jax.Array, axis: int, lo: int, target: int) -> jax.Array:
  """Zero-pads `x` by `lo` in front along `axis` (lo >= 0) and pads or crops the end to length `target`."""
  n = x.shape[axis]
  hi = target - n - lo
  if hi < 0:
    x = lax.slice_in_dim(x, 0, n + hi, axis=axis)
    hi = 0
  pads = [(0, 0)] * x.ndim
  pads[axis] = (lo, hi)
  return jnp.pad(x, pads)


def weight_grad_matmul(x: jax.Array, g: jax.Array, kernel_shape: Sequence[int], strides: Sequence[int],
                       padding: Sequence[tuple[int, int]], dilation: Sequence[int], mode: str = "scan") -> jax.Array:
  """Gradient of sum(g * conv(x, W)) with respect to W, as one matmul per kernel tap.

  Args:
    x: input (N, H, W, C_in). g: output gradient (N, Ho, Wo, C_out).
    kernel_shape: (kh, kw, C_in, C_out) (HWIO). strides, dilation: (sy, sx), (dy, dx). padding: ((lo, hi),
      (lo, hi)) explicit, non-negative.
    mode: 'scan' (a lax.scan over the taps: one small loop body per convolution, which keeps compile time
      close to that of XLA's own gradient), 'unrolled' (one product per tap in the graph), 'concat' (stride
      1 only: the taps' shifted gradients side by side, one product; for few output channels), 'blocked'
      (stride 1 only: 'concat' over cache-sized blocks of image rows, accumulated by a scan) or 'split'
      (stride 1 only: blocks as 'blocked', the input shifted along columns and the gradient along rows;
      `_weight_grad_split`) or 'winograd' (3x3, stride 1, dilation 1, padding 1 only: Winograd F(4x4, 3x3),
      `jaxflow.ops.winograd_wgrad.weight_grad`).
  Returns:
    (kh, kw, C_in, C_out) float32 (float64 for float64 inputs).
  """
  kh, kw, cin, cout = kernel_shape
  n = x.shape[0]
  acc = jnp.result_type(jnp.float32, x.dtype, g.dtype)
  (ho, gy, ty), (wo, gx, tx) = (_tap_geometry(x.shape[1 + a], padding[a][0], padding[a][1], (kh, kw)[a],
                                              strides[a], dilation[a]) for a in range(2))
  if (ho, wo) != tuple(g.shape[1:3]):
    raise ValueError(f"conv: output gradient shape {g.shape} does not match the convolution output "
                     f"({n}, {ho}, {wo}, {cout})")
  sy, sx = strides
  big_l = n * gy * gx
  xp = _pad_or_crop(_pad_or_crop(x, 1, padding[0][0], ty), 2, padding[1][0], tx)
  # Stride phases, transposed once: (sy * sx, C_in, L); phase (py, px) holds xp[:, py::sy, px::sx].
  xt = None
  if mode != "concat":
    xt = jnp.transpose(xp.reshape(n, gy, sy, gx, sx, cin), (2, 4, 5, 0, 1, 3)).reshape(sy * sx, cin, big_l)
  taps = []  # (phase index, row offset, column offset) per tap, row-major over (i, j)
  for i in range(kh):
    oy, py = divmod(dilation[0] * i, sy)
    for j in range(kw):
      ox, px = divmod(dilation[1] * j, sx)
      taps.append((py * sx + px, oy, ox))

  def tap_product(phase, oy, ox):
    ph = xt[0] if sy * sx == 1 else lax.dynamic_index_in_dim(xt, phase, keepdims=False)
    gp = lax.dynamic_update_slice(jnp.zeros((n, gy, gx, cout), g.dtype), g, (0, oy, ox, 0))
    return jnp.matmul(ph, gp.reshape(big_l, cout), preferred_element_type=acc)

  if mode == "winograd":
    if not _winograd_wgrad_geometry(kernel_shape, strides, padding, dilation):
      raise ValueError(f"conv: mode 'winograd' needs a 3x3 kernel, stride 1, dilation 1 and padding 1, got kernel "
                       f"{tuple(kernel_shape)}, strides {tuple(strides)}, dilation {tuple(dilation)}, padding "
                       f"{tuple(map(tuple, padding))}")
    return winograd_wgrad.weight_grad(x, g)
  if (sy, sx) == (1, 1) and mode in ("scan", "concat", "blocked", "split"):
    return _weight_grad_stride1(x, g, kernel_shape, padding, dilation, mode, acc)
  if mode in ("concat", "blocked", "split"):
    if sy * sx != 1:
      raise ValueError(f"conv: mode {mode!r} needs stride 1")
    # All taps' shifted output gradients side by side (L, K * C_out), one product with the untransposed input:
    # for few output channels this reads the input once instead of once per tap.
    gs = jnp.concatenate([lax.dynamic_update_slice(jnp.zeros((n, gy, gx, cout), g.dtype), g, (0, oy, ox, 0))
                          for _, oy, ox in taps], axis=-1).reshape(big_l, len(taps) * cout)
    dw = lax.dot_general(xp.reshape(big_l, cin), gs, (((0,), (0,)), ((), ())), preferred_element_type=acc)
    return jnp.transpose(dw.reshape(cin, kh, kw, cout), (1, 2, 0, 3))
  if mode == "unrolled":
    dw = jnp.stack([tap_product(*t) for t in taps])
  elif mode == "scan":
    ts = jnp.asarray(taps, jnp.int32)
    _, dw = lax.scan(lambda _, t: (None, tap_product(t[0], t[1], t[2])), None, ts)
  else:
    raise ValueError(f"conv: mode must be 'scan' or 'unrolled', got {mode!r}")
  return dw.reshape(kh, kw, cin, cout)


def _weight_grad_stride1(x: jax.Array | Sequence[jax.Array], g: jax.Array, kernel_shape: Sequence[int],
                         padding: Sequence[tuple[int, int]], dilation: Sequence[int], mode: str, acc) -> jax.Array:
  """Stride-1 weight gradient with the input used in place (no padded or transposed copy of x).

  Tap (i, j) reads x[n, y + d*i - lo, x + d*j - lo] against g[n, y, x]; on x's own grid that is
  x[n, y', x'] against g shifted by (lo - d*i, lo - d*j) and zero outside, so every tap is
  x.reshape(L, C_in)^T @ shifted_g.reshape(L, C_out) with L = N*H*W: the contraction runs over x's leading
  axis (a transposed-operand matmul, no copy), and only g (C_out channels) is copied, once per tap.
  Positions of the padded border carry zeros in x, so leaving them out changes nothing.

  x may be a list of parts (N, H, W, C_p) whose channel concatenation is the input: modes 'concat',
  'blocked' and 'split' then take one product per part (the rows of dW that part owns) and never concatenate them.
  """
  xs = [x] if isinstance(x, (jax.Array, np.ndarray)) else list(x)
  if mode == "split":  # pads g along rows only, itself
    return _weight_grad_split(xs, g, kernel_shape, padding, dilation, acc)
  kh, kw, cin, cout = kernel_shape
  n, h, w, _ = xs[0].shape
  ho, wo = g.shape[1:3]
  # g zero-padded so that any tap's shifted (h, w) window is a slice of it: g[n, y - oy, x - ox] for
  # offsets oy = d*i - lo in [-lo, d*(kh-1) - lo].
  top, left = padding[0][0], padding[1][0]
  pad_lo_y, pad_lo_x = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
  gp = jnp.pad(g, ((0, 0), (pad_lo_y, max(0, h - ho + top)), (pad_lo_x, max(0, w - wo + left)), (0, 0)))
  offsets = [(pad_lo_y + top - dilation[0] * i, pad_lo_x + left - dilation[1] * j)
             for i in range(kh) for j in range(kw)]

  def shifted(oy, ox):
    return lax.dynamic_slice(gp, (0, oy, ox, 0), (n, h, w, cout)).reshape(n * h * w, cout)

  contract = (((0,), (0,)), ((), ()))
  if mode == "blocked":
    return _weight_grad_blocked(xs, gp, offsets, (kh, kw), cout, acc)
  if mode == "concat":
    if _GATHER_PATCHES:
      # The K shifted windows by one gather (one kernel; K slices and their concatenation compiled to K + 1):
      # flat indices into each image's padded g, (H, W, K) in row-major order, the same for every image.
      wp = gp.shape[2]
      yy, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
      idx = np.stack([(yy + oy) * wp + cc + ox for oy, ox in offsets], -1).reshape(-1).astype(np.int32)
      gs = jnp.take(gp.reshape(n, -1, cout), idx, axis=1, mode="clip").reshape(n * h * w, len(offsets) * cout)
    else:
      gs = jnp.concatenate([shifted(oy, ox) for oy, ox in offsets], axis=-1)  # (L, K * C_out)
    dw = jnp.concatenate([lax.dot_general(p.reshape(n * h * w, p.shape[-1]), gs, contract,
                                          preferred_element_type=acc) for p in xs], axis=0)
    return jnp.transpose(dw.reshape(cin, kh, kw, cout), (1, 2, 0, 3))
  xl = (xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=-1)).reshape(n * h * w, cin)
  ts = jnp.asarray(offsets, jnp.int32)
  _, dw = lax.scan(lambda _, t: (None, lax.dot_general(xl, shifted(t[0], t[1]), contract,
                                                       preferred_element_type=acc)), None, ts)
  return dw.reshape(kh, kw, cin, cout)


# Positions (rows x width) of one block of the blocked stride-1 weight gradient: x's block (positions x C_in) and
# the taps' shifted output gradients (positions x K * C_out) stay in the core's cache while their product runs
# (conv_grad.py: 256-1024 positions measured alike at PWC-Net's 48x64 level, 2 rows of 64 slower).
_BLOCK_POSITIONS = 512


def _block_rows(h: int, w: int) -> int:
  """Rows per block: the largest divisor of h whose block holds at most _BLOCK_POSITIONS positions (>= 1 row)."""
  return max(r for r in range(1, h + 1) if h % r == 0 and (r == 1 or r * w <= _BLOCK_POSITIONS))


def _weight_grad_blocked(xs: Sequence[jax.Array], gp: jax.Array, offsets: Sequence[tuple[int, int]],
                         kernel_hw: tuple[int, int], cout: int, acc) -> jax.Array:
  """Stride-1 weight gradient over blocks of R image rows: per block, the K = kh * kw taps' shifted output
  gradients side by side (R*W, K*C_out) and one product x_block^T @ that per input part, accumulated into
  (C_p, K*C_out) per part.

  The input (the parts xs, each (N, H, W, C_p)) is read once, block by block, instead of once per tap, and the
  long contraction over N*H*W positions is split into cache-sized pieces; nothing larger than a block is
  materialised (the 'concat' mode builds the whole (N*H*W, K*C_out) array). gp is the output gradient
  zero-padded as in `_weight_grad_stride1`, offsets the (row, column) start of each tap's window in it.
  """
  n, h, w, _ = xs[0].shape
  rows = _block_rows(h, w)
  per_image = h // rows
  # Bitcasts: blocks are contiguous runs of positions.
  xbs = [p.reshape(n * per_image, rows * w, p.shape[-1]) for p in xs]
  if _GATHER_TAPS:
    # The block's K windows by one gather (see `_weight_grad_split`): flat indices into gp's image for block
    # row 0, (rows, W, K); the block at row r adds r * W'.
    hp, wp = gp.shape[1:3]
    gflat = gp.reshape(n, hp * wp, cout)
    yy, cc = np.meshgrid(np.arange(rows), np.arange(w), indexing="ij")
    idx = np.stack([(yy + oy) * wp + cc + ox for oy, ox in offsets], -1).reshape(-1).astype(np.int32)

  def body(totals, k):
    b, r = k // per_image, (k % per_image) * rows
    if _GATHER_TAPS:
      gs = jnp.take(lax.dynamic_index_in_dim(gflat, b, keepdims=False), idx + r * wp, axis=0,
                    mode="clip").reshape(rows * w, len(offsets) * cout)
    else:
      gs = jnp.concatenate([lax.dynamic_slice(gp, (b, r + oy, ox, 0), (1, rows, w, cout)).reshape(rows * w, cout)
                            for oy, ox in offsets], axis=-1)
    return tuple(t + lax.dot_general(lax.dynamic_index_in_dim(xb, k, keepdims=False), gs,
                                     (((0,), (0,)), ((), ())), preferred_element_type=acc)
                 for t, xb in zip(totals, xbs)), None

  init = tuple(jnp.zeros((p.shape[-1], len(offsets) * cout), acc) for p in xs)
  totals, _ = lax.scan(body, init, jnp.arange(n * per_image))
  total = totals[0] if len(totals) == 1 else jnp.concatenate(totals, axis=0)
  cin = total.shape[0]
  return jnp.transpose(total.reshape(cin, kernel_hw[0], kernel_hw[1], cout), (1, 2, 0, 3))


def _weight_grad_split(xs: Sequence[jax.Array], g: jax.Array, kernel_shape: Sequence[int],
                       padding: Sequence[tuple[int, int]], dilation: Sequence[int], acc) -> jax.Array:
  """Stride-1 weight gradient with the kernel's taps split between the operands: column offsets on the input,
  row offsets on the output gradient.

  With L = N * H * Wo positions (x's rows, the output's columns),
    XW[n, r, c, (j, ci)] = x[n, r, c + dx*j - left, ci]     (L, kw * C_in): x shifted along its columns only,
    GH[n, r, c, (i, o)]  = g[n, r + top - dy*i, c, o]        (L, kh * C_out): g shifted along its rows only,
  (zero outside the arrays), and XW^T @ GH is (kw * C_in, kh * C_out), i.e. dW[i, j, ci, o] for every tap. Per
  position kw * C_in + kh * C_out values are copied, against kh * kw * C_out for 'blocked' (SpyNet's 7x7
  32 -> 64: 672 against 3,136), and the product is near square (224 x 448 instead of 32 x 3,136). Rows of x
  in the padded border are zero and are left out. As in 'blocked', the positions run in blocks of R whole rows
  (R * Wo <= _BLOCK_POSITIONS) accumulated by a scan, so neither shifted array exists beyond one block;
  except where both whole arrays fit in _WHOLE_SPLIT_BYTES: then they are built for all images at once and
  multiplied once, without a loop (fewer kernels to compile).

  xs: the input's channel parts (N, H, W, C_p); g (N, Ho, Wo, C_out). Returns (kh, kw, sum C_p, C_out) in acc.
  """
  kh, kw, _, cout = kernel_shape
  n, h, w, _ = xs[0].shape
  ho, wo = g.shape[1:3]
  (top, _), (left, right) = padding
  dy, dx = dilation
  # Rows of g read by block rows [r, r + R) and tap i: [r + top - dy*i, ...); padded so every window is inside.
  lo = max(0, dy * (kh - 1) - top)
  gp = jnp.pad(g, ((0, 0), (lo, max(0, h + top - ho)), (0, 0), (0, 0)))
  whole = _GATHER_TAPS and n * h * wo * (kw * sum(p.shape[-1] for p in xs) + kh * cout) * 4 <= _WHOLE_SPLIT_BYTES
  rows = h if whole else _block_rows(h, wo)
  per_image = h // rows
  if _GATHER_TAPS:
    # Each block's shifted matrices as one gather per operand (one kernel instead of a slice per tap: XLA:CPU
    # compiles every slice as its own kernel, ~40 CPU-ms each). Flat row indices for block row 0, shape
    # (rows, Wo, taps); the block at row r adds r * (row length). x's columns outside [0, W) read index
    # `beyond`, past the end even after the offset, which mode 'fill' turns into zeros.
    yy, cc = np.meshgrid(np.arange(rows), np.arange(wo), indexing="ij")
    g_idx = np.stack([(yy + lo + top - dy * i) * wo + cc for i in range(kh)], -1).reshape(-1).astype(np.int32)
    beyond = 2 * h * w
    cols = np.stack([cc + dx * j - left for j in range(kw)], -1)
    x_idx = np.where((cols >= 0) & (cols < w), yy[..., None] * w + cols, beyond).reshape(-1).astype(np.int32)
  if whole:
    # Small problems: every image's matrices by one gather per operand and one product per part, no loop over
    # blocks (a scan's counter, condition and accumulator are kernels of their own: 4 per convolution).
    gh = jnp.take(gp.reshape(n, -1, cout), g_idx, axis=1, mode="clip").reshape(n * h * wo, kh * cout)
    totals = [lax.dot_general(jnp.take(p.reshape(n, h * w, p.shape[-1]), x_idx, axis=1, mode="fill",
                                       fill_value=0).reshape(n * h * wo, kw * p.shape[-1]), gh,
                              (((0,), (0,)), ((), ())), preferred_element_type=acc) for p in xs]
  else:
    totals = _split_blocks(xs, gp, g_idx if _GATHER_TAPS else None, x_idx if _GATHER_TAPS else None,
                           (kh, kw, cout), (lo, top, left, right), dilation, rows, acc)
  # (kw, C_p, kh, C_out) per part -> (kh, kw, C_p, C_out), parts concatenated along C_in.
  parts = [jnp.transpose(t.reshape(kw, p.shape[-1], kh, cout), (2, 0, 1, 3)) for t, p in zip(totals, xs)]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=2)


def _split_blocks(xs, gp, g_idx, x_idx, khw_cout, pads, dilation, rows, acc):
  """`_weight_grad_split`'s products accumulated over blocks of `rows` image rows by a scan: per part the
  (kw * C_p, kh * C_out) total. g_idx / x_idx: the block-row-0 gather indices (None: a slice per tap)."""
  kh, kw, cout = khw_cout
  lo, top, left, right = pads
  dy, dx = dilation
  n, h, w, _ = xs[0].shape
  wo = gp.shape[2]
  per_image = h // rows
  if g_idx is not None:
    gflat = gp.reshape(n, gp.shape[1] * wo, cout)
    xflats = [p.reshape(n, h * w, p.shape[-1]) for p in xs]

  def body(totals, k):
    b, r = k // per_image, (k % per_image) * rows
    if g_idx is not None:
      gh = jnp.take(lax.dynamic_index_in_dim(gflat, b, keepdims=False), g_idx + r * wo, axis=0,
                    mode="clip").reshape(rows * wo, kh * cout)
      xws = [jnp.take(lax.dynamic_index_in_dim(xf, b, keepdims=False), x_idx + r * w, axis=0, mode="fill",
                      fill_value=0).reshape(rows * wo, kw * xf.shape[-1]) for xf in xflats]
    else:
      gh = jnp.concatenate([lax.dynamic_slice(gp, (b, r + lo + top - dy * i, 0, 0), (1, rows, wo, cout))
                            for i in range(kh)], axis=-1).reshape(rows * wo, kh * cout)
      xws = []
      for p in xs:
        c = p.shape[-1]
        xb = jnp.pad(lax.dynamic_slice(p, (b, r, 0, 0), (1, rows, w, c)), ((0, 0), (0, 0), (left, right), (0, 0)))
        xws.append(jnp.concatenate([lax.slice_in_dim(xb, dx * j, dx * j + wo, axis=2) for j in range(kw)],
                                   axis=-1).reshape(rows * wo, kw * c))
    return tuple(t + lax.dot_general(xw, gh, (((0,), (0,)), ((), ())), preferred_element_type=acc)
                 for t, xw in zip(totals, xws)), None

  init = tuple(jnp.zeros((kw * p.shape[-1], kh * cout), acc) for p in xs)
  totals, _ = lax.scan(body, init, jnp.arange(n * per_image))
  return totals


def _patches_sliced(xp: jax.Array, geometry) -> jax.Array:
  """Patch matrix of the padded input xp (N, Hp, Wp, C) as kh * kw strided slices side by side: (N, Ho, Wo,
  kh * kw * C), taps in row-major (i, j) order, channels fastest.
  geometry: ((kh, kw), strides, dilation, (Ho, Wo), xp's shape (N, Hp, Wp, C)), hashable."""
  (kh, kw), (sy, sx), (dy, dx), (ho, wo) = geometry[:4]
  n, _, _, c = xp.shape
  cols = [lax.slice(xp, (0, dy * i, dx * j, 0), (n, dy * i + sy * (ho - 1) + 1, dx * j + sx * (wo - 1) + 1, c),
                    (1, sy, sx, 1)) for i in range(kh) for j in range(kw)]
  return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _patches_gather(xp: jax.Array, geometry) -> jax.Array:
  """`_patches_sliced`'s values by one gather of precomputed flat indices (XLA:CPU compiles each of the kh * kw
  slices as its own kernel, ~40 CPU-ms each; the gather is one). Its backward pass is the slices' own (pads and
  adds, which XLA fuses into one kernel): autodiff of the gather would be a scatter-add, slow on XLA:CPU."""
  (kh, kw), (sy, sx), (dy, dx), (ho, wo) = geometry[:4]
  n, _, wp, c = xp.shape
  yy, cc = np.meshgrid(np.arange(ho) * sy, np.arange(wo) * sx, indexing="ij")
  idx = np.stack([(yy + dy * i) * wp + cc + dx * j for i in range(kh) for j in range(kw)], -1)
  taps = jnp.take(xp.reshape(n, -1, c), idx.reshape(-1).astype(np.int32), axis=1, mode="clip")
  return taps.reshape(n, ho, wo, kh * kw * c)


def _patches_gather_fwd(xp, geometry):
  return _patches_gather(xp, geometry), None


def _patches_gather_bwd(geometry, _, g):
  # The slices' transpose onto the padded input's shape geometry[4] (N, Hp, Wp, C).
  return jax.linear_transpose(lambda a: _patches_sliced(a, geometry),
                              jax.ShapeDtypeStruct(geometry[4], g.dtype))(g)


_patches_gather.defvjp(_patches_gather_fwd, _patches_gather_bwd)


def conv2d_im2col(x: jax.Array, w: jax.Array, strides: Sequence[int], padding: Sequence[tuple[int, int]],
                  dilation: Sequence[int]) -> jax.Array:
  """The convolution as one matrix product of its patches (N*Ho*Wo, kh*kw*C_in) with the kernel (kh*kw*C_in,
  C_out), in plain jnp: its autodiff is two more products (dW = patches^T @ g, d patches = g @ W^T) and the
  overlap-add of the patch gradient back onto x (the transpose of the strided slices: pads and adds).

  For few output positions with many channels (FlowNet's conv5-conv6 at 2x2 .. 8x8): there XLA:CPU's own
  convolution and its input gradient ran at 0.5-20 GFLOP per CPU-second (step_profile.py), the product at
  matmul speed; the patch matrix is kh*kw times the (tiny) input. Same arguments and values as `conv2d`
  (float32 accumulation; the sums in another order). x (N, H, W, C_in), w (kh, kw, C_in, C_out) ->
  (N, Ho, Wo, C_out).
  """
  n, h, wd, cin = x.shape
  kh, kw, _, cout = w.shape
  (sy, sx), (dy, dx) = strides, dilation
  ho, wo = _out_size(h, *padding[0], kh, sy, dy), _out_size(wd, *padding[1], kw, sx, dx)
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  geometry = ((kh, kw), (sy, sx), (dy, dx), (ho, wo), tuple(xp.shape))
  if _GATHER_PATCHES and kh * kw > 1:
    patches = _patches_gather(xp, geometry)
  else:
    patches = _patches_sliced(xp, geometry)
  patches = patches.reshape(n * ho * wo, kh * kw * cin)
  acc = jnp.result_type(jnp.float32, x.dtype, w.dtype)
  y = jnp.matmul(patches, w.reshape(kh * kw * cin, cout), preferred_element_type=acc)
  return y.astype(jnp.result_type(x.dtype, w.dtype)).reshape(n, ho, wo, cout)


def conv_transpose2d_matmul(x: jax.Array, w: jax.Array, strides: Sequence[int],
                            padding: Sequence[tuple[int, int]]) -> jax.Array:
  """`lax.conv_transpose(x, w, strides, padding, dimension_numbers=NHWC/HWIO/NHWC)` (transpose_kernel=False,
  i.e. a stride-1 convolution of x dilated by the strides, padded by `padding`, with w) as one matrix product
  and an overlap-add, in plain jnp.

  Input pixel y with tap t = (i, j) lands on output o = s*y + lo - t (per axis), so the product
  Z = x (N*H*W, C_in) @ w (C_in, kh*kw*C_out) holds every contribution, and the output is the sum over taps of
  Z's tap slice spread onto the output grid (lax.pad with s-1 interior zeros, offsets lo - t: negative pads
  crop). Autodiff then gives the weight gradient x^T @ G and the input gradient G @ w^T with G the taps'
  strided slices of the output gradient side by side: matmuls instead of XLA:CPU's generic transposed
  convolution (FlowNet's deconv5 1024 -> 512 at 2x2 ran at 0.1 GFLOP per CPU-second, the weight gradients of
  the others at 0.4-0.6; step_profile.py).

  x (N, H, W, C_in), w (kh, kw, C_in, C_out), explicit non-negative padding ((lo, hi), (lo, hi)) in lax's
  convention; returns (N, (H-1)*sy + 1 + lo + hi - kh + 1, ..., C_out), float32 accumulation.
  """
  n, h, wd, cin = x.shape
  kh, kw, _, cout = w.shape
  (sy, sx) = strides
  ho = (h - 1) * sy + 1 + padding[0][0] + padding[0][1] - kh + 1
  wo = (wd - 1) * sx + 1 + padding[1][0] + padding[1][1] - kw + 1
  acc = jnp.result_type(jnp.float32, x.dtype, w.dtype)
  wm = jnp.transpose(w, (2, 0, 1, 3)).reshape(cin, kh * kw * cout)
  z = jnp.matmul(x.reshape(n * h * wd, cin), wm, preferred_element_type=acc).reshape(n, h, wd, kh * kw, cout)
  zero = jnp.zeros((), acc)
  y = None
  for i in range(kh):
    for j in range(kw):
      lo_y, lo_x = padding[0][0] - i, padding[1][0] - j
      cfg = ((0, 0, 0), (lo_y, ho - lo_y - (h - 1) * sy - 1, sy - 1), (lo_x, wo - lo_x - (wd - 1) * sx - 1, sx - 1),
             (0, 0, 0))
      part = lax.pad(z[:, :, :, i * kw + j, :], zero, cfg)
      y = part if y is None else y + part
  return y.astype(jnp.result_type(x.dtype, w.dtype))


# Benchmarks set False to time XLA's transposed convolution inside the model (step_ab's 'matmul-s4' variant).
_MATMUL_TRANSPOSE = True


def conv_transpose2d(x: jax.Array, w: jax.Array, strides: Sequence[int], padding: Sequence[tuple[int, int]], *,
                     impl: str | None = None) -> jax.Array:
  """Transposed 2-D convolution with lax.conv_transpose's values (NHWC / HWIO, transpose_kernel=False,
  explicit padding): on CPU (impl 'auto' / 'matmul') `conv_transpose2d_matmul`, else XLA's own.
  x (N, H, W, C_in), w (kh, kw, C_in, C_out) -> (N, Ho, Wo, C_out)."""
  if x.ndim != 4 or w.ndim != 4 or x.shape[-1] != w.shape[2]:
    raise ValueError(f"conv_transpose2d: expected x (N, H, W, C_in) and w (kh, kw, C_in, C_out) with matching "
                     f"C_in, got shapes {x.shape} and {w.shape}")
  strides, padding, _ = _normalise(strides, padding, (1, 1))
  if _resolve(impl) == "lax" or (impl is None and (w.shape[2] * w.shape[3] < 64 or not _MATMUL_TRANSPOSE)):
    # (2 -> 2 flow upsampling: XLA's is as fast, 0.4 vs 0.7 CPU-ms at 16x16 b4.)
    return lax.conv_transpose(x, w, strides, padding, dimension_numbers=_DN)
  return conv_transpose2d_matmul(x, w, strides, padding)


# Whether stride-1 3x3 'same' float32 convolutions (forward and input gradient) of the CPU path may run by
# Winograd F(4x4, 3x3) (jaxflow.ops.winograd; benchmarks set False to compare with XLA's convolution).
_WINOGRAD = True
# ... for at least this many positions per image, and channels (C_in, C_out of the convolution as computed: the
# input gradient's are the forward's swapped) both at least _WINOGRAD_MIN_CHANNELS with a product of at least
# _WINOGRAD_MIN_CHANNEL_PRODUCT. experiments/benchmarks/winograd_conv.py, b8, CPU time XLA / Winograd (load ~5):
# 96x128 117->128 1.65 (its input gradient 1.56), 245->128 1.69 / 1.78, 373->96 1.35 / 2.31, 469->64 1.10 / 1.56,
# 565->128 1.69 / 2.23, 48x64 565->128 1.41 / 1.61; but 533->32 0.58, 565->2 0.33, 32->32 0.54, 48x64 64->64 0.86,
# 24x32 117->128 1.26 / 1.03, 96->96 1.06 / 1.08, 12x16 117->128 0.54.
_WINOGRAD_MIN_POSITIONS = 2048
_WINOGRAD_MIN_CHANNELS = 64
_WINOGRAD_MIN_CHANNEL_PRODUCT = 12288


def use_winograd(x_shape: Sequence[int], w_shape: Sequence[int], strides: Sequence[int],
                 padding: Sequence[tuple[int, int]], dilation: Sequence[int], dtype=jnp.float32) -> bool:
  """Whether the CPU path computes the convolution of x (N, H, W, C_in) with w (kh, kw, C_in, C_out) by
  Winograd F(4x4, 3x3): float32, 3x3, stride 1, dilation 1, padding 1 on every side, and a shape where it
  measured faster than XLA's convolution (see the thresholds above)."""
  cin, cout = w_shape[2], w_shape[3]
  return (_WINOGRAD and jnp.dtype(dtype) == jnp.float32 and tuple(w_shape[:2]) == (3, 3)
          and tuple(strides) == (1, 1) and tuple(dilation) == (1, 1) and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
          and x_shape[1] * x_shape[2] >= _WINOGRAD_MIN_POSITIONS and min(cin, cout) >= _WINOGRAD_MIN_CHANNELS
          and cin * cout >= _WINOGRAD_MIN_CHANNEL_PRODUCT)


def conv2d_taps(x: jax.Array | Sequence[jax.Array], w: jax.Array, padding: Sequence[tuple[int, int]],
                dilation: Sequence[int]) -> jax.Array:
  """Stride-1 convolution as one product per input part and a shifted sum: Z = sum_p x_p (N*H*W, C_p) @
  w_p (C_p, kh*kw*C_out), then y[n, oy, ox] = sum over taps (i, j) of Zp[n, oy + d*i, ox + d*j, tap (i, j)] with
  Zp = Z zero-padded by `padding` (the taps' windows of the padded input, moved from the input, C_in channels,
  to the product, kh*kw*C_out channels).

  For few output channels (predict_flow's 565 -> 2): XLA:CPU's convolution ran those at 8.5-14 GFLOP per CPU-s on
  the AVX-512 machine, this at 41-43 (conv_paths10.py b8: 96x128 141 -> 47 CPU-ms, 48x64 35 -> 12; session 10).
  x: (N, H, W, C_in) or channel parts (N, H, W, C_p) whose concatenation is the input (never concatenated);
  w (kh, kw, C_in, C_out); explicit non-negative padding. Same values as `conv2d` (float32 accumulation, the
  sums in another order); returns (N, Ho, Wo, C_out) in the promoted dtype. Differentiable by jax (products,
  pads and slices)."""
  xs = [x] if isinstance(x, (jax.Array, np.ndarray)) else list(x)
  kh, kw, cin, cout = w.shape
  n, h, wd, _ = xs[0].shape
  if sum(p.shape[-1] for p in xs) != cin:
    raise ValueError(f"conv2d_taps: the inputs' channels {[p.shape[-1] for p in xs]} do not add up to the "
                     f"kernel's C_in {cin} (w shape {w.shape})")
  (dy, dx) = dilation
  ho, wo = _out_size(h, *padding[0], kh, 1, dy), _out_size(wd, *padding[1], kw, 1, dx)
  acc = jnp.result_type(jnp.float32, xs[0].dtype, w.dtype)
  wm = jnp.transpose(w, (2, 0, 1, 3)).reshape(cin, kh * kw * cout)
  z, a = None, 0
  for p in xs:
    c = p.shape[-1]
    zp = jnp.matmul(p.reshape(n * h * wd, c), wm[a:a + c], preferred_element_type=acc)
    z, a = (zp if z is None else z + zp), a + c
  z = jnp.pad(z.reshape(n, h, wd, kh * kw, cout), ((0, 0), padding[0], padding[1], (0, 0), (0, 0)))
  y = None
  for i in range(kh):
    for j in range(kw):
      t = z[:, dy * i:dy * i + ho, dx * j:dx * j + wo, i * kw + j]
      y = t if y is None else y + t
  return y.astype(jnp.result_type(xs[0].dtype, w.dtype))


# Forward convolutions (stride 1, float32) with at most this many output channels and at least
# _TAPS_MIN_CIN input channels run as `conv2d_taps` (0: never; benchmarks set it to compare with XLA's).
_TAPS_MAX_COUT = 8
_TAPS_MIN_CIN = 64


def _use_taps(x_shape, w_shape, strides, dtype) -> bool:
  return (tuple(strides) == (1, 1) and w_shape[3] <= _TAPS_MAX_COUT and w_shape[2] >= _TAPS_MIN_CIN
          and jnp.dtype(dtype) == jnp.float32)


def _cpu_conv(x: jax.Array | Sequence[jax.Array], w: jax.Array, strides, padding, dilation) -> jax.Array:
  """The CPU path's convolution values: Winograd where `use_winograd` says so, the tap product for few output
  channels (`_use_taps`), XLA's otherwise. x may be a sequence of channel parts (concatenated unless taps)."""
  xs = [x] if isinstance(x, (jax.Array, np.ndarray)) else list(x)
  x_shape = (*xs[0].shape[:3], w.shape[2])
  dtype = jnp.result_type(xs[0].dtype, w.dtype)
  if _use_taps(x_shape, w.shape, strides, dtype):
    return conv2d_taps(xs, w, padding, dilation)
  x = xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=-1)
  if use_winograd(x.shape, w.shape, strides, padding, dilation, dtype):
    return winograd.conv3x3_same(x, w)
  return _lax_conv(x, w, strides, padding, dilation)


# From this many bytes of input gradient on, `_cpu_input_grad` computes a concatenation's input gradient per part
# (each part in its own buffer) instead of whole and sliced: XLA fuses the slices into the parts' consumers, so the
# whole gradient stays alive until the last of them, and in PWC-Net that is the level's pyramid features, whose
# gradient is summed at the end of the backward pass (384x512 b8: the level-2 predict_flow's 565-channel input
# gradient, 212 MiB, was alive from the start of the backward pass to its end). Below it (PWC-Net at 128x128 b4
# and the coarse levels) the whole gradient and slices: fewer kernels to compile.
_SPLIT_DX_MIN_BYTES = 16 * 2**20


def _cpu_input_grad(g: jax.Array, w: jax.Array, x_shape, x_dtype, strides, padding, dilation,
                    splits: Sequence[int] | None = None) -> jax.Array | tuple[jax.Array, ...]:
  """Gradient with respect to x (shape x_shape) of sum(g * conv(x, w)): Winograd for the rotated kernel where
  `use_winograd` takes that (C_out -> C_in) convolution, XLA's transposed convolution otherwise.

  splits: channel counts of x's parts (adding up to C_in); then a tuple of the parts' gradients, each its own
  buffer when the whole is at least _SPLIT_DX_MIN_BYTES (Winograd: written per part by its loop; XLA: one
  transposed convolution per part, with the kernel's rows of that part), else slices of the whole."""
  bounds = None if splits is None else np.cumsum([0] + [int(c) for c in splits]).tolist()
  per_part = (bounds is not None and len(splits) > 1
              and int(np.prod(x_shape)) * jnp.dtype(x_dtype).itemsize >= _SPLIT_DX_MIN_BYTES)
  if use_winograd(g.shape, (*w.shape[:2], w.shape[3], w.shape[2]), strides, padding, dilation,
                  jnp.result_type(g.dtype, w.dtype)):
    dx = winograd.conv3x3_same_input_grad(g, w, splits=splits if per_part else None)
    if per_part:
      return tuple(d.astype(x_dtype) for d in dx)
    dx = dx.astype(x_dtype)
  elif per_part:
    return tuple(jax.linear_transpose(lambda x_, w_=w[:, :, a:b]: _lax_conv(x_, w_, strides, padding, dilation),
                                      jax.ShapeDtypeStruct((*x_shape[:3], b - a), x_dtype))(g)[0]
                 for a, b in zip(bounds[:-1], bounds[1:]))
  else:
    (dx,) = jax.linear_transpose(lambda x_: _lax_conv(x_, w, strides, padding, dilation),
                                 jax.ShapeDtypeStruct(x_shape, x_dtype))(g)
  if bounds is None:
    return dx
  return tuple(lax.slice_in_dim(dx, a, b, axis=3) for a, b in zip(bounds[:-1], bounds[1:]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_matmul_grad(x, w, strides, padding, dilation):
  return _cpu_conv(x, w, strides, padding, dilation)


def _conv_fwd(x, w, strides, padding, dilation):
  return _cpu_conv(x, w, strides, padding, dilation), (x, w)


# Below this many multiply-adds per tap (C_in * C_out * N * Ho * Wo) XLA's own weight gradient was as fast or
# faster (conv_grad.py: 32 -> 32 at 48x64 batch 4 and 64 -> 96 stride 2 at 24x32: 0.6x; 531 -> 128 at 12x16:
# 1.0x; 32 -> 32 at 96x128 batch 8: 1.5x; 117 -> 128 at 48x64 batch 4: 3.0x).
_MIN_TAP_MACS = 5e7
# The mode of large stride-1 weight gradients (benchmarks set 'scan' to compare with the previous default).
_STRIDE1_MODE = "blocked"
# Whether stride-1 weight gradients may take mode 'split' (benchmarks set False for session 5's path).
_SPLIT = True
# Whether 'split' and 'blocked' take each block's shifted windows by one gather per operand instead of a slice
# per tap (benchmarks set False for session 5's slices).
_GATHER_TAPS = True
# Whether the patch matrix of `conv2d_im2col` (forward) and the 'concat' weight gradient's shifted output
# gradients are one gather each instead of a slice per tap and a concatenation (benchmarks and tests set False
# for session 8's slices). XLA:CPU compiled every slice as its own kernel: FlowNetS's train step had 59 + 40 of
# them, ~40 CPU-ms of compile each (BENCHMARKS.md, session 9: cold start).
_GATHER_PATCHES = True
# The 'split' weight gradient without its scan over row blocks (one gather per operand over all images, one
# product per part) when its two gathered matrices take at most this many bytes (float32): SpyNet's three coarse
# levels at 128x128 b4 (up to 11 MB), 48 of its kernels (session 9). Benchmarks set 0 for the blocked loop.
WHOLE_SPLIT_BYTES = 16 * 2**20
_WHOLE_SPLIT_BYTES = WHOLE_SPLIT_BYTES


# Whether float32 3x3 'same' stride-1 weight gradients may run by Winograd F(4x4, 3x3) (jaxflow.ops.winograd_wgrad;
# benchmarks set False to compare with 'blocked'), where the output has at least _WINOGRAD_WGRAD_MIN_COUT channels,
# the input at least _WINOGRAD_WGRAD_MIN_CIN and each image _WINOGRAD_WGRAD_MIN_POSITIONS positions.
# experiments/benchmarks/winograd_wgrad.py, b8, CPU time blocked / Winograd (load 5-9): 96x128 117->128 1.22,
# 245->128 1.28, 373->96 1.12, 565->128 1.39; 48x64 117->128 1.38, 245->128 1.31, 373->96 1.23; but 96x128 469->64
# 0.81, 533->32 0.50, 48x64 469->64 0.72: the input's transform (36 x 36 per 6x6 window, 2.25x the input) is
# paid per input channel and the products' saving per output channel, so few output channels lose.
_WINOGRAD_WGRAD = True
_WINOGRAD_WGRAD_MIN_COUT = 96
_WINOGRAD_WGRAD_MIN_CIN = 64
_WINOGRAD_WGRAD_MIN_POSITIONS = 2048


def _winograd_wgrad_geometry(kernel_shape: Sequence[int], strides: Sequence[int],
                             padding: Sequence[tuple[int, int]], dilation: Sequence[int]) -> bool:
  """Whether a convolution is one `jaxflow.ops.winograd_wgrad` computes: 3x3, stride 1, dilation 1, padding 1."""
  return (tuple(kernel_shape[:2]) == (3, 3) and tuple(strides) == (1, 1) and tuple(dilation) == (1, 1)
          and tuple(map(tuple, padding)) == ((1, 1), (1, 1)))


def weight_grad_mode(cin: int, cout: int, strides: Sequence[int], positions: int | None = None,
                     kernel: Sequence[int] = (3, 3), *, padding: Sequence[tuple[int, int]] | None = None,
                     dilation: Sequence[int] = (1, 1), image_positions: int | None = None,
                     dtype=None) -> str:
  """How `conv2d` computes a weight gradient on CPU (kernel = (kh, kw)), from measurements (conv_grad.py --cpu).

  Kernels larger than 3x3 at stride 1 (SpyNet's 7x7): 'split' (7x7 32 -> 64 at 128x128 b4: 221 CPU-ms against
  434 for 'blocked' and 1,739 for XLA's; 16 -> 2: 13 against 53 for 'concat'), except for inputs narrower than
  16 channels, where XLA's is as fast or faster (8 -> 32: 53 against 58). 3x3 kernels: 'concat' for few
  output channels at stride 1 (predict_flow 565 -> 2: ~7x faster than XLA's), 'lax' for small channel products
  (16 -> 32) or small problems (`positions` = N * Ho * Wo output positions, when given: fewer than
  _MIN_TAP_MACS multiply-adds per tap), otherwise 'blocked' at stride 1 (estimator and context convolutions:
  1.2-2.2x faster than the per-tap 'scan', e.g. 469 -> 64 at 48x64 b4 94 vs 162 CPU-ms) and 'scan' at larger
  strides (the pyramid's first convolution of each level). 'split' is not taken for 3x3 kernels: at PWC-Net's
  shapes it was within 10 % of 'blocked' (117 -> 128 at 48x64 b4 56 vs 64 CPU-ms, 373 -> 96 130 vs 127) and
  PWC-Net's 128x128 b4 step with it 0.99x by CPU time (step_ab, load ~5).

  'winograd' (F(4x4, 3x3), `jaxflow.ops.winograd_wgrad`) instead of 'blocked' when padding, dtype and
  image_positions (H * W per image) are given and the convolution is a float32 3x3 stride-1 undilated 'same' one
  with enough channels and positions (_WINOGRAD_WGRAD_MIN_*: PWC-Net's estimator conv0-conv2 and context conv0
  at its fine levels, FlowNet's conv3_1; 1.1-1.4x less CPU time than 'blocked' there)."""
  stride1 = tuple(strides) == (1, 1)
  kh, kw = kernel
  if stride1 and _SPLIT and kh * kw > 9:
    return "lax" if cin < 16 and cout > 8 else "split"
  if cout <= 8 and stride1:
    return "concat"
  if cin * cout < 1024 or (positions is not None and cin * cout * positions < _MIN_TAP_MACS):
    return "lax"
  if not stride1:
    return "scan"
  if (_WINOGRAD_WGRAD and padding is not None and dtype is not None and jnp.dtype(dtype) == jnp.float32
      and image_positions is not None and _winograd_wgrad_geometry(kernel, strides, padding, dilation)
      and cout >= _WINOGRAD_WGRAD_MIN_COUT and cin >= _WINOGRAD_WGRAD_MIN_CIN
      and image_positions >= _WINOGRAD_WGRAD_MIN_POSITIONS):
    return "winograd"
  return _STRIDE1_MODE


def _summed_per_device(fn, xs: Sequence[jax.Array], g: jax.Array) -> jax.Array:
  """fn(xs, g): a weight gradient (kh, kw, C_in, C_out) of the channel parts xs (N, H, W, C_p) and g (N, Ho, Wo,
  C_out). Under a jit with the batch sharded each device runs it on its own images and the devices' sums are added
  (`parallel.per_image`): its loops over images and row blocks would otherwise all-gather the batch (PWC-Net
  128x128 b4 on 2 devices: 51 all-gathers). One device: fn inlined, the same program."""
  from jaxflow import parallel
  rule = "".join(f"... h w c{i}, " for i in range(len(xs))) + "... y x o -> ki kj ci o"
  return parallel.per_image(lambda *a: fn(list(a[:-1]), a[-1]), rule)(*xs, g)


def _conv_bwd(strides, padding, dilation, res, g):
  x, w = res
  # The input gradient is XLA's transposed convolution (near matmul speed on CPU) or Winograd's.
  dx = _cpu_input_grad(g, w, x.shape, x.dtype, strides, padding, dilation)
  mode = weight_grad_mode(w.shape[2], w.shape[3], strides, g.shape[0] * g.shape[1] * g.shape[2], w.shape[:2],
                          padding=padding, dilation=dilation, image_positions=g.shape[1] * g.shape[2],
                          dtype=jnp.result_type(x.dtype, g.dtype))
  if mode == "lax":
    (dw,) = jax.linear_transpose(lambda w_: _lax_conv(x, w_, strides, padding, dilation),
                                 jax.ShapeDtypeStruct(w.shape, w.dtype))(g)
  else:
    dw = _summed_per_device(lambda xs, g_: weight_grad_matmul(xs[0], g_, w.shape, strides, padding, dilation, mode),
                            [x], g)
  return dx, dw.astype(w.dtype)


_conv_matmul_grad.defvjp(_conv_fwd, _conv_bwd)


# At most this many output positions (N * Ho * Wo) a CPU convolution is one product of its patch matrix
# (`conv2d_im2col`, autodiff for both gradients) instead of XLA's convolution (conv_small.py, forward + both
# gradients, CPU time: 1024 -> 1024 at 2x2 b4 17.7x faster, 512 -> 1024 /2 at 4x4 b4 20x, 512 -> 512 at 8x8 b4
# 1.55x, 256 -> 256 at 16x16 b4 (1,024 positions) 1.08x, 512 -> 512 at 12x14 b8 (1,344) 1.07x; at 24x28 b8
# (5,376) 0.81x, i.e. slower).
_IM2COL_MAX_POSITIONS = 1536
# ... and only for kernels with at least this many C_in x C_out: XLA's convolution collapses with many channels
# (FlowNet's 256-1024), while with SpyNet's (<= 64) and PWC-Net's (<= 196 x 196) the patch product changed the
# step by 0.97-1.10x and 1.02-1.03x but lengthened the step's compile (SpyNet 128x128 b4: 15.1 / 18.0 s against
# 28.1 / 26.4 s, step_ab in both orders, quiet machine).
_IM2COL_MIN_CHANNEL_PRODUCT = 256 * 256


def _use_im2col(x_shape, w_shape, strides, padding, dilation) -> bool:
  """Whether `conv2d` takes the patch-matrix product for this problem (few output positions, see above)."""
  n, h, w = x_shape[:3]
  ho = _out_size(h, *padding[0], w_shape[0], strides[0], dilation[0])
  wo = _out_size(w, *padding[1], w_shape[1], strides[1], dilation[1])
  # Few output channels (predict_flow: C_out 2), or a kernel much wider than its output, stay on the other path:
  # there the patch matrix is the larger operand (386 -> 2 at 16x16 b4: 14.7 against 2.5 CPU-ms for the three
  # passes; PWC-Net's dense 565 -> 64 at 12x16 b8: 0.35x).
  return (n * ho * wo <= _IM2COL_MAX_POSITIONS and w_shape[3] > 8 and 4 * w_shape[3] >= w_shape[2]
          and w_shape[2] * w_shape[3] >= _IM2COL_MIN_CHANNEL_PRODUCT)


def _normalise(strides, padding, dilation) -> tuple[tuple[int, int], tuple[tuple[int, int], ...], tuple[int, int]]:
  strides = tuple(int(s) for s in strides)
  dilation = tuple(int(d) for d in (dilation if dilation is not None else (1, 1)))
  if isinstance(padding, str):
    raise ValueError(f"conv: padding must be explicit ((lo, hi), (lo, hi)) pairs, got {padding!r}")
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if len(strides) != 2 or len(dilation) != 2 or len(padding) != 2:
    raise ValueError(f"conv: expected 2-D strides, padding and dilation, got {strides}, {padding}, {dilation}")
  if any(lo < 0 or hi < 0 for lo, hi in padding):
    raise ValueError(f"conv: padding must be non-negative, got {padding}")
  return strides, padding, dilation


def conv2d(x: jax.Array, w: jax.Array, strides: Sequence[int] = (1, 1),
           padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)), dilation: Sequence[int] = (1, 1), *,
           impl: str | None = None) -> jax.Array:
  """2-D cross-correlation of x (N, H, W, C_in) with w (kh, kw, C_in, C_out) (NHWC / HWIO), explicit padding.

  Same values as `lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation)`; output
  (N, Ho, Wo, C_out) in the promoted dtype of x and w. On CPU (impl 'auto') the weight gradient is computed by
  `weight_grad_matmul`; `impl='lax'` forces XLA's gradient.
  """
  if x.ndim != 4 or w.ndim != 4:
    raise ValueError(f"conv: expected x (N, H, W, C_in) and w (kh, kw, C_in, C_out), got shapes {x.shape} "
                     f"and {w.shape}")
  if x.shape[-1] != w.shape[2]:
    raise ValueError(f"conv: input channels {x.shape[-1]} (x shape {x.shape}) do not match the kernel's "
                     f"C_in {w.shape[2]} (w shape {w.shape})")
  strides, padding, dilation = _normalise(strides, padding, dilation)
  if _resolve(impl) == "lax":
    return _lax_conv(x, w, strides, padding, dilation)
  # float32 only: in bfloat16 the patch product moved PWC-Net's flow further from float32 (max 0.74 against 0.62
  # px on test_pwcnet's random-weight forward), so bfloat16 keeps XLA's convolution.
  if x.dtype == jnp.float32 and w.dtype == jnp.float32 and _use_im2col(x.shape, w.shape, strides, padding,
                                                                        dilation):
    return conv2d_im2col(x, w, strides, padding, dilation)
  return _conv_matmul_grad(x, w, strides, padding, dilation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_of_concat(xs, w, strides, padding, dilation):
  return _cpu_conv(xs, w, strides, padding, dilation)


def _concat_fwd(xs, w, strides, padding, dilation):
  # The concatenation is a temporary of the forward pass; only the parts (already alive as the outputs of
  # earlier layers) are kept for the backward pass.
  return _cpu_conv(xs, w, strides, padding, dilation), (xs, w)


def _concat_bwd(strides, padding, dilation, res, g):
  xs, w = res
  cin = w.shape[2]
  n, h, wd, _ = xs[0].shape
  # The input gradient needs only the kernel; one per part (the whole's channel ranges).
  dxs = _cpu_input_grad(g, w, (n, h, wd, cin), xs[0].dtype, strides, padding, dilation,
                        splits=[x.shape[-1] for x in xs])
  mode = weight_grad_mode(cin, w.shape[3], strides, g.shape[0] * g.shape[1] * g.shape[2], w.shape[:2],
                          padding=padding, dilation=dilation, image_positions=g.shape[1] * g.shape[2],
                          dtype=jnp.result_type(xs[0].dtype, g.dtype))
  if mode == "winograd":  # the parts are concatenated per image inside its loop
    dw = _summed_per_device(winograd_wgrad.weight_grad, xs, g)
  elif tuple(strides) == (1, 1) and mode in ("blocked", "concat", "split"):
    # The weight gradient reads the parts where they are: no concatenation is rebuilt in the backward pass
    # (one would be a value XLA may schedule, and keep alive, long before it is needed).
    acc = jnp.result_type(jnp.float32, xs[0].dtype, g.dtype)
    dw = _summed_per_device(lambda xs_, g_: _weight_grad_stride1(xs_, g_, w.shape, padding, dilation, mode, acc),
                            xs, g)
  else:
    _, dw = _conv_bwd(strides, padding, dilation, (jnp.concatenate(xs, axis=-1), w), g)
  return dxs, dw.astype(w.dtype)


_conv_of_concat.defvjp(_concat_fwd, _concat_bwd)


def conv2d_concat(xs: Sequence[jax.Array], w: jax.Array, strides: Sequence[int] = (1, 1),
                  padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)), dilation: Sequence[int] = (1, 1), *,
                  impl: str | None = None) -> jax.Array:
  """`conv2d` of the channel concatenation of xs (each (N, H, W, C_i), one dtype) with w (kh, kw, sum C_i,
  C_out): the same values, but on CPU (impl 'auto' / 'matmul') the concatenation is not saved for the backward
  pass: the parts are. The input gradient is split per part; a stride-1 weight gradient in mode 'blocked' or
  'concat' reads the parts block by block, any other rebuilds the concatenation as a temporary.

  For densely connected layers (PWC-Net's estimators: every conv reads the concatenation of all earlier
  outputs) this keeps each part once in memory instead of once per later conv (PWC-Net level 2: 2,302
  channels per pixel of saved conv inputs become 565). Input gradients are returned per part.
  """
  xs = tuple(xs)
  if not xs:
    raise ValueError("conv2d_concat: expected at least one input")
  for i, x in enumerate(xs):
    if x.ndim != 4 or x.shape[:3] != xs[0].shape[:3] or x.dtype != xs[0].dtype:
      raise ValueError(f"conv2d_concat: input {i} has shape {x.shape} and dtype {x.dtype}; every input must be "
                       f"(N, H, W, C_i) with (N, H, W) = {xs[0].shape[:3]} and dtype {xs[0].dtype}")
  cin = sum(x.shape[-1] for x in xs)
  if w.ndim != 4 or w.shape[2] != cin:
    raise ValueError(f"conv2d_concat: the inputs' channels {[x.shape[-1] for x in xs]} add up to {cin}, but the "
                     f"kernel has shape {w.shape} (expected (kh, kw, {cin}, C_out))")
  strides, padding, dilation = _normalise(strides, padding, dilation)
  if len(xs) == 1:
    return conv2d(xs[0], w, strides, padding, dilation, impl=impl)
  if _resolve(impl) == "lax":
    return _lax_conv(jnp.concatenate(xs, axis=-1), w, strides, padding, dilation)
  # (No patch product here: for the dense estimators' wide inputs and narrow outputs it was slower, e.g. 565 -> 64
  # at 12x16 b8 0.35x, 533 -> 64 at 8x8 b4 0.79x; conv_small.py --only dense.)
  return _conv_of_concat(xs, w, strides, padding, dilation)


def flax_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                              dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """Drop-in for `lax.conv_general_dilated` as flax's `nn.Conv(conv_general_dilated=...)`: uses `conv2d` for
  2-D NHWC/HWIO convolutions without input dilation or groups, and lax for anything else."""
  plain = (lhs.ndim == 4 and feature_group_count == 1 and precision is None and not kwargs
           and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1)) and not isinstance(padding, str)
           and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DN))
  if not plain or _resolve(None) == "lax":
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision, **kwargs)
  return conv2d(lhs, rhs, window_strides, padding, rhs_dilation or (1, 1), impl="matmul")


__all__ = ["conv2d", "conv2d_concat", "conv2d_im2col", "conv2d_taps", "conv_transpose2d",
           "conv_transpose2d_matmul", "flax_conv_general_dilated", "get_default_impl", "set_default_impl",
           "weight_grad_matmul", "weight_grad_mode"]
