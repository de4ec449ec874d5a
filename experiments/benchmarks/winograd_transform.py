r"""Cost of Winograd F(4x4, 3x3)'s input transform on its own (jaxflow.ops.winograd's 'matmul' transforms): the
gathered windows of one image (36, tiles * C_in) multiplied by kron(B^T, B^T) (36 x 36), against the same values
as two 6 x 6 products (separable B^T d B) and as elementwise sums of B^T's nonzero entries; and the product with
the windows transposed ((tiles * C_in, 36) @ (36, 36)).

  python -m experiments.benchmarks.winograd_transform --tiles 768 --cin 373 --repeats 7

Variants alternate within each repeat; prints median process-CPU and wall ms, GFLOP/CPU-s of the 36 x 36 product
(2 * 36 * 36 * tiles * C_in FLOPs) and each variant's error against it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxflow.ops import winograd


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiles", type=int, default=768, help="tiles per image (96x128: 24 * 32 = 768)")
  p.add_argument("--cin", type=int, default=373)
  p.add_argument("--repeats", type=int, default=7)
  args = p.parse_args(argv)
  bt = winograd._BT.astype(np.float32)
  kron = jnp.asarray(np.kron(winograd._BT, winograd._BT), jnp.float32)
  m = args.tiles * args.cin
  x = jnp.asarray(np.random.default_rng(0).standard_normal((36, m), np.float32))
  xt = jnp.asarray(np.asarray(x).T.copy())
  b = jnp.asarray(bt)

  def elementwise(q):
    q = q.reshape(6, 6, m)
    t = jnp.stack([sum(float(bt[a, r]) * q[r] for r in range(6) if bt[a, r]) for a in range(6)])
    return jnp.stack([sum(float(bt[k, c]) * t[:, c] for c in range(6) if bt[k, c]) for k in range(6)],
                     axis=1).reshape(36, m)

  variants = {
      "kron": (jax.jit(lambda q: jnp.dot(kron, q)), x, False),
      "separable": (jax.jit(lambda q: jnp.einsum("bc,acm->abm", b, jnp.einsum("ar,rcm->acm", b, q.reshape(6, 6, m)))
                            .reshape(36, m)), x, False),
      "elementwise": (jax.jit(elementwise), x, False),
      "kron-transposed": (jax.jit(lambda q: jnp.dot(q, kron.T)), xt, True),
  }
  ref = np.asarray(variants["kron"][0](x))
  errs = {}
  for k, (f, a, transposed) in variants.items():
    out = np.asarray(f(a))
    errs[k] = float(np.max(np.abs((out.T if transposed else out) - ref)) / np.max(np.abs(ref)))
  times = {k: [] for k in variants}
  for _ in range(args.repeats):
    for k, (f, a, _) in variants.items():
      c, w = time.process_time(), time.perf_counter()
      jax.block_until_ready(f(a))
      times[k].append((time.process_time() - c, time.perf_counter() - w))
  gflop = 2e-9 * 36 * 36 * m
  for k, ts in times.items():
    cpu, wall = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
    print(f"tiles {args.tiles} C_in {args.cin} {k:16s} cpu {1e3 * cpu:6.1f} ms wall {1e3 * wall:6.1f} ms "
          f"({gflop / cpu:5.1f} GFLOP/CPU-s of the 36x36 product)  err {errs[k]:.1e}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
