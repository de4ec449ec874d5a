r"""Winograd F(4x4, 3x3) against XLA's convolution at PWC-Net's stride-1 3x3 shapes: forward and input gradient.

  python -m experiments.benchmarks.winograd_conv --batch 8 --shapes "96x128:117->128,96x128:565->128" --repeats 3

Shapes are 'HxW:Cin->Cout'. Per shape and pass ('fwd': x (Cin) -> y (Cout); 'dx': g (Cout) -> dx (Cin)) the
variants are alternated within each repeat (robust to a shared machine's load) and it prints the median wall ms
and process CPU ms of XLA's ('xla') and of jaxflow.ops.winograd ('w1': its default, 'wf': the 'fused' transforms), the
ratio xla / w1 by CPU time and the error max |w - xla| / max |xla|; 'wm' is w1 with session 7's loop (the
padded batch, lax.map and a crop of its stacked output).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxflow.ops import winograd

DN = ("NHWC", "HWIO", "NHWC")


def _cpu() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def _lax(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)


def _switched(name, value, f, *args):
  """f traced with the module switch winograd.<name> set to value (then restored): _TRANSFORMS 'fused' (one kernel
  per transformed entry) or _LOOP 'map' (session 7's loop: padded batch, lax.map, crop) instead of the default."""
  old = getattr(winograd, name)
  setattr(winograd, name, value)
  try:
    return f(*args)
  finally:
    setattr(winograd, name, old)


def bench(batch: int, h: int, w: int, cin: int, cout: int, repeats: int) -> None:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, h, w, cin), np.float32))
  g = jnp.asarray(rng.standard_normal((batch, h, w, cout), np.float32))
  k = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32) / np.sqrt(9 * cin))
  dx_lax = lambda g, k: jax.linear_transpose(lambda x_: _lax(x_, k), jax.ShapeDtypeStruct(x.shape, x.dtype))(g)[0]
  passes = {
      "fwd": ((x, k), {"xla": _lax, "w1": lambda x, k: winograd.conv3x3_same(x, k, 1),
                       "wf": lambda x, k: _switched("_TRANSFORMS", "fused", winograd.conv3x3_same, x, k),
                       "wm": lambda x, k: _switched("_LOOP", "map", winograd.conv3x3_same, x, k)}),
      "dx": ((g, k), {"xla": dx_lax, "w1": lambda g, k: winograd.conv3x3_same_input_grad(g, k, 1),
                      "wf": lambda g, k: _switched("_TRANSFORMS", "fused", winograd.conv3x3_same_input_grad, g, k),
                      "wm": lambda g, k: _switched("_LOOP", "map", winograd.conv3x3_same_input_grad, g, k)}),
  }
  gflop = 2 * batch * h * w * cin * cout * 9 / 1e9
  for name, (args, fns) in passes.items():
    jitted = {v: jax.jit(f) for v, f in fns.items()}
    ref = jitted["xla"](*args).block_until_ready()
    scale = float(jnp.max(jnp.abs(ref)))
    err = {v: float(jnp.max(jnp.abs(f(*args).block_until_ready() - ref))) / scale for v, f in jitted.items()}
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in jitted}
    for _ in range(repeats):
      for v, f in jitted.items():
        t, c = time.perf_counter(), _cpu()
        f(*args).block_until_ready()
        times[v].append((time.perf_counter() - t, _cpu() - c))
    med = {v: (statistics.median(t[0] for t in ts) * 1e3, statistics.median(t[1] for t in ts) * 1e3)
           for v, ts in times.items()}
    cols = "  ".join(f"{v} {m[0]:6.0f} ms {m[1]:6.0f} cpu-ms (err {err[v]:.1e})" for v, m in med.items())
    print(f"b{batch} {h}x{w} {cin}->{cout} {name} {gflop:5.1f} GFLOP  {cols}  xla/w1 cpu {med['xla'][1] / med['w1'][1]:.2f}"
          f" wall {med['xla'][0] / med['w1'][0]:.2f}; wm/w1 cpu {med['wm'][1] / med['w1'][1]:.2f}", flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--shapes", default="96x128:117->128,96x128:373->96,96x128:565->128,48x64:565->128")
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args()
  for spec in a.shapes.split(","):
    size, ch = spec.split(":")
    h, w = (int(v) for v in size.split("x"))
    cin, cout = (int(v) for v in ch.split("->"))
    bench(a.batch, h, w, cin, cout, a.repeats)


if __name__ == "__main__":
  main()
