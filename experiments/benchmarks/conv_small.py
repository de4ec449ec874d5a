r"""Convolution paths at FlowNet / PWC-Net shapes, CPU time of forward + input gradient + weight gradient:
jaxflow.ops.conv.conv2d's default CPU path (XLA forward / input gradient, matmul weight gradient) against the
patch-matrix product `conv2d_im2col`, and XLA's transposed convolution against `conv_transpose2d_matmul`.

  python -m experiments.benchmarks.conv_small [--repeats 5]

Each pass is its own jitted program, timed by process CPU time (median of --repeats after one warm-up run);
A and B alternate within each repeat. Prints CPU-ms per pass, GFLOP per CPU-second and the ratio A / B.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxflow.ops import conv as conv_ops

# (N, H, W, C_in), (kh, kw, C_in, C_out), stride: FlowNetS at 128x128 b4 and at 384x448 b8 (conv4 .. conv6_1),
# PWC-Net's top estimator level at 128x128 b4.
CONVS = [
    ((4, 2, 2, 1024), (3, 3, 1024, 1024), 1), ((4, 4, 4, 512), (3, 3, 512, 1024), 2),
    ((4, 4, 4, 512), (3, 3, 512, 512), 1), ((4, 8, 8, 512), (3, 3, 512, 512), 2),
    ((4, 8, 8, 512), (3, 3, 512, 512), 1), ((4, 16, 16, 256), (3, 3, 256, 512), 2),
    ((4, 16, 16, 256), (3, 3, 256, 256), 1),
    ((8, 6, 7, 1024), (3, 3, 1024, 1024), 1), ((8, 12, 14, 512), (3, 3, 512, 1024), 2),
    ((8, 12, 14, 512), (3, 3, 512, 512), 1), ((8, 24, 28, 512), (3, 3, 512, 512), 1),
    ((4, 2, 2, 81), (3, 3, 81, 128), 1), ((4, 4, 4, 290), (3, 3, 290, 96), 1),
]
# Transposed 4x4 / 2 convolutions (padding 2, 2): FlowNetS 128x128 b4, 384x448 b8, PWC-Net upfeat 384x512 b8.
DECONVS = [
    ((4, 2, 2, 1024), (4, 4, 1024, 512)), ((4, 4, 4, 1026), (4, 4, 1026, 256)), ((4, 8, 8, 770), (4, 4, 770, 128)),
    ((4, 16, 16, 386), (4, 4, 386, 64)), ((4, 16, 16, 2), (4, 4, 2, 2)),
    ((8, 6, 7, 1024), (4, 4, 1024, 512)), ((8, 24, 28, 770), (4, 4, 770, 128)), ((8, 48, 56, 386), (4, 4, 386, 64)),
    ((8, 48, 64, 565), (4, 4, 565, 2)),
]


# PWC-Net dense estimator convolutions, (N, h, w), the parts' channels (newest first, as the estimator builds
# them), C_out: level 3 at 128x128 b4 (16x16), level 4 at 128x128 b4, level 5 at 384x512 b8 (12x16, 1,536
# positions), level 6 at 384x512 b8.
DENSE = [((4, 16, 16), (96, 128, 128, 81, 64, 2, 2), 64), ((4, 16, 16), (128, 81, 64, 2, 2), 128),
         ((4, 8, 8), (96, 128, 128, 81, 96, 2, 2), 64), ((8, 12, 16), (96, 128, 128, 81, 128, 2, 2), 64),
         ((8, 12, 16), (128, 81, 128, 2, 2), 128), ((8, 6, 8), (128, 128, 81), 96)]


def _passes(f, x, w):
  g = jnp.ones(jax.eval_shape(f, x, w).shape, jnp.float32)
  return (jax.jit(f), (x, w)), (jax.jit(lambda x_, w_, g_: jax.vjp(lambda a: f(a, w_), x_)[1](g_)[0]), (x, w, g)), \
         (jax.jit(lambda x_, w_, g_: jax.vjp(lambda b: f(x_, b), w_)[1](g_)[0]), (x, w, g))


def _cpu(fn, args) -> float:
  c = time.process_time()
  jax.block_until_ready(fn(*args))
  return time.process_time() - c


def compare(label: str, fa, fb, x, w, gflop: float, repeats: int) -> None:
  pa, pb = _passes(fa, x, w), _passes(fb, x, w)
  ta, tb = [[] for _ in range(3)], [[] for _ in range(3)]
  for k in range(3):
    _cpu(*pa[k]), _cpu(*pb[k])
  for _ in range(repeats):
    for k in range(3):
      ta[k].append(_cpu(*pa[k]))
      tb[k].append(_cpu(*pb[k]))
  ma, mb = [statistics.median(t) for t in ta], [statistics.median(t) for t in tb]
  row = lambda m: " ".join(f"{1e3 * v:7.1f}" for v in m) + f" ({gflop * 3 / sum(m):5.1f} GF/CPU-s)"
  print(f"{label:58s} A {row(ma)} | B {row(mb)} | A/B {sum(ma) / sum(mb):5.2f}", flush=True)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--only", choices=["conv", "deconv", "dense"], default=None)
  args = p.parse_args(argv)
  rng = np.random.default_rng(0)
  arr = lambda s: jnp.asarray(rng.standard_normal(s, np.float32) * 0.1)
  print("CPU-ms forward, input gradient, weight gradient; A = XLA path (conv: conv2d's CPU default), "
        "B = matmul path")
  if args.only != "deconv":
    for xs, ws, s in CONVS:
      x, w = arr(xs), arr(ws)
      pad = ((1, 1), (1, 1))
      fa = lambda x_, w_: conv_ops.conv2d(x_, w_, (s, s), pad, impl="matmul")
      fb = lambda x_, w_: conv_ops.conv2d_im2col(x_, w_, (s, s), pad, (1, 1))
      out = jax.eval_shape(fa, x, w).shape
      gflop = 2e-9 * np.prod(out[:3]) * np.prod(ws)
      compare(f"conv {xs} {ws[:2]} {ws[2]}->{ws[3]} /{s}", fa, fb, x, w, gflop, args.repeats)
  if args.only in (None, "dense"):
    for nhw, chans, cout in DENSE:
      parts = [arr(nhw + (c,)) for c in chans]
      w = arr((3, 3, sum(chans), cout))
      pad = ((1, 1), (1, 1))
      fa = lambda x_, w_: conv_ops._conv_of_concat(tuple(x_), w_, (1, 1), pad, (1, 1))
      fb = lambda x_, w_: conv_ops.conv2d_im2col(jnp.concatenate(x_, axis=-1), w_, (1, 1), pad, (1, 1))
      gflop = 2e-9 * np.prod(nhw) * 9 * sum(chans) * cout
      compare(f"dense {nhw} {sum(chans)}->{cout}", fa, fb, parts, w, gflop, args.repeats)
  if args.only not in ("conv", "dense"):
    for xs, ws in DECONVS:
      x, w = arr(xs), arr(ws)
      pad = ((2, 2), (2, 2))
      fa = lambda x_, w_: lax.conv_transpose(x_, w_, (2, 2), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
      fb = lambda x_, w_: conv_ops.conv_transpose2d_matmul(x_, w_, (2, 2), pad)
      gflop = 2e-9 * np.prod(xs[:3]) * np.prod(ws)
      compare(f"deconv {xs} {ws[2]}->{ws[3]}", fa, fb, x, w, gflop, args.repeats)
  return 0


if __name__ == "__main__":
  sys.exit(main())
