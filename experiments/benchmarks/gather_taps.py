r"""A proposal for ops/conv.py, measured without editing it: the blocked stride-1 weight gradient's K = kh * kw
shifted output-gradient windows taken by one gather instead of K dynamic slices.

  python -m experiments.benchmarks.gather_taps                                  # one block's windows: A/B
  python -m experiments.benchmarks.gather_taps --check                          # equality on SpyNet's shapes
  python -m experiments.benchmarks.gather_taps --step --model spynet --steps 3  # train step A/B, both orders

jaxflow.ops.conv._weight_grad_blocked builds, per block of R image rows, the (R*W, K*C_out) matrix of the K taps'
windows of the zero-padded output gradient with K `lax.dynamic_slice`s and a concatenation. XLA:CPU compiles
every slice as its own kernel (`slice_bitcast_fusion`: 240 of SpyNet's 522 kernels at 128x128 b4, ~40 CPU-ms of
compile each) and does not fuse them into the concatenation. The same matrix is one gather from the padded
gradient flattened to (N, H'*W', C_out): row p of tap t reads position base[p, t] + r * W' (base precomputed on
the host), so the block's matrix is one kernel. Values are identical (the same elements are copied, the product
is unchanged): --check compares the weight gradients bitwise. The default run compiles and times one block's
(R*W, K*C_out) matrix both ways (49 taps of a 7x7 kernel, SpyNet's channel counts): kernels, compile CPU-s,
run time. --step patches the module function at run time for the 'gather' variant only (this file's `patch`)
and A/Bs the whole train step in one process, both orders; it says so when the model's weight gradients do not
go through the blocked path (then the two programs are the same). Figures: BENCHMARKS.md (session 6).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxflow.ops import conv as conv_ops


def weight_grad_blocked_gather(xs: Sequence[jax.Array], gp: jax.Array, offsets: Sequence[tuple[int, int]],
                               kernel_hw: tuple[int, int], cout: int, acc) -> jax.Array:
  """conv_ops._weight_grad_blocked with the taps' windows gathered: same arguments, same (kh, kw, C_in, C_out)
  result. xs: parts (N, H, W, C_p); gp: (N, H', W', C_out) padded output gradient; offsets: K (row, column)
  window starts in gp."""
  n, h, w, _ = xs[0].shape
  rows = conv_ops._block_rows(h, w)
  per_image = h // rows
  xbs = [p.reshape(n * per_image, rows * w, p.shape[-1]) for p in xs]
  hp, wp = gp.shape[1:3]
  flat = gp.reshape(n, hp * wp, cout)
  ys, xs_ = np.meshgrid(np.arange(rows), np.arange(w), indexing="ij")
  base = np.stack([(ys + oy) * wp + (xs_ + ox) for oy, ox in offsets], axis=-1).reshape(-1).astype(np.int32)
  k_taps = len(offsets)

  def body(totals, k):
    b, r = k // per_image, (k % per_image) * rows
    image = lax.dynamic_index_in_dim(flat, b, keepdims=False)  # (H'*W', C_out)
    gs = jnp.take(image, base + r * wp, axis=0, mode="clip").reshape(rows * w, k_taps * cout)
    return tuple(t + lax.dot_general(lax.dynamic_index_in_dim(xb, k, keepdims=False), gs,
                                     (((0,), (0,)), ((), ())), preferred_element_type=acc)
                 for t, xb in zip(totals, xbs)), None

  init = tuple(jnp.zeros((p.shape[-1], k_taps * cout), acc) for p in xs)
  totals, _ = lax.scan(body, init, jnp.arange(n * per_image))
  total = totals[0] if len(totals) == 1 else jnp.concatenate(totals, axis=0)
  cin = total.shape[0]
  return jnp.transpose(total.reshape(cin, kernel_hw[0], kernel_hw[1], cout), (1, 2, 0, 3))


_ORIGINAL = conv_ops._weight_grad_blocked


def patch(gather: bool) -> None:
  """Use the gather variant (True) or the module's own function (False) for the next trace."""
  conv_ops._weight_grad_blocked = weight_grad_blocked_gather if gather else _ORIGINAL


def check() -> None:
  """Bitwise equality of the two on SpyNet-like layers (7x7, padding 3, 128x128 and 16x16, 8-32-64 channels)."""
  rng = np.random.default_rng(0)
  for (n, h, w, cin, cout) in ((2, 16, 16, 8, 32), (1, 128, 128, 32, 64), (2, 32, 32, 64, 32)):
    x = jnp.asarray(rng.normal(size=(n, h, w, cin)).astype(np.float32))
    g = jnp.asarray(rng.normal(size=(n, h, w, cout)).astype(np.float32))
    args = (x, g, (7, 7, cin, cout), ((3, 3), (3, 3)), (1, 1), "blocked", jnp.float32)
    patch(False)
    ref = jax.jit(lambda x, g: conv_ops._weight_grad_stride1(x, g, *args[2:]))(x, g)
    patch(True)
    got = jax.jit(lambda x, g: conv_ops._weight_grad_stride1(x, g, *args[2:]))(x, g)
    patch(False)
    same = bool(np.array_equal(np.asarray(ref), np.asarray(got)))
    print(f"{n}x{h}x{w} {cin}->{cout} 7x7: weight gradient bitwise equal: {same}", flush=True)
    if not same:
      raise SystemExit("gather variant differs")


def block_ab(repeats: int = 50) -> None:
  """One block's tap matrix by K dynamic slices (the module's form) and by one gather, per SpyNet-like shape."""
  offsets = [(i, j) for i in range(7) for j in range(7)]
  for (n, hp, wp, rows, w, cout) in ((4, 134, 134, 4, 128, 32), (4, 38, 38, 16, 32, 64), (4, 24, 22, 16, 16, 16)):
    gp = jnp.asarray(np.random.default_rng(0).normal(size=(n, hp, wp, cout)).astype(np.float32))
    ys, xs = np.meshgrid(np.arange(rows), np.arange(w), indexing="ij")
    base = np.stack([(ys + oy) * wp + (xs + ox) for oy, ox in offsets], axis=-1).reshape(-1).astype(np.int32)

    def slices(gp, b, r):
      return jnp.concatenate([lax.dynamic_slice(gp, (b, r + oy, ox, 0), (1, rows, w, cout)).reshape(rows * w, cout)
                              for oy, ox in offsets], axis=-1)

    def gather(gp, b, r):
      image = lax.dynamic_index_in_dim(gp.reshape(n, hp * wp, cout), b, keepdims=False)
      return jnp.take(image, base + r * wp, axis=0, mode="clip").reshape(rows * w, len(offsets) * cout)

    out = {}
    for name, fn in (("slices", slices), ("gather", gather)):
      lowered = jax.jit(fn).lower(gp, 1, 2)
      c = time.process_time()
      compiled = lowered.compile()
      compile_cpu = time.process_time() - c
      jax.block_until_ready(compiled(gp, 1, 2))
      wall, cpu = [], []
      for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out[name] = jax.block_until_ready(compiled(gp, 1, 2))
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
      print(f"block {rows}x{w} positions x 49 taps x {cout} channels, {name}: {compiled.as_text().count(' fusion(')} "
            f"fusions, compile {compile_cpu:.2f} CPU-s, run median {statistics.median(wall) * 1e3:.3f} ms wall / "
            f"{statistics.median(cpu) * 1e3:.3f} CPU-ms", flush=True)
    print(f"  equal: {bool(np.array_equal(np.asarray(out['slices']), np.asarray(out['gather'])))}", flush=True)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="spynet")
  p.add_argument("--height", type=int, default=128)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--check", action="store_true", help="bitwise equality of the weight gradients")
  p.add_argument("--step", action="store_true", help="A/B of the whole train step")
  args = p.parse_args(argv)
  jax.config.update("jax_enable_compilation_cache", False)
  if args.check:
    check()
    return 0
  if not args.step:
    block_ab()
    return 0
  from experiments.benchmarks import compile_time
  runs: dict[str, list] = {"slices": [], "gather": []}
  for variant in ("slices", "gather", "gather", "slices"):
    patch(variant == "gather")
    r = compile_time.measure("step", args.model, args.height, args.width, args.batch, {}, args.steps, True)
    patch(False)
    runs[variant].append(r)
    print(f"{args.model} {args.height}x{args.width} b{args.batch} {variant}: compile {r['compile_s']:.1f} s wall / "
          f"{r['compile_cpu_s']:.1f} CPU-s, {r['phases']['kernels']} kernels, {r['fusions']} fusions; step "
          f"{r['step_s']:.3f} s wall / {r['step_cpu_s']:.3f} CPU-s", flush=True)
  if runs["slices"][0]["hlo_instructions"] == runs["gather"][0]["hlo_instructions"]:
    print("the two programs are the same: this model's weight gradients do not use ops.conv's blocked path")
  for variant, rs in runs.items():
    med = lambda k: statistics.median(r[k] for r in rs)
    print(f"median {variant}: compile {med('compile_cpu_s'):.1f} CPU-s, step {med('step_s'):.3f} s wall / "
          f"{med('step_cpu_s'):.3f} CPU-s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
