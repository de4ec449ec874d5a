"""Training losses over a model's multiscale predictions: FlowNet's multiscale EPE and the robust fine-tuning loss.

Every model returns `flows`, its predictions coarse to fine, each at its own level's spatial size (h_l, w_l) but
with values in pixels of the input resolution. The ground truth (B, H, W, 2) is brought to each level by
downsampling in space only (values are not rescaled, as in FlowNet/PWC-Net), masked by `valid`:

  - integer factor (H / h_l and W / w_l integers): masked average pooling over each f_y x f_x block of valid
    pixels; a level pixel is valid if any of its source pixels is;
  - otherwise: masked anti-aliased bilinear resizing, sum(w * valid * flow) / sum(w * valid) with the
    resampling weights w, valid where that denominator is positive (the same rule with fractional blocks).

Per-pixel errors are computed in flow / div_flow units (FlowNet trains on flow / 20):
  - kind 'multiscale_epe': the end-point error ||pred - gt||_2;
  - kind 'robust': (||pred - gt||_1 + eps)^q, the PWC-Net fine-tuning loss (q = 0.4, eps = 0.01; the paper
    writes the L1 norm of the flow difference).
and reduced per level over valid pixels by
  - 'mean': sum over the batch of valid errors / number of valid pixels (FlowNet's mean EPE per level);
  - 'sum': per-image sum over valid pixels, averaged over the batch (the PWC-Net paper's training losses).
The total is sum_l weights[l] * level_loss[l], weights coarse to fine (FlowNet: 0.32, 0.08, 0.02, 0.01, 0.005
for flow6 ... flow2, from the released Caffe prototxt). Weight decay belongs in the optimizer, not here.

All arithmetic is float32, whatever the compute dtype of the flows.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

KINDS = ("multiscale_epe", "robust")
REDUCTIONS = ("mean", "sum")
FLOWNET_WEIGHTS = (0.32, 0.08, 0.02, 0.01, 0.005)


def default_config() -> ml_collections.ConfigDict:
  """The FlowNet multiscale EPE loss with its released weights; set kind='robust' for PWC-Net fine-tuning.

  Fields: kind ('multiscale_epe' | 'robust'), weights (one per entry of the model's `flows`, coarse to fine),
  div_flow (errors are measured on flow / div_flow), reduction ('mean' | 'sum'; the PWC-Net paper uses
  'sum' for both of its losses), q and eps (robust loss exponent and offset).
  """
  config = ml_collections.ConfigDict()
  config.kind = "multiscale_epe"
  config.weights = FLOWNET_WEIGHTS
  config.div_flow = 20.0
  config.reduction = "mean"
  config.q = 0.4
  config.eps = 0.01
  return config


def _check_flow(name: str, flow: Any, batch_shape: tuple[int, ...] | None = None) -> None:
  shape = getattr(flow, "shape", None)
  if shape is None or len(shape) != 4 or shape[-1] != 2:
    raise ValueError(f"{name} must be a (B, H, W, 2) flow, got shape {shape}")
  if batch_shape is not None and shape[0] != batch_shape[0]:
    raise ValueError(f"{name} has batch size {shape[0]} but the ground truth flow has shape {batch_shape}")


def downsample_flow(flow: jax.Array, valid: jax.Array, size: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """Brings a ground-truth flow and its mask to `size` in space only (values keep their pixel units).

  Args:
    flow: (B, H, W, 2) flow in pixels (any float dtype; computed in float32).
    valid: (B, H, W) mask, nonzero where the flow is known.
    size: (h, w) target spatial size.
  Returns:
    (B, h, w, 2) float32 flow (zero where invalid) and (B, h, w) float32 {0, 1} mask. See the module
    docstring for the integer (masked block average) and fractional (masked anti-aliased resize) rules.
  """
  _check_flow("ground truth flow", flow)
  b, big_h, big_w, _ = flow.shape
  if tuple(valid.shape) != (b, big_h, big_w):
    raise ValueError(f"valid must have shape {(b, big_h, big_w)} to match the flow {flow.shape}, got {valid.shape}")
  h, w = int(size[0]), int(size[1])
  flow = flow.astype(jnp.float32)
  valid = (valid > 0).astype(jnp.float32)
  if (h, w) == (big_h, big_w):
    return flow * valid[..., None], valid
  if big_h % h == 0 and big_w % w == 0:
    fy, fx = big_h // h, big_w // w
    # The masked flow and the mask summed by one reduction (one kernel to compile instead of two).
    sums = jnp.concatenate([flow * valid[..., None], valid[..., None]], -1).reshape(b, h, fy, w, fx, 3).sum((2, 4))
    weighted, count = sums[..., :2], sums[..., 2]
  else:
    weighted = jax.image.resize(flow * valid[..., None], (b, h, w, 2), method="linear", antialias=True)
    count = jax.image.resize(valid, (b, h, w), method="linear", antialias=True)
    # Resampling weights sum to one, so a level pixel far from any valid source has count ~ 0 up to rounding.
    count = jnp.where(count > 1e-6, count, 0.0)
  level_valid = (count > 0).astype(jnp.float32)
  level_flow = weighted / jnp.where(count > 0, count, 1.0)[..., None]
  return level_flow, level_valid


def endpoint_error(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Per-pixel end-point error ||pred - target||_2 over the last axis (u, v): (..., H, W, 2) -> (..., H, W)."""
  diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
  # sqrt has an infinite derivative at 0: differentiate through a safe square root so that a perfect
  # prediction gives a zero (not NaN) gradient.
  sq = jnp.sum(diff * diff, axis=-1)
  safe = jnp.where(sq > 0, sq, 1.0)
  return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def robust_penalty(pred: jax.Array, target: jax.Array, q: float = 0.4, eps: float = 0.01) -> jax.Array:
  """PWC-Net fine-tuning penalty (||pred - target||_1 + eps)^q per pixel: (..., H, W, 2) -> (..., H, W)."""
  diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
  return (jnp.sum(jnp.abs(diff), axis=-1) + jnp.float32(eps)) ** jnp.float32(q)


# Whether multiscale_loss sums each level's masked EPE by `masked_epe_sum` (its own VJP) instead of autodiff of
# endpoint_error and reduce_error: FlowNetS's loss and its gradient (5 levels) compiled to 29 kernels instead of 45
# (the difference, its squared norm, the square root and the sum were kernels of their own). Tests set False.
_FUSED_EPE = True


@jax.custom_vjp
def masked_epe_sum(pred: jax.Array, target: jax.Array, valid: jax.Array) -> jax.Array:
  """sum over pixels of valid * ||pred - target||_2: pred, target (B, H, W, 2) float32, valid (B, H, W) float32
  {0, 1}; float32 scalar. The same value as jnp.sum(endpoint_error(pred, target) * valid), with the same gradient
  (d / ||d|| where d = pred - target is nonzero, 0 where it is zero), written so that XLA computes the forward
  and the backward pass in one kernel each: the two channels' squares are added elementwise, not reduced."""
  d = pred - target
  sq = d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1]
  return jnp.sum(jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0) * valid)


def _masked_epe_sum_fwd(pred, target, valid):
  return masked_epe_sum(pred, target, valid), (pred, target, valid)


def _masked_epe_sum_bwd(res, g):
  pred, target, valid = res
  d = pred - target
  sq = d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1]
  # 1 / ||d|| by rsqrt: no subexpression shared with the forward pass's square root, which XLA would otherwise
  # keep as a stored (B, H, W) array and compute in kernels of its own.
  dpred = d * jnp.where(sq > 0, g * valid * lax.rsqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)[..., None]
  return dpred, -dpred, jnp.zeros_like(valid)


masked_epe_sum.defvjp(_masked_epe_sum_fwd, _masked_epe_sum_bwd)


def reduce_error(error: jax.Array, valid: jax.Array, reduction: str) -> jax.Array:
  """Reduces a (B, H, W) error map over the pixels where `valid` (B, H, W) is nonzero to a float32 scalar.

  'mean': sum of valid errors / number of valid pixels (0 if there are none); 'sum': per-image sum of valid
  errors averaged over the batch.
  """
  error, valid = error.astype(jnp.float32), (valid > 0).astype(jnp.float32)
  total = jnp.sum(error * valid)
  if reduction == "mean":
    return total / jnp.maximum(jnp.sum(valid), 1.0)
  if reduction == "sum":
    return total / error.shape[0]
  raise ValueError(f"loss.reduction must be one of {REDUCTIONS}, got {reduction!r}")


def multiscale_loss(flows: Sequence[jax.Array], flow: jax.Array, valid: jax.Array, weights: Sequence[float], *,
                    kind: str = "multiscale_epe", div_flow: float = 20.0, reduction: str = "mean",
                    q: float = 0.4, eps: float = 0.01) -> tuple[jax.Array, list[jax.Array]]:
  """Weighted sum over levels of the per-level loss (see the module docstring).

  Args:
    flows: predictions coarse to fine, each (B, h_l, w_l, 2) in pixels of the input resolution.
    flow: (B, H, W, 2) ground truth in pixels; valid: (B, H, W) mask.
    weights: one weight per level, coarse to fine.
  Returns:
    (total float32 scalar, list of unweighted per-level float32 scalars, coarse to fine).
  """
  if kind not in KINDS:
    raise ValueError(f"loss.kind must be one of {KINDS}, got {kind!r}")
  if reduction not in REDUCTIONS:
    raise ValueError(f"loss.reduction must be one of {REDUCTIONS}, got {reduction!r}")
  flows = list(flows)
  weights = [float(w) for w in weights]
  if not flows:
    raise ValueError("outputs['flows'] is empty: the loss needs at least one prediction")
  if len(weights) != len(flows):
    raise ValueError(f"loss.weights has {len(weights)} entries but the model returned {len(flows)} flows "
                     f"(coarse to fine); give one weight per level")
  _check_flow("batch['flow']", flow)
  scale = jnp.float32(1.0 / div_flow)
  total = jnp.zeros((), jnp.float32)
  per_level = []
  for index, (pred, weight) in enumerate(zip(flows, weights)):
    _check_flow(f"outputs['flows'][{index}]", pred, tuple(flow.shape))
    target, level_valid = downsample_flow(flow, valid, pred.shape[1:3])
    pred = pred.astype(jnp.float32) * scale
    target = target * scale
    if kind == "multiscale_epe" and _FUSED_EPE:
      total_error = masked_epe_sum(pred, target, level_valid)
      level_loss = total_error / (jnp.maximum(jnp.sum(level_valid), 1.0) if reduction == "mean" else pred.shape[0])
    else:
      error = endpoint_error(pred, target) if kind == "multiscale_epe" else robust_penalty(pred, target, q, eps)
      level_loss = reduce_error(error, level_valid, reduction)
    per_level.append(level_loss)
    total = total + jnp.float32(weight) * level_loss
  return total, per_level


def average_epe(pred: jax.Array, flow: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean end-point error in pixels over valid pixels, (B, H, W, 2) x2 and (B, H, W) -> float32 scalar."""
  if tuple(pred.shape) != tuple(flow.shape):
    raise ValueError(f"outputs['flow'] has shape {pred.shape} but batch['flow'] has shape {flow.shape}; the model "
                     "must return its full-resolution flow at the input size")
  return reduce_error(endpoint_error(pred, flow), valid, "mean")


def compute_loss(loss_config: Mapping[str, Any], outputs: Mapping[str, Any],
                 batch: Mapping[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training loss of a model's outputs on a pipeline batch.

  Args:
    loss_config: `default_config()`-like (kind, weights, div_flow, reduction, q, eps); missing fields take
      their defaults, unknown fields are an error.
    outputs: the model's dict with `flows` (coarse to fine) and `flow` (B, H, W, 2), pixels.
    batch: the pipeline dict with `flow` (B, H, W, 2) and `valid` (B, H, W); without `valid` every pixel
      counts.
  Returns:
    (loss float32 scalar, metrics) with metrics 'loss', 'loss_level{i}' (unweighted, i = 0 the coarsest of
    `flows`) and 'epe' (mean full-resolution EPE in pixels over valid pixels), all float32 scalars.
  """
  config = dict(default_config())
  unknown = sorted(set(loss_config) - set(config))
  if unknown:
    raise ValueError(f"loss config has unknown field(s) {unknown}; known fields are {sorted(config)}")
  config.update(dict(loss_config))
  for key in ("flows", "flow"):
    if key not in outputs:
      raise KeyError(f"model outputs have no {key!r} entry (got keys {sorted(outputs)})")
  if "flow" not in batch:
    raise KeyError(f"batch has no 'flow' entry (got keys {sorted(batch)})")
  flow = batch["flow"]
  _check_flow("batch['flow']", flow)
  valid = batch.get("valid")
  if valid is None:
    valid = jnp.ones(flow.shape[:3], jnp.float32)
  elif tuple(valid.shape) != tuple(flow.shape[:3]):
    raise ValueError(f"batch['valid'] must have shape {tuple(flow.shape[:3])} (B, H, W), got {valid.shape}")
  loss, per_level = multiscale_loss(outputs["flows"], flow, valid, config["weights"], kind=config["kind"],
                                    div_flow=config["div_flow"], reduction=config["reduction"], q=config["q"],
                                    eps=config["eps"])
  metrics = {"loss": loss, "epe": average_epe(jnp.asarray(outputs["flow"], jnp.float32), flow, valid)}
  for index, level_loss in enumerate(per_level):
    metrics[f"loss_level{index}"] = level_loss
  return loss, metrics


__all__ = ["FLOWNET_WEIGHTS", "KINDS", "REDUCTIONS", "average_epe", "compute_loss", "default_config",
           "downsample_flow", "endpoint_error", "multiscale_loss", "reduce_error", "robust_penalty"]
