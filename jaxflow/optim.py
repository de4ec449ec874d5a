"""Optimisers and learning-rate schedules of the FlowNet family, as optax objects.

Schedules (learning rate as a function of the optimisation step, counted from 0):
  - S_long  (FlowNet 2.0): 1e-4 until 400k, then halved at 400k, 600k, 800k and 1M; 1.2M iterations.
  - S_short (FlowNet 2.0, = the original FlowNet schedule): 1e-4, halved at 300k, 400k, 500k; 600k iterations.
  - S_fine  (FlowNet 2.0, fine-tuning): 1e-5, halved at 200k, 300k, 400k; 500k iterations.
  - FlowNetC warm-up (FlowNet paper, Sec. 5.1): "we started at 1e-6 and slowly increased to 1e-4 after 10k
    iterations"; the paper does not say how, we ramp linearly from `warmup_init_lr` to `base_lr`.

Optimiser: Adam(beta1=0.9, beta2=0.999, eps=1e-8) with Caffe-style weight decay 4e-4. Caffe's `weight_decay`
adds `wd * w` to the gradient *before* the solver update (coupled L2, not AdamW's decoupled decay), which is
what the released FlowNet / FlowNet 2.0 / PWC-Net solvers do; the released prototxts give biases
`decay_mult: 0`, so by default only kernels (parameters with ndim > 1) are decayed. Optional global-norm
gradient clipping acts on the raw gradients, before the decay term is added.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

# name -> (base_lr, boundaries, total_steps) of the FlowNet 2.0 schedules; each boundary halves the rate.
PRESETS: dict[str, tuple[float, tuple[int, ...], int]] = {
  "s_long": (1e-4, (400_000, 600_000, 800_000, 1_000_000), 1_200_000),
  "s_short": (1e-4, (300_000, 400_000, 500_000), 600_000),
  "s_fine": (1e-5, (200_000, 300_000, 400_000), 500_000),
}

_SCHEDULES = ("piecewise", "constant", "cosine")


def default_config() -> ml_collections.ConfigDict:
  """The `config.optim` block: Adam + coupled weight decay on the S_short schedule, no clipping, no warm-up."""
  base_lr, boundaries, _ = PRESETS["s_short"]
  return ml_collections.ConfigDict({
    "schedule": "piecewise",      # one of piecewise | constant | cosine
    "base_lr": base_lr,
    "boundaries": boundaries,     # piecewise: steps at which the rate is multiplied by decay_factor
    "decay_factor": 0.5,
    "warmup_steps": 0,            # linear ramp from warmup_init_lr to the schedule's value over these steps
    "warmup_init_lr": 1e-6,
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
    "weight_decay": 4e-4,         # coupled L2 (Caffe weight_decay), added to the gradient before Adam
    "decay_biases": False,        # released prototxts: decay_mult 0 on biases
    "clip_grad_norm": 0.0,        # > 0: clip the global gradient norm to this value
  })


def preset(name: str, scale: float = 1.0) -> dict[str, Any]:
  """Fields of `config.optim` (and the total step count) for a paper schedule, with all steps multiplied by scale.

  Returns a dict {base_lr, boundaries, total_steps}; `scale` < 1 compresses a schedule for short runs.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown schedule preset {name!r}; expected one of {sorted(PRESETS)}")
  base_lr, boundaries, total = PRESETS[name]
  return {"base_lr": base_lr, "boundaries": tuple(max(1, int(round(b * scale))) for b in boundaries),
          "total_steps": max(1, int(round(total * scale)))}


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Learning rate (float32 scalar) as a function of the step, from `config.optim`."""
  kind = optim.schedule
  if kind == "piecewise":
    boundaries = [int(b) for b in optim.boundaries]
    if any(b <= 0 for b in boundaries) or boundaries != sorted(boundaries):
      raise ValueError(f"config.optim.boundaries must be positive and increasing, got {tuple(optim.boundaries)}")
    main = optax.piecewise_constant_schedule(
        optim.base_lr, {b: float(optim.decay_factor) for b in boundaries})
  elif kind == "constant":
    main = optax.constant_schedule(optim.base_lr)
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(optim.base_lr, max(1, total_steps - optim.warmup_steps))
  else:
    raise ValueError(f"config.optim.schedule={kind!r} is not one of {_SCHEDULES}")
  warm = int(optim.warmup_steps)
  if warm < 0:
    raise ValueError(f"config.optim.warmup_steps must be >= 0, got {warm}")
  if warm == 0:
    return main
  ramp = optax.linear_schedule(optim.warmup_init_lr, optim.base_lr, warm)
  if kind == "cosine":
    return optax.join_schedules([ramp, main], [warm])

  # Warm-up on top of a piecewise/constant schedule keeps that schedule's absolute boundaries.
  def schedule(step):
    return jnp.where(step < warm, ramp(step), main(step))

  return schedule


def _decay_mask(decay_biases: bool) -> Callable[[Any], Any]:
  return lambda params: jax.tree.map(lambda p: decay_biases or p.ndim > 1, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int,
                   trainable: Any | None = None) -> optax.GradientTransformation:
  """Gradient transformation for `config.optim`: [clip] -> + wd * w -> Adam -> * -lr(step).

  `trainable`, if given, is a pytree of bools with the structure of the params: False leaves are frozen
  (their updates are exactly zero and they get no optimizer state beyond an empty placeholder).
  """
  parts = []
  if optim.clip_grad_norm and optim.clip_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.clip_grad_norm))
  if optim.weight_decay:
    parts.append(optax.add_decayed_weights(optim.weight_decay, mask=_decay_mask(optim.decay_biases)))
  parts.append(optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps))
  parts.append(optax.scale_by_learning_rate(make_schedule(optim, total_steps)))
  tx = optax.chain(*parts)
  if trainable is not None:
    labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  return tx


def learning_rate(optim: ml_collections.ConfigDict, total_steps: int, step: int) -> float:
  """The learning rate at `step` (host float), for logging."""
  return float(make_schedule(optim, total_steps)(step))
