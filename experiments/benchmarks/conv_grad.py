r"""Convolution forward / input-gradient / weight-gradient times at PWC-Net's conv shapes, XLA's against
jaxflow.ops.conv's matmul weight gradient and against a plain matmul of the same FLOPs.

  python -m experiments.benchmarks.conv_grad --height 192 --width 256 --batch 4 --repeats 5
  python -m experiments.benchmarks.conv_grad --shapes "48x64:117->128,48x64:565->2,96x128:16->32/2"
  python -m experiments.benchmarks.conv_grad --shapes "128x128:32->64k7,64x64:64->32k7" --cpu

Shapes are 'HxW:Cin->Cout[/stride][@dilation][kK]' (K x K kernels, 3 by default, 'same' padding) at the given
batch; the default list is a representative set of PWC-Net's convolutions (pyramid stride 2, estimator,
predict_flow, context) at the given image size. The variants of one shape are alternated within each repeat
(robust to the load of a shared machine); per shape it prints the median ms (process CPU time with --cpu) and
GFLOP/s of: fwd, dx (lax), dw_lax, dw_ours (weight_grad_mode's choice), dw_scan (always the scan), at stride 1
dw_blocked and dw_split (those modes), for undilated 3x3 kernels dw_winograd (Winograd F(4x4, 3x3)), and mm (a (N*Ho*Wo, K*K*Cin) @ (K*K*Cin, Cout) matmul), and dw_lax /
dw_ours.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxflow.ops import conv as conv_ops

DN = ("NHWC", "HWIO", "NHWC")


def default_shapes(h: int, w: int) -> list[str]:
  return [f"{h // 2}x{w // 2}:16->32/2", f"{h // 4}x{w // 4}:32->32", f"{h // 4}x{w // 4}:117->128",
          f"{h // 4}x{w // 4}:373->96", f"{h // 4}x{w // 4}:565->2", f"{h // 4}x{w // 4}:128->128@4",
          f"{h // 16}x{w // 16}:531->128", f"{h // 8}x{w // 8}:64->96/2"]


def parse(spec: str) -> tuple[int, int, int, int, int, int, int]:
  try:
    size, ch = spec.split(":")
    k = 3
    if "k" in ch:
      ch, ks = ch.split("k")
      k = int(ks)
    h, w = (int(v) for v in size.split("x"))
    d = 1
    if "@" in ch:
      ch, dil = ch.split("@")
      d = int(dil)
    s = 1
    if "/" in ch:
      ch, st = ch.split("/")
      s = int(st)
    cin, cout = (int(v) for v in ch.split("->"))
  except ValueError as e:
    raise SystemExit(f"--shapes: cannot parse {spec!r}; expected 'HxW:Cin->Cout[/stride][@dilation][kK]' ({e})")
  return h, w, cin, cout, s, d, k


def bench(batch: int, h: int, w: int, cin: int, cout: int, s: int, d: int, repeats: int, k: int = 3,
          clock=time.perf_counter) -> dict[str, float]:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((batch, h, w, cin), np.float32))
  wt = jnp.asarray(rng.random((k, k, cin, cout), np.float32))
  pad = ((d * (k // 2), d * (k // 2)),) * 2
  f = lambda x, w: lax.conv_general_dilated(x, w, (s, s), pad, rhs_dilation=(d, d), dimension_numbers=DN)
  y = f(x, wt)
  g = jnp.asarray(rng.random(y.shape, np.float32))
  m = y.shape[0] * y.shape[1] * y.shape[2]
  mode = conv_ops.weight_grad_mode(cin, cout, (s, s), m, (k, k), padding=pad, dilation=(d, d),
                                   image_positions=y.shape[1] * y.shape[2], dtype=jnp.float32)
  a, b = jnp.ones((m, k * k * cin)), jnp.ones((k * k * cin, cout))
  cases = {
      "fwd": (jax.jit(f), (x, wt)),
      "dx": (jax.jit(lambda x, w, g: jax.vjp(f, x, w)[1](g)[0]), (x, wt, g)),
      "dw_lax": (jax.jit(lambda x, w, g: jax.vjp(f, x, w)[1](g)[1]), (x, wt, g)),
      "dw_ours": (jax.jit(lambda x, g: conv_ops.weight_grad_matmul(x, g, wt.shape, (s, s), pad, (d, d), mode)
                          if mode != "lax" else jax.vjp(f, x, wt)[1](g)[1]), (x, g)),
      "dw_scan": (jax.jit(lambda x, g: conv_ops.weight_grad_matmul(x, g, wt.shape, (s, s), pad, (d, d))), (x, g)),
  }
  if s == 1:
    for md in ("blocked", "split"):
      cases[f"dw_{md}"] = (jax.jit(lambda x, g, md=md: conv_ops.weight_grad_matmul(x, g, wt.shape, (1, 1), pad,
                                                                                    (d, d), md)), (x, g))
    if (k, d) == (3, 1):
      cases["dw_winograd"] = (jax.jit(lambda x, g: conv_ops.weight_grad_matmul(x, g, wt.shape, (1, 1), pad, (1, 1),
                                                                             "winograd")), (x, g))
  cases["mm"] = (jax.jit(lambda a, b: a @ b), (a, b))
  for fn, args in cases.values():
    jax.block_until_ready(fn(*args))
  times: dict[str, list[float]] = {k: [] for k in cases}
  for _ in range(repeats):
    for name, (fn, args) in cases.items():
      t = clock()
      jax.block_until_ready(fn(*args))
      times[name].append(clock() - t)
  flops = 2.0 * m * k * k * cin * cout
  out = {k: statistics.median(v) for k, v in times.items()}
  out["flops"] = flops
  out["mode"] = mode
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description="Conv fwd / dx / dw at PWC-Net shapes vs matmul.")
  p.add_argument("--height", type=int, default=192)
  p.add_argument("--width", type=int, default=256)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--shapes", default=None, help="comma-separated 'HxW:Cin->Cout[/stride][@dilation][kK]'")
  p.add_argument("--cpu", action="store_true", help="time by process CPU time instead of wall time")
  args = p.parse_args(argv)
  specs = args.shapes.split(",") if args.shapes else default_shapes(args.height, args.width)
  print(f"backend {jax.default_backend()}, batch {args.batch}, medians of {args.repeats}, "
        f"{'CPU' if args.cpu else 'wall'} time; load average {os.getloadavg()[0]:.1f}", flush=True)
  for spec in specs:
    h, w, cin, cout, s, d, k = parse(spec)
    clock = time.process_time if args.cpu else time.perf_counter
    r = bench(args.batch, h, w, cin, cout, s, d, args.repeats, k, clock)
    cols = " ".join(f"{c} {r[c] * 1e3:7.1f} ms ({r['flops'] / r[c] / 1e9:5.1f} GF/s)"
                    for c in ("fwd", "dx", "dw_lax", "dw_ours", "dw_scan", "dw_blocked", "dw_split", "dw_winograd", "mm")
                    if c in r)
    print(f"{spec:22s} [{r['mode']:6s}] {cols}  dw_lax/dw_ours {r['dw_lax'] / r['dw_ours']:.2f}x", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
