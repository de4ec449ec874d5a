"""Shared configuration for every model: fields, variant parsing, locking.

Each model file (configs/flownet_s.py, ...) defines `get_config(arg)`; `arg` is what follows ':' on the command
line, a variant name optionally followed by key=value options: `chairs`, `local`, `sintel`, `kitti`,
`chairs,stage=2` (SpyNet). The returned ConfigDict is locked: unknown keys (`--config.bogus=1`) and values of the
wrong type (`--config.batch_size=abc`) are errors naming the key.

Top-level fields:
  seed                  int, seeds the parameters, the per-step RNG and (via config.data) the input stream
  batch_size            int, global batch (all devices of all processes)
  total_steps           int, optimisation steps
  model                 name + every field of the registered model class (passed to get_model)
  loss                  jaxflow.losses.default_config()
  optim                 jaxflow.optim.default_config() (schedule, Adam, weight decay, clipping)
  data                  data_pipelines.pipeline.default_config(), adjusted per variant
  evals                 {name: {dataset, batch_size, num_batches (0 = all)}}; datasets from pipeline.eval_iterator
  eval_every_steps      periodic evaluation (0 = only at the end); best_metric: the metric tracked (lower=better)
  log_every_steps, checkpoint_every_steps, keep_checkpoints, log_tensorboard, log_images, prefetch
  init_from             workdir whose latest checkpoint initialises the parameters (fine-tuning, SpyNet stages)
  trainable_levels      SpyNet only: levels trained in this stage (others frozen); () = all
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

VARIANTS = ("chairs", "sintel", "kitti", "local")


def parse_arg(arg: str | None, *, variants: tuple[str, ...] = VARIANTS, options: dict[str, Any] | None = None,
              default: str = "chairs") -> tuple[str, dict[str, Any]]:
  """'chairs,stage=2' -> ('chairs', {'stage': 2}); options gives the allowed keys and their defaults (typed).

  Raises a ValueError naming a variant or option that does not exist.
  """
  options = dict(options or {})
  parts = [p.strip() for p in (arg or default).split(",") if p.strip()]
  variant = parts[0] if parts and "=" not in parts[0] else default
  rest = parts[1:] if parts and "=" not in parts[0] else parts
  if variant not in variants:
    raise ValueError(f"unknown config variant {variant!r}; expected one of {list(variants)}")
  for item in rest:
    if "=" not in item:
      raise ValueError(f"config option {item!r} must look like key=value")
    key, value = item.split("=", 1)
    if key not in options:
      raise ValueError(f"unknown config option {key!r}; expected one of {sorted(options)}")
    kind = type(options[key])
    try:
      options[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    except ValueError as e:
      raise ValueError(f"config option {key}={value!r}: expected {kind.__name__}") from e
  return variant, options


def model_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """`name` + every field of the registered model class with its default (dtypes as strings), then overrides."""
  from jaxflow.models import get_model
  cls = type(get_model(name))
  fields: dict[str, Any] = {"name": name}
  for f in dataclasses.fields(cls):
    if f.name in ("parent", "name") or f.default is dataclasses.MISSING:
      continue
    value = f.default
    if f.name == "dtype":
      value = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(getattr(value, "__name__", str(value)), "float32")
    elif isinstance(value, list):
      value = tuple(value)
    fields[f.name] = value
  for key, value in overrides.items():
    if key not in fields:
      raise ValueError(f"model {name!r} has no field {key!r}; its fields are {sorted(k for k in fields if k != 'name')}")
    fields[key] = value
  return ml_collections.ConfigDict(fields)


def _pipeline_config() -> ml_collections.ConfigDict:
  from data_pipelines import pipeline
  return pipeline.default_config()


def _loss_config() -> ml_collections.ConfigDict:
  from jaxflow import losses
  return losses.default_config()


def base_config(model_name: str, **model_overrides: Any) -> ml_collections.ConfigDict:
  """Defaults shared by all models (unlocked; the model file adjusts it, then calls `finalize`)."""
  from jaxflow import optim
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 8
  c.total_steps = optim.PRESETS["s_long"][2]
  c.model = model_config(model_name, **model_overrides)
  c.loss = _loss_config()
  c.optim = optim.default_config()
  c.data = _pipeline_config()
  c.evals = ml_collections.ConfigDict({
    "synthetic_val": {"dataset": "synthetic_val", "batch_size": 8, "num_batches": 0},
  })
  c.eval_every_steps = 10_000
  c.best_metric = "synthetic_val/epe"
  c.log_every_steps = 100
  c.checkpoint_every_steps = 5_000
  c.keep_checkpoints = 3
  c.log_tensorboard = True
  c.log_images = True
  c.prefetch = 2
  c.init_from = ""
  c.trainable_levels = ()
  return c


def apply_schedule(c: ml_collections.ConfigDict, name: str, scale: float = 1.0) -> None:
  """Sets optim.{schedule, base_lr, boundaries} and total_steps from a FlowNet 2.0 schedule preset."""
  from jaxflow import optim
  p = optim.preset(name, scale)
  c.optim.schedule = "piecewise"
  c.optim.base_lr = p["base_lr"]
  c.optim.boundaries = p["boundaries"]
  c.total_steps = p["total_steps"]


def local_variant(c: ml_collections.ConfigDict, *, steps: int = 600, batch: int = 8,
                  crop: tuple[int, int] = (128, 160), lr: float = 1e-4) -> None:
  """Small crops and batch, a few hundred steps: minutes on a CPU; evaluation on a small held-out set."""
  c.batch_size = batch
  c.total_steps = steps
  c.optim.schedule = "piecewise"
  c.optim.base_lr = lr
  c.optim.boundaries = (int(steps * 0.6), int(steps * 0.8))
  set_crop(c, crop)
  c.evals.synthetic_val.batch_size = batch
  c.evals.synthetic_val.num_batches = 8
  c.eval_every_steps = 0
  c.log_every_steps = 25
  c.checkpoint_every_steps = 200
  c.log_images = True


def set_crop(c: ml_collections.ConfigDict, crop: tuple[int, int]) -> None:
  """Training crop (H, W) and the synthetic image size it is cut from."""
  c.data.crop_size = tuple(crop)


def finalize(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks cross-field invariants and locks the config (unknown keys become errors)."""
  if c.batch_size <= 0:
    raise ValueError(f"config.batch_size must be positive, got {c.batch_size}")
  if c.total_steps <= 0:
    raise ValueError(f"config.total_steps must be positive, got {c.total_steps}")
  c.lock()
  return c


def check_config(c: ml_collections.ConfigDict) -> None:
  """Runtime checks after command-line overrides (the trainer calls it): names the offending key."""
  for key in ("batch_size", "total_steps", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    if int(c[key]) <= 0:
      raise ValueError(f"config.{key} must be positive, got {c[key]}")
  if c.eval_every_steps < 0:
    raise ValueError(f"config.eval_every_steps must be >= 0, got {c.eval_every_steps}")
  for name, ev in c.evals.items():
    for key in ("dataset", "batch_size", "num_batches"):
      if key not in ev:
        raise ValueError(f"config.evals.{name} needs the key {key!r} (has {sorted(ev.keys())})")
  if c.evals and c.best_metric and not any(c.best_metric.startswith(f"{n}/") for n in c.evals):
    raise ValueError(f"config.best_metric={c.best_metric!r} does not name one of config.evals {sorted(c.evals)}")
