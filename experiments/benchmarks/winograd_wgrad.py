r"""Winograd F(4x4, 3x3) weight gradient (jaxflow.ops.winograd_wgrad) against the 'blocked' direct product
(jaxflow.ops.conv) at PWC-Net's and FlowNet's stride-1 3x3 'same' shapes.

  python -m experiments.benchmarks.winograd_wgrad --batch 8 --repeats 3 \
      --shapes "96x128:117->128,96x128:128+117->128,48x64:565->128" [--lax] [--error]

Shapes are 'HxW:Cin->Cout'; 'HxW:C1+C2+...->Cout' passes the input as channel parts (conv2d_concat's backward).
Per shape the variants ('blocked', 'winograd', with --lax XLA's own weight gradient 'lax') are alternated within
each repeat (robust to a shared machine's load); it prints the median wall ms and process CPU ms of each, its
compile CPU seconds, and blocked / winograd by CPU and wall. With --error: max |dw - ref| / max |ref| of each
variant against a float64 numpy reference (the 9 taps' products in float64; slow at big shapes).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxflow.ops import conv as conv_ops
from jaxflow.ops import winograd_wgrad

DN = ("NHWC", "HWIO", "NHWC")
PAD = ((1, 1), (1, 1))


def _cpu() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def parse(spec: str) -> tuple[int, int, list[int], int]:
  try:
    size, ch = spec.split(":")
    h, w = (int(v) for v in size.split("x"))
    cins, cout = ch.split("->")
    return h, w, [int(c) for c in cins.split("+")], int(cout)
  except ValueError as e:
    raise SystemExit(f"--shapes: cannot parse {spec!r}; expected 'HxW:Cin[+Cin2...]->Cout' ({e})")


def ref64(x: np.ndarray, g: np.ndarray) -> np.ndarray:
  """dw[i, j] = sum over positions of xpad[y + i, x + j]^T g[y, x], float64 numpy: (3, 3, C_in, C_out)."""
  n, h, w, cin = x.shape
  xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  g2 = g.astype(np.float64).reshape(-1, g.shape[-1])
  return np.stack([np.stack([xp[:, i:i + h, j:j + w].reshape(-1, cin).T @ g2 for j in range(3)])
                   for i in range(3)])


def bench(batch: int, h: int, w: int, cins: list[int], cout: int, repeats: int, with_lax: bool,
          error: bool) -> dict[str, tuple[float, float]]:
  rng = np.random.default_rng(0)
  xs = [rng.standard_normal((batch, h, w, c), np.float32) for c in cins]
  g = rng.standard_normal((batch, h, w, cout), np.float32)
  cin = sum(cins)
  shape = (3, 3, cin, cout)
  fns = {
      "blocked": lambda xs, g: conv_ops._weight_grad_stride1(xs, g, shape, PAD, (1, 1), "blocked", jnp.float32),
      "winograd": lambda xs, g: winograd_wgrad.weight_grad(xs, g),
  }
  if with_lax:
    def lax_dw(xs, g):
      x = jnp.concatenate(xs, axis=-1)
      f = lambda k: lax.conv_general_dilated(x, k, (1, 1), PAD, dimension_numbers=DN)
      return jax.linear_transpose(f, jax.ShapeDtypeStruct(shape, jnp.float32))(g)[0]
    fns["lax"] = lax_dw
  args = ([jnp.asarray(p) for p in xs], jnp.asarray(g))
  jitted, compile_cpu = {}, {}
  for v, f in fns.items():
    c = _cpu()
    jitted[v] = jax.jit(f).lower(*args).compile()
    compile_cpu[v] = _cpu() - c
  outs = {v: np.asarray(f(*args)) for v, f in jitted.items()}
  errs = {}
  if error:
    ref = ref64(np.concatenate(xs, axis=-1), g)
    errs = {v: float(np.max(np.abs(o - ref)) / np.max(np.abs(ref))) for v, o in outs.items()}
  times: dict[str, list[tuple[float, float]]] = {v: [] for v in jitted}
  for _ in range(repeats):
    for v, f in jitted.items():
      t, c = time.perf_counter(), _cpu()
      jax.block_until_ready(f(*args))
      times[v].append((time.perf_counter() - t, _cpu() - c))
  med = {v: (statistics.median(t[0] for t in ts) * 1e3, statistics.median(t[1] for t in ts) * 1e3)
         for v, ts in times.items()}
  gflop = 2 * batch * h * w * cin * cout * 9 / 1e9
  cols = "  ".join(f"{v} {m[0]:6.0f} ms {m[1]:6.0f} cpu-ms (compile {compile_cpu[v]:.2f} cpu-s"
                   + (f", err {errs[v]:.1e})" if errs else ")") for v, m in med.items())
  name = "+".join(map(str, cins))
  print(f"b{batch} {h}x{w} {name}->{cout} {gflop:5.1f} GFLOP  {cols}  blocked/winograd cpu "
        f"{med['blocked'][1] / med['winograd'][1]:.2f} wall {med['blocked'][0] / med['winograd'][0]:.2f}", flush=True)
  return med


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--shapes", default="96x128:117->128,96x128:245->128,96x128:373->96,96x128:469->64,"
                 "96x128:565->128,48x64:117->128,48x64:565->128,48x64:256->256")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--lax", action="store_true", help="also time XLA's own weight gradient")
  p.add_argument("--error", action="store_true", help="error against a float64 numpy reference")
  a = p.parse_args()
  print(f"medians of {a.repeats} alternated repeats; load average {os.getloadavg()[0]:.1f}", flush=True)
  for spec in a.shapes.split(","):
    h, w, cins, cout = parse(spec)
    bench(a.batch, h, w, cins, cout, a.repeats, a.lax, a.error)
  print(f"load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
  main()
