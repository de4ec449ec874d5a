"""Flow-aware resizing and image pyramids."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def resize_flow(flow: jax.Array, size: tuple[int, int], method: str = "bilinear") -> jax.Array:
  """Resizes a flow field (..., H, W, 2) to (..., H', W', 2) and rescales it to the new pixel units.

  u is multiplied by W'/W and v by H'/H, so the result is the same motion expressed in pixels of the new grid.
  Sampling is bilinear with pixel centres aligned (half-pixel convention, no corner alignment).
  """
  if flow.ndim < 3 or flow.shape[-1] != 2:
    raise ValueError(f"resize_flow expects a flow of shape (..., H, W, 2), got {flow.shape}")
  h, w = flow.shape[-3], flow.shape[-2]
  new_h, new_w = int(size[0]), int(size[1])
  if (new_h, new_w) == (h, w):
    return flow
  out_shape = flow.shape[:-3] + (new_h, new_w, 2)
  resized = jax.image.resize(flow, out_shape, method=method, antialias=False)
  scale = jnp.asarray([new_w / w, new_h / h], dtype=flow.dtype)
  return resized * scale


def image_pyramid(image: jax.Array, levels: int) -> list[jax.Array]:
  """Returns [image, image/2, image/4, ...] (fine to coarse, `levels` entries) by 2x2 average pooling.

  Input (B, H, W, C); H and W must be divisible by 2**(levels - 1).
  """
  if image.ndim != 4:
    raise ValueError(f"image_pyramid expects (B, H, W, C), got {image.shape}")
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
