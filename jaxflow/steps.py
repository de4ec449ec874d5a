"""Pure training and evaluation steps; the trainer jits them once (state donated, batch sharded over 'data').

A batch is a dict of global arrays: image1, image2 (B, H, W, 3) float32 in [0, 1], flow (B, H, W, 2) float32
pixels, valid (B, H, W) float32 in {0, 1}.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxflow import metrics as metrics_lib
from jaxflow import optim
from jaxflow.train_state import TrainState, wrap_key

LossFn = Callable[[dict[str, Any], dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]

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
    # Parameters and optimiser state are kept as they were when `finite` is False (jaxflow.optim).
    new_params, new_opt = optim.guarded_update(tx, grads, state.opt_state, state.params, finite)
    bad_step = jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step)
    new_state = state.replace(step=state.step + 1, params=new_params,
                              batch_stats=optim.keep_if(finite, new_stats, state.batch_stats),
                              opt_state=new_opt, bad_step=bad_step)
    metrics = {"loss": loss, "epe": masked_epe(outputs["flow"], batch["flow"], batch["valid"]),
               "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}
    for k, v in aux.items():
      if k not in metrics and jnp.ndim(v) == 0:
        metrics[f"loss/{k}"] = jnp.asarray(v, jnp.float32)
    return new_state, metrics

  return train_step


def eval_sums(flow: jax.Array, gt: jax.Array, valid: jax.Array,
              occlusion: jax.Array | None = None) -> dict[str, jax.Array]:
  """Summed evaluation metrics of one batch: jaxflow.metrics.flow_metric_sums plus the zero-flow baseline.

  flow, gt (B, H, W, 2) pixels; valid, occlusion (B, H, W) (> 0.5 = evaluated / occluded). Returns the float32 EPE
  sums and int32 counts of flow_metric_sums (EPE, 1/3/5 px outliers, KITTI Fl, the Sintel speed bands, and the
  occluded / non-occluded split when `occlusion` is given) and ``zero_epe_sum``: the EPE sum of a zero-flow
  prediction over the same pixels. Accumulate batches on the host with :func:`jaxflow.metrics.accumulate_sums` (float64 /
  int64: float32 running sums drift past 2^24 pixels) and finish with :func:`finalize_sums`.
  """
  sums = metrics_lib.flow_metric_sums(flow.astype(jnp.float32), gt, valid, occlusion)
  gt = jnp.asarray(gt, jnp.float32)
  speed = jnp.sqrt(jnp.sum(jnp.square(gt), axis=-1))
  sums["zero_epe_sum"] = jnp.sum(jnp.where(metrics_lib.valid_mask(gt, valid), speed, 0.0), dtype=jnp.float32)
  return sums


def finalize_sums(sums: dict[str, Any]) -> dict[str, float]:
  """Means from accumulated `eval_sums`: metrics.finalize's (epe, outlier_{1,3,5}px, fl_all, s0_10, s10_40,
  s40plus, epe_occ / epe_noc with occlusion; pixels or fractions) and zero_epe (pixels), as Python floats.

  Raises ValueError when no pixel was evaluated (count == 0).
  """
  count = int(np.asarray(sums["count"]))
  if count <= 0:
    raise ValueError("evaluation saw no valid pixels (count == 0)")
  out = metrics_lib.finalize({k: v for k, v in sums.items() if k != "zero_epe_sum"})
  out["zero_epe"] = float(np.asarray(sums["zero_epe_sum"], np.float64)) / count
  out["num_pixels"] = float(out["num_pixels"])
  return out


def make_eval_step(model: Any) -> Callable[[TrainState, dict[str, jax.Array]], tuple[dict[str, jax.Array], jax.Array]]:
  """eval_step(state, batch) -> (sums as in eval_sums, predicted flow (B, H, W, 2) float32).

  The batch's optional ``occlusion`` (B, H, W) adds the occluded / non-occluded EPE split.
  """

  def eval_step(state: TrainState, batch: dict[str, jax.Array]):
    outputs, _ = _apply(model, state.params, state.batch_stats, batch, False, None)
    flow = outputs["flow"].astype(jnp.float32)
    return eval_sums(flow, batch["flow"], batch["valid"], batch.get("occlusion")), flow

  return eval_step
