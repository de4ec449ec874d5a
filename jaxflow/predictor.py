"""Loading a trained (or converted) checkpoint for inference: `load(path) -> Predictor`.

Checkpoint layout (written by jaxflow.trainer and by the weight converter):

  WORKDIR/config.json             the run's config as JSON; its `model` entry (name + fields) builds the model
  WORKDIR/checkpoints/<step>/     orbax checkpoint of a pytree holding at least `params` (and `batch_stats` for
                                  models with batch norm); the trainer's TrainState also has step, opt_state, ...

`load` accepts the workdir (latest step), its `checkpoints` folder (latest step) or one `checkpoints/<step>`
folder. The checkpoint is restored without a target (generic), only `params` / `batch_stats` are kept, and
they are checked against the shapes of the configured model: a checkpoint of another model raises an error
naming the checkpoint and the first mismatched parameter.

Input rule of :class:`Predictor` (numpy in, numpy out): frames are RGB, shape (H, W, 3) or batched
(B, H, W, 3). uint8 frames are divided by 255 and uint16 frames by 65535; floating frames are taken as
already in [0, 1] (values outside [-0.001, 1.001] raise, since a float image in [0, 255] is the usual
mistake). Any H, W: the models resize internally and return flow at the input size, in input pixels.
One compilation per distinct input shape (cached).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
# Tolerance on the [0, 1] range of floating input frames.
_RANGE_TOL = 1e-3


class CheckpointError(ValueError):
  """A checkpoint or its config.json is missing, unreadable or does not fit the configured model."""


# ----------------------------------------------------------------------------------------------------------
# Finding and restoring checkpoints


def resolve_checkpoint(path: str | os.PathLike, step: int | None = None) -> tuple[str, str, int]:
  """Finds (workdir, checkpoints directory, step) for a workdir, its checkpoints/ folder or checkpoints/<step>.

  Args:
    path: WORKDIR, WORKDIR/checkpoints or WORKDIR/checkpoints/<step>.
    step: the step to use with a workdir / checkpoints folder (default: the latest). Must agree with
      a path that names a step.
  Raises:
    FileNotFoundError: the path does not exist or holds no checkpoint (the message names it).
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
  base = os.path.basename(path.rstrip(os.sep))
  if re.fullmatch(r"\d+", base) and os.path.isdir(path):
    ckpt_dir = os.path.dirname(path)
    named = int(base)
    if step is not None and step != named:
      raise ValueError(f"checkpoint path {path!r} is step {named}, but step={step} was requested")
    return os.path.dirname(ckpt_dir), ckpt_dir, named
  if base == CHECKPOINTS_DIR and os.path.isdir(path):
    ckpt_dir = path
  elif os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
    ckpt_dir = os.path.join(path, CHECKPOINTS_DIR)
  else:
    raise FileNotFoundError(f"{path!r} is not a workdir (no {CHECKPOINTS_DIR}/ folder) nor a checkpoint folder "
                            f"(expected WORKDIR, WORKDIR/{CHECKPOINTS_DIR} or WORKDIR/{CHECKPOINTS_DIR}/<step>)")
  steps = sorted(int(d) for d in os.listdir(ckpt_dir)
                 if re.fullmatch(r"\d+", d) and os.path.isdir(os.path.join(ckpt_dir, d)))
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {ckpt_dir!r} (expected <step>/ folders written by the trainer)")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {ckpt_dir!r}; available steps: {steps}")
  return os.path.dirname(ckpt_dir), ckpt_dir, step


def load_model_config(workdir: str) -> dict[str, Any]:
  """The `model` entry (name + fields) of WORKDIR/config.json; errors name the file and the missing key."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file; a checkpoint folder needs its run's {CONFIG_FILE} beside "
                            f"{CHECKPOINTS_DIR}/ to know which model to build")
  try:
    with open(path) as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None
  model = config.get("model") if isinstance(config, dict) else None
  if not isinstance(model, dict) or "name" not in model:
    raise CheckpointError(f"{path}: expected a 'model' entry with a 'name' and the model's fields, "
                          f"got {model!r}")
  return dict(model)


def restore_variables(ckpt_dir: str, step: int) -> dict[str, Any]:
  """Restores checkpoint `step` of `ckpt_dir` without a target; returns {'params', 'batch_stats'?} as numpy."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  where = os.path.join(ckpt_dir, str(step))
  manager = ocp.CheckpointManager(ckpt_dir)
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore())
  except FileNotFoundError:
    raise
  except Exception as e:  # orbax raises assorted types for unreadable folders
    raise CheckpointError(f"{where}: cannot restore the checkpoint ({type(e).__name__}: {e})") from e
  finally:
    manager.close()
  if not isinstance(restored, Mapping) or "params" not in restored:
    keys = sorted(restored) if isinstance(restored, Mapping) else type(restored).__name__
    raise CheckpointError(f"{where}: expected a checkpoint holding 'params' (and 'batch_stats' for batch-norm "
                          f"models), got {keys}")
  to_np = lambda tree: jax.tree.map(np.asarray, jax.device_get(tree))
  out = {"params": to_np(restored["params"])}
  stats = restored.get("batch_stats")
  if stats is not None and jax.tree.leaves(stats):
    out["batch_stats"] = to_np(stats)
  return out


def _flat(tree: Any) -> dict[str, tuple[int, ...]]:
  return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(np.shape(x))
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def check_variables(variables: Mapping[str, Any], expected: Mapping[str, Any], model_name: str, where: str) -> None:
  """Raises CheckpointError naming the first parameter whose presence or shape differs from the model's."""
  for collection in ("params", "batch_stats"):
    want = _flat(expected.get(collection, {}))
    have = _flat(variables.get(collection, {}))
    if not want and not have:
      continue
    for key in sorted(want):
      if key not in have:
        raise CheckpointError(f"{where}: does not fit model {model_name!r}: {collection} '{key}' (shape "
                              f"{want[key]}) is missing from the checkpoint (is it a checkpoint of another "
                              f"model or other model fields?)")
      if have[key] != want[key]:
        raise CheckpointError(f"{where}: does not fit model {model_name!r}: {collection} '{key}' has shape "
                              f"{have[key]} in the checkpoint, the model expects {want[key]}")
    extra = sorted(set(have) - set(want))
    if extra:
      raise CheckpointError(f"{where}: does not fit model {model_name!r}: the checkpoint has {collection} "
                            f"'{extra[0]}' (shape {have[extra[0]]}) that the model does not have "
                            f"({len(extra)} unexpected in all)")


# ----------------------------------------------------------------------------------------------------------
# Input conversion


def to_float_frames(image: Any, name: str = "image") -> np.ndarray:
  """Frames -> float32 RGB in [0, 1] with a batch axis: (B, H, W, 3).

  Args:
    image: (H, W, 3) or (B, H, W, 3); uint8 (/ 255), uint16 (/ 65535) or floating in [0, 1].
    name: used in error messages.
  Raises:
    ValueError / TypeError naming `name`, its shape or dtype and what was expected.
  """
  image = np.asarray(image)
  if image.ndim not in (3, 4) or image.shape[-1] != 3:
    raise ValueError(f"{name}: expected an RGB frame (H, W, 3) or a batch (B, H, W, 3), got shape {image.shape}")
  if 0 in image.shape:
    raise ValueError(f"{name}: empty frame of shape {image.shape}")
  if image.dtype == np.uint8:
    out = image.astype(np.float32) / np.float32(255)
  elif image.dtype == np.uint16:
    out = image.astype(np.float32) / np.float32(65535)
  elif np.issubdtype(image.dtype, np.floating):
    out = image.astype(np.float32)
    if not np.all(np.isfinite(out)):
      raise ValueError(f"{name}: frame has non-finite values")
    lo, hi = float(out.min()), float(out.max())
    if lo < -_RANGE_TOL or hi > 1.0 + _RANGE_TOL:
      raise ValueError(f"{name}: floating frames must be RGB in [0, 1], got values in [{lo:g}, {hi:g}]; "
                       f"pass uint8 frames or divide by 255")
    out = np.clip(out, 0.0, 1.0)
  else:
    raise TypeError(f"{name}: unsupported dtype {image.dtype}; expected uint8, uint16 or float in [0, 1]")
  return out[None] if out.ndim == 3 else out


# ----------------------------------------------------------------------------------------------------------
# Predictor


class Predictor:
  """A model with its variables: `predict(image1, image2) -> flow` (numpy), jit-compiled once per input shape.

  Attributes:
    model: the linen Module; variables: {'params', 'batch_stats'?}; model_config: the config.json `model`
    entry; checkpoint: the restored checkpoint folder (or '' when built from variables); step: its step.
  """

  def __init__(self, model: Any, variables: Mapping[str, Any], *, model_config: Mapping[str, Any] | None = None,
               checkpoint: str = "", step: int | None = None):
    self.model = model
    self.variables = jax.device_put(dict(variables))
    self.model_config = dict(model_config or {})
    self.checkpoint = checkpoint
    self.step = step
    self._jitted = jax.jit(self._forward)
    self._compiled: dict[tuple[int, ...], Any] = {}

  def _forward(self, variables, image1: jax.Array, image2: jax.Array) -> jax.Array:
    return self.model.apply(variables, image1, image2, train=False)["flow"].astype(jnp.float32)

  @property
  def num_compilations(self) -> int:
    """How many input shapes have been compiled so far."""
    return len(self._compiled)

  def predict_jax(self, image1: jax.Array, image2: jax.Array) -> jax.Array:
    """float32 (B, H, W, 3) frames in [0, 1] (numpy or jax) -> (B, H, W, 2) flow in pixels, a jax array."""
    shape = tuple(np.shape(image1))
    if tuple(np.shape(image2)) != shape:
      raise ValueError(f"image1 and image2 must have the same shape, got {shape} and {tuple(np.shape(image2))}")
    fn = self._compiled.get(shape)
    if fn is None:
      spec = jax.ShapeDtypeStruct(shape, jnp.float32)
      fn = self._jitted.lower(self.variables, spec, spec).compile()
      self._compiled[shape] = fn
    flow = fn(self.variables, jnp.asarray(image1, jnp.float32), jnp.asarray(image2, jnp.float32))
    if flow.shape != shape[:3] + (2,):
      raise RuntimeError(f"model {self.model_config.get('name', type(self.model).__name__)!r} returned flow of "
                         f"shape {flow.shape} for frames {shape}; expected {shape[:3] + (2,)}")
    return flow

  def predict(self, image1: Any, image2: Any) -> np.ndarray:
    """Flow from image1 to image2.

    Args:
      image1, image2: (H, W, 3) or (B, H, W, 3) RGB frames of the same shape; uint8 (/ 255), uint16
        (/ 65535) or floating in [0, 1].
    Returns:
      float32 flow in pixels (u right, v down), (H, W, 2) or (B, H, W, 2) like the input.
    """
    single = np.ndim(image1) == 3
    a = to_float_frames(image1, "image1")
    b = to_float_frames(image2, "image2")
    if a.shape != b.shape:
      raise ValueError(f"image1 and image2 must have the same shape, got {np.shape(image1)} and "
                       f"{np.shape(image2)}")
    flow = np.asarray(self.predict_jax(a, b))
    return flow[0] if single else flow

  __call__ = predict

  def __repr__(self) -> str:
    return (f"Predictor(model={self.model_config.get('name', type(self.model).__name__)!r}, "
            f"checkpoint={self.checkpoint!r}, step={self.step})")


def build_model(model_config: Mapping[str, Any], dtype: str | None = None) -> Any:
  """The registered model from a config `model` entry (name + fields); `dtype` overrides the compute dtype."""
  from jaxflow.models import get_model  # pylint: disable=import-outside-toplevel

  fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in model_config.items() if k != "name"}
  if dtype is not None:
    fields["dtype"] = dtype
  return get_model(model_config["name"], **fields)


def abstract_variables(model: Any, size: tuple[int, int] = (64, 64)) -> dict[str, Any]:
  """Shapes of the model's variables (no computation), from frames of `size`."""
  spec = jax.ShapeDtypeStruct((1, size[0], size[1], 3), jnp.float32)
  return jax.eval_shape(lambda k, a, b: model.init({"params": k}, a, b, train=False), jax.random.key(0), spec,
                        spec)


def load(path: str | os.PathLike, step: int | None = None, *, dtype: str | None = None) -> Predictor:
  """Loads a checkpoint for inference.

  Args:
    path: a training workdir (latest checkpoint), its `checkpoints` folder, or one `checkpoints/<step>` folder.
    step: a step of a workdir (default: the latest).
    dtype: optional compute dtype override ('float32' / 'bfloat16'); parameters stay float32.
  Returns:
    a Predictor: `predictor(image1, image2) -> flow` (see the module docstring for the input rule).
  Raises:
    FileNotFoundError: missing path, checkpoint or config.json (named).
    CheckpointError: unreadable checkpoint, or parameters that do not fit the configured model (names the
      checkpoint folder and the parameter).
  """
  workdir, ckpt_dir, step = resolve_checkpoint(path, step)
  model_config = load_model_config(workdir)
  where = os.path.join(ckpt_dir, str(step))
  try:
    model = build_model(model_config, dtype)
  except ValueError as e:
    raise CheckpointError(f"{os.path.join(workdir, CONFIG_FILE)}: cannot build the model: {e}") from e
  variables = restore_variables(ckpt_dir, step)
  check_variables(variables, abstract_variables(model), model_config["name"], where)
  return Predictor(model, variables, model_config=model_config, checkpoint=where, step=step)


def save_for_inference(workdir: str | os.PathLike, model_config: Mapping[str, Any], variables: Mapping[str, Any],
                       step: int = 0) -> str:
  """Writes WORKDIR/config.json ({'model': model_config}) and an orbax checkpoint of `variables` at `step`.

  The layout `load` reads (and the converter writes); returns the checkpoint folder. Used by tests and the
  notebook to make tiny checkpoints without a training run.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  workdir = os.path.abspath(os.fspath(workdir))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    json.dump({"model": dict(model_config)}, f, indent=2, sort_keys=True, default=list)
  ckpt_dir = os.path.join(workdir, CHECKPOINTS_DIR)
  manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(create=True,
                                                                                enable_async_checkpointing=False))
  try:
    tree = {k: jax.tree.map(np.asarray, jax.device_get(v)) for k, v in variables.items()}
    manager.save(step, args=ocp.args.StandardSave(tree), force=True)
    manager.wait_until_finished()
  finally:
    manager.close()
  return os.path.join(ckpt_dir, str(step))
