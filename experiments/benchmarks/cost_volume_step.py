r"""A/B of a model's whole jitted training step with this session's cost volume and warp against session 6's,
alternated in one process (robust to the load of a shared machine): wall and process-CPU seconds per step.

  python -m experiments.benchmarks.cost_volume_step --model pwcnet --height 192 --width 256 --batch 4 --repeats 3

Variants: 's8' (jaxflow as it is), 's7' (session 7's code: the same but the cost volume's backward scales the
cotangent by 1/C before its per-image loop) and 's6' (also the correlation's pad/reshape skews, impl
'tiled_reshape', and session 6's warp VJP from cost_volume.py). The step is step_ab.py's (same model, loss, optimiser, random batch).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax


def _set_variant(variant: str) -> None:
  corr = sys.modules["jaxflow.ops.correlation"]
  warp_mod = sys.modules["jaxflow.ops.warp"]
  from experiments.benchmarks.cost_volume import _warp_s6
  if not hasattr(warp_mod, "_warp_s7"):
    warp_mod._warp_s7 = warp_mod._warp
  corr._CPU_TILED = "tiled_reshape" if variant == "s6" else "tiled_gather"
  corr._BWD_SCALE_FEATURES = variant not in ("s6", "s7")
  warp_mod._warp = _warp_s6 if variant == "s6" else warp_mod._warp_s7
  jax.clear_caches()  # the inner jitted correlation / warp are retraced with the switch


def main(argv: list[str] | None = None) -> int:
  from experiments.benchmarks.step_ab import add_step_args, build, time_alternated
  import jaxflow.ops.correlation  # noqa: F401  (registers the module for _set_variant)
  import jaxflow.ops.warp  # noqa: F401
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_step_args(p)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--variants", default="s7,s8")
  args = p.parse_args(argv)
  variants = args.variants.split(",")
  print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
  runs = {}
  for v in variants:
    _set_variant(v)
    compiled, state, batch, compile_s = build(args.model, args.height, args.width, args.batch, "matmul")
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    runs[v] = [compiled, state, batch]
    print(f"{v}: compile {compile_s:.1f} s", flush=True)
  _set_variant("s8")
  time_alternated(runs, args.repeats, f"{args.model} {args.height}x{args.width} b{args.batch}", args.batch)
  print(f"load average {os.getloadavg()[0]:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
