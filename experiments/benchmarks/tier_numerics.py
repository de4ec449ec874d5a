r"""Can a train step compiled cheaply (XLA:CPU at a lower LLVM optimisation level) stand in for the optimised one
during the first steps of a cold start ("tiered compilation")? Only if both give bitwise-equal states.

  python -m experiments.benchmarks.tier_numerics --model pwcnet --levels 3 0      # then --levels 0 3 (other order)
  python -m experiments.benchmarks.tier_numerics --model flownet_s --levels 0 1 2 3 --steps 3

The program is train_throughput.py's (configs/<model>.py:chairs model, loss and optimiser, the config's
compiler_options, state not donated, random inputs, one CPU device, no persistent cache). It is traced and lowered
once; for each level in --levels (xla_backend_optimization_level, added to the config's options) it prints the
XLA compile's wall and process-CPU seconds and the median step of --steps executions (from the same initial
state), then, for every level against the last one: how many leaves of the state after --steps steps differ
bitwise, the largest absolute difference and the first step's loss. The last section compiles tiny elementwise
programs at levels 0-3 and counts the outputs that differ from level 3 (a*b + c: FMA contraction; exp, log, tanh,
sqrt / divide, pow, sum).

  python -m experiments.benchmarks.tier_numerics --model pwcnet --timeline single --timeline-steps 20
  python -m experiments.benchmarks.tier_numerics --model pwcnet --timeline tiered --timeline-steps 20

--timeline (one mode per process: XLA keeps compiled programs in memory) measures the end-to-end effect from the
end of the lowering: 'single' compiles at O3 and runs the steps; 'tiered' compiles at O0, starts the O3 compile in
a thread, runs O0 steps and switches to O3 at the first step boundary where the compile is done (non-blocking
check). Printed: seconds to steps 1, 5, 10, ... and the last step, process CPU-s, and the switch step.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="pwcnet")
  p.add_argument("--height", type=int, default=128)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--levels", type=int, nargs="+", default=[0, 3])
  p.add_argument("--timeline", choices=("single", "tiered"), default=None)
  p.add_argument("--timeline-steps", type=int, default=20)
  args = p.parse_args(argv)

  import jax
  import ml_collections
  import numpy as np

  from jaxflow import losses, optim, parallel
  from jaxflow import platform as jaxflow_platform
  from jaxflow import steps as steps_lib
  from jaxflow.models import get_model
  from jaxflow.train_state import INIT_SIZE, create_train_state, make_init_fn
  import train_throughput as tt

  jaxflow_platform.configure(cache_dir=None)
  print(f"load {os.getloadavg()[0]:.2f} at start", flush=True)
  model_fields, loss_cfg, optim_fields = tt._model_settings(args.model)
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in model_fields.items() if k != "name"}
  model = get_model(args.model, **fields)
  mesh = parallel.make_mesh(1)
  rep = parallel.replicated(mesh)
  ocfg = optim.default_config()
  ocfg.update(optim_fields)
  tx = optim.make_optimizer(ocfg, 1000)
  state, abstract = create_train_state(make_init_fn(model, tx, (1, INIT_SIZE, INIT_SIZE, 3)), 0, rep)
  sharding = jax.tree.map(lambda a: a.sharding, abstract)
  options = jaxflow_platform.compiler_options(tt.model_compiler_options(args.model), "compiler option ") or {}
  step = jax.jit(steps_lib.make_train_step(model, tx, functools.partial(losses.compute_loss,
                                                                        ml_collections.ConfigDict(loss_cfg))),
                 in_shardings=(sharding, parallel.data_sharding(mesh)), out_shardings=(sharding, rep))
  batch = parallel.to_global(tt._host_batch(args.batch, args.height, args.width), mesh)
  t = time.perf_counter()
  lowered = step.lower(state, batch)
  print(f"{args.model} {args.height}x{args.width} b{args.batch}: lower {time.perf_counter() - t:.1f} s; "
        f"options {options}", flush=True)
  if args.timeline:
    _timeline(args, lowered, options, state, batch)
    return 0
  results = {}
  for level in args.levels:
    t, c = time.perf_counter(), time.process_time()
    compiled = lowered.compile(compiler_options={**options, "xla_backend_optimization_level": level})
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    s, times, losses_ = state, [], []
    for _ in range(args.steps):
      t = time.perf_counter()
      s, metrics = compiled(s, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t)
      losses_.append(float(metrics["loss"]))
    results[level] = (jax.tree.leaves(jax.device_get(s)), losses_)
    print(f"  O{level}: compile {wall:.1f} s wall / {cpu:.1f} CPU-s; step median {statistics.median(times):.3f} s "
          f"(load {os.getloadavg()[0]:.2f})", flush=True)
  ref = args.levels[-1]
  for level in args.levels[:-1]:
    a, b = results[level][0], results[ref][0]
    differ = sum(not np.array_equal(x, y) for x, y in zip(a, b))
    diff = max((float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(a, b)
                if np.size(x)), default=0.0)
    print(f"  O{level} vs O{ref} after {args.steps} steps: {differ}/{len(a)} state leaves differ bitwise, max |diff| "
          f"{diff:.3g}; first loss {results[level][1][0]!r} vs {results[ref][1][0]!r}", flush=True)

  import jax.numpy as jnp
  x = jnp.asarray(np.random.default_rng(0).standard_normal(4099).astype(np.float32))
  y = jnp.asarray(np.random.default_rng(1).standard_normal(4099).astype(np.float32))
  tiny = {"a*b + 1.3*a": lambda a, b: a * b + 1.3 * a, "exp": lambda a, b: jnp.exp(a),
          "log": lambda a, b: jnp.log(jnp.abs(a) + 0.1), "tanh": lambda a, b: jnp.tanh(a),
          "sqrt/div": lambda a, b: a / (jnp.sqrt(jnp.abs(b)) + 1e-8), "pow": lambda a, b: jnp.abs(a) ** b,
          "sum(a*b)": lambda a, b: jnp.sum(a * b)}
  for name, fn in tiny.items():
    lo = jax.jit(fn).lower(x, y)
    out = {lv: np.asarray(lo.compile(compiler_options={"xla_backend_optimization_level": lv})(x, y))
           for lv in (0, 1, 2, 3)}
    print(f"  tiny {name}: elements differing from O3: " +
          ", ".join(f"O{lv} {int(np.sum(out[lv] != out[3]))}/{out[3].size}" for lv in (0, 1, 2)), flush=True)
  return 0


def _timeline(args, lowered, options, state, batch) -> None:
  import concurrent.futures

  import jax
  t0, c0 = time.perf_counter(), time.process_time()
  marks, switch = [], None
  level = 3 if args.timeline == "single" else 0
  compiled = lowered.compile(compiler_options={**options, "xla_backend_optimization_level": level})
  t_first_compile = time.perf_counter() - t0
  pending = None
  if args.timeline == "tiered":
    pool = concurrent.futures.ThreadPoolExecutor(1)
    pending = pool.submit(lowered.compile, compiler_options={**options, "xla_backend_optimization_level": 3})
  s = state
  for i in range(args.timeline_steps):
    if pending is not None and pending.done():
      compiled, pending, switch = pending.result(), None, i
    s, metrics = compiled(s, batch)
    jax.block_until_ready(metrics)
    marks.append(time.perf_counter() - t0)
  n = args.timeline_steps
  shown = [k for k in (1, 5, 10, 20, 30, 50, 100) if k < n] + [n]
  print(f"  timeline {args.timeline}: first compile (O{level}) {t_first_compile:.1f} s; "
        + ", ".join(f"step {k} at {marks[k - 1]:.1f} s" for k in shown)
        + f"; process CPU {time.process_time() - c0:.1f} s; switched to O3 before step "
        + (f"{switch + 1}" if switch is not None else ("- (single)" if args.timeline == "single" else "never"))
        + f"; last step {marks[-1] - marks[-2]:.3f} s (load {os.getloadavg()[0]:.2f})", flush=True)


if __name__ == "__main__":
  sys.exit(main())
