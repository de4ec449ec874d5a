r"""Where the XLA:CPU compile of a model's training step goes, and what compiler options / program changes cost.

  python -m experiments.benchmarks.compile_time --model pwcnet --height 128 --width 128 --batch 4 --phases
  python -m experiments.benchmarks.compile_time --model flownet_s --parts step,forward,grad,update,loss --phases
  python -m experiments.benchmarks.compile_time --model spynet --options "" "xla_backend_optimization_level=1" \
      --both-orders

The program is the benchmark's (experiments/benchmarks/train_throughput.py): the model, loss and optimiser of
configs/<model>.py:chairs, every parameter trained, state donated, random inputs, one CPU device, no persistent
cache. For each (part, option set), in one process:
  - trace + lower seconds, XLA compile seconds (wall and process CPU: parallel codegen shows as CPU > wall);
  - the optimised module's HLO instruction and fusion counts and the number of compiled kernels;
  - with --phases, the compile split from XLA's own trace annotations (jax.profiler): HLO passes, kernel
    emission (ThunkEmitter::EmitEntryComputation: each fusion lowered to LLVM IR through MLIR by the
    FusionCompiler, on the codegen threads), kernel hand-over (ThunkEmitter::ConsumeKernels), LLVM optimisation
    + machine code (JitCompiler::Compile: the kernels' modules split into parts compiled in parallel), the
    rest; the FusionCompiler thread-seconds per fusion kind (the kernel's name without its number) and the
    slowest single kernels;
  - then the median wall / CPU seconds of --steps executions.

Parts (--parts): 'step' the whole train step; 'forward' model + loss (no gradient); 'grad' value_and_grad of the
loss (forward + backward); 'update' the optimiser alone (tx.update + apply_updates + the step's keep-if-finite
select) on given gradients, state donated; 'loss' the multiscale loss alone on given model outputs.
Option sets (--options) are space-separated name=value XLA options, "" = defaults, "config" = the model
config's config.compiler_options (what the trainer compiles the step with); --both-orders runs the list
forwards then backwards (medians over both runs per option set), so a drift of the machine's load hits all.
--optimizer sets config.optim fields for every part, e.g. fused_update=False (jaxflow.optim's per-leaf optax
chain) against fused_update=True (jaxflow.optim.fused_adam).
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

PARTS = ("step", "forward", "grad", "update", "loss")


def _parse(opts: str) -> dict[str, object]:
  out: dict[str, object] = {}
  for tok in opts.split():
    k, v = tok.split("=", 1)
    if v.lower() in ("true", "false"):  # XLA wants a bool for bool options, not the string
      out[k] = v.lower() == "true"
    else:
      out[k] = int(v) if v.lstrip("-").isdigit() else v
  return out


def _config_options(name: str) -> dict[str, object]:
  """The XLA compiler options of configs/<name>.py:chairs (config.compiler_options), as the trainer passes them."""
  from experiments.benchmarks.train_throughput import model_compiler_options
  from jaxflow import platform
  return platform.compiler_options(model_compiler_options(name)) or {}


def _model_settings(name: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  from experiments.benchmarks.train_throughput import _model_settings as settings
  return settings(name)


def build_part(part: str, model_name: str, height: int, width: int, batch: int,
               optim_overrides: dict[str, Any] | None = None) -> tuple[Callable, tuple, Callable]:
  """(jitted function, its arguments, refresh) for one part of the benchmark's train step.

  Images (B, H, W, 3) float32 uniform in [0, 1), flow (B, H, W, 2) float32 pixels, valid all ones.
  refresh(args, outputs) -> the arguments of the next call (donated state threaded through).
  """
  import ml_collections
  import optax

  from jaxflow import losses, optim
  from jaxflow import steps as steps_lib
  from jaxflow.models import get_model
  from jaxflow.train_state import INIT_SIZE, create_train_state, make_init_fn
  if part not in PARTS:
    raise ValueError(f"--parts: unknown part {part!r}; expected some of {PARTS}")
  fields, loss_dict, optim_dict = _model_settings(model_name)
  model = get_model(fields.pop("name"), **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
  optim_cfg = optim.default_config()
  optim_cfg.update(optim_dict)
  optim_cfg.update(optim_overrides or {})
  tx = optim.make_optimizer(optim_cfg, 1_000_000)
  loss_fn = functools.partial(losses.compute_loss, ml_collections.ConfigDict(
      {k: tuple(v) if isinstance(v, list) else v for k, v in loss_dict.items()}))
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state, _ = create_train_state(make_init_fn(model, tx, (1, INIT_SIZE, INIT_SIZE, 3)), 0, dev)
  shape = (batch, height, width, 3)
  rng = np.random.default_rng(0)
  host = {"image1": rng.random(shape, dtype=np.float32), "image2": rng.random(shape, dtype=np.float32),
          "flow": rng.normal(size=shape[:3] + (2,)).astype(np.float32) * 5, "valid": np.ones(shape[:3], np.float32)}
  data = jax.device_put(host, dev)
  same = lambda args, out: args
  if part == "step":
    fn = jax.jit(steps_lib.make_train_step(model, tx, loss_fn), donate_argnums=0)
    return fn, (state, data), lambda args, out: (out[0], args[1])

  def objective(params, data):
    outputs, _ = steps_lib._apply(model, params, state.batch_stats, data, True, jax.random.key(0))
    return loss_fn(outputs, data)[0]

  if part == "forward":
    return jax.jit(objective), (state.params, data), same
  if part == "grad":
    return jax.jit(jax.value_and_grad(objective)), (state.params, data), same
  if part == "loss":
    outputs = jax.eval_shape(lambda p: steps_lib._apply(model, p, state.batch_stats, data, True,
                                                        jax.random.key(0))[0], state.params)
    outputs = jax.tree.map(lambda s: jax.device_put(rng.normal(size=s.shape).astype(s.dtype), dev), outputs)
    return jax.jit(loss_fn), (outputs, data), same
  # 'update': the optimiser part of steps.make_train_step on fixed gradients of the parameters' shapes.
  grads = jax.tree.map(lambda p: jax.device_put(rng.normal(size=p.shape).astype(p.dtype) * 1e-3, dev),
                       state.params)

  def update(state, grads):
    finite = jnp.isfinite(optax.global_norm(grads))
    params, opt_state = optim.guarded_update(tx, grads, state.opt_state, state.params, finite)
    return state.replace(params=params, opt_state=opt_state)

  return jax.jit(update, donate_argnums=0), (state, grads), lambda args, out: (out, args[1])


# Compile phases: (label, XLA trace annotation on the compiler thread).
PHASES = (("hlo_passes", "HLO passes"), ("emit_kernels", "ThunkEmitter::EmitEntryComputation"),
          ("consume_kernels", "ThunkEmitter::ConsumeKernels"), ("llvm_codegen", "JitCompiler::Compile"))


def compile_phases(trace_dir: str, top: int = 8) -> dict[str, Any]:
  """The compile split from a jax.profiler trace of one lowered.compile() call (see the module docstring).

  Returns seconds per phase (wall, on the compiler thread), 'total' (PjRtCpuClient::Compile), 'other' (the
  total minus the phases), 'kernels' (compiled functions), 'llvm_parts', 'fusion_thread_s' (FusionCompiler
  thread-seconds summed over kernels), 'by_kind' [(kind, count, thread-seconds, ops)] and 'slowest'
  [(seconds, ops, kernel)].
  """
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
  with gzip.open(path) as f:
    events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
  sec = lambda e: e["dur"] / 1e6
  out: dict[str, Any] = {"total": sum(sec(e) for e in events if e["name"] == "PjRtCpuClient::Compile")}
  for label, name in PHASES:
    out[label] = sum(sec(e) for e in events if e["name"].startswith(name))
  out["other"] = out["total"] - sum(out[label] for label, _ in PHASES)
  codegen = [e for e in events if e["name"] == "Codegen"]
  out["kernels"] = sum(int(e.get("args", {}).get("num_compiled_functions", 0)) for e in codegen)
  out["llvm_parts"] = sum(int(e.get("args", {}).get("num_default_parts", 0)) for e in codegen)
  fusions = [(sec(e), int(e.get("args", {}).get("op_count", 0)), e.get("args", {}).get("module", "?"))
             for e in events if e["name"] == "FusionCompiler::Compile"]
  out["fusion_thread_s"] = sum(f[0] for f in fusions)
  kinds: dict[str, list] = collections.defaultdict(lambda: [0, 0.0, 0])
  for s, ops, module in fusions:
    kind = re.sub(r"(\.\d+)?(_kernel_module)?$", "", module)
    kinds[kind][0] += 1
    kinds[kind][1] += s
    kinds[kind][2] += ops
  out["by_kind"] = sorted(((k, c, s, o) for k, (c, s, o) in kinds.items()), key=lambda r: -r[2])[:top]
  out["slowest"] = sorted(fusions, reverse=True)[:top]
  return out


def _fmt_phases(ph: dict[str, Any]) -> str:
  parts = ", ".join(f"{label} {ph[label]:.2f}" for label, _ in PHASES)
  kinds = "; ".join(f"{k} x{c} {s:.2f}" for k, c, s, _ in ph["by_kind"])
  return (f"  phases (s wall): {parts}, other {ph['other']:.2f} of {ph['total']:.2f}; {ph['kernels']} kernels in "
          f"{ph['llvm_parts']} LLVM parts; FusionCompiler {ph['fusion_thread_s']:.2f} thread-s, "
          f"{ph['fusion_thread_s'] / max(1, ph['kernels']) * 1e3:.0f} ms per kernel\n"
          f"  fusion kinds by FusionCompiler thread-s: {kinds}\n"
          f"  slowest kernels: " + "; ".join(f"{m} {s * 1e3:.0f} ms ({o} ops)" for s, o, m in ph["slowest"][:5]))


def measure(part: str, model_name: str, height: int, width: int, batch: int, options: dict[str, object],
            steps: int, phases: bool, optim_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """Lower + compile one part under `options` and run it `steps` times; returns the figures (seconds)."""
  fn, args, refresh = build_part(part, model_name, height, width, batch, optim_overrides)
  t0, c0 = time.perf_counter(), time.process_time()
  lowered = fn.lower(*args)
  t1, c1 = time.perf_counter(), time.process_time()
  trace_dir = tempfile.mkdtemp(prefix="compile_time_") if phases else None
  if phases:
    jax.profiler.start_trace(trace_dir)
  t1, c1 = time.perf_counter(), time.process_time()
  compiled = lowered.compile(compiler_options=options or None)
  t2, c2 = time.perf_counter(), time.process_time()
  if phases:
    jax.profiler.stop_trace()
  text = compiled.as_text()
  r: dict[str, Any] = {"lower_s": t1 - t0, "compile_s": t2 - t1, "compile_cpu_s": c2 - c1,
                       "hlo_instructions": sum(1 for line in text.splitlines() if " = " in line),
                       "fusions": len(re.findall(r"\bfusion\(", text))}
  if phases:
    r["phases"] = compile_phases(trace_dir)
  wall, cpu = [], []
  for _ in range(steps):
    w, c = time.perf_counter(), time.process_time()
    out = compiled(*args)
    jax.block_until_ready(out)
    wall.append(time.perf_counter() - w)
    cpu.append(time.process_time() - c)
    args = refresh(args, out)
  r["step_s"] = statistics.median(wall) if wall else float("nan")
  r["step_cpu_s"] = statistics.median(cpu) if cpu else float("nan")
  return r


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="pwcnet")
  p.add_argument("--height", type=int, default=128)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--steps", type=int, default=3, help="executions timed after each compile (median)")
  p.add_argument("--parts", default="step", help=f"comma-separated, of {','.join(PARTS)}")
  p.add_argument("--options", nargs="+", default=[""])
  p.add_argument("--optimizer", nargs="+", default=[""],
                 help="optimiser forms to compare: '' (the model config's), or config.optim fields such as "
                      "'fused_update=True' / 'fused_update=False'")
  p.add_argument("--both-orders", action="store_true", help="run every list forwards then backwards")
  p.add_argument("--phases", action="store_true", help="split each compile by XLA's trace annotations")
  args = p.parse_args(argv)
  jax.config.update("jax_enable_compilation_cache", False)
  runs = [(part, opts, tx) for part in args.parts.split(",") for tx in args.optimizer for opts in args.options]
  order = runs + (runs[::-1] if args.both_orders else [])
  results: dict[tuple, list] = collections.defaultdict(list)
  for part, opts, tx in order:
    options = _config_options(args.model) if opts.strip() == "config" else _parse(opts)
    r = measure(part, args.model, args.height, args.width, args.batch, options, args.steps, args.phases,
                _parse(tx))
    results[(part, opts, tx)].append(r)
    print(f"{args.model} {args.height}x{args.width} b{args.batch} {part} options {opts or '(defaults)'}"
          f"{' optimizer ' + tx if tx else ''}: lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s wall / "
          f"{r['compile_cpu_s']:.1f} s CPU, {r['hlo_instructions']} HLO instructions, {r['fusions']} fusions; run "
          f"median {r['step_s']:.3f} s wall / {r['step_cpu_s']:.3f} s CPU", flush=True)
    if "phases" in r:
      print(_fmt_phases(r["phases"]), flush=True)
  if args.both_orders:
    print("medians over both orders:")
    for key in runs:
      rs = results[key]
      med = lambda k: statistics.median(r[k] for r in rs)
      comp = ", ".join(f"{r['compile_cpu_s']:.1f}" for r in rs)
      run = ", ".join(f"{r['step_cpu_s']:.3f}" for r in rs)
      print(f"  {key[0]} {key[1] or '(defaults)'} {key[2]}: compile {med('compile_s'):.1f} s wall / "
            f"{med('compile_cpu_s'):.1f} s CPU; run {med('step_s'):.3f} s wall / {med('step_cpu_s'):.3f} s CPU "
            f"(compile CPU-s per run: {comp}; run CPU-s: {run})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
