"""Cost volume by shifted dot products (the FlowNetC / PWC-Net correlation layer): jnp, and a C++ kernel on CPU.

`correlation(f1, f2, max_displacement, stride)` returns, for every pixel (y, x) of f1 and every displacement
(dy, dx) of a square window, the mean over channels of f1(y, x) * f2(y + dy, x + dx); positions outside f2
contribute zero (zero padding).

Three implementations of the same sums, all `jax.custom_vjp`s (gradients are written by hand, not autodiff):

- 'ffi' (what 'tiled' means on XLA:CPU when the kernel is available; session 9): a C++ XLA FFI custom call,
  jaxflow/ops/csrc/correlation.cc, built on first use by jaxflow.ops.correlation_ffi (system C++ compiler,
  cached per source / compiler / jaxlib / CPU; $JAXFLOW_CORRELATION_FFI=0 turns it off). Forward and backward
  of the stride-1 correlation on float32 maps: each image's rows are copied into 8-pixel chunk windows (a block's
  channels contiguous, n zero columns of padding), then 8 pixels per vector meet the K shifted f2 rows of one dy in K register accumulators (one load per fused
  multiply-add), rows split over XLA's intra-op thread pool; the f2 gradient is the same loop on the (g, f1)
  pair with the displacements reversed. bfloat16 / float16 inputs are cast to float32 around it (gradients cast
  back); float64 (x64 tests) and a process without the kernel (no compiler, failed build: one warning) use
  'tiled_gather'. Stride 2 (FlowNetC) reaches it through the pixel phases below. This departs, on CPU only,
  from DESIGN.md's "jnp shifted dot products": XLA:CPU runs the tiled path's (64, 32) @ (32, 256) block
  products at ~12 GFLOP/CPU-s (BENCHMARKS.md, sessions 7-9); the jnp paths stay the reference in the tests and
  accelerators keep 'tiled_reshape'.

- 'tiled' (the default; 'tiled_gather' / 'tiled_reshape'): the image is cut into T x T pixel tiles. For one tile, every product it needs lies in
  the (T + 2d) x (T + 2d) window of f2 around it, so the tile's products with its whole window are one small
  matmul over channels, (T*T, C) @ (C, (T+2d)^2); the K*K wanted displacements of each pixel are then read off
  that block by two "skews" (pad / reshape / slice: pure data movement, no gather; impl 'tiled_reshape',
  accelerators' default) or, on CPU ('tiled_gather'), by one gather whose output is already the cost volume
  in image layout (the skews' strided passes over the 3.2x larger block were ~40 % of the forward there). The backward pass embeds
  the cotangent back into the band of the block (the transposed skews) and needs two matmuls of the same
  shape: dF1 = dM @ window and dWindow = dM^T @ F1, the windows' gradients being summed back onto f2 by the
  transpose of the window construction. One batch element is processed at a time (`lax.map`), so the
  temporaries are per image: (T+2d)^2 / T^2 copies of f2's channels (4x for PWC-Net: T = 8, d = 4) and a
  (T+2d)^2 per-pixel block (3.2x the cost volume), never K*K x C x H x W. A displacement stride s > 1
  (FlowNetC) is handled by splitting both maps into their s x s pixel phases: displacements that are multiples
  of s stay within a phase, so each phase is a stride-1 correlation of a (H/s, W/s) map. Measured on CPU
  (experiments/benchmarks/cost_volume.py): it reads and writes a few times the feature maps instead of
  streaming f1 and a shifted f2 once per displacement (2 x K*K passes over memory in the scan).
- 'scan': a `lax.scan` over the K*K displacements, each step one fused dynamic-slice * f1 -> sum over C,
  and a backward scan accumulating both input gradients in (B, H, W, C) float32 carries (the f2 gradient is a
  correlation of the zero-padded (g, f1) pair with the window flipped, so it needs no scatter). Memory-light but
  memory-bound; kept as a second, structurally different implementation for the tests and the benchmark.

Precision: products and sums are float32 for bfloat16, float16 and float32 inputs (bfloat16 products are
exact in float32) and the output is float32 (DESIGN.md: cost-volume accumulation stays float32); float64
inputs (x64 mode, used by the gradient tests) are accumulated and returned in float64. Gradients come back
in the dtype of each input.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from jaxflow.ops import correlation_ffi

_F32 = jnp.float32

# Builds (first use on this machine, ~5 s of one core) or loads the C++ kernel in the background.
correlation_ffi.start_build()


def _acc_dtype(*xs: jax.Array):
  """float32 for bfloat16/float16/float32 inputs; float64 only when an input is float64 (x64 mode)."""
  return jnp.result_type(_F32, *[x.dtype for x in xs])


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


def _shifted(x: jax.Array, dy: jax.Array, dx: jax.Array, h: int, w: int) -> jax.Array:
  """x[:, dy:dy + h, dx:dx + w] for a (B, H + 2d, W + 2d, ...) padded array and traced offsets."""
  start = (0, dy, dx) + (0,) * (x.ndim - 3)
  return lax.dynamic_slice(x, start, (x.shape[0], h, w) + x.shape[3:])


def _forward(f1: jax.Array, f2: jax.Array, n: int, s: int) -> jax.Array:
  """Cost volume (B, H, W, K*K) float32, K = 2n+1, by a scan over the K*K displacements.

  Each step is one fused dynamic-slice * f1 -> sum over C loop writing a (B, H, W) plane. (Measured on CPU,
  forward only: a scan over dy rows with the dx shifts unrolled as static slices of a row slab made XLA
  copy every shifted slice: 3.2x the temp memory at PWC-Net level 2 and 1.4-3x slower, e.g. 5.9 s vs 3.4 s
  for FlowNetC conv3 at batch 2.)
  """
  b, h, w, c = f1.shape
  k = 2 * n + 1
  f2p = _pad_hw(f2, n * s)  # (B, H + 2d, W + 2d, C)
  acc = _acc_dtype(f1, f2)
  f1f = f1.astype(acc)
  inv_c = 1.0 / c

  def step(_, t):
    i, j = t // k, t % k
    plane = jnp.sum(f1f * _shifted(f2p, i * s, j * s, h, w).astype(acc), axis=-1)
    return None, plane * inv_c

  _, planes = lax.scan(step, None, jnp.arange(k * k))  # (K*K, B, H, W), t = i * K + j
  return jnp.moveaxis(planes, 0, -1)


def _backward(f1: jax.Array, f2: jax.Array, g: jax.Array, n: int, s: int) -> tuple[jax.Array, jax.Array]:
  """Gradients of sum(g * correlation(f1, f2)) with respect to f1 and f2, accumulated per displacement.

  With f2p = f2 zero-padded by d:  dL/df1(y, x) = 1/C sum_{i,j} g(y, x, i, j) f2p(y + i s, x + j s).
  For f2, substituting i' = K-1-i, j' = K-1-j:
    dL/df2(y, x) = 1/C sum_{i',j'} gf_p(y + i' s, x + j' s, i', j') f1p(y + i' s, x + j' s),
  where gf = g with both displacement axes reversed and gf_p, f1p are zero-padded by d: the same shifted
  products as dL/df1, read from the padded (gf, f1) pair. Both sums run in one scan over the K*K
  displacements with (B, H, W, C) float32 accumulators; nothing displacement x channel sized is stored.
  """
  b, h, w, c = f1.shape
  k, d = 2 * n + 1, n * s
  inv_c = 1.0 / c
  acc = _acc_dtype(f1, f2, g)
  g = g.astype(acc)
  g_planes = jnp.moveaxis(g, -1, 0)  # (K*K, B, H, W), t = i * K + j
  gf = g.reshape(b, h, w, k, k)[..., ::-1, ::-1].reshape(b, h, w, k * k)
  gf_planes = jnp.moveaxis(_pad_hw(gf, d), -1, 0)  # (K*K, B, H + 2d, W + 2d)
  f1p = _pad_hw(f1, d)
  f2p = _pad_hw(f2, d)

  def step(carry, xs):
    acc1, acc2 = carry
    t, g_t, gf_t = xs
    i, j = t // k, t % k
    acc1 = acc1 + g_t[..., None] * _shifted(f2p, i * s, j * s, h, w).astype(acc)
    gf_shift = lax.dynamic_slice(gf_t, (0, i * s, j * s), (b, h, w))
    acc2 = acc2 + gf_shift[..., None] * _shifted(f1p, i * s, j * s, h, w).astype(acc)
    return (acc1, acc2), None

  zeros = jnp.zeros_like(f1, dtype=acc)  # zeros_like keeps shard_map's varying-axes type of f1
  (acc1, acc2), _ = lax.scan(step, (zeros, zeros), (jnp.arange(k * k), g_planes, gf_planes))
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


# ---------------------------------------------------------------------------------------------------------------
# Tiled implementation (stride 1; stride s > 1 goes through the s x s pixel phases, see `_by_phases`).


def _tile_side(h: int, w: int, c: int, d: int) -> int:
  """Tile side T for an (h, w, c) map and a displacement radius d: minimises the per-pixel data the tiled path
  moves, (T+2d)^2/T^2 * c window values + (T+2d)^2 block values, over the padded (multiple of T) image."""
  best = None
  for t in (4, 8, 16, 32):
    s = t + 2 * d
    padded = (-(-h // t) * t) * (-(-w // t) * t) / (h * w)
    cost = padded * (s * s / (t * t) * c + s * s)
    if best is None or cost < best[0]:
      best = (cost, t)
  return best[1]


def _tiles(x: jax.Array, t: int) -> jax.Array:
  """(H, W, C) -> (nty, ntx, T*T, C) tiles, zero-padded at the end to multiples of T; pixel (p, q) of a tile
  at row p * T + q."""
  h, w, c = x.shape
  nty, ntx = -(-h // t), -(-w // t)
  xp = jnp.pad(x, ((0, nty * t - h), (0, ntx * t - w), (0, 0)))
  return jnp.transpose(xp.reshape(nty, t, ntx, t, c), (0, 2, 1, 3, 4)).reshape(nty, ntx, t * t, c)


def _untile(a: jax.Array, t: int, h: int, w: int) -> jax.Array:
  """Inverse of `_tiles` for any trailing size: (nty, ntx, T*T, E) -> (H, W, E)."""
  nty, ntx, _, e = a.shape
  a = jnp.transpose(a.reshape(nty, ntx, t, t, e), (0, 2, 1, 3, 4))
  return a.reshape(nty * t, ntx * t, e)[:h, :w]


def _windows(x: jax.Array, t: int, d: int) -> jax.Array:
  """(H, W, C) -> (nty, ntx, S*S, C), S = T + 2d: window (ty, tx) holds rows ty*T - d ... ty*T + T + d - 1 and
  the same columns of x (zero outside), position (a, e) of the window at row a * S + e. Built from whole
  tiles of the padded map (m = ceil(S / T) neighbouring tiles per axis, cropped to S)."""
  h, w, c = x.shape
  s = t + 2 * d
  m = -(-s // t)
  nty, ntx = -(-h // t), -(-w // t)
  xp = jnp.pad(x, ((d, (nty + m - 1) * t - h - d), (d, (ntx + m - 1) * t - w - d), (0, 0)))
  xt = jnp.transpose(xp.reshape(nty + m - 1, t, ntx + m - 1, t, c), (0, 2, 1, 3, 4))  # (ty, tx, p, q, C)
  rows = [jnp.concatenate([xt[u:u + nty, v:v + ntx] for v in range(m)], axis=3)[:, :, :, :s] for u in range(m)]
  return jnp.concatenate(rows, axis=2)[:, :, :s].reshape(nty, ntx, s * s, c)


def _skew(m: jax.Array, t: int, s: int, k: int) -> jax.Array:
  """(..., T, S) -> (..., T, K) with out[..., q, j] = m[..., q, q + j]: the band of a block, by pad/reshape."""
  lead = m.shape[:-2]
  flat = jnp.pad(m.reshape(lead + (t * s,)), [(0, 0)] * len(lead) + [(0, t)])
  return flat.reshape(lead + (t, s + 1))[..., :k]


def _unskew(g: jax.Array, t: int, s: int, k: int) -> jax.Array:
  """Transpose of `_skew`: (..., T, K) -> (..., T, S) with g[..., q, j] at [..., q, q + j], zeros elsewhere."""
  lead = g.shape[:-2]
  full = jnp.pad(g, [(0, 0)] * len(lead) + [(0, 0), (0, s + 1 - k)])
  return full.reshape(lead + (t * (s + 1),))[..., :t * s].reshape(lead + (t, s))


def _forward_tiled_one(f1: jax.Array, f2: jax.Array, n: int, t: int) -> jax.Array:
  """One image: (H, W, C) x2 -> (H, W, K*K) in f1's dtype (the accumulation dtype), unnormalised sums."""
  h, w, c = f1.shape
  k, s = 2 * n + 1, t + 2 * n
  block = jnp.einsum("yxpc,yxwc->yxpw", _tiles(f1, t), _windows(f2, t, n), preferred_element_type=f1.dtype)
  nty, ntx = block.shape[:2]
  block = block.reshape(nty, ntx, t, t, s, s)                   # (p, q, a, e): pixel (p, q), window (a, e)
  band = _skew(jnp.transpose(block, (0, 1, 2, 4, 3, 5)), t, s, k)   # (p, a, q, j): e = q + j
  band = _skew(jnp.transpose(band, (0, 1, 4, 5, 2, 3)), t, s, k)    # (q, j, p, i): a = p + i
  band = jnp.transpose(band, (0, 1, 4, 2, 5, 3))                    # (p, q, i, j)
  return _untile(band.reshape(nty, ntx, t * t, k * k), t, h, w)


def _backward_tiled_one(f1: jax.Array, f2: jax.Array, g: jax.Array, n: int, t: int
                        ) -> tuple[jax.Array, jax.Array]:
  """One image: gradients of sum(g * unnormalised correlation) w.r.t. f1 and f2, (H, W, C) each."""
  h, w, c = f1.shape
  k, s = 2 * n + 1, t + 2 * n
  gt = _tiles(g, t)
  nty, ntx = gt.shape[:2]
  gt = gt.reshape(nty, ntx, t, t, k, k)                             # (p, q, i, j)
  gt = _unskew(jnp.transpose(gt, (0, 1, 3, 5, 2, 4)), t, s, k)      # (q, j, p, a)
  gt = _unskew(jnp.transpose(gt, (0, 1, 4, 5, 2, 3)), t, s, k)      # (p, a, q, e)
  dblock = jnp.transpose(gt, (0, 1, 2, 4, 3, 5)).reshape(nty, ntx, t * t, s * s)
  # The windows are linear in f2: their VJP (pads, slices and adds) sums the windows' gradients back onto f2.
  windows, windows_vjp = jax.vjp(lambda x: _windows(x, t, n), f2)
  d1 = jnp.einsum("yxpw,yxwc->yxpc", dblock, windows, preferred_element_type=f1.dtype)
  dwin = jnp.einsum("yxpw,yxpc->yxwc", dblock, _tiles(f1, t), preferred_element_type=f1.dtype)
  (d2,) = windows_vjp(dwin)
  return _untile(d1, t, h, w), d2


def _skew_gather_index(t: int, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Where the forward's gather reads a tile's (T*T, S*S) block, S = T + K - 1: int32 (T, T, K*K) row and
  column indices, band[p, q, i*K + j] = block[p*T + q, (p + i)*S + q + j] (pixel (p, q) of the tile and
  window position (p + i, q + j), i.e. displacement (i - n, j - n))."""
  s = t + k - 1
  p, q, i, j = np.meshgrid(np.arange(t), np.arange(t), np.arange(k), np.arange(k), indexing="ij")
  rows = (p * t + q).reshape(t, t, k * k)
  cols = ((p + i) * s + q + j).reshape(t, t, k * k)
  return rows.astype(np.int32), cols.astype(np.int32)


def _forward_tiled_gather_one(f1: jax.Array, f2: jax.Array, n: int, t: int) -> jax.Array:
  """`_forward_tiled_one` scaled by 1/C, with the band read off the blocks by one gather (XLA:CPU's path).

  The gather's output is already in image layout, (nty, T, ntx, T, K*K): the two skews, their transposes,
  the untiling, the crop and the 1/C scale become one loop that reads each kept product once (the skews
  are several strided passes over the 3.2x larger block). Same values bit for bit before the scale."""
  h, w, c = f1.shape
  k = 2 * n + 1
  block = jnp.einsum("yxpc,yxwc->yxpw", _tiles(f1, t), _windows(f2, t, n), preferred_element_type=f1.dtype)
  nty, ntx = block.shape[:2]
  rows, cols = _skew_gather_index(t, k)
  one_tile = lambda blk: blk[rows, cols]                              # (T*T, S*S) -> (T, T, K*K)
  band = jax.vmap(jax.vmap(one_tile, in_axes=0, out_axes=1))(block)  # (nty, T, ntx, T, K*K)
  return band.reshape(nty * t, ntx * t, k * k)[:h, :w] * (1.0 / c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _correlation_tiled(f1: jax.Array, f2: jax.Array, n: int, t: int, skew: str) -> jax.Array:
  return _forward_tiled(f1, f2, n, t, skew)


def _forward_tiled(f1, f2, n, t, skew):
  b, h, w, c = f1.shape
  acc = _acc_dtype(f1, f2)
  if skew == "gather":
    return lax.map(lambda xs: _forward_tiled_gather_one(xs[0], xs[1], n, t), (f1.astype(acc), f2.astype(acc)))
  out = lax.map(lambda xs: _forward_tiled_one(xs[0], xs[1], n, t), (f1.astype(acc), f2.astype(acc)))
  return out * (1.0 / c)


def _correlation_tiled_fwd(f1, f2, n, t, skew):
  return _forward_tiled(f1, f2, n, t, skew), (f1, f2)


def _correlation_tiled_bwd(n, t, skew, residuals, g):
  # Both skew modes share the backward: a gather embedding the cotangent into the blocks (with both
  # matmuls then on XLA:CPU's fast path, 2 gathers or transposed operands) measured no faster than the
  # transposed skews, session 7.
  f1, f2 = residuals
  c = f1.shape[-1]
  acc = _acc_dtype(f1, f2, g)
  if _BWD_SCALE_FEATURES:
    # The 1/C scale rides on the per-image feature tiles and windows (fused into their copies) instead of a
    # separate pass over the K*K-channel cotangent: both products are linear in the features.
    g = g.astype(acc)
    body = lambda xs: _backward_tiled_one(xs[0] * (1.0 / c), xs[1] * (1.0 / c), xs[2], n, t)
  else:
    g = g.astype(acc) * (1.0 / c)
    body = lambda xs: _backward_tiled_one(xs[0], xs[1], xs[2], n, t)
  d1, d2 = lax.map(body, (f1.astype(acc), f2.astype(acc), g))
  return d1.astype(f1.dtype), d2.astype(f2.dtype)


_correlation_tiled.defvjp(_correlation_tiled_fwd, _correlation_tiled_bwd)


# ---------------------------------------------------------------------------------------------------------------
# The C++ kernel on XLA:CPU (jaxflow/ops/csrc/correlation.cc through the XLA FFI; see correlation_ffi).


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _correlation_ffi(f1: jax.Array, f2: jax.Array, n: int) -> jax.Array:
  return correlation_ffi.forward(f1.astype(_F32), f2.astype(_F32), n)


def _correlation_ffi_fwd(f1, f2, n):
  return _correlation_ffi(f1, f2, n), (f1, f2)


def _correlation_ffi_bwd(n, residuals, g):
  f1, f2 = residuals
  d1, d2 = correlation_ffi.backward(f1.astype(_F32), f2.astype(_F32), g.astype(_F32), n)
  return d1.astype(f1.dtype), d2.astype(f2.dtype)


_correlation_ffi.defvjp(_correlation_ffi_fwd, _correlation_ffi_bwd)


def _stride1(f1: jax.Array, f2: jax.Array, n: int, skew: str) -> jax.Array:
  """Stride-1 correlation (B, H, W, K*K): the C++ kernel ('ffi', float32 accumulation only) or the tiled jnp."""
  if skew == "ffi" and _acc_dtype(f1, f2) == _F32:
    return _correlation_ffi(f1, f2, n)
  b, h, w, c = f1.shape
  return _correlation_tiled(f1, f2, n, _tile_side(h, w, c, n), "reshape" if skew == "reshape" else "gather")


def _by_phases(f1: jax.Array, f2: jax.Array, n: int, s: int, skew: str) -> jax.Array:
  """Stride-s correlation as s*s stride-1 correlations of the pixel phases; (B, H, W, K*K)."""
  b, h, w, c = f1.shape
  k = 2 * n + 1
  if s == 1:
    return _stride1(f1, f2, n, skew)
  hp, wp = -(-h // s), -(-w // s)
  # Zero rows/columns at the end make H, W multiples of s: zeros of f2 add nothing, those of f1 are cropped.
  pad = ((0, 0), (0, hp * s - h), (0, wp * s - w), (0, 0))

  # The image axis stays outermost, so a batch sharded over devices stays sharded on the phase images (under
  # a partitioned jit each device then runs its own images' phases, no all-gather).
  def phases(x):  # (B, H, W, C) -> (B*s*s, H/s, W/s, C), image b's phase (py, px) = x[b, py::s, px::s]
    x = jnp.pad(x, pad).reshape(b, hp, s, wp, s, c)
    return jnp.transpose(x, (0, 2, 4, 1, 3, 5)).reshape(b * s * s, hp, wp, c)

  out = _stride1(phases(f1), phases(f2), n, skew)
  out = jnp.transpose(out.reshape(b, s, s, hp, wp, k * k), (0, 3, 1, 4, 2, 5))
  return out.reshape(b, hp * s, wp * s, k * k)[:, :h, :w]



def _resolve(impl: str) -> str:
  """The concrete implementation of `impl` in this process: 'tiled' is `_CPU_TILED` on CPU (the C++ kernel when
  it is available, else 'tiled_gather') and 'tiled_reshape' on accelerators; 'ffi' is 'tiled_reshape' on
  accelerators and, without the kernel (no compiler, failed build, switched off: one warning), 'tiled_gather'."""
  cpu = jax.default_backend() == "cpu"
  if impl == "tiled":
    impl = _CPU_TILED if cpu else "tiled_reshape"
  if impl == "ffi" and not cpu:
    impl = "tiled_reshape"  # the kernel is registered for the CPU platform only
  if impl == "ffi" and not correlation_ffi.available():
    impl = "tiled_gather"
  return impl


def _correlation_any(f1: jax.Array, f2: jax.Array, n: int, s: int, impl: str) -> jax.Array:
  impl = _resolve(impl)
  if impl == "scan":
    return _correlation(f1, f2, n, s)
  skew = {"ffi": "ffi", "tiled_gather": "gather"}.get(impl, "reshape")
  return _by_phases(f1, f2, n, s, skew)


# Session 8: the backward's 1/C scale applied to the features inside the per-image loop (True) or to the
# cotangent before it (False, session 7); a switch for the benchmark's A/B (then jax.clear_caches()).
_BWD_SCALE_FEATURES = True

# What 'tiled' means on CPU: 'ffi' (the C++ kernel, session 9; 'tiled_gather' when the kernel is not
# available). Benchmarks set 'tiled_gather' (session 8's path) or 'tiled_reshape' (session 6's) for A/B runs,
# then call jax.clear_caches() so that traced programs pick the change up.
_CPU_TILED = "ffi"

# Jitted so eager calls compile once instead of dispatching primitive by primitive; inlined under jit.
_correlation_jit = jax.jit(_correlation_any, static_argnums=(2, 3, 4))
IMPLS = ("tiled", "ffi", "tiled_gather", "tiled_reshape", "scan")


def correlation(f1: jax.Array, f2: jax.Array, max_displacement: int, stride: int = 1, *,
                impl: str = "tiled") -> jax.Array:
  """Cost volume: mean over channels of f1(y, x) * f2(y + dy, x + dx) for a square window of displacements.

  Args:
    f1, f2: feature maps (B, H, W, C) of the same shape and any float dtype.
    max_displacement: largest |dy|, |dx| in pixels; rounded down to a multiple of `stride` (d).
    stride: step between displacements in pixels (FlowNetC's stride2 = 2; PWC-Net 1). Output positions
      are every pixel (stride1 = 1), so the spatial size is unchanged.
    impl: 'tiled' (the fast default: on CPU the C++ kernel 'ffi' when it is available, else 'tiled_gather';
      'tiled_reshape' elsewhere), 'ffi' (the C++ XLA:CPU kernel; CPU only; float64 inputs and a process
      without the kernel use 'tiled_gather'), 'tiled_gather' / 'tiled_reshape' (tile x window matmuls in jnp,
      differing only in how the forward reads the band off the blocks) or 'scan' (one pass per displacement);
      the same values up to float32 summation order (see the module docstring).

  Returns:
    float32 (B, H, W, K*K) (float64 for float64 inputs), K = 2 * (max_displacement // stride) + 1. Channel (i * K + j) holds the
    displacement dy = (i - n) * stride, dx = (j - n) * stride (dy-major, dx-minor, as in the FlowNet
    correlation layer). Where (y + dy, x + dx) falls outside the image the value is 0. Accumulation is
    float32 also for bfloat16 inputs; the gradient with respect to each input has that input's dtype.

  Works under jit, vmap, grad and shard_map; no (K*K, C, H, W)-sized intermediate is materialised in
  the forward or the backward pass (see the module docstring).
  """
  n, _ = _check_inputs(f1, f2, max_displacement, stride)
  if impl not in IMPLS:
    raise ValueError(f"correlation: impl must be one of {IMPLS}, got {impl!r}")
  return _correlation_jit(f1, f2, n, stride, _resolve(impl))


__all__ = ["IMPLS", "correlation"]
