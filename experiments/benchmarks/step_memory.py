r"""Memory of one model's compiled training step: XLA's buffer assignment and the process's peak resident set.

  python -m experiments.benchmarks.step_memory --model pwcnet --height 192 --width 256 --batch 4 [--run]

Prints, for the jitted step of experiments/benchmarks/step_ab.py (state donated, like the trainer):
compile seconds, and `compiled.memory_analysis()`: argument, output, alias (donated) and temp bytes, and the
resulting live peak estimate args + outputs - alias + temp (MiB). With --run it also runs --steps steps and
prints the process's peak RSS (VmHWM, MiB) while running them (reset after the compile, whose own peak is printed
beside it) and the median step CPU time. Model fields can be overridden with
--field name=value (ints, floats or strings).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax


def vm_hwm_mib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  from experiments.benchmarks.step_ab import add_step_args
  add_step_args(p)
  p.add_argument("--run", action="store_true")
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--field", action="append", default=[], help="model field override name=value")
  p.add_argument("--impl", default="auto", help="step_ab.build variant, e.g. 'matmul-s6' (no Winograd)")
  args = p.parse_args(argv)
  from experiments.benchmarks.step_ab import build
  overrides = {}
  for item in args.field:
    k, v = item.split("=", 1)
    for conv in (int, float):
      try:
        v = conv(v)
        break
      except ValueError:
        pass
    overrides[k] = v
  compiled, state, batch, compile_s = build(args.model, args.height, args.width, args.batch, args.impl,
                                            model_overrides=overrides)
  m = compiled.memory_analysis()
  mib = lambda x: x / 2**20
  live = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  print(f"{args.model} {args.height}x{args.width} b{args.batch} {args.impl} {overrides or ''}: compile {compile_s:.1f} s; "
        f"args {mib(m.argument_size_in_bytes):.0f} MiB, outputs {mib(m.output_size_in_bytes):.0f}, "
        f"alias {mib(m.alias_size_in_bytes):.0f}, temp {mib(m.temp_size_in_bytes):.0f}; "
        f"live estimate {mib(live):.0f} MiB", flush=True)
  if args.run:
    hwm_with_compile = vm_hwm_mib()
    # Start the high-water mark afresh after the compile (its peak is XLA's, not the step's): freed heap returned
    # to the system first, then the kernel's peak RSS reset (Linux >= 4.0), like a worker that loads the
    # executable instead of compiling it.
    try:
      import ctypes
      ctypes.CDLL("libc.so.6").malloc_trim(0)
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    except OSError:
      pass
    cpu = []
    for _ in range(args.steps):
      c0 = time.process_time()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      cpu.append(time.process_time() - c0)
    print(f"  ran {args.steps} steps: median CPU {statistics.median(cpu):.2f} s/step, peak RSS (VmHWM) of the steps "
          f"{vm_hwm_mib():.0f} MiB (up to the end of the compile {hwm_with_compile:.0f}), loss {float(metrics['loss']):.4g}",
          flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
