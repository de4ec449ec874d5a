"""Pure training and evaluation steps; the trainer jits them once (state donated, batch sharded over 'data').

A batch is a dict of global arrays: image1, image2 (B, H, W, 3) float32 in [0, 1], flow (B, H, W, 2) float32
pixels, valid (B, H, W) float32 in {0, 1}.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxflow.metrics import fl_outlier_map
from jaxflow.train_state import TrainState, wrap_key

LossFn = Callable[[dict[str, Any], dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]

# Outlier thresholds (pixels) of the evaluation sums.
OUTLIER_THRESHOLDS = (1.0, 3.0, 5.0)


def masked_epe(flow: jax.Array, gt: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean end-point error (pixels, float32 scalar) over valid pixels; flow, gt (B, H, W, 2), valid (B, H, W)."""
  err = jnp.linalg.norm(flow.astype(jnp.float32) - gt.astype(jnp.float32), axis=-1)
  valid = valid.astype(jnp.float32)
  return jnp.sum(err * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def _apply(model: Any, params: Any, batch_stats: Any, batch: dict[str, jax.Array], train: bool,
           rng: jax.Array | None) -> tuple[dict[str, Any], Any]:
  variables = {"params": params}
  has_bn = bool(jax.tree.leaves(batch_stats))
  if has_bn:
    variables["batch_stats"] = batch_stats
  rngs = {"dropout": rng} if rng is not None else None
  if train and has_bn:
    outputs, updates = model.apply(variables, batch["image1"], batch["image2"], train=True, rngs=rngs,
                                   mutable=["batch_stats"])
    return outputs, updates["batch_stats"]
  outputs = model.apply(variables, batch["image1"], batch["image2"], train=train, rngs=rngs)
  return outputs, batch_stats


def make_train_step(model: Any, tx: optax.GradientTransformation, loss_fn: LossFn
                    ) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """train_step(state, batch) -> (new_state, metrics), metrics float32 scalars: loss, epe, grad_norm, finite.

  When the loss or the gradient norm is not finite, parameters, batch statistics and optimizer state are left
  unchanged, `bad_step` records the first such step (it stays set afterwards), and the step counter still
  advances (so the data stream stays aligned); the host checks `bad_step` at logging/checkpoint points only.
  """

  def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    rng = jax.random.fold_in(wrap_key(state.rng), state.step)

    def objective(params):
      outputs, new_stats = _apply(model, params, state.batch_stats, batch, True, rng)
      loss, aux = loss_fn(outputs, batch)
      return loss.astype(jnp.float32), (outputs, new_stats, aux)

    (loss, (outputs, new_stats, aux)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    bad_step = jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step)
    new_state = state.replace(step=state.step + 1, params=keep(new_params, state.params),
                              batch_stats=keep(new_stats, state.batch_stats),
                              opt_state=keep(new_opt, state.opt_state), bad_step=bad_step)
    metrics = {"loss": loss, "epe": masked_epe(outputs["flow"], batch["flow"], batch["valid"]),
               "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}
    for k, v in aux.items():
      if k not in metrics and jnp.ndim(v) == 0:
        metrics[f"loss/{k}"] = jnp.asarray(v, jnp.float32)
    return new_state, metrics

  return train_step


def eval_sums(flow: jax.Array, gt: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  """Summed evaluation metrics over a batch (float32 scalars; divide by `count` for means).

  epe: sum of per-pixel end-point errors over valid pixels; out{t}px: number of valid pixels with EPE > t;
  fl_all: number of valid pixels that are KITTI outliers (EPE > 3 px and > 5 % of the true flow's length:
  jaxflow.metrics.fl_outlier_map); zero_epe: the same EPE sum for a zero-flow prediction (the baseline); count: number
  of valid pixels.
  """
  valid = valid.astype(jnp.float32)
  err = jnp.linalg.norm(flow.astype(jnp.float32) - gt, axis=-1)
  speed = jnp.linalg.norm(gt, axis=-1)
  sums = {"epe": jnp.sum(err * valid), "count": jnp.sum(valid), "zero_epe": jnp.sum(speed * valid)}
  for t in OUTLIER_THRESHOLDS:
    sums[f"out{int(t)}px"] = jnp.sum((err > t).astype(jnp.float32) * valid)
  sums["fl_all"] = jnp.sum(fl_outlier_map(flow, gt) * valid)
  return sums


def finalize_sums(sums: dict[str, Any]) -> dict[str, float]:
  """Means from accumulated `eval_sums`: epe, zero_epe (pixels), out{t}px and fl_all (fractions in [0, 1])."""
  count = float(sums["count"])
  if count <= 0:
    raise ValueError("evaluation saw no valid pixels (count == 0)")
  return {k: float(v) / count for k, v in sums.items() if k != "count"}


def make_eval_step(model: Any) -> Callable[[TrainState, dict[str, jax.Array]], tuple[dict[str, jax.Array], jax.Array]]:
  """eval_step(state, batch) -> (sums as in eval_sums, predicted flow (B, H, W, 2) float32)."""

  def eval_step(state: TrainState, batch: dict[str, jax.Array]):
    outputs, _ = _apply(model, state.params, state.batch_stats, batch, False, None)
    flow = outputs["flow"].astype(jnp.float32)
    return eval_sums(flow, batch["flow"], batch["valid"]), flow

  return eval_step
