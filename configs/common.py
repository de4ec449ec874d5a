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
  data                  data_pipelines.defaults.data_config() (= pipeline.default_config()), adjusted per variant
  evals                 {name: {dataset, batch_size, num_batches (0 = all)}}; datasets from pipeline.eval_iterator
  eval_every_steps      periodic evaluation (0 = only at the end); best_metric: the metric tracked (lower=better)
  log_every_steps, checkpoint_every_steps, keep_checkpoints, log_tensorboard, log_images, prefetch
  init_from             workdir whose latest checkpoint initialises the parameters (fine-tuning, SpyNet stages)
  trainable_levels      SpyNet only: levels trained in this stage (others frozen); () = all
  spynet_copy_previous_level  SpyNet stages: with init_from, G_k (k = the trained level) starts as a copy of G_{k-1}
  compiler_options      XLA compiler options of the train and evaluation steps' programs only (not process-wide
                        like XLA_FLAGS): {option name: value as a string ('True' / 'False' for a bool)}; empty =
                        XLA's defaults. PWC-Net's configs set one (configs/pwcnet.py). From the command line:
                        --config.compiler_options.NAME=VALUE changes a given option, --config.compiler_options=
                        "{'NAME': 'VALUE'}" replaces the set ({} = none). XLA rejecting a name or value is an error
                        naming config.compiler_options.NAME (at the step's compile).
  fast_compile_steps    int >= 0 (default 0 = off; PWC-Net's local variant sets 1): on the CPU backend, global
                        steps < this value (counted from step 0, so a resume at a later step never uses it) run the
                        train step compiled with compiler_options plus xla_backend_optimization_level=0 (about
                        half the compile; slower steps, and not bitwise equal to the full program's); the full
                        program is compiled in the background meanwhile and used from this step on. Results depend
                        only on the config and the start step. Ignored on GPU / TPU.
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
  # data_pipelines.defaults is TensorFlow-free: loading a config must not wait for TensorFlow's import, which
  # the trainer starts in its input-pipeline thread beside the JAX side.
  from data_pipelines import defaults
  return defaults.data_config()


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
  c.spynet_copy_previous_level = False
  c.compiler_options = ml_collections.ConfigDict()
  c.fast_compile_steps = 0  # PWC-Net's local variant sets 1 (see configs/pwcnet.py)
  return c


def apply_schedule(c: ml_collections.ConfigDict, name: str, scale: float = 1.0) -> None:
  """Sets optim.{schedule, base_lr, boundaries} and total_steps from a FlowNet 2.0 schedule preset."""
  from jaxflow import optim
  p = optim.preset(name, scale)
  c.optim.schedule = "piecewise"
  c.optim.base_lr = p["base_lr"]
  c.optim.boundaries = p["boundaries"]
  c.total_steps = p["total_steps"]


def local_variant(c: ml_collections.ConfigDict, *, steps: int = 300, batch: int = 4,
                  crop: tuple[int, int] = (128, 128), lr: float = 1e-4) -> None:
  """Small crops and batch, a few hundred steps: minutes on a CPU; evaluation on a small held-out set."""
  c.batch_size = batch
  c.total_steps = steps
  c.optim.schedule = "piecewise"
  c.optim.base_lr = lr
  c.optim.boundaries = (int(steps * 0.6), int(steps * 0.8))
  set_crop(c, crop)
  c.evals.synthetic_val.batch_size = batch
  c.data.val_size = 64
  c.eval_every_steps = 0
  c.log_every_steps = 25
  c.checkpoint_every_steps = 200
  c.log_images = True


def set_crop(c: ml_collections.ConfigDict, crop: tuple[int, int]) -> None:
  """Training crop (H, W); the synthetic pairs are generated at the crop size plus a margin of 1/4 (at least
  the 384 x 512 FlowNet Chairs size for full-size crops), so augmentation has room to zoom out and rotate."""
  h, w = int(crop[0]), int(crop[1])
  c.data.crop_size = (h, w)
  if h >= 320:
    c.data.synthetic.image_size = (max(384, h), max(512, w))
  else:
    c.data.synthetic.image_size = (h + h // 4, w + w // 4)


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
  fast = c.get("fast_compile_steps", 0)
  if isinstance(fast, bool) or not isinstance(fast, int) or fast < 0:
    raise ValueError(f"config.fast_compile_steps={fast!r}: expected a non-negative integer (0 = off)")
  if c.eval_every_steps < 0:
    raise ValueError(f"config.eval_every_steps must be >= 0, got {c.eval_every_steps}")
  for name, ev in c.evals.items():
    for key in ("dataset", "batch_size", "num_batches"):
      if key not in ev:
        raise ValueError(f"config.evals.{name} needs the key {key!r} (has {sorted(ev.keys())})")
  for name, value in (c.get("compiler_options") or {}).items():
    if not isinstance(value, (str, bool, int, float)) or not str(name).strip():
      raise ValueError(f"config.compiler_options.{name}={value!r}: expected an XLA option name with a string value")
  from jaxflow.models import get_model
  get_model(c.model.name, **{k: v for k, v in c.model.items() if k != "name"})  # unknown model / field: ValueError
  if c.evals and c.best_metric and not any(c.best_metric.startswith(f"{n}/") for n in c.evals):
    raise ValueError(f"config.best_metric={c.best_metric!r} does not name one of config.evals {sorted(c.evals)}")


def real_evals(names: tuple[str, ...], batch_size: int = 1) -> ml_collections.ConfigDict:
  """Evaluations on real sets at full resolution plus the synthetic held-out set.

  Real sets of mixed image sizes need a per-process batch of 1 (batch_size = number of processes); the trainer
  pads per-process batches to the local device count.
  """
  evals = {"synthetic_val": {"dataset": "synthetic_val", "batch_size": 8, "num_batches": 0}}
  for n in names:
    evals[n] = {"dataset": n, "batch_size": batch_size, "num_batches": 0}
  return ml_collections.ConfigDict(evals)


def scaled_boundaries(schedule: str, scale: float) -> tuple[int, ...]:
  from jaxflow import optim
  return optim.preset(schedule, scale)["boundaries"]


def scaled_total(schedule: str, scale: float) -> int:
  from jaxflow import optim
  return optim.preset(schedule, scale)["total_steps"]


def flownet_config(name: str, arg: str | None, warmup_steps: int = 0) -> ml_collections.ConfigDict:
  """FlowNetS / FlowNetC: chairs (S_long, or schedule=s_short), sintel / kitti fine-tuning (S_fine), local."""
  variant, opts = parse_arg(arg, options={"schedule": "s_long"})
  c = base_config(name)
  apply_schedule(c, opts["schedule"])
  c.optim.warmup_steps = warmup_steps
  c.optim.warmup_init_lr = 1e-6
  c.loss.div_flow = c.model.div_flow
  set_crop(c, (320, 448))
  if variant == "sintel":
    apply_schedule(c, "s_fine")
    c.optim.warmup_steps = 0
    c.data.train = "sintel_final"
    set_crop(c, (384, 768))
    c.evals = real_evals(("sintel_clean", "sintel_final"))
    c.best_metric = "sintel_final/epe"
  elif variant == "kitti":
    apply_schedule(c, "s_fine")
    c.optim.warmup_steps = 0
    c.data.train = "kitti2015"
    set_crop(c, (320, 896))
    c.evals = real_evals(("kitti2015",))
    c.best_metric = "kitti2015/epe"
  elif variant == "local":
    local_variant(c, steps=300, batch=4, crop=(128, 128), lr=1e-4)
    c.optim.warmup_steps = min(warmup_steps, 50)
  return finalize(c)
