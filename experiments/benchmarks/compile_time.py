r"""Compile time of one model's training step under XLA compiler options, and what they cost the step.

  python -m experiments.benchmarks.compile_time --model pwcnet --height 128 --width 128 --batch 4 \
      --options "" "xla_backend_optimization_level=0"

For each option set (space-separated name=value pairs; "" = defaults) in one process: trace + lower seconds,
XLA compile seconds (wall and process CPU: parallel codegen shows as CPU > wall), the number of HLO
instructions and fusions of the optimised module, then the median step wall / CPU seconds over --steps steps.
The step is built as in experiments/benchmarks/step_ab.py (state donated). No persistent cache is used.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax


def _parse(opts: str) -> dict[str, object]:
  out: dict[str, object] = {}
  for tok in opts.split():
    k, v = tok.split("=", 1)
    if v.lower() in ("true", "false"):  # XLA wants a bool for bool options, not the string
      out[k] = v.lower() == "true"
    else:
      out[k] = int(v) if v.lstrip("-").isdigit() else v
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  from experiments.benchmarks.step_ab import add_step_args
  add_step_args(p, height=128, width=128)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--options", nargs="+", default=[""])
  args = p.parse_args(argv)
  jax.config.update("jax_enable_compilation_cache", False)
  from experiments.benchmarks import step_ab
  for opts in args.options:
    options = _parse(opts)
    t0, c0 = time.perf_counter(), time.process_time()
    step, state, batch = step_ab.build(args.model, args.height, args.width, args.batch, "auto", lower_only=True)
    lowered = step.lower(state, batch)
    t1, c1 = time.perf_counter(), time.process_time()
    compiled = lowered.compile(compiler_options=options or None)
    t2, c2 = time.perf_counter(), time.process_time()
    text = compiled.as_text()
    n_instr = sum(1 for line in text.splitlines() if " = " in line)
    n_fusion = text.count(" fusion(")
    wall, cpu = [], []
    for _ in range(args.steps):
      w, c = time.perf_counter(), time.process_time()
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
      wall.append(time.perf_counter() - w)
      cpu.append(time.process_time() - c)
    print(f"{args.model} {args.height}x{args.width} b{args.batch} options {opts or '(defaults)'}: lower "
          f"{t1 - t0:.1f} s, compile {t2 - t1:.1f} s wall / {c2 - c1:.1f} s CPU, {n_instr} HLO instructions, "
          f"{n_fusion} fusions; step median {statistics.median(wall):.3f} s wall / {statistics.median(cpu):.3f} s "
          f"CPU", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
