r"""Training-step throughput of the models on this machine, against its measured matmul peak.

  python -m experiments.benchmarks.train_throughput --model pwcnet --height 128 --width 192 --batch 4
  python -m experiments.benchmarks.train_throughput --model flownet_c --height 128 --width 192 --batch 4 --dtype bfloat16
  python -m experiments.benchmarks.train_throughput --all --height 128 --width 192 --batch 4 --json runs/throughput.json

Per model and dtype it prints: compile time (lowering + XLA compile of the whole jitted, donated train step),
first-step time (compile + first execution), steady step time (median over --steps executions, synchronised),
pairs/s, the FLOPs and bytes accessed of one step from XLA's cost analysis, the achieved FLOP/s and its fraction
of this machine's peak, measured in the same run as the FLOP/s of a large float32 (or bfloat16) matmul on all
devices of the mesh. The peak RSS of the process (MiB) is reported too. The step is the real trainer step
(multiscale loss, Adam with weight decay), on random inputs sharded over all local devices.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

MODELS = ("flownet_s", "flownet_c", "spynet", "pwcnet")


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def measure_peak_flops(dtype, n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of an n x n x n matmul per device, run on every device at once (sharded batch of matmuls)."""
  from jaxflow import parallel
  mesh = parallel.make_mesh()
  d = mesh.devices.size
  sharding = parallel.data_sharding(mesh)
  a = jax.device_put(jnp.ones((d, n, n), dtype), sharding)
  b = jax.device_put(jnp.ones((d, n, n), dtype), sharding)
  f = jax.jit(lambda x, y: jnp.einsum("bij,bjk->bik", x, y, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2.0 * d * n ** 3 / min(times)


def benchmark(model_name: str, height: int, width: int, batch: int, dtype: str, steps: int,
              peak: float) -> dict:
  from jaxflow import losses, optim, parallel
  from jaxflow import steps as steps_lib
  from jaxflow.models import get_model
  from jaxflow.train_state import create_train_state, make_init_fn
  model = get_model(model_name, dtype=dtype)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(batch, mesh)
  shape = (batch, height, width, 3)
  rng = np.random.default_rng(0)
  host = {"image1": rng.random(shape, dtype=np.float32), "image2": rng.random(shape, dtype=np.float32),
          "flow": rng.normal(size=shape[:3] + (2,)).astype(np.float32) * 5,
          "valid": np.ones(shape[:3], np.float32)}
  n_levels = len(jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), host["image1"][:1], host["image2"][:1])[0])["flows"])
  loss_cfg = losses.default_config()
  loss_cfg.weights = losses.FLOWNET_WEIGHTS if n_levels == 5 else (1.0,) * n_levels
  tx = optim.make_optimizer(optim.default_config(), 1000)
  rep = parallel.replicated(mesh)
  state, abstract = create_train_state(make_init_fn(model, tx, (1, height, width, 3)), 0, rep)
  state_sharding = jax.tree.map(lambda a: a.sharding, abstract)
  step_fn = jax.jit(steps_lib.make_train_step(model, tx, functools.partial(losses.compute_loss, loss_cfg)),
                    in_shardings=(state_sharding, parallel.data_sharding(mesh)), out_shardings=(state_sharding, rep),
                    donate_argnums=0)
  batch_arrays = parallel.to_global(host, mesh)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch_arrays).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  bytes_accessed = float(cost.get("bytes accessed", float("nan"))) if cost else float("nan")
  state, metrics = compiled(state, batch_arrays)
  jax.block_until_ready(metrics)
  first_step_s = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch_arrays)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  # XLA's cost analysis of an SPMD-partitioned module counts one device's share; scale to the whole mesh.
  devices = mesh.devices.size
  total_flops = flops * devices
  achieved = total_flops / step_s
  return {"model": model_name, "dtype": dtype, "height": height, "width": width, "batch": batch,
          "devices": devices, "compile_s": compile_s, "first_step_s": first_step_s, "step_s": step_s,
          "pairs_per_s": batch / step_s, "flops_per_step": total_flops, "bytes_accessed_per_step": bytes_accessed * devices,
          "achieved_flops_per_s": achieved, "peak_flops_per_s": peak, "fraction_of_peak": achieved / peak,
          "loss": float(metrics["loss"]), "peak_rss_mib": peak_rss_mib()}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description="Training-step throughput vs measured matmul peak.")
  parser.add_argument("--model", choices=MODELS)
  parser.add_argument("--all", action="store_true", help="all four models in float32 and bfloat16")
  parser.add_argument("--height", type=int, default=128)
  parser.add_argument("--width", type=int, default=192)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--steps", type=int, default=5, help="timed steps after the first")
  parser.add_argument("--json", default=None, help="write the results (a list of dicts) to this file")
  args = parser.parse_args(argv)
  if not args.all and not args.model:
    parser.error("give --model NAME or --all")
  runs = [(m, d) for m in MODELS for d in ("float32", "bfloat16")] if args.all else [(args.model, args.dtype)]
  print(f"backend {jax.default_backend()}, {jax.device_count()} devices", flush=True)
  peaks: dict[str, float] = {}
  results = []
  for model_name, dtype in runs:
    if dtype not in peaks:
      peaks[dtype] = measure_peak_flops(jnp.dtype(dtype))
      print(f"measured matmul peak ({dtype}): {peaks[dtype] / 1e9:.1f} GFLOP/s", flush=True)
    r = benchmark(model_name, args.height, args.width, args.batch, dtype, args.steps, peaks[dtype])
    results.append(r)
    print(f"{model_name:10s} {dtype:8s} {args.height}x{args.width} b{args.batch}: compile {r['compile_s']:.1f} s, "
          f"first step {r['first_step_s']:.1f} s, step {r['step_s'] * 1e3:.0f} ms, {r['pairs_per_s']:.2f} pairs/s, "
          f"{r['flops_per_step'] / 1e9:.2f} GFLOP/step, {r['bytes_accessed_per_step'] / 1e9:.2f} GB/step, "
          f"{r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * r['fraction_of_peak']:.1f}% of peak, "
          f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
