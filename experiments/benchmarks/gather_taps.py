r"""Cold start A/B: the train step's kernel count, compile CPU time and steady step under the session-9 kernel cuts
(issue #8, "first step under 10 s cold"), switched at trace time and compared in one process.

  python -m experiments.benchmarks.gather_taps --model flownet_s                 # before,after; 5 alternations
  python -m experiments.benchmarks.gather_taps --model spynet --variants before,after,after --repeats 7

XLA:CPU's compile of a train step costs ~40 CPU-ms per distinct kernel (BENCHMARKS.md, session 6: cold compile),
so a cold start is cut by cutting kernels. The cuts, each behind a module switch read while tracing:
  - conv._GATHER_PATCHES: `conv2d_im2col`'s patch matrix and the 'concat' weight gradient's shifted output
    gradients by one gather each instead of a slice per tap + a concatenation (FlowNet's conv3_1-conv6 forward,
    every predict_flow's weight gradient);
  - conv._WHOLE_SPLIT_BYTES: the 'split' weight gradient (SpyNet's 7x7) without its scan over row blocks when
    both gathered matrices fit in that many bytes (the loop's counter, condition and accumulator kernels gone);
  - losses._FUSED_EPE: each level's masked EPE sum by losses.masked_epe_sum (its own VJP; 3-4 kernels fewer per
    level of the multiscale loss).
Variant 'before' turns all of them off (session 8's program), 'after' on (the defaults). Every variant is
traced, lowered and compiled in turn (compile CPU seconds of this process, the number of fusions that are not
YNNPACK library calls, i.e. the kernels XLA generates code for), then the steps alternate variant by variant
`--repeats` times (robust to the other users of the machine: medians of wall and process-CPU seconds).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time

import jax

CUTS = ("patches", "whole_split", "fused_epe")
VARIANTS = ("before", "after") + CUTS + tuple(f"no_{c}" for c in CUTS)


def switches(variant: str) -> None:
  """Sets the module switches of `variant`: 'before' (session 8's program), 'after' (the defaults), a cut's name
  (only that cut on) or 'no_' + a cut's name (every cut but that one)."""
  from jaxflow import losses
  from jaxflow.ops import conv as conv_ops
  if variant not in VARIANTS:
    raise ValueError(f"--variants: unknown variant {variant!r}; expected some of {VARIANTS}")
  on = {c: variant == "after" or variant == c or (variant.startswith("no_") and variant != "no_" + c)
        for c in CUTS}
  conv_ops._GATHER_PATCHES = on["patches"]
  conv_ops._WHOLE_SPLIT_BYTES = conv_ops.WHOLE_SPLIT_BYTES if on["whole_split"] else 0
  losses._FUSED_EPE = on["fused_epe"]


def kernels(hlo_text: str) -> int:
  """Fusions of an optimised HLO module other than YNNPACK's library calls (each is one generated kernel)."""
  return sum(1 for line in hlo_text.splitlines()
             if re.search(r"= \S+ fusion\(", line) and not line.lstrip().startswith("%ynn_fusion"))


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="flownet_s")
  p.add_argument("--height", type=int, default=128)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--variants", default="before,after", help="comma-separated, of " + ",".join(VARIANTS))
  args = p.parse_args(argv)
  from experiments.benchmarks.compile_time import build_part
  names = args.variants.split(",")
  runs = []
  for i, name in enumerate(names):
    switches(name)
    fn, fargs, refresh = build_part("step", args.model, args.height, args.width, args.batch)
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = fn.lower(*fargs)
    t1, c1 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    n = kernels(compiled.as_text())
    print(f"{name}: lower {t1 - t0:.2f} s / {c1 - c0:.2f} CPU-s, compile {t2 - t1:.2f} s / {c2 - c1:.2f} CPU-s, "
          f"{n} kernels", flush=True)
    runs.append({"name": name, "compiled": compiled, "args": fargs, "refresh": refresh, "wall": [], "cpu": [],
                 "compile_cpu": c2 - c1, "kernels": n})
  for r in runs:  # one untimed step each (first execution)
    out = r["compiled"](*r["args"])
    jax.block_until_ready(out)
    r["args"] = r["refresh"](r["args"], out)
  for _ in range(args.repeats):
    for r in runs:
      w, c = time.perf_counter(), time.process_time()
      out = r["compiled"](*r["args"])
      jax.block_until_ready(out)
      r["wall"].append(time.perf_counter() - w)
      r["cpu"].append(time.process_time() - c)
      r["args"] = r["refresh"](r["args"], out)
  base = runs[0]
  print(f"{args.model} {args.height}x{args.width} b{args.batch}, {args.repeats} alternations:")
  for r in runs:
    wall, cpu = statistics.median(r["wall"]), statistics.median(r["cpu"])
    print(f"  {r['name']:8s} kernels {r['kernels']:4d}, compile {r['compile_cpu']:6.2f} CPU-s, step {wall:.3f} s "
          f"wall / {cpu:.3f} CPU-s; vs {base['name']}: kernels {r['kernels'] / base['kernels']:.2f}x, compile "
          f"{r['compile_cpu'] / base['compile_cpu']:.2f}x, step CPU {cpu / statistics.median(base['cpu']):.3f}x, "
          f"wall {wall / statistics.median(base['wall']):.3f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())
