r"""Warm start to the end of the first training step, per model, with alternated A/B variants and repeats.

  python -m experiments.benchmarks.warm_start --model pwcnet --repeats 5
  python -m experiments.benchmarks.warm_start --model flownet_s --model pwcnet --repeats 4 \
      --env-b "JAXFLOW_BENCH_LATE_LOAD=1"        # A = as is, B = with this environment variable; alternated
  python -m experiments.benchmarks.warm_start --model pwcnet --options-a none --options-b config
      # the step compiled with XLA's default options (A) against the model config's compiler options (B)

Each configuration (128x128, batch 4 by default: the `local` configs' size) first fills an executable cache with
one worker per variant of experiments/benchmarks/train_throughput.py (the trainer's start-up path; cold unless
the cache already holds it), then starts
`--repeats` fresh warm workers per variant, alternating A, B, A, B, ... so a change of machine load hits both.
Every warm worker runs its first step, then `--steps` steady steps; reported per worker and as medians:
  first    wall seconds from launching the process (before it imports jax) to the end of the first step;
  steady   the median of the steady steps after it (seconds);
  overhead first - steady: what the start costs beyond one step (import, init, executable load, the first
           execution's extra cost);
  import / init / data / wait   train_throughput's split (wait: the time spent in the step's compile call,
           i.e. waiting for the background executable load); load: that load's whole duration (started right
           after `import jax`); exec: the first execution itself (wall, CPU);
  cpu      process CPU seconds to the end of the first step (robust to other jobs on the machine).
The first step's loss is printed too: it is a function of the seed only, so variants must agree exactly (XLA
options that change the program, e.g. which fusions YNNPACK runs, may move it by a few ulps: summation order).
--options-a / --options-b: the train step's XLA compiler options of each variant ('config': the model config's,
as the trainer; 'none': XLA's defaults; or 'NAME=VALUE ...'); A defaults to 'config', B to A's.
--in-process N (with --options-b, without --env-b): after the workers, one more process loads the variants' stored
train steps alternately N times each and prints the medians of the load's CPU seconds (XLA's rebuild, as the
background load does it) and of the first and second executions' CPU seconds: the start's two option-dependent
parts, measured where the machine's load cannot favour one variant.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import shlex
import statistics
import sys
import tempfile
from typing import Any

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments.benchmarks import train_throughput as tt  # noqa: E402  (jax-free: the parent stays light)

FIELDS = ("first", "steady", "overhead", "import", "init", "data", "wait", "load", "exec", "exec_cpu", "st_cpu", "kflt",
          "st_kflt", "cpu")


def _spec(name: str, height: int, width: int, batch: int, options: str | None = None) -> dict[str, Any]:
  model, loss, optim_cfg = tt._model_settings(name)
  return {"model": model, "loss": loss, "optim": optim_cfg, "height": height, "width": width, "batch": batch,
          "dtype": "float32", "warmup": 0, "torch_threads": 1, "exec_cache": True, "init_method": "host",
          "prefetch": True, "compiler_options": tt.parse_options(options, name)}


def _run(spec: dict[str, Any], env: dict[str, str], steps: int) -> dict[str, float]:
  worker = tt.Worker("jax", spec, env)
  try:
    first = worker.read()
    worker.read()  # ready
    steady = steady_cpu = steady_faults = float("nan")
    if steps:
      reply = worker.request(f"run {steps}")
      steady, steady_cpu = statistics.median(reply["times"]), statistics.median(reply["cpu"])
      steady_faults = statistics.median(reply["minor_faults"])
  finally:
    worker.close()
  st = first["startup"]
  return {"first": first["first_step_s"], "steady": steady, "overhead": first["first_step_s"] - steady,
          "import": first["import_s"], "init": first["init_s"], "data": first["data_s"],
          "wait": first["compile_s"], "load": st.get("load_background_s", float("nan")),
          "exec": st.get("first_step_exec_s", float("nan")),
          "exec_cpu": st.get("first_step_exec_cpu_s", float("nan")), "st_cpu": steady_cpu,
          "kflt": st.get("first_step_exec_minor_faults", float("nan")) / 1e3, "st_kflt": steady_faults / 1e3, "cpu": st.get("process_cpu_s", float("nan")),
          "loss": first["loss"], "hit": bool(st.get("exec_cache_hit"))}


def _row(label: str, r: dict[str, float]) -> str:
  return f"  {label:10s} " + " ".join(f"{r[k]:8.3f}" for k in FIELDS) + f"  loss {r['loss']:.6f}" + (
      "" if r.get("hit", True) else "  (exec cache MISS)")


def _load_child(job_json: str) -> None:
  """--in-process's child: alternated loads and first / second executions of each variant's stored step."""
  import time

  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxflow import exec_cache
  from jaxflow import platform as jaxflow_platform
  job = json.loads(job_json)
  jaxflow_platform.configure(cache_dir=os.environ["JAX_COMPILATION_CACHE_DIR"], min_compile_time_secs=0)
  cache = exec_cache.default_dir()
  paths = {}
  for label, spec in job["specs"].items():
    with open(exec_cache.pointer_path(cache, "train_step", tt._lookup_parts(spec), tt._options(spec))) as f:
      paths[label] = exec_cache.entry_path(cache, "train_step", f.read().strip())
  rng = np.random.default_rng(0)

  def arguments(compiled):
    def make(path, info):  # floats small and random (the optimiser's moments positive), integers zero
      aval, name = info._aval, jax.tree_util.keystr(path)
      if jnp.issubdtype(aval.dtype, jnp.floating):
        x = rng.standard_normal(aval.shape) * 0.02
        if "opt_state" in name:
          x = np.abs(x) * 1e-3
        return jnp.asarray(x.astype(aval.dtype))
      return jnp.full(aval.shape, -1 if "bad_step" in name else 0, aval.dtype)
    return jax.tree_util.tree_map_with_path(make, compiled.args_info[0])

  keys = ("load_cpu", "first_cpu", "second_cpu")
  res = {label: {k: [] for k in keys} for label in paths}
  for _ in range(job["repeats"]):
    for label, path in paths.items():
      c = time.process_time()
      compiled = exec_cache.load(path)
      res[label]["load_cpu"].append(time.process_time() - c)
      args = arguments(compiled)
      jax.block_until_ready(args)
      for k in keys[1:]:
        c = time.process_time()
        out = jax.block_until_ready(compiled(*args))
        res[label][k].append(time.process_time() - c)
        assert bool(out[1]["finite"]), f"{label}: non-finite loss on the synthetic arguments"
        args = (out[0],) + tuple(args[1:])
      print("    " + label[:40].ljust(40) + " ".join(f"{k} {res[label][k][-1]:.3f}" for k in keys), flush=True)
      del compiled, out, args
  for label in paths:
    print("  median " + label[:33].ljust(33) + " ".join(f"{k} {statistics.median(res[label][k]):.3f}" for k in keys)
          + f"  (n={job['repeats']})", flush=True)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", action="append", choices=tt.MODELS, required=True)
  parser.add_argument("--height", type=int, default=128)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3, help="warm workers per variant")
  parser.add_argument("--steps", type=int, default=3, help="steady steps after the first, per worker")
  parser.add_argument("--env-b", default=None,
                      help="variant B: 'NAME=VALUE ...' added to the workers' environment (A: as is)")
  parser.add_argument("--options-a", default="config",
                      help="variant A's step compiler options: 'config' (the model config's), 'none', 'NAME=VALUE ...'")
  parser.add_argument("--options-b", default=None,
                      help="variant B's step compiler options (as --options-a); gives a B variant on its own")
  parser.add_argument("--in-process", type=int, default=0, metavar="N",
                      help="also load and run the variants' stored steps alternately N times in one process")
  parser.add_argument("--load-child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--cache-dir", default=None,
                      help="keep the compilation / executable cache here (reused if it exists: no cold fill "
                           "when it already holds this configuration); default: a temporary directory")
  if argv is None and "--load-child" in sys.argv:
    _load_child(sys.argv[sys.argv.index("--load-child") + 1])
    return 0
  args = parser.parse_args(argv)
  if args.in_process and (args.env_b or args.options_b is None):
    parser.error("--in-process compares --options-a with --options-b in one environment (no --env-b)")
  if args.repeats < 1 or args.steps < 0:
    parser.error("--repeats must be >= 1 and --steps >= 0")
  variants = [("A" + ("" if args.options_a == "config" else f" options {args.options_a}"), {}, args.options_a)]
  if args.env_b or args.options_b is not None:
    extra = dict(item.split("=", 1) for item in shlex.split(args.env_b or ""))
    options_b = args.options_a if args.options_b is None else args.options_b
    variants.append(("B " + " ".join(filter(None, [args.env_b, f"options {options_b}"])), extra, options_b))
  tmp = None
  cache = args.cache_dir
  if cache is None:
    tmp = tempfile.TemporaryDirectory(prefix="jaxflow_warm_start_")
    cache = tmp.name
  try:
    base = tt._jax_env(1, os.path.abspath(cache))
    print(f"{tt._cpu_model()}, {tt._usable_cores()} usable cores; load {os.getloadavg()[0]:.1f}; commit "
          f"{tt._git_commit()}; cache {cache}", flush=True)
    for name in args.model:
      specs = {label: _spec(name, args.height, args.width, args.batch, options) for label, _, options in variants}
      for label, extra, _ in variants:  # one fill per variant: B's environment may change the program or the code
        print(f"  {label}: step compiler options {specs[label]['compiler_options'] or '(XLA defaults)'}", flush=True)
        fill = _run(dict(specs[label], warmup=0), dict(base, **extra), 0)
        print(f"{name} {args.height}x{args.width} b{args.batch}: fill run of {label[0]} first step "
              f"{fill['first']:.1f} s ({'hit' if fill['hit'] else 'cold'}), loss {fill['loss']:.6f}", flush=True)
      print("  variant    " + " ".join(f"{k:>8s}" for k in FIELDS), flush=True)
      results: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in variants}
      for _ in range(args.repeats):
        for label, extra, _ in variants:
          r = _run(specs[label], dict(base, **extra), args.steps)
          results[label].append(r)
          print(_row(label[:10], r), flush=True)
      for label, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in FIELDS}
        med["loss"] = rs[0]["loss"]
        print(_row(("median " + label[0]), med) + f"  (n={len(rs)}; {label})", flush=True)
        losses = {r["loss"] for r in rs}
        if len(losses) > 1:
          print(f"  WARNING: {label}: first-step losses differ: {sorted(losses)}", flush=True)
      if len(variants) == 2:
        a, b = (statistics.median(r["first"] for r in results[v[0]]) for v in variants)
        print(f"  first step B / A: {b / a:.3f} (medians); load {os.getloadavg()[0]:.1f}", flush=True)
      if args.in_process:
        print(f"  in one process, alternated (CPU seconds); load {os.getloadavg()[0]:.1f}", flush=True)
        job = json.dumps({"specs": specs, "repeats": args.in_process})
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        subprocess.run([sys.executable, "-m", "experiments.benchmarks.warm_start", "--load-child", job], env=base,
                       cwd=root, check=True)
  finally:
    if tmp is not None:
      tmp.cleanup()
  return 0


if __name__ == "__main__":
  sys.exit(main())
