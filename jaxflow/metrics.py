"""Optical-flow evaluation metrics in jnp: jit-friendly, float32, masked by a valid mask.

Two forms:

* per-pixel maps: :func:`endpoint_error`, :func:`outlier_map`, :func:`fl_outlier_map`, and the per-image
  mean :func:`per_image_epe`;
* summed form for dataset-level evaluation: :func:`flow_metric_sums` turns one batch into a dict of sums
  and counts; add the dicts over batches and devices (:func:`accumulate_sums` does it on the host in
  float64 / int64), then :func:`finalize` divides. The result is the mean over *all valid pixels of the
  dataset*, which is how the Sintel and KITTI benchmarks define their numbers (KITTI's official Fl-all is
  the fraction of outliers among all valid pixels of all images, not a mean of per-image rates).

Definitions (pred, gt: (..., H, W, 2) flow in pixels):

* EPE = ||pred - gt||_2 per pixel.
* n-px outlier: EPE > n, for n = 1, 3, 5.
* KITTI Fl: EPE > 3 px and EPE > 5 % of ||gt|| (devkit: ``err > 3 && err / mag > 0.05``).
* Sintel speed bands: mean EPE over pixels whose true speed ||gt|| lies in [0, 10), [10, 40), [40, inf).
* occluded / non-occluded (Sintel "unmatched" / "matched"): mean EPE over valid pixels with
  occlusion > 0.5 / <= 0.5.

The array functions are jitted (one compilation per input shape), so eager calls are cheap too.
Masks are float (..., H, W); a pixel counts when valid > 0.5. Pixels whose ground truth is unknown
(non-finite or |component| > 1e9, the Middlebury convention) are excluded as well. Rates are fractions
in [0, 1] (multiply by 100 for the percentages benchmarks print). A band or split without pixels
finalizes to NaN.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

UNKNOWN_FLOW_THRESH = 1e9
OUTLIER_THRESHOLDS = (1, 3, 5)
# KITTI Fl outlier thresholds: absolute (pixels) and relative (fraction of the true flow magnitude).
FL_ABS_THRESH = 3.0
FL_REL_THRESH = 0.05
# Sintel speed bands: (name, lower bound inclusive, upper bound exclusive), pixels.
SPEED_BANDS = (("s0_10", 0.0, 10.0), ("s10_40", 10.0, 40.0), ("s40plus", 40.0, math.inf))


def _check_shapes(pred, gt, valid=None, occlusion=None, where: str = "metrics"):
  pred = jnp.asarray(pred, jnp.float32)
  gt = jnp.asarray(gt, jnp.float32)
  if pred.shape != gt.shape or pred.ndim < 3 or pred.shape[-1] != 2:
    raise ValueError(f"{where}: pred {pred.shape} and gt {gt.shape} must have the same shape (..., H, W, 2)")
  for name, mask in (("valid", valid), ("occlusion", occlusion)):
    if mask is not None and tuple(jnp.shape(mask)) != gt.shape[:-1]:
      raise ValueError(f"{where}: {name} has shape {tuple(jnp.shape(mask))}, expected {gt.shape[:-1]} "
                       f"(the flow shape without its last axis)")
  return pred, gt


@jax.jit
def endpoint_error(pred, gt) -> jax.Array:
  """Per-pixel end-point error ||pred - gt||_2: float32 (..., H, W) from two (..., H, W, 2) flows (pixels)."""
  pred, gt = _check_shapes(pred, gt, where="endpoint_error")
  return jnp.sqrt(jnp.sum(jnp.square(pred - gt), axis=-1))


@jax.jit
def outlier_map(pred, gt, threshold: float) -> jax.Array:
  """float32 (..., H, W): 1 where the EPE exceeds ``threshold`` pixels."""
  return (endpoint_error(pred, gt) > threshold).astype(jnp.float32)


@jax.jit
def fl_outlier_map(pred, gt, abs_thresh: float = FL_ABS_THRESH, rel_thresh: float = FL_REL_THRESH) -> jax.Array:
  """KITTI Fl outliers, float32 (..., H, W): 1 where EPE > abs_thresh px and EPE > rel_thresh * ||gt||."""
  pred, gt = _check_shapes(pred, gt, where="fl_outlier_map")
  epe = jnp.sqrt(jnp.sum(jnp.square(pred - gt), axis=-1))
  mag = jnp.sqrt(jnp.sum(jnp.square(gt), axis=-1))
  return ((epe > abs_thresh) & (epe > rel_thresh * mag)).astype(jnp.float32)


def valid_mask(gt: jax.Array, valid) -> jax.Array:
  """bool (..., H, W): the evaluated pixels, valid > 0.5 (when given) and ground truth known (finite, below the
  unknown-flow threshold)."""
  known = jnp.all(jnp.isfinite(gt) & (jnp.abs(gt) <= UNKNOWN_FLOW_THRESH), axis=-1)
  if valid is None:
    return known
  return known & (jnp.asarray(valid) > 0.5)


@jax.jit
def per_image_epe(pred, gt, valid=None) -> jax.Array:
  """Mean EPE of each image over its valid pixels: float32 (B,) from (B, H, W, 2) flows and (B, H, W) mask.

  An image without valid pixels gives NaN.
  """
  pred, gt = _check_shapes(pred, gt, valid, where="per_image_epe")
  if pred.ndim != 4:
    raise ValueError(f"per_image_epe: expected batched flows (B, H, W, 2), got {pred.shape}")
  mask = valid_mask(gt, valid)
  epe = jnp.sqrt(jnp.sum(jnp.square(pred - gt), axis=-1))
  total = jnp.sum(jnp.where(mask, epe, 0.0), axis=(1, 2))
  count = jnp.sum(mask, axis=(1, 2))
  return jnp.where(count > 0, total / jnp.maximum(count, 1).astype(jnp.float32), jnp.nan)


@jax.jit
def flow_metric_sums(pred, gt, valid=None, occlusion=None) -> dict[str, jax.Array]:
  """Sums and counts of every metric over one batch (jit-friendly).

  Args:
    pred: (B, H, W, 2) predicted flow, pixels (any float dtype; computed in float32).
    gt: (B, H, W, 2) ground-truth flow, pixels.
    valid: optional (B, H, W) mask, > 0.5 = evaluated. Default: every pixel with known ground truth.
    occlusion: optional (B, H, W) mask, > 0.5 = occluded; adds the occluded / non-occluded split.
  Returns:
    dict with float32 EPE sums and int32 counts (outlier sums are counts too):
      ``count``, ``epe_sum``, ``outlier_1px_sum``, ``outlier_3px_sum``, ``outlier_5px_sum``,
      ``fl_all_sum``, for each speed band b in (s0_10, s10_40, s40plus): ``{b}_epe_sum``, ``{b}_count``;
      with occlusion also ``occ_epe_sum``, ``occ_count``, ``noc_epe_sum``, ``noc_count``.
    Sum these dicts elementwise over batches / devices, then call :func:`finalize`. int32 counts are
    exact up to 2^31 pixels per batch; accumulate across batches with :func:`accumulate_sums`.
  """
  pred, gt = _check_shapes(pred, gt, valid, occlusion, where="flow_metric_sums")
  mask = valid_mask(gt, valid)
  safe_gt = jnp.where(mask[..., None], gt, 0.0)
  epe = jnp.sqrt(jnp.sum(jnp.square(pred - safe_gt), axis=-1))
  speed = jnp.sqrt(jnp.sum(jnp.square(safe_gt), axis=-1))
  # Build every masked quantity first, then reduce them in two stacked sums (float EPE sums, int32
  # counts): one reduction each keeps the compiled program small.
  epe_masks = {"epe_sum": mask}
  count_masks = {"count": mask}
  for n in OUTLIER_THRESHOLDS:
    count_masks[f"outlier_{n}px_sum"] = mask & (epe > n)
  count_masks["fl_all_sum"] = mask & (epe > FL_ABS_THRESH) & (epe > FL_REL_THRESH * speed)
  for name, lo, hi in SPEED_BANDS:
    band = mask & (speed >= lo) & (speed < hi)
    epe_masks[f"{name}_epe_sum"] = band
    count_masks[f"{name}_count"] = band
  if occlusion is not None:
    occ = jnp.asarray(occlusion) > 0.5
    for prefix, m in (("occ", mask & occ), ("noc", mask & ~occ)):
      epe_masks[f"{prefix}_epe_sum"] = m
      count_masks[f"{prefix}_count"] = m
  epe_sums = jnp.sum(jnp.where(jnp.stack(list(epe_masks.values())), epe[None], 0.0),
                     axis=tuple(range(1, epe.ndim + 1)), dtype=jnp.float32)
  counts = jnp.sum(jnp.stack(list(count_masks.values())), axis=tuple(range(1, epe.ndim + 1)), dtype=jnp.int32)
  out = {k: epe_sums[i] for i, k in enumerate(epe_masks)}
  out.update({k: counts[i] for i, k in enumerate(count_masks)})
  return out


def accumulate_sums(total: Optional[Mapping[str, np.ndarray]], batch_sums: Mapping) -> dict[str, np.ndarray]:
  """Adds one batch's sums to a running host-side total (float64 sums, int64 counts); total may be None.

  Raises:
    ValueError: the two dicts have different keys (e.g. occlusion given for some batches only).
  """
  batch = {k: np.asarray(jax.device_get(v)) for k, v in batch_sums.items()}
  batch = {k: v.astype(np.int64 if np.issubdtype(v.dtype, np.integer) else np.float64) for k, v in batch.items()}
  if total is None:
    return batch
  if set(total) != set(batch):
    raise ValueError(f"accumulate_sums: keys differ: {sorted(set(total) ^ set(batch))} present in only one dict")
  return {k: total[k] + batch[k] for k in total}


_MEANS = (
    ("epe", "epe_sum", "count"),
    ("outlier_1px", "outlier_1px_sum", "count"),
    ("outlier_3px", "outlier_3px_sum", "count"),
    ("outlier_5px", "outlier_5px_sum", "count"),
    ("fl_all", "fl_all_sum", "count"),
) + tuple((name, f"{name}_epe_sum", f"{name}_count") for name, _, _ in SPEED_BANDS) + (
    ("epe_occ", "occ_epe_sum", "occ_count"),
    ("epe_noc", "noc_epe_sum", "noc_count"),
)


def finalize(sums: Mapping) -> dict:
  """Turns (summed) outputs of :func:`flow_metric_sums` into means.

  Returns:
    ``epe`` (px), ``outlier_1px``, ``outlier_3px``, ``outlier_5px``, ``fl_all`` (fractions), ``s0_10``,
    ``s10_40``, ``s40plus`` (mean EPE per speed band, px), and with occlusion sums ``epe_occ``,
    ``epe_noc``; plus ``num_pixels``. NaN where the count is zero. Python floats (and an int
    ``num_pixels``) for concrete inputs, numpy or jax; float32 jax scalars when traced under jit.
  """
  if "count" not in sums or "epe_sum" not in sums:
    raise ValueError(f"finalize: expected the dict of flow_metric_sums, got keys {sorted(sums)}")
  # Under jit (tracers) stay in jnp; concrete values (numpy or jax arrays) give Python numbers.
  on_device = any(isinstance(v, jax.core.Tracer) for v in sums.values())
  if not on_device:
    sums = {k: np.asarray(jax.device_get(v)) for k, v in sums.items()}
    shaped = {k: v.shape for k, v in sums.items() if v.shape != ()}
    if shaped:
      raise ValueError(f"finalize: expected scalar sums (add them over batches / devices first), got shapes {shaped}")
  out = {}
  for name, num, den in _MEANS:
    if num not in sums:
      continue
    if den not in sums:
      raise ValueError(f"finalize: {num!r} present without its count {den!r}")
    if on_device:
      c = jnp.asarray(sums[den]).astype(jnp.float32)
      out[name] = jnp.where(c > 0, jnp.asarray(sums[num], jnp.float32) / jnp.maximum(c, 1.0), jnp.nan)
    else:
      c = float(np.asarray(sums[den]))
      out[name] = float(np.asarray(sums[num], np.float64)) / c if c > 0 else math.nan
  out["num_pixels"] = sums["count"] if on_device else int(np.asarray(sums["count"]))
  return out


def flow_metrics(pred, gt, valid=None, occlusion=None) -> dict:
  """Convenience: ``finalize(flow_metric_sums(...))`` for one batch (pixel-weighted means over the batch)."""
  return finalize(flow_metric_sums(pred, gt, valid, occlusion))
