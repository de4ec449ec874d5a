"""Flow visualisation in numpy: the Middlebury colour code, its key image, arrow plots and error maps.

All functions take numpy arrays (or anything ``np.asarray`` accepts, such as jax arrays) and return
uint8 RGB images; no matplotlib.

The Middlebury colour code (Baker et al., IJCV 2011, and its ``colorcode.cpp``): a 55-colour wheel
made of six linear ramps (red-yellow 15, yellow-green 6, green-cyan 4, cyan-blue 11, blue-magenta 13,
magenta-red 6 entries, each 255 * i / n with integer division); the flow direction picks a position
on the wheel through atan2(-v, -u) / pi, interpolated linearly between the two nearest entries; the
flow magnitude, divided by the normalising radius, fades the colour to white at zero inside the unit
circle, and beyond it the colour is darkened to 75 %; unknown flow is black. Channels are truncated
to integers like the reference's ``(int)(255 * col)``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

UNKNOWN_FLOW_THRESH = 1e9

# Segment lengths of the Middlebury colour wheel.
_RY, _YG, _GC, _CB, _BM, _MR = 15, 6, 4, 11, 13, 6


def make_colorwheel() -> np.ndarray:
  """The 55 x 3 Middlebury colour wheel, integer RGB values in [0, 255] (float64 for interpolation)."""
  ramps = []

  def ramp(n: int) -> np.ndarray:
    return (255 * np.arange(n)) // n

  def seg(r, g, b):
    ramps.append(np.stack([np.broadcast_to(c, (len(ramp_),)) for c in (r, g, b)], axis=-1))

  ramp_ = ramp(_RY)
  seg(255, ramp_, 0)
  ramp_ = ramp(_YG)
  seg(255 - ramp_, 255, 0)
  ramp_ = ramp(_GC)
  seg(0, 255, ramp_)
  ramp_ = ramp(_CB)
  seg(0, 255 - ramp_, 255)
  ramp_ = ramp(_BM)
  seg(ramp_, 0, 255)
  ramp_ = ramp(_MR)
  seg(255, 0, 255 - ramp_)
  return np.concatenate(ramps, axis=0).astype(np.float64)


_COLORWHEEL = make_colorwheel()


def _check_flow(flow, name: str = "flow") -> np.ndarray:
  flow = np.asarray(flow)
  if flow.ndim != 3 or flow.shape[-1] != 2:
    raise ValueError(f"{name}: expected shape (H, W, 2), got {flow.shape}")
  return flow


def known_flow_mask(flow) -> np.ndarray:
  """bool (H, W): both components finite and |.| <= 1e9 (the Middlebury unknown-flow convention)."""
  flow = np.asarray(flow)
  with np.errstate(invalid="ignore"):
    return np.all(np.isfinite(flow) & (np.abs(flow) <= UNKNOWN_FLOW_THRESH), axis=-1)


def max_flow_radius(flow) -> float:
  """Largest magnitude (pixels) of the known flow vectors of a (H, W, 2) flow; 0 if none is known."""
  flow = _check_flow(flow).astype(np.float64)
  known = known_flow_mask(flow)
  if not np.any(known):
    return 0.0
  return float(np.sqrt(np.max(np.sum(flow[known] ** 2, axis=-1))))


def _normalised_to_color(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Colour of flow already divided by the normalising radius: (...,) u, v -> uint8 (..., 3)."""
  ncols = _COLORWHEEL.shape[0]
  rad = np.sqrt(u * u + v * v)
  angle = np.arctan2(-v, -u) / np.pi
  fk = (angle + 1.0) / 2.0 * (ncols - 1)
  k0 = np.floor(fk).astype(np.int64)
  k1 = (k0 + 1) % ncols
  f = (fk - k0)[..., None]
  col0 = _COLORWHEEL[k0 % ncols] / 255.0
  col1 = _COLORWHEEL[k1] / 255.0
  col = (1.0 - f) * col0 + f * col1
  inside = (rad <= 1.0)[..., None]
  col = np.where(inside, 1.0 - rad[..., None] * (1.0 - col), col * 0.75)
  return np.floor(255.0 * col).astype(np.uint8)


def flow_to_color(flow, max_radius: Optional[float] = None) -> np.ndarray:
  """Middlebury colour coding of a flow field.

  Args:
    flow: (H, W, 2) flow in pixels (u right, v down). Unknown flow (|u| or |v| > 1e9, or non-finite)
      is drawn black.
    max_radius: the flow magnitude (pixels) that maps to the unit circle (full saturation). By default
      the largest known radius of this flow (if that is 0, the flow is all white / black).
  Returns:
    uint8 (H, W, 3) RGB image.
  """
  flow = _check_flow(flow).astype(np.float64)
  if max_radius is not None and not (np.isfinite(max_radius) and max_radius > 0):
    raise ValueError(f"flow_to_color: max_radius must be positive and finite, got {max_radius}")
  known = known_flow_mask(flow)
  radius = max_flow_radius(flow) if max_radius is None else float(max_radius)
  safe = np.where(known[..., None], flow, 0.0)
  if radius > 0:
    safe = safe / radius
  image = _normalised_to_color(safe[..., 0], safe[..., 1])
  image[~known] = 0
  return image


def color_wheel(size: int = 151, max_radius_fraction: float = 1.0 / 1.04, axes: bool = False) -> np.ndarray:
  """Key image for the colour code: uint8 (size, size, 3).

  Pixel (x, y) shows the flow (x - c, y - c) with c = size // 2, normalised so that the unit circle
  (full saturation) has a radius of ``max_radius_fraction * c`` pixels; the default leaves a margin
  past the unit circle where the darkening shows, as Middlebury's ``colortest`` key does.

  Args:
    size: image side in pixels.
    max_radius_fraction: radius of the unit circle as a fraction of the half-size.
    axes: draw the u = 0 and v = 0 axes in black (as ``colortest`` does).
  """
  if size < 1:
    raise ValueError(f"color_wheel: size must be >= 1, got {size}")
  c = size // 2
  coords = np.arange(size, dtype=np.float64) - c
  u, v = np.meshgrid(coords, coords)
  scale = max(c, 1) * max_radius_fraction
  image = _normalised_to_color(u / scale, v / scale)
  if axes:
    image[c, :] = 0
    image[:, c] = 0
  return image


def _draw_segment(image: np.ndarray, x0, y0, x1, y1, color, thickness: int = 1) -> None:
  """Rasterises line segments (arrays of endpoints, float pixel coordinates) into image in place."""
  x0, y0, x1, y1 = (np.asarray(a, np.float64).ravel() for a in (x0, y0, x1, y1))
  color = np.asarray(color)
  if color.ndim == 1:
    color = np.broadcast_to(color, (x0.size, 3))
  height, width = image.shape[:2]
  length = np.hypot(x1 - x0, y1 - y0)
  steps = np.ceil(length * 2).astype(np.int64) + 1
  seg_idx = np.repeat(np.arange(x0.size), steps)
  # t in [0, 1] along each segment.
  starts = np.cumsum(steps) - steps
  t = (np.arange(seg_idx.size) - starts[seg_idx]) / np.maximum(steps[seg_idx] - 1, 1)
  xs = x0[seg_idx] + t * (x1 - x0)[seg_idx]
  ys = y0[seg_idx] + t * (y1 - y0)[seg_idx]
  half = (thickness - 1) // 2
  for dy in range(-half, thickness - half):
    for dx in range(-half, thickness - half):
      xi = np.round(xs).astype(np.int64) + dx
      yi = np.round(ys).astype(np.int64) + dy
      inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
      image[yi[inside], xi[inside]] = color[seg_idx[inside]]


def flow_to_arrows(flow, image=None, step: int = 16, scale: Optional[float] = None,
                   color: Optional[tuple[int, int, int]] = None, thickness: int = 1,
                   head_fraction: float = 0.3) -> np.ndarray:
  """Arrow (quiver) plot of a flow, rendered with numpy into an RGB image.

  One arrow per ``step`` x ``step`` cell, from the cell centre (x, y) to (x + s u, y + s v).

  Args:
    flow: (H, W, 2) flow in pixels. Unknown flow gets no arrow.
    image: optional background, (H, W, 3) or (H, W) float in [0, 1] or uint8; default a white canvas.
    step: grid spacing in pixels.
    scale: arrow length per pixel of flow; default makes the longest sampled arrow ``step`` pixels long
      (1 if all sampled flow is zero).
    color: RGB arrow colour; default each arrow takes its Middlebury colour (darkened to 75 % so it
      shows on white).
    thickness: line thickness in pixels.
    head_fraction: arrow-head length as a fraction of the arrow length (heads are 30 degrees wide).
  Returns:
    uint8 (H, W, 3) image.
  """
  flow = _check_flow(flow).astype(np.float64)
  height, width = flow.shape[:2]
  if step < 1:
    raise ValueError(f"flow_to_arrows: step must be >= 1, got {step}")
  if image is None:
    canvas = np.full((height, width, 3), 255, np.uint8)
  else:
    canvas = np.asarray(image)
    if canvas.ndim == 2:
      canvas = np.repeat(canvas[..., None], 3, axis=-1)
    if canvas.shape != (height, width, 3):
      raise ValueError(f"flow_to_arrows: image has shape {np.asarray(image).shape}, expected ({height}, {width}, 3) "
                       f"or ({height}, {width}) to match the flow")
    if np.issubdtype(canvas.dtype, np.floating):
      canvas = np.round(np.clip(canvas, 0, 1) * 255).astype(np.uint8)
    elif canvas.dtype == np.uint8:
      canvas = canvas.copy()
    else:
      raise ValueError(f"flow_to_arrows: image must be float in [0, 1] or uint8, got dtype {canvas.dtype}")
  ys = np.arange(step // 2, height, step)
  xs = np.arange(step // 2, width, step)
  gx, gy = np.meshgrid(xs, ys)
  vec = flow[gy, gx]
  known = known_flow_mask(vec)
  gx, gy, vec = gx[known], gy[known], vec[known]
  if vec.size == 0:
    return canvas
  if scale is None:
    longest = np.max(np.hypot(vec[:, 0], vec[:, 1]))
    scale = step / longest if longest > 0 else 1.0
  du, dv = vec[:, 0] * scale, vec[:, 1] * scale
  tip_x, tip_y = gx + du, gy + dv
  if color is None:
    radius = max_flow_radius(flow)
    cols = flow_to_color(vec[None], max_radius=radius if radius > 0 else 1.0)[0].astype(np.float64) * 0.75
    cols = cols.astype(np.uint8)
  else:
    cols = np.asarray(color, np.uint8)
  _draw_segment(canvas, gx, gy, tip_x, tip_y, cols, thickness)
  length = np.hypot(du, dv)
  head = head_fraction * length
  angle = np.arctan2(dv, du)
  for side in (-1.0, 1.0):
    back = angle + np.pi - side * np.pi / 6
    _draw_segment(canvas, tip_x, tip_y, tip_x + head * np.cos(back), tip_y + head * np.sin(back), cols, thickness)
  return canvas


# KITTI devkit error colours: normalised error bins [lo, hi) -> RGB (blue = small, red = large).
_ERROR_BINS = np.array([
    [0.0, 0.0625, 49, 54, 149],
    [0.0625, 0.125, 69, 117, 180],
    [0.125, 0.25, 116, 173, 209],
    [0.25, 0.5, 171, 217, 233],
    [0.5, 1.0, 224, 243, 248],
    [1.0, 2.0, 254, 224, 144],
    [2.0, 4.0, 253, 174, 97],
    [4.0, 8.0, 244, 109, 67],
    [8.0, 16.0, 215, 48, 39],
    [16.0, np.inf, 165, 0, 38],
])


def error_map(flow, gt, valid=None) -> np.ndarray:
  """Colour-coded end-point-error image in the style of the KITTI devkit.

  The error of each pixel is normalised by the Fl outlier threshold, n = min(EPE / 3, EPE / (0.05 |gt|)),
  so n >= 1 exactly where the pixel is a KITTI Fl outlier; n is binned on a log2 scale from blue
  (n < 1/16) through white (n just below 1) to dark red (n >= 16). Invalid pixels are black.

  Args:
    flow: (H, W, 2) predicted flow, pixels.
    gt: (H, W, 2) ground truth, pixels.
    valid: optional (H, W) mask (> 0.5 = valid); default: pixels with known ground truth.
  Returns:
    uint8 (H, W, 3).
  """
  flow = _check_flow(flow, "error_map flow").astype(np.float64)
  gt = _check_flow(gt, "error_map gt").astype(np.float64)
  if flow.shape != gt.shape:
    raise ValueError(f"error_map: flow shape {flow.shape} != gt shape {gt.shape}")
  mask = known_flow_mask(gt) & known_flow_mask(flow)
  if valid is not None:
    valid = np.asarray(valid)
    if valid.shape != gt.shape[:2]:
      raise ValueError(f"error_map: valid has shape {valid.shape}, expected {gt.shape[:2]}")
    mask &= valid > 0.5
  diff = np.where(mask[..., None], flow - gt, 0.0)
  epe = np.hypot(diff[..., 0], diff[..., 1])
  mag = np.hypot(*np.moveaxis(np.where(mask[..., None], gt, 0.0), -1, 0))
  with np.errstate(divide="ignore", invalid="ignore"):
    rel = np.where(mag > 0, epe / (0.05 * mag), np.where(epe > 0, np.inf, 0.0))
  n = np.minimum(epe / 3.0, rel)
  idx = np.searchsorted(_ERROR_BINS[:, 1], n, side="right")
  idx = np.minimum(idx, len(_ERROR_BINS) - 1)
  image = _ERROR_BINS[idx, 2:].astype(np.uint8)
  image[~mask] = 0
  return image
