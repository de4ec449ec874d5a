"""Shared by the training tests: a tiny registered model, a deterministic fake input stream, a tiny config,
and a command-line entry (`python tests/train_helpers.py WORKDIR [--steps N] ...`) used by the subprocess tests
(SIGKILL resume, several processes)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any, Iterator

import numpy as np

if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

# The training tests build the same tiny train step many times (new jit objects per run, and in subprocesses):
# a persistent compilation cache turns the repeats into cache hits. Only affects compile time, never results.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "jaxflow_train_tests_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

CROP = (32, 32)


class TinyFlow(nn.Module):
  """Two convolutions on the stacked pair -> flow; `flows` = [half-resolution flow, full flow].

  Deliberately not registered (a registry-wide test elsewhere must not see it): passed to the trainer directly.
  """
  features: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image1, image2, train: bool = False):
    x = jnp.concatenate([image1, image2], axis=-1).astype(self.dtype)
    x = nn.relu(nn.Conv(self.features, (3, 3), dtype=self.dtype, param_dtype=jnp.float32)(x))
    flow = nn.Conv(2, (3, 3), dtype=self.dtype, param_dtype=jnp.float32)(x).astype(jnp.float32) * 4.0
    b, h, w, _ = flow.shape
    coarse = jax.image.resize(flow, (b, h // 2, w // 2, 2), "bilinear")
    return {"flow": flow, "flows": [coarse, flow]}


def example(seed: int, index: int, crop: tuple[int, int] = CROP) -> dict[str, np.ndarray]:
  """One deterministic pair: a random image and its copy shifted by an integer flow, a pure function of (seed, index)."""
  rng = np.random.default_rng([seed, index])
  h, w = crop
  base = rng.random((h + 8, w + 8, 3), dtype=np.float32)
  du, dv = rng.integers(-3, 4, size=2)
  image1 = base[4:4 + h, 4:4 + w]
  image2 = base[4 - dv:4 - dv + h, 4 - du:4 - du + w]  # I2(x + d) = I1(x)
  flow = np.broadcast_to(np.array([du, dv], np.float32), (h, w, 2)).copy()
  return {"image1": image1, "image2": image2, "flow": flow, "valid": np.ones((h, w), np.float32)}


def stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def fake_train_iter(config, *, start_step: int, process_index: int, process_count: int
                    ) -> Iterator[dict[str, np.ndarray]]:
  """Global step s covers examples [s*B, (s+1)*B); process p gets its contiguous slice (the pipeline contract)."""
  b = config.batch_size
  per = b // process_count
  step = start_step
  while True:
    first = step * b + process_index * per
    yield stack([example(config.seed, i, tuple(config.data.crop_size)) for i in range(first, first + per)])
    step += 1


def fake_eval_iter(config, name: str, *, batch_size: int, process_index: int, process_count: int
                   ) -> Iterator[dict[str, np.ndarray]]:
  """A fixed held-out set of 6 pairs (seed 10_000) with out-of-view occlusion masks; the last batch of 4 is padded
  with valid = 0 rows."""
  if name != "synthetic_val":
    raise ValueError(f"unknown eval set {name!r}")
  per = batch_size // process_count
  n = 6
  for start in range(0, n, batch_size):
    rows = []
    for i in range(start + process_index * per, start + (process_index + 1) * per):
      e = example(10_000, min(i, n - 1), tuple(config.data.crop_size))
      # Occlusion as the pipeline defines it: pixels of frame 1 whose flow leaves the frame (out of view).
      h, w = e["valid"].shape
      ys, xs = np.mgrid[0:h, 0:w]
      x2, y2 = xs + e["flow"][..., 0], ys + e["flow"][..., 1]
      e["occlusion"] = ((x2 < 0) | (x2 > w - 1) | (y2 < 0) | (y2 > h - 1)).astype(np.float32)
      if i >= n:  # padding rows, as the real pipeline does: zeros with valid = 0
        e = {k: np.zeros_like(v) for k, v in e.items()}
      rows.append(e)
    yield stack(rows)


def tiny_config(**overrides: Any) -> ml_collections.ConfigDict:
  """A complete trainer config for tiny_test on 32x32 pairs (no pipeline config needed)."""
  from jaxflow import losses, optim
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 4
  c.total_steps = 6
  c.model = {"name": "tiny_test", "features": 8, "dtype": "float32"}
  c.loss = losses.default_config()
  c.loss.weights = (0.5, 1.0)
  c.optim = optim.default_config()
  c.optim.base_lr = 1e-2
  c.optim.boundaries = (3,)
  c.data = {"crop_size": CROP}
  c.evals = {"synthetic_val": {"dataset": "synthetic_val", "batch_size": 4, "num_batches": 0}}
  c.eval_every_steps = 0
  c.best_metric = "synthetic_val/epe"
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2
  c.keep_checkpoints = 10
  c.log_tensorboard = False
  c.log_images = False
  c.prefetch = 2
  c.init_from = ""
  c.trainable_levels = ()
  for k, v in overrides.items():
    c[k] = v
  return c


def tiny_model(config) -> Any:
  if config.model.name != "tiny_test":
    return None  # the trainer builds registered models itself
  return TinyFlow(features=config.model.features)


def run(config, workdir: str, **kwargs):
  from jaxflow import trainer
  kwargs.setdefault("train_iter_fn", fake_train_iter)
  return trainer.train_and_evaluate(config, workdir, eval_iter_fn=fake_eval_iter, model=tiny_model(config),
                                    **kwargs)


def params_npz(state) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--checkpoint_every", type=int, default=2)
  parser.add_argument("--slow", type=float, default=0.0, help="sleep per input batch (seconds)")
  parser.add_argument("--coordinator", default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--out", default=None, help="write the final params to this .npz")
  args = parser.parse_args()
  from jaxflow import parallel
  parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  config = tiny_config(total_steps=args.steps, batch_size=args.batch, checkpoint_every_steps=args.checkpoint_every)
  train_iter = fake_train_iter
  if args.slow:
    import time

    def train_iter(config, **kw):
      for batch in fake_train_iter(config, **kw):
        time.sleep(args.slow)
        yield batch

  result = run(config, args.workdir, train_iter_fn=train_iter)
  if args.out:
    np.savez(args.out, **params_npz(result["state"]))
  print(f"done step {result['step']} devices {jax.device_count()} processes {jax.process_count()}", flush=True)


if __name__ == "__main__":
  main()
