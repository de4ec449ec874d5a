"""Named evaluators built from `config.evals`, each `run(state) -> {"<name>/<metric>": value}`.

`config.evals` maps a name to {dataset, batch_size, num_batches (0 = all)}; the dataset is any eval set of
data_pipelines.pipeline.eval_iterator (e.g. 'synthetic_val', 'sintel_clean', 'kitti2015'). An evaluator runs
the model (params / batch_stats of a TrainState or of a restored checkpoint) on every batch in one jitted
step that returns the summed metrics of jaxflow.metrics (padded rows have valid = 0 and do not count), adds
them on the host in float64 / int64, and finalises them, so each number is the mean over all valid pixels of
the set: epe, outlier_{1,3,5}px, fl_all, the Sintel speed bands (and epe_occ / epe_noc when the set has
occlusion masks). The trainer's own evaluation loop (sharded over its mesh, padded per process) reports the same
metric set through jaxflow.steps.eval_sums, plus the zero-flow baseline.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxflow import metrics

EvalIterFn = Callable[..., Iterable[Mapping[str, np.ndarray]]]


def _default_eval_iter(config: Any, name: str, *, batch_size: int, process_index: int, process_count: int):
  from data_pipelines import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.eval_iterator(config, name, batch_size=batch_size, process_index=process_index,
                                process_count=process_count)


class Evaluator:
  """One named evaluation: `run(state)` -> {'<name>/<metric>': float}, plus '<name>/num_pixels'.

  Args:
    name: the key of config.evals. dataset, batch_size, num_batches: its fields.
    model: the linen Module. config: the full config (passed to eval_iter_fn).
    eval_iter_fn: (config, dataset, batch_size=, process_index=, process_count=) -> numpy batches
      (default: data_pipelines.pipeline.eval_iterator).
  """

  def __init__(self, name: str, dataset: str, batch_size: int, num_batches: int, model: Any, config: Any,
               eval_iter_fn: EvalIterFn | None = None):
    if batch_size < 1:
      raise ValueError(f"config.evals.{name}.batch_size must be >= 1, got {batch_size}")
    self.name, self.dataset, self.batch_size, self.num_batches = name, dataset, int(batch_size), int(num_batches)
    self.model, self.config = model, config
    self.eval_iter_fn = eval_iter_fn or _default_eval_iter
    self._step = jax.jit(self._sums)

  def _sums(self, params, batch_stats, batch):
    variables = {"params": params}
    if jax.tree.leaves(batch_stats):
      variables["batch_stats"] = batch_stats
    flow = self.model.apply(variables, batch["image1"], batch["image2"], train=False)["flow"]
    return metrics.flow_metric_sums(flow.astype(jnp.float32), batch["flow"], batch["valid"],
                                    batch.get("occlusion"))

  def run(self, state: Any) -> dict[str, float]:
    """Evaluates `state` (anything with .params and optionally .batch_stats, or a dict of them)."""
    get = (lambda k: state.get(k)) if isinstance(state, Mapping) else (lambda k: getattr(state, k, None))
    params, batch_stats = get("params"), get("batch_stats") or {}
    total = None
    for i, batch in enumerate(self.eval_iter_fn(self.config, self.dataset, batch_size=self.batch_size,
                                                process_index=jax.process_index(),
                                                process_count=jax.process_count())):
      if self.num_batches and i >= self.num_batches:
        break
      keys = ("image1", "image2", "flow", "valid") + (("occlusion",) if "occlusion" in batch else ())
      missing = [k for k in ("image1", "image2", "flow", "valid") if k not in batch]
      if missing:
        raise KeyError(f"evaluation {self.name!r} (dataset {self.dataset!r}): batch {i} lacks {missing}")
      sums = self._step(params, batch_stats, {k: jnp.asarray(batch[k]) for k in keys})
      total = metrics.accumulate_sums(total, sums)
    if total is None:
      raise ValueError(f"evaluation {self.name!r} (dataset {self.dataset!r}) produced no batches")
    if int(total["count"]) == 0:
      raise ValueError(f"evaluation {self.name!r} (dataset {self.dataset!r}) saw no valid pixels")
    return {f"{self.name}/{k}": float(v) for k, v in metrics.finalize(total).items()}


def build_evaluators(config: Any, model: Any, eval_iter_fn: EvalIterFn | None = None) -> dict[str, Evaluator]:
  """One Evaluator per entry of config.evals (sorted by name); missing fields raise naming the entry."""
  out = {}
  for name in sorted(config.evals):
    ev = config.evals[name]
    for key in ("dataset", "batch_size", "num_batches"):
      if key not in ev:
        raise KeyError(f"config.evals.{name} needs the key {key!r} (has {sorted(ev)})")
    out[name] = Evaluator(name, ev["dataset"], ev["batch_size"], ev["num_batches"], model, config, eval_iter_fn)
  return out


def run_all(evaluators: Mapping[str, Evaluator], state: Any) -> dict[str, float]:
  """Runs every evaluator on `state`; returns the union of their metric dicts."""
  results: dict[str, float] = {}
  for ev in evaluators.values():
    results.update(ev.run(state))
  return results
