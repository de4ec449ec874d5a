"""Flow-aware resizing and image pyramids."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) bilinear interpolation weights with the corner pixels aligned: output i reads input
  position i * (n_in - 1) / (n_out - 1) (position 0 when n_out == 1)."""
  pos = np.arange(n_out, dtype=np.float64) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
  lo = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = pos - lo
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m.astype(np.float32)


def resize_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of (..., H, W, C) to (..., H', W', C) with corner pixels aligned (PyTorch's
  `align_corners=True`): the four corner pixels map onto each other exactly. Values are not rescaled."""
  h, w = x.shape[-3], x.shape[-2]
  my = jnp.asarray(_align_corners_matrix(h, int(size[0])))
  mx = jnp.asarray(_align_corners_matrix(w, int(size[1])))
  out = jnp.einsum("Yy,...yxc,Xx->...YXc", my, x.astype(jnp.float32), mx, precision=jax.lax.Precision.HIGHEST)
  return out.astype(x.dtype)


def resize_flow(flow: jax.Array, size: tuple[int, int], method: str = "bilinear",
                align_corners: bool = False) -> jax.Array:
  """Resizes a flow field (..., H, W, 2) to (..., H', W', 2) and rescales it to the new pixel units.

  u is multiplied by W'/W and v by H'/H, so the result is the same motion expressed in pixels of the new grid.
  Sampling is bilinear with pixel centres aligned (half-pixel convention, no corner alignment): output pixel
  x' reads input position (x' + 0.5) * W / W' - 0.5, clamped to the border; no antialiasing, so a 2x
  downsampling is the mean of each 2x2 block. `method` is any jax.image.resize method ("nearest", ...).
  With `align_corners=True` (bilinear only) the corner pixels of the two grids coincide instead, as in
  PyTorch's `interpolate(..., align_corners=True)` used by released SpyNet code; the values are still scaled
  by W'/W and H'/H.
  """
  shape = getattr(flow, "shape", None)
  if shape is None or len(shape) < 3 or shape[-1] != 2:
    raise ValueError(f"resize_flow expects a flow of shape (..., H, W, 2), got {shape}")
  if not jnp.issubdtype(flow.dtype, jnp.floating):
    raise TypeError(f"resize_flow expects a floating-point flow, got dtype {flow.dtype}")
  if len(size) != 2 or any(int(x) != x or int(x) < 1 for x in size):
    raise ValueError(f"resize_flow: size must be two positive ints (H', W'), got {size!r}")
  h, w = flow.shape[-3], flow.shape[-2]
  new_h, new_w = int(size[0]), int(size[1])
  if (new_h, new_w) == (h, w):
    return flow
  out_shape = flow.shape[:-3] + (new_h, new_w, 2)
  if align_corners:
    if method != "bilinear":
      raise ValueError(f"resize_flow: align_corners=True needs method='bilinear', got {method!r}")
    resized = resize_align_corners(flow, (new_h, new_w))
  else:
    resized = jax.image.resize(flow, out_shape, method=method, antialias=False)
  scale = jnp.asarray([new_w / w, new_h / h], dtype=flow.dtype)
  return resized * scale


def image_pyramid(image: jax.Array, levels: int) -> list[jax.Array]:
  """Returns [image, image/2, image/4, ...] (fine to coarse, `levels` entries) by 2x2 average pooling.

  Input (B, H, W, C); H and W must be divisible by 2**(levels - 1).
  """
  if getattr(image, "ndim", None) != 4:
    raise ValueError(f"image_pyramid expects (B, H, W, C), got {getattr(image, 'shape', None)}")
  if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
    raise ValueError(f"image_pyramid: levels must be a positive int, got {levels!r}")
  b, h, w, c = image.shape
  factor = 2 ** (levels - 1)
  if h % factor or w % factor:
    raise ValueError(f"image_pyramid: H, W = {h}, {w} must be divisible by 2**(levels-1) = {factor}")
  out = [image]
  for _ in range(levels - 1):
    x = out[-1]
    bh, bw = x.shape[1] // 2, x.shape[2] // 2
    x = x.reshape(b, bh, 2, bw, 2, c).mean(axis=(2, 4))
    out.append(x)
  return out
