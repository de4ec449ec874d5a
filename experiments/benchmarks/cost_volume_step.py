r"""A/B of a model's whole jitted training step with this session's cost volume and warp against session 6's,
alternated in one process (robust to the load of a shared machine): wall and process-CPU seconds per step.

  python -m experiments.benchmarks.cost_volume_step --model pwcnet --height 192 --width 256 --batch 4 --repeats 3

Variants: 's7' (jaxflow as it is: on CPU the cost volume's band by one gather, the warp's fused corner gathers
and per-image backward) and 's6' (the correlation's pad/reshape skews, impl 'tiled_reshape', and session 6's
warp VJP from cost_volume.py). The step is step_ab.py's (same model, loss, optimiser, random batch).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax


def _set_variant(variant: str) -> None:
  corr = sys.modules["jaxflow.ops.correlation"]
  warp_mod = sys.modules["jaxflow.ops.warp"]
  from experiments.benchmarks.cost_volume import _warp_s6
  if not hasattr(warp_mod, "_warp_s7"):
    warp_mod._warp_s7 = warp_mod._warp
  corr._CPU_TILED = "tiled_reshape" if variant == "s6" else "tiled_gather"
  warp_mod._warp = _warp_s6 if variant == "s6" else warp_mod._warp_s7
  jax.clear_caches()  # the inner jitted correlation / warp are retraced with the switch


def main(argv: list[str] | None = None) -> int:
  from experiments.benchmarks.step_ab import add_step_args, build
  import jaxflow.ops.correlation  # noqa: F401  (registers the module for _set_variant)
  import jaxflow.ops.warp  # noqa: F401
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_step_args(p)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--variants", default="s6,s7")
  args = p.parse_args(argv)
  variants = args.variants.split(",")
  print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
  runs = {}
  for v in variants:
    _set_variant(v)
    compiled, state, batch, compile_s = build(args.model, args.height, args.width, args.batch, "matmul")
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    runs[v] = [compiled, state, batch, [], []]
    print(f"{v}: compile {compile_s:.1f} s", flush=True)
  _set_variant("s7")
  for _ in range(args.repeats):
    for v in variants:
      r = runs[v]
      w, c = time.perf_counter(), time.process_time()
      r[1], m = r[0](r[1], r[2])
      jax.block_until_ready(m)
      r[3].append(time.perf_counter() - w)
      r[4].append(time.process_time() - c)
  base = None
  for v in variants:
    wall, cpu = statistics.median(runs[v][3]), statistics.median(runs[v][4])
    base = base or (wall, cpu)
    print(f"{args.model} {args.height}x{args.width} b{args.batch} {v}: step wall {wall * 1e3:.0f} ms "
          f"(cpu {cpu * 1e3:.0f} ms); speed-up vs {variants[0]}: wall {base[0] / wall:.2f}x, cpu {base[1] / cpu:.2f}x",
          flush=True)
  print(f"load average {os.getloadavg()[0]:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
