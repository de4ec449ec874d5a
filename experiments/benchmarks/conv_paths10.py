r"""Forward / input-gradient paths of PWC-Net's stride-1 convolutions on this machine (session 10, AVX-512):
XLA's convolution with XLA's defaults ('xla'), XLA's convolution compiled with PWC-Net's YNNPACK option ('ynn',
configs/pwcnet.py's compiler_options, as the training step), Winograd F(4x4, 3x3) ('wino', jaxflow.ops.winograd,
under the same option), and for few output channels the tap product ('taps', jaxflow.ops.conv.conv2d_taps).

  python -m experiments.benchmarks.conv_paths10 --batch 8 --repeats 5 \
      --shapes "96x128:117->128,96x128:565->2,96x128:128->96@8"

Shapes 'HxW:Cin->Cout[@dilation]' (3x3, 'same' padding). Per shape and pass ('fwd': x -> y; 'dx': the input
gradient) the variants alternate within each repeat; it prints median process-CPU ms and nominal GFLOP per CPU-s.
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
from jaxflow.ops import winograd

DN = ("NHWC", "HWIO", "NHWC")
YNN = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}


def parse(spec: str):
  hw, ch = spec.split(":")
  h, w = (int(v) for v in hw.split("x"))
  d = 1
  if "@" in ch:
    ch, dd = ch.split("@")
    d = int(dd)
  cin, cout = (int(v) for v in ch.split("->"))
  return h, w, cin, cout, d


def _cpu(fn, args) -> float:
  c = time.process_time()
  jax.block_until_ready(fn(*args))
  return time.process_time() - c


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--shapes", default="96x128:117->128,96x128:245->128,96x128:373->96,96x128:469->64,"
                 "96x128:533->32,96x128:565->2,96x128:565->128,96x128:128->128@2,96x128:128->96@8,"
                 "96x128:96->64@16,48x64:565->2,48x64:373->96,24x32:373->96")
  args = p.parse_args(argv)
  rng = np.random.default_rng(0)
  for spec in args.shapes.split(","):
    h, w, cin, cout, d = parse(spec)
    x = jnp.asarray(rng.standard_normal((args.batch, h, w, cin), np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32) * 0.05)
    g = jnp.asarray(rng.standard_normal((args.batch, h, w, cout), np.float32))
    pad = ((d, d), (d, d))
    lax_f = lambda x_, k_: lax.conv_general_dilated(x_, k_, (1, 1), pad, rhs_dilation=(d, d), dimension_numbers=DN)
    fwds = {"xla": (lax_f, None), "ynn": (lax_f, YNN)}
    if d == 1:
      fwds["wino"] = (winograd.conv3x3_same, YNN)
    if cout <= 8:
      fwds["taps"] = (lambda x_, k_: conv_ops.conv2d_taps(x_, k_, pad, (d, d)), YNN)
    progs = {}
    for name, (f, opts) in fwds.items():
      progs[("fwd", name)] = (jax.jit(f, compiler_options=opts), (x, k))
      dxf = lambda x_, k_, g_, f=f: jax.vjp(lambda a: f(a, k_), x_)[1](g_)[0]
      if name != "taps":
        progs[("dx", name)] = (jax.jit(dxf, compiler_options=opts), (x, k, g))
    ref = np.asarray(progs[("fwd", "xla")][0](x, k))
    errs = {n: float(np.max(np.abs(np.asarray(progs[("fwd", n)][0](x, k)) - ref)) / np.max(np.abs(ref)))
            for n in fwds}
    for prog in progs.values():
      _cpu(*prog)
    times = {key: [] for key in progs}
    for _ in range(args.repeats):
      for key, prog in progs.items():
        times[key].append(_cpu(*prog))
    gflop = 2e-9 * args.batch * h * w * 9 * cin * cout
    line = []
    for key in progs:
      m = statistics.median(times[key])
      line.append(f"{key[0]}:{key[1]} {1e3 * m:6.1f} ({gflop / m:5.0f})")
    print(f"b{args.batch} {spec:18s} " + "  ".join(line) + "  err " + " ".join(f"{n} {e:.1e}" for n, e in errs.items()),
          flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
