"""train_and_evaluate(config, workdir): mesh, input, sharded init, the jitted loop, evaluation, logs, checkpoints.

Layout of a workdir:
  config.json        the resolved config (written by process 0)
  checkpoints/<step> orbax checkpoints of the TrainState (last `keep_checkpoints`)
  metrics.jsonl      one JSON object per line: train rows {"step", "train/..."} and eval rows {"step", "<eval>/..."}
                     and a last row with "final": true
  tensorboard/       tf.summary scalars and colour-coded flow images of a fixed validation batch

Restarting with the same workdir resumes from the latest checkpoint; since the input stream is a pure function
of (seed, step) and the per-step RNG is fold_in(state.rng, step), the resumed run reaches exactly the same
parameters as an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxflow import checkpointing, exec_cache, optim, parallel, param_init, steps
from jaxflow import metrics as metrics_lib
from jaxflow.train_state import INIT_SIZE, TrainState, create_train_state, make_init_fn, param_count

TrainIterFn = Callable[..., Iterable[dict[str, np.ndarray]]]
EvalIterFn = Callable[..., Iterable[dict[str, np.ndarray]]]


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradients became NaN/Inf; the message names the first bad step."""


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def build_model(config: ml_collections.ConfigDict) -> Any:
  from jaxflow.models import get_model
  fields = {k: v for k, v in config.model.to_dict().items() if k != "name"}
  return get_model(config.model.name, **fields)


OPTIONS_PREFIX = "config.compiler_options."


def compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """config.compiler_options as the XLA compiler options of the train / eval step (None when empty); see
  platform.compiler_options (bools from 'True' / 'False'; `xla_cpu_*` options only on the CPU backend; a bad
  value type is a ValueError naming the key)."""
  from jaxflow import platform
  return platform.compiler_options(config.get("compiler_options") or {}, OPTIONS_PREFIX,
                                   cpu=jax.default_backend() == "cpu")


FAST_COMPILE_KEY = "config.fast_compile_steps"


def fast_compile_steps(config: ml_collections.ConfigDict) -> int:
  """config.fast_compile_steps (0 when the config has no such field): how many global steps from step 0 run on the
  train step compiled with exec_cache.FAST_TIER_OPTIONS added (CPU backend only). A negative or non-integer value is a
  ValueError naming the key."""
  value = config.get("fast_compile_steps", 0)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"{FAST_COMPILE_KEY}={value!r}: expected a non-negative integer (0 = off)")
  return int(value)


def _tf_xla_cache() -> None:
  # Before TensorFlow's import (the first pipeline call, in the prefetch thread): TensorFlow keeps the input
  # pipeline's XLA-compiled renderer / augmentation beside JAX's compilation cache (data_pipelines.tf_cache).
  from data_pipelines import tf_cache
  tf_cache.enable_xla_cache(jax.config.jax_compilation_cache_dir)


def default_train_iter(config: ml_collections.ConfigDict, *, start_step: int, process_index: int,
                       process_count: int) -> Iterable[dict[str, np.ndarray]]:
  _tf_xla_cache()
  from data_pipelines import graph_cache, pipeline
  # The built synthetic stream's graph is kept beside the caches too: a repeated configuration skips tracing.
  return pipeline.train_iterator(config, start_step=start_step, process_index=process_index,
                                 process_count=process_count,
                                 graph_cache_dir=graph_cache.cache_dir_for(jax.config.jax_compilation_cache_dir))


def default_eval_iter(config: ml_collections.ConfigDict, name: str, *, batch_size: int, process_index: int,
                      process_count: int) -> Iterable[dict[str, np.ndarray]]:
  _tf_xla_cache()
  from data_pipelines import pipeline
  return pipeline.eval_iterator(config, name, batch_size=batch_size, process_index=process_index,
                                process_count=process_count)


def default_loss_fn(config: ml_collections.ConfigDict) -> steps.LossFn:
  from jaxflow import losses
  return functools.partial(losses.compute_loss, config.loss)


class MetricWriter:
  """Process 0 writes metrics.jsonl and TensorBoard summaries; other processes write nothing."""

  def __init__(self, workdir: str, tensorboard: bool, resume_step: int):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    # Rows after the restored step were produced by the interrupted run and will be produced again.
    if os.path.exists(self.path):
      with open(self.path) as f:
        rows = [line for line in f if line.strip()]
      kept = [r for r in rows if json.loads(r).get("step", 0) <= resume_step and not json.loads(r).get("final")]
      with open(self.path, "w") as f:
        f.writelines(kept)
    if tensorboard:
      import tensorflow as tf
      from tensorflow.core.framework import summary_pb2
      tf.config.set_visible_devices([], "GPU")
      self._tf = tf
      # tf.summary.scalar/image live in the `tensorboard` package, which tensorflow-cpu does not install; the
      # core tf.summary.write with the plugins' metadata writes the same event records without it.
      self._meta = {}
      for plugin in ("scalars", "images"):
        md = summary_pb2.SummaryMetadata()
        md.plugin_data.plugin_name = plugin
        self._meta[plugin] = md
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, values: dict[str, Any], **extra: Any) -> None:
    if not self.active:
      return
    row = {"step": int(step), **{k: float(v) for k, v in values.items()}, **extra}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      tf = self._tf
      with self._tb.as_default():
        for k, v in values.items():
          tf.summary.write(k, tf.constant(float(v), tf.float32), step=step, metadata=self._meta["scalars"])

  def images(self, step: int, name: str, images: np.ndarray) -> None:
    """images: uint8 (N, H, W, 3), stored as the TensorBoard image plugin expects ([W, H, png, png, ...])."""
    if self.active and self._tb is not None:
      tf = self._tf
      n, h, w = images.shape[:3]
      pngs = [tf.io.encode_png(images[i]) for i in range(n)]
      tensor = tf.stack([tf.constant(str(w)), tf.constant(str(h))] + pngs)
      with self._tb.as_default():
        tf.summary.write(name, tensor, step=step, metadata=self._meta["images"])

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()


# Evaluation metrics printed on the console line (all of steps.finalize_sums go to the logs).
_CONSOLE_METRICS = ("epe", "zero_epe", "outlier_3px", "fl_all", "epe_occ", "epe_noc")


def _pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads a short (last) evaluation batch to `size` examples with zeros (valid = 0 so they do not count)."""
  n = len(batch["image1"])
  if n == size:
    return batch
  if n > size:
    raise ValueError(f"evaluation batch of {n} examples is larger than the expected per-process size {size}")
  return {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


class _StopRequest:
  """Turns SIGTERM into a flag checked by the loop (Ctrl-C arrives as KeyboardInterrupt)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not in the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


def _format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _init_from(config: ml_collections.ConfigDict, state: TrainState, replicated: jax.NamedSharding) -> TrainState:
  """Initialises params (and batch stats) from the latest checkpoint of config.init_from (another workdir).

  For SpyNet with more levels than the source run, spynet.init_from_coarser copies the trained coarser levels
  G0..G{n-1} and the new finer level keeps its fresh initialisation (the paper's level-by-level training).
  """
  source = config.init_from
  ckpt = checkpointing.Checkpointer(source, async_save=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"config.init_from={source!r}: no checkpoint in {ckpt.directory}")
    import orbax.checkpoint as ocp
    restored = ckpt._manager.restore(step, args=ocp.args.StandardRestore())
  finally:
    ckpt.close()
  old_params = jax.tree.map(np.asarray, restored["params"])
  new_params = jax.tree.map(np.asarray, jax.device_get(state.params))
  if config.model.name == "spynet" and jax.tree.structure(old_params) != jax.tree.structure(new_params):
    from jaxflow.models import spynet
    params = spynet.init_from_coarser(new_params, old_params)
  else:
    if jax.tree.structure(old_params) != jax.tree.structure(new_params):
      raise ValueError(f"config.init_from={source!r}: its parameters do not have the structure of model "
                       f"{config.model.name!r} with these fields")
    for path, (a, b) in zip(jax.tree_util.tree_leaves_with_path(new_params),
                            zip(jax.tree.leaves(old_params), jax.tree.leaves(new_params))):
      if np.shape(a) != np.shape(b):
        raise ValueError(f"config.init_from={source!r}: parameter {jax.tree_util.keystr(path[0])} has shape "
                         f"{np.shape(a)}, this model expects {np.shape(b)}")
    params = old_params
  if config.model.name == "spynet" and config.get("spynet_copy_previous_level", False):
    params = dict(params)
    for level in tuple(config.trainable_levels):
      if level > 0:
        params[f"G{level}"] = params[f"G{level - 1}"]
        _log(f"spynet: G{level} initialised as a copy of G{level - 1}")
  put = lambda x: jax.make_array_from_callback(np.shape(x), replicated, lambda idx: np.asarray(x)[idx])
  state = state.replace(params=jax.tree.map(put, params))
  old_stats = restored.get("batch_stats") or {}
  if jax.tree.leaves(old_stats) and jax.tree.structure(old_stats) == jax.tree.structure(state.batch_stats):
    state = state.replace(batch_stats=jax.tree.map(put, old_stats))
  _log(f"initialised parameters from {source} (step {step})")
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       train_iter_fn: TrainIterFn | None = None, eval_iter_fn: EvalIterFn | None = None,
                       loss_fn: steps.LossFn | None = None, model: Any | None = None,
                       num_devices: int | None = None,
                       stop_after_steps: int | None = None) -> dict[str, Any]:
  """Trains config.model for config.total_steps global steps; returns the final metrics and the state.

  train_iter_fn / eval_iter_fn / loss_fn default to data_pipelines.pipeline and jaxflow.losses, model to
  get_model(config.model.name, **fields) (tests inject small fakes). num_devices restricts the mesh to the first devices (single process). stop_after_steps stops
  (with a checkpoint) after that many steps of this invocation, like an interruption.
  Returns {"step", "final": {metrics}, "best": {...}, "state": TrainState, "interrupted", "tiers"}; "tiers" lists
  (first global step, "fast" | "full") of a run that started below config.fast_compile_steps (else []).
  """
  workdir = os.path.abspath(workdir)
  train_iter_fn = train_iter_fn or default_train_iter
  eval_iter_fn = eval_iter_fn or default_eval_iter
  injected_model, injected_loss = model, loss_fn
  loss_fn = loss_fn or default_loss_fn(config)
  pid, nproc = jax.process_index(), jax.process_count()

  mesh = parallel.make_mesh(num_devices)
  rep, dshard = parallel.replicated(mesh), parallel.data_sharding(mesh)
  local_batch = parallel.check_batch_size(config.batch_size, mesh)
  checkpointing.save_config(config, workdir)
  total_steps = int(config.total_steps)

  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
  start = ckpt.latest_step()

  def host_batches(first_step: int = start or 0) -> Iterator[dict[str, np.ndarray]]:
    # Runs in the prefetch thread, so the input pipeline's start (TensorFlow's import, building the dataset, the
    # first batches) overlaps the JAX side's below (model, state, loading or compiling the step). An error of
    # the pipeline surfaces at the first step.
    yield from train_iter_fn(config, start_step=first_step, process_index=pid, process_count=nproc)

  prefetch = parallel.Prefetcher(host_batches(), mesh, size=config.prefetch)
  try:
    cache_dir = exec_cache.default_dir() if injected_model is None and injected_loss is None else None
    # A warm start loads the train step's executable (the entry this config used last) in a thread from here on,
    # while the model and the state are built below: XLA's load releases the GIL (exec_cache.prefetch; used
    # only if the full key matches). The pointer is named by the config, known before the model exists.
    lookup_parts = {"model": config.model.to_json(sort_keys=True), "loss": config.loss.to_json(sort_keys=True),
                    "optim": config.optim.to_json(sort_keys=True), "total_steps": total_steps,
                    "trainable_levels": tuple(config.trainable_levels)}
    # Per-program XLA options of the train and eval steps (config.compiler_options; PWC-Net's keep YNNPACK to
    # the convolutions), part of the executable cache's key and of the pointer's name.
    options = compiler_options(config)
    # The first fast_compile_steps global steps of a run (CPU only) use the step compiled at LLVM -O0 (about half
    # the compile); a resume at or after that step never does. Which executable runs a step is fixed by the
    # config and the step, so results never depend on how long the full compile took.
    fast_steps = fast_compile_steps(config)
    tiered = fast_steps > 0 and jax.default_backend() == "cpu" and (start or 0) < fast_steps
    # Tiered: the full step is loaded by the background thread after the fast one (no two loads at once).
    first_name, first_options = exec_cache.first_entry("train_step", options, tiered)
    step_prefetch = exec_cache.prefetch(first_name, lookup_parts, cache_dir, first_options)
    # A fresh run (nothing to resume) also starts the parameters' host draws in threads: the values of the tree
    # this config led to last, used only if the model's tree, rules and seed match (param_init).
    host_prefetch = param_init.prefetch_host_variables(lookup_parts, config.seed, cache_dir) if start is None \
        else None
    model = model if model is not None else build_model(config)
    image_shape = (1, INIT_SIZE, INIT_SIZE, 3)  # same parameter shapes at any crop; a small abstract trace
    # What the train step and the init program depend on besides their arguments and jaxflow's sources: the
    # model (repr: every field), the loss, the optimiser and its schedule length, the frozen SpyNet levels.
    cache_parts = {"model": repr(model), "loss": config.loss.to_json(sort_keys=True),
                   "optim": config.optim.to_json(sort_keys=True), "total_steps": total_steps,
                   "trainable_levels": tuple(config.trainable_levels)}
    # Parameter shapes and initialisers from one abstract (traced, never compiled) model.init; values are drawn
    # on the host by create_train_state (jaxflow.param_init).
    variables = param_init.abstract_variables(model, image_shape, cache_dir=cache_dir, lookup_parts=lookup_parts)
    trainable = None
    if tuple(config.trainable_levels):
      if config.model.name != "spynet":
        raise ValueError(f"config.trainable_levels={tuple(config.trainable_levels)} is only for spynet, "
                         f"not {config.model.name!r}")
      from jaxflow.models import spynet
      trainable = spynet.trainable_mask(variables[0]["params"], tuple(config.trainable_levels))
    tx = optim.make_optimizer(config.optim, total_steps, trainable)
    schedule = optim.make_schedule(config.optim, total_steps)

    state, abstract = create_train_state(make_init_fn(model, tx, image_shape, variables=variables),
                                         config.seed, rep, exec_cache_dir=cache_dir, cache_key_parts=cache_parts,
                                         host_prefetch=host_prefetch)
    state_sharding = jax.tree.map(lambda a: a.sharding, abstract)
    if start is not None:
      state = ckpt.restore(abstract, start)
      _log(f"resumed from {ckpt.directory}/{start}")
    else:
      start = 0
      if config.init_from:
        state = _init_from(config, state, rep)
    _log(f"model {config.model.name}: {param_count(state.params):,} parameters; {jax.device_count()} devices "
         f"({nproc} processes); global batch {config.batch_size}; steps {start} -> {total_steps}")

    train_step = jax.jit(steps.make_train_step(model, tx, loss_fn), in_shardings=(state_sharding, dshard),
                         out_shardings=(state_sharding, rep), donate_argnums=0, compiler_options=options)
    # Warm starts load the compiled step from disk (no tracing): keyed by cache_parts, the argument signature,
    # the options and the jaxflow sources (jaxflow.exec_cache); off without a compilation cache dir and for
    # injected models / losses (their code is not hashed): then it only compiles (an option XLA rejects is an
    # error naming config.compiler_options.<name>).
    if tiered:
      # Same jitted function (donation, shardings), one lowering compiled twice: options + O0, then options.
      train_step = exec_cache.TieredStep.build(train_step, "train_step", cache_parts, cache_dir, options, fast_steps,
                                               prefetched=step_prefetch, lookup_parts=lookup_parts,
                                               options_prefix=OPTIONS_PREFIX)
    else:
      full_step = exec_cache.CachedFunction(train_step, "train_step", cache_parts, cache_dir, options,
                                            prefetched=step_prefetch, lookup_parts=lookup_parts,
                                            options_prefix=OPTIONS_PREFIX)
      train_step = lambda step, state, batch, _f=full_step: _f(state, batch)
    eval_step = jax.jit(steps.make_eval_step(model), in_shardings=(state_sharding, dshard),
                        out_shardings=(rep, dshard), compiler_options=options)
  except BaseException:
    prefetch.close()
    ckpt.close()
    raise

  writer = MetricWriter(workdir, config.log_tensorboard, start)
  best: dict[str, Any] = {}
  val_images: dict[str, np.ndarray] | None = None

  def evaluate(state: TrainState, step: int) -> dict[str, float]:
    nonlocal val_images
    results: dict[str, float] = {}
    for name, ev in sorted(config.evals.items()):
      bs = int(ev.batch_size)
      if bs <= 0 or bs % nproc:
        raise ValueError(f"config.evals.{name}.batch_size={bs} must be a positive multiple of the number of "
                         f"processes ({nproc})")
      # Pad each process's rows up to a multiple of its devices (rows with valid = 0 do not count), so sets of
      # mixed image sizes can be evaluated one image per process.
      local_devices = mesh.devices.size // nproc
      per_process = -(-(bs // nproc) // local_devices) * local_devices
      sums = None
      first = None
      for i, host_batch in enumerate(eval_iter_fn(config, ev.dataset, batch_size=bs, process_index=pid,
                                                  process_count=nproc)):
        if ev.num_batches and i >= ev.num_batches:
          break
        keys = ("image1", "image2", "flow", "valid") + (("occlusion",) if "occlusion" in host_batch else ())
        host_batch = _pad_batch({k: host_batch[k] for k in keys}, per_process)
        batch = parallel.to_global(host_batch, mesh)
        s, flow = eval_step(state, batch)
        # Summed on the host in float64 / int64 (exact pixel counts for any set size).
        sums = metrics_lib.accumulate_sums(sums, s)
        if i == 0:
          first = (host_batch, flow)
      if sums is None:
        raise ValueError(f"evaluation {name!r} (dataset {ev.dataset!r}) produced no batches")
      means = steps.finalize_sums(sums)
      results.update({f"{name}/{k}": v for k, v in means.items()})
      if config.log_images and writer._tb is not None and first is not None:
        _write_flow_images(writer, step, name, first[0], first[1])
    return results

  key_metric = config.best_metric
  stop = _StopRequest()
  acc = None
  acc_steps = 0
  last_time, last_step = time.time(), start
  step = start
  interrupted = False
  try:
    with stop:
      try:
        while step < total_steps:
          batch = next(prefetch)
          state, metrics = train_step(step, state, batch)
          acc = metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)
          acc_steps += 1
          step += 1
          at_end = step == total_steps
          log_now = step % config.log_every_steps == 0 or at_end
          stop_now = stop_after_steps is not None and step - start >= stop_after_steps
          if nproc == 1:
            stop_now = stop_now or stop.requested
          elif log_now:  # multi-process: agree at logging points only (a tiny collective)
            stop_now = stop_now or parallel.allgather_flag(stop.requested)
          if log_now or stop_now:
            _check_finite(state, ckpt)
            means = {f"train/{k}": float(v) / acc_steps for k, v in jax.device_get(acc).items()}
            now = time.time()
            rate = (step - last_step) * config.batch_size / max(now - last_time, 1e-9)
            eta = (total_steps - step) * config.batch_size / max(rate, 1e-9)
            means["train/lr"] = float(schedule(step - 1))
            means["train/pairs_per_s"] = rate
            writer.write(step, means)
            _log(f"step {step}/{total_steps}  loss {means['train/loss']:.4f}  epe {means['train/epe']:.3f}  "
                 f"{rate:.1f} pairs/s  ETA {_format_eta(eta)}")
            acc, acc_steps, last_time, last_step = None, 0, now, step
          if config.eval_every_steps and (step % config.eval_every_steps == 0) and not at_end and config.evals:
            _check_finite(state, ckpt)
            results = evaluate(state, step)
            _update_best(best, results, key_metric, step)
            writer.write(step, results)
            # The console gets the headline figures; metrics.jsonl and TensorBoard get every one.
            shown = {k: v for k, v in results.items() if k.rsplit("/", 1)[-1] in _CONSOLE_METRICS}
            _log(f"eval step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items())))
          if (step % config.checkpoint_every_steps == 0) and not at_end:
            _check_finite(state, ckpt)
            ckpt.save(step, state)
          if stop_now:
            interrupted = True
            break
      except KeyboardInterrupt:
        interrupted = True
        _log(f"interrupted at step {step}")
      _check_finite(state, ckpt)
      ckpt.save(step, state)
      ckpt.wait()
      if interrupted:
        _log(f"stopped at step {step}; checkpoint saved in {ckpt.directory}/{step}")
        writer.flush()
        return {"step": step, "final": {}, "best": best, "state": state, "interrupted": True,
                "tiers": list(getattr(train_step, "tiers", []))}
      final: dict[str, float] = {}
      if config.evals:
        final = evaluate(state, step)
        _update_best(best, final, key_metric, step)
        writer.write(step, final)
        _log(f"final eval step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(final.items())))
      writer.write(step, final, final=True, best=best)
      writer.flush()
      return {"step": step, "final": final, "best": best, "state": state, "interrupted": False,
              "tiers": list(getattr(train_step, "tiers", []))}
  finally:
    if isinstance(train_step, exec_cache.TieredStep):  # an early exit: let the background compile finish (and store)
      try:
        train_step.wait_full()
      except BaseException:  # noqa: BLE001 - the run's own outcome is what is reported
        pass
    prefetch.close()
    ckpt.close()


def _check_finite(state: TrainState, ckpt: checkpointing.Checkpointer) -> None:
  bad = int(jax.device_get(state.bad_step))
  if bad >= 0:
    latest = ckpt.latest_step()
    raise NonFiniteLossError(
        f"non-finite loss or gradients at step {bad} (0-based; no update was applied from then on); stopping "
        f"without saving. Last good checkpoint: {'none' if latest is None else f'{ckpt.directory}/{latest}'}. "
        "Lower config.optim.base_lr or set config.optim.clip_grad_norm.")


def _update_best(best: dict[str, Any], results: dict[str, float], key: str, step: int) -> None:
  if key in results and ("value" not in best or results[key] < best["value"]):
    best.update({"metric": key, "value": results[key], "step": step})


def _write_flow_images(writer: MetricWriter, step: int, name: str, host_batch: dict[str, np.ndarray],
                       flow: jax.Array) -> None:
  """Colour-coded predicted and ground-truth flows (and frame 1) of the first examples of a fixed batch."""
  from jaxflow import viz
  n = min(3, len(host_batch["image1"]))
  local = np.asarray(jax.device_get(flow.addressable_shards[0].data)) if not flow.is_fully_addressable else \
      np.asarray(jax.device_get(flow))
  n = min(n, len(local))
  gt = host_batch["flow"][:n]
  # One colour scale per example (the ground truth's maximum), so prediction and truth are comparable.
  pred_rgb, gt_rgb = [], []
  for i in range(n):
    scale = max(float(np.max(np.linalg.norm(gt[i], axis=-1))), 1e-6)
    pred_rgb.append(viz.flow_to_color(local[i], max_radius=scale))
    gt_rgb.append(viz.flow_to_color(gt[i], max_radius=scale))
  frame = (np.clip(host_batch["image1"][:n], 0, 1) * 255).astype(np.uint8)
  grid = np.concatenate([frame, np.stack(gt_rgb), np.stack(pred_rgb)], axis=2)
  writer.images(step, f"{name}/image1_gt_pred", grid)
