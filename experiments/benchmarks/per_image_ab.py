r"""A/B of the convolutions' loops over images under the trainer's 2-device data parallelism: each device looping
over its own images (`parallel.per_image` around conv's weight-gradient loops, summed per device, and around
Winograd's loop for values and input gradients: the default) against the plain loops (which XLA's partitioner
feeds by all-gathering the batch), compiled in one process and timed alternately.

  XLA_FLAGS=--xla_force_host_platform_device_count=2 \
    python -m experiments.benchmarks.per_image_ab --model pwcnet --height 128 --width 128 --batch 4 --rounds 5

The step is value_and_grad of a multiscale loss of the model's flows (parameters replicated, the images sharded on
'data', as tests/sharding_helpers.check_sharded_step). Prints per variant: the compiled step's moving collectives
(all-gather / all-to-all / collective-permute) and all-reduces, compile seconds, median wall and process-CPU
seconds per step over the rounds (the variants alternate, the order flips every round) and the ratio
per_image / plain; and that the two give the same loss and gradients.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def build(model_name: str, height: int, width: int, batch: int, variant: str):
  from jaxflow import parallel
  from jaxflow.models import get_model
  from jaxflow.ops import conv, winograd
  sys.path.insert(0, "tests")
  from sharding_helpers import collectives
  if not hasattr(build, "original"):
    build.original = conv._summed_per_device, winograd.conv3x3_same

  def winograd_plain(x, w, images_per_step=1, splits=None):
    bounds = np.cumsum([0] + ([w.shape[3]] if splits is None else [int(c) for c in splits])).tolist()
    return winograd._conv3x3_same(x, w, images_per_step, splits, bounds)

  plain = (lambda fn, xs, g: fn(list(xs), g)), winograd_plain
  conv._summed_per_device, winograd.conv3x3_same = build.original if variant == "per_image" else plain
  model = get_model(model_name)
  rng = np.random.default_rng(0)
  im1, im2 = (rng.random((batch, height, width, 3), np.float32) for _ in range(2))
  shapes = jax.eval_shape(model.init, jax.random.key(0), im1, im2)
  variables = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.05, x.dtype), shapes)

  def loss(params, a, b):
    flows = model.apply({**variables, "params": params}, a, b)["flows"]
    return sum(jnp.mean(jnp.square(f - 0.3)) for f in flows)

  mesh = parallel.make_mesh(2)
  data, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)
  params = jax.device_put(variables["params"], rep)
  a, b = jax.device_put(im1, data), jax.device_put(im2, data)
  t = time.perf_counter()
  step = jax.jit(jax.value_and_grad(loss), in_shardings=(rep, data, data), out_shardings=(rep, rep)).lower(
      params, a, b).compile()
  seconds = time.perf_counter() - t
  hlo = step.as_text()
  reduces = sum(1 for line in hlo.splitlines() if " all-reduce(" in line or " all-reduce-start(" in line)
  conv._summed_per_device, winograd.conv3x3_same = build.original
  return step, (params, a, b), seconds, len(collectives(hlo)), reduces


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="pwcnet")
  p.add_argument("--height", type=int, default=128)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--rounds", type=int, default=5)
  args = p.parse_args(argv)
  if jax.device_count() < 2:
    raise SystemExit("needs 2 devices: XLA_FLAGS=--xla_force_host_platform_device_count=2")
  variants = ("plain", "per_image")
  built = {v: build(args.model, args.height, args.width, args.batch, v) for v in variants}
  outs = {}
  for v, (step, inputs, seconds, moved, reduces) in built.items():
    outs[v] = jax.block_until_ready(step(*inputs))  # warm-up
    print(f"{v:10s} compile {seconds:6.1f} s   moving collectives {moved:3d}   all-reduces {reduces}")
  (la, ga), (lb, gb) = outs["plain"], outs["per_image"]
  diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)))
  print(f"loss plain {float(la):.6f} per_image {float(lb):.6f}; gradients max |diff| {diff:.3g}")
  wall = {v: [] for v in variants}
  cpu = {v: [] for v in variants}
  for r in range(args.rounds):
    for v in (variants if r % 2 == 0 else variants[::-1]):
      step, inputs = built[v][:2]
      t, c = time.perf_counter(), time.process_time()
      jax.block_until_ready(step(*inputs))
      wall[v].append(time.perf_counter() - t)
      cpu[v].append(time.process_time() - c)
  for v in variants:
    print(f"{v:10s} step median {statistics.median(wall[v]):.3f} s wall, {statistics.median(cpu[v]):.3f} CPU-s "
          f"({args.rounds} rounds, {args.model} {args.height}x{args.width} b{args.batch}, 2 devices)")
  print(f"per_image / plain: wall {statistics.median(wall['per_image']) / statistics.median(wall['plain']):.3f}, "
        f"CPU {statistics.median(cpu['per_image']) / statistics.median(cpu['plain']):.3f}")


if __name__ == "__main__":
  main()
