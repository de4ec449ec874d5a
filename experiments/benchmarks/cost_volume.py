"""Cost-volume benchmark: forward+backward time and compiled memory of jaxflow.ops.correlation vs alternatives.

Run: `python experiments/benchmarks/cost_volume.py [--batch 8] [--repeats 3] [--quick]`

Cases: the PWC-Net pyramid of a 384x512 batch (levels 2..6 at 1/4..1/64 with 32/64/96/128/196 channels,
max displacement 4, stride 1 -> 81 channels) and FlowNetC (conv3 at 1/8: 48x64x256, max displacement 20,
stride 2 -> 441 channels).

Variants (all compute the same cost volume, float32):
  jaxflow      jaxflow.ops.correlation (impl 'tiled'): on CPU the C++ kernel (impl 'ffi') when it is available
  ffi          jaxflow.ops.correlation(impl='ffi'): the C++ XLA FFI kernel (jaxflow/ops/csrc/correlation.cc, session 9)
  gather_s8    jaxflow.ops.correlation(impl='tiled_gather'): T x T tiles x (T+2d)^2 windows as matmuls, custom VJP,
               the band read off / written into the blocks by gathers (CPU's default in session 8)
  s7           jaxflow.ops.correlation as at the end of session 7 (switched while traced: the backward's 1/C scale
               on the K*K-channel cotangent instead of on the per-image features)
  tiled_s6     the same with the pad/reshape skews (impl 'tiled_reshape': CPU's default until session 6,
               accelerators' default)
  scan         jaxflow.ops.correlation(impl='scan'): scan over the K*K displacements, custom VJP accumulating
               per displacement (jaxflow's implementation until session 3)
  scan_ad      the same forward scan differentiated by JAX autodiff (saves a shifted f2 per displacement)
  rows_ad      scan over dy rows with the dx shifts unrolled as static slices of a row slab, autodiff
  unrolled_ad  Python loops over all dy, dx (K*K fused multiply-reduce ops), autodiff
  band_mm      per dy row, a (W, C) x (C, W + 2d) matmul then the diagonal band is extracted, autodiff
  dense        stacks all K*K shifted copies of f2 and contracts: materialises K*K x C x H x W (memory only)

For each case and variant it prints the fwd+bwd wall time (median of --repeats after a warm-up) and
XLA's compiled memory analysis: temp bytes, and the ratio of (args + outputs + temp) to the memory floor
(args + outputs: f1, f2, the cotangent, the cost volume and both gradients), and temp as a fraction of the
K*K*C*H*W*B*4 bytes that a materialised intermediate would take.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import re
import time
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from jaxflow.ops import correlation
from jaxflow.ops.correlation import _forward


def _pad(x: jax.Array, d: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (d, d), (d, d), (0, 0)))


def corr_scan_ad(f1, f2, md, s):
  return _forward(f1, f2, md // s, s)


def corr_rows(f1, f2, md, s):
  """Scan over dy rows; the dx shifts are static slices of a (B, H, W + 2d, C) row slab (autodiff)."""
  b, h, w, c = f1.shape
  n = md // s
  k, d = 2 * n + 1, n * s
  f2p = _pad(f2, d)

  def row(_, i):
    slab = lax.dynamic_slice_in_dim(f2p, i * s, h, axis=1)
    return None, jnp.stack([jnp.mean(f1 * slab[:, :, j * s:j * s + w, :], axis=-1) for j in range(k)], axis=-1)

  _, rows = lax.scan(row, None, jnp.arange(k))
  return jnp.moveaxis(rows, 0, 3).reshape(b, h, w, k * k)


def corr_unrolled(f1, f2, md, s):
  b, h, w, c = f1.shape
  n = md // s
  k, d = 2 * n + 1, n * s
  f2p = _pad(f2, d)
  outs = [jnp.mean(f1 * f2p[:, i * s:i * s + h, j * s:j * s + w, :], axis=-1) for i in range(k) for j in range(k)]
  return jnp.stack(outs, axis=-1)


def corr_band_mm(f1, f2, md, s):
  """Per dy row: all-pairs dot products along the row by a matmul, then the band |x' - x| <= d is kept."""
  b, h, w, c = f1.shape
  n = md // s
  k, d = 2 * n + 1, n * s
  L = w + 2 * d
  f2p = _pad(f2, d)

  def row(_, i):
    slab = lax.dynamic_slice_in_dim(f2p, i * s, h, axis=1)  # (B, H, L, C)
    m = jnp.einsum("bhwc,bhlc->bhwl", f1, slab, precision=lax.Precision.HIGHEST) / c  # (B, H, W, L)
    # Skew: entry (x, x + t) sits at flat index x * (L + 1) + t.
    flat = jnp.pad(m.reshape(b, h, w * L), ((0, 0), (0, 0), (0, w)))
    band = flat.reshape(b, h, w, L + 1)[..., :2 * d + 1:s]  # (B, H, W, K)
    return None, band

  _, rows = lax.scan(row, None, jnp.arange(k))
  return jnp.moveaxis(rows, 0, 3).reshape(b, h, w, k * k)


def corr_dense(f1, f2, md, s):
  b, h, w, c = f1.shape
  n = md // s
  k, d = 2 * n + 1, n * s
  f2p = _pad(f2, d)
  shifted = jnp.stack([f2p[:, i * s:i * s + h, j * s:j * s + w, :] for i in range(k) for j in range(k)], axis=3)
  return jnp.einsum("bhwc,bhwkc->bhwk", f1, shifted, precision=lax.Precision.HIGHEST) / c


VARIANTS: dict[str, Callable] = {
    "jaxflow": correlation,
    "s7": correlation,  # traced under module switches (see SETUPS)
    "ffi": lambda f1, f2, md, s: correlation(f1, f2, md, s, impl="ffi"),
    "gather_s8": lambda f1, f2, md, s: correlation(f1, f2, md, s, impl="tiled_gather"),
    "tiled_s6": lambda f1, f2, md, s: correlation(f1, f2, md, s, impl="tiled_reshape"),
    "scan": lambda f1, f2, md, s: correlation(f1, f2, md, s, impl="scan"),
    "scan_ad": corr_scan_ad,
    "rows_ad": corr_rows,
    "unrolled_ad": corr_unrolled,
    "band_mm": corr_band_mm,
    "dense": corr_dense,
}


@contextlib.contextmanager
def _switches(**values):
  """Sets jaxflow.ops.correlation's module switches (e.g. _BWD_SCALE_FEATURES=False) while a variant is traced and
  compiled, for an A/B in one process; caches are cleared so that the inner jit is retraced."""
  corr_mod = importlib.import_module("jaxflow.ops.correlation")
  saved = {name: getattr(corr_mod, name) for name in values}
  for name, value in values.items():
    setattr(corr_mod, name, value)
  jax.clear_caches()
  try:
    yield
  finally:
    for name, value in saved.items():
      setattr(corr_mod, name, value)
    jax.clear_caches()


# Variants whose code is switched while they are traced and compiled: 's7' is session 7's code (the
# backward's 1/C scale on the cotangent).
SETUPS: dict[str, Callable] = {
    "s7": functools.partial(_switches, _BWD_SCALE_FEATURES=False),
}


def fwd_bwd(fn: Callable, md: int, s: int) -> Callable:
  def f(f1, f2, g):
    out, vjp = jax.vjp(lambda a, b: fn(a, b, md, s), f1, f2)
    return (out,) + vjp(g)
  return jax.jit(f)


def _kernel_count(hlo: str) -> int:
  """Approximate number of XLA:CPU kernels of a compiled program: fusions, plus the dots, copies,
  transposes, gathers, scatters, pads and slices left outside fusions (an op inside a fused computation is
  part of its fusion's kernel)."""
  fused = set(re.findall(r"calls=%([\w.-]+)", hlo))
  count, inside = 0, False
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%([\w.-]+) ", line)
    if head and line.rstrip().endswith("{"):
      inside = head.group(1) in fused
      continue
    if not inside and re.search(r" (fusion|dot|copy|transpose|gather|scatter|pad|slice|concatenate)\(", line):
      count += 1
  return count


def _mb(x: float) -> str:
  return f"{x / 2**20:9.1f}"


def run_case(name: str, shape: tuple[int, int, int, int], md: int, s: int, variants: list[str], repeats: int,
             no_run: tuple[str, ...] = ()) -> dict[str, tuple[float, float]]:
  b, h, w, c = shape
  k = 2 * (md // s) + 1
  key1, key2, key3 = jax.random.split(jax.random.key(0), 3)
  f1 = jax.random.normal(key1, shape, jnp.float32)
  f2 = jax.random.normal(key2, shape, jnp.float32)
  g = jax.random.normal(key3, (b, h, w, k * k), jnp.float32)
  floor = 4 * (3 * b * h * w * c + 2 * b * h * w * k * k)  # f1, f2, g in; out, df1, df2 out
  dense_bytes = 4 * b * k * k * c * h * w
  print(f"\n{name}: B,H,W,C = {shape}, max_displacement {md}, stride {s} -> {k * k} channels; "
        f"memory floor {_mb(floor).strip()} MB, K*K*C*H*W*B intermediate {_mb(dense_bytes).strip()} MB")
  print(f"  {'variant':12s} {'fwd+bwd ms':>11s} {'CPU ms':>8s} {'compile s':>10s} {'compile CPU':>10s} "
        f"{'kernels':>8s} {'temp MB':>9s} "
        f"{'total/floor':>12s} {'temp/KKCHW':>11s}")
  ref = None
  compiled_fns, stats = {}, {}
  for v in variants:
    f = fwd_bwd(VARIANTS[v], md, s)
    with SETUPS.get(v, contextlib.nullcontext)():
      t0, c0 = time.perf_counter(), time.process_time()
      compiled = f.lower(f1, f2, g).compile()
      t_compile, cpu_compile = time.perf_counter() - t0, time.process_time() - c0
    mem = compiled.memory_analysis()
    kernels = _kernel_count(compiled.as_text())
    stats[v] = (t_compile, cpu_compile, mem, kernels)
    if v not in no_run:
      out = jax.block_until_ready(compiled(f1, f2, g))
      if ref is None:
        ref = out
      else:
        err = max(float(jnp.max(jnp.abs(a - r))) for a, r in zip(out, ref))
        assert err < 1e-3, f"{v} disagrees with {variants[0]} by {err}"
      compiled_fns[v] = compiled
  # Repeats alternate between the variants (A B C A B C ...), so a change of machine load hits all alike.
  times: dict[str, list[float]] = {v: [] for v in compiled_fns}
  cpu: dict[str, list[float]] = {v: [] for v in compiled_fns}
  for _ in range(repeats):
    for v, compiled in compiled_fns.items():
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(compiled(f1, f2, g))
      times[v].append(time.perf_counter() - t0)
      cpu[v].append(time.process_time() - c0)
  results = {}
  for v in variants:
    t_compile, cpu_compile, mem, kernels = stats[v]
    temp = mem.temp_size_in_bytes
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + temp
    ms = cpu_ms = float("nan")
    if v in compiled_fns:
      ms, cpu_ms = 1e3 * float(np.median(times[v])), 1e3 * float(np.median(cpu[v]))
      results[v] = (ms, cpu_ms)
    shown = "not run" if v in no_run else f"{ms:.1f}"
    print(f"  {v:12s} {shown:>11s} {cpu_ms:8.1f} {t_compile:10.2f} {cpu_compile:10.2f} {kernels:8d} {_mb(temp)} "
          f"{total / floor:12.2f} {temp / dense_bytes:11.3f}")
  return results


@jax.custom_vjp
def _warp_s6(image: jax.Array, flow: jax.Array) -> jax.Array:
  """jaxflow.ops.warp's custom VJP as of session 6 (the A/B baseline): the four corners' values in one stored
  (B, 4HW, C) gather, and the image gradient as one batched scatter-add over the whole batch."""
  return _warp_s6_fwd(image, flow)[0]


def _warp_s6_fwd(image, flow):
  from jaxflow.ops.warp import _corners, _gather
  b, h, w, c = image.shape
  index, weight, inside, fx, fy = _corners(flow)
  vals = _gather(image.reshape(b, h * w, c), index.reshape(b, h * w * 4)).reshape(b, h * w, 4, c)
  out = jnp.sum(weight[..., None] * vals, axis=2).reshape(b, h, w, c)
  return out, (index, weight, inside, fx, fy, vals)


def _warp_s6_bwd(residuals, g):
  index, weight, inside, fx, fy, vals = residuals
  b, h, w, c = g.shape
  g = g.reshape(b, h * w, c)
  updates = (weight[..., None] * g[:, :, None, :]).reshape(b, h * w * 4, c)
  grad_image = jax.vmap(lambda i, u: jnp.zeros((h * w, c), g.dtype).at[i].add(u, mode="drop"))(
      index.reshape(b, h * w * 4), updates)
  dwx = jnp.stack([-(1 - fy), 1 - fy, -fy, fy], axis=-1) * inside
  dwy = jnp.stack([-(1 - fx), -fx, 1 - fx, fx], axis=-1) * inside
  gv = jnp.sum(g[:, :, None, :] * vals, axis=-1)
  grad_flow = jnp.stack([jnp.sum(gv * dwx, -1), jnp.sum(gv * dwy, -1)], axis=-1)
  return grad_image.reshape(b, h, w, c), grad_flow.reshape(b, h, w, 2)


_warp_s6.defvjp(_warp_s6_fwd, _warp_s6_bwd)


def run_warp(b: int, repeats: int) -> None:
  """PWC-Net's four warps (levels 5..2 of a 384x512 batch, features times the validity mask as in the model),
  forward + backward: jaxflow.ops.warp against session 6's custom VJP and plain autodiff, alternated."""
  from jaxflow.ops.warp import _corners, _mask_from_weights, warp, warp_reference

  def masked(fn):
    def f(image, flow):
      _, weight, _, _, _ = _corners(lax.stop_gradient(flow))
      return fn(image, flow) * _mask_from_weights(weight, image.shape[:3])[..., None]
    return f

  fns = {"jaxflow": warp, "warp_s6": _warp_s6, "autodiff": warp_reference}
  print("\nBackward warp fwd+bwd (PWC-Net levels 5..2 at 384x512, masked as in the model), alternated repeats")
  print(f"  {'level':6s} " + " ".join(f"{v + ' ms':>13s} {'CPU':>7s} {'compile s':>9s} {'kernels':>7s}" for v in fns))
  totals = {v: [0.0, 0.0] for v in fns}
  for level, h, w, c in [(5, 12, 16, 128), (4, 24, 32, 96), (3, 48, 64, 64), (2, 96, 128, 32)]:
    k1, k2, k3 = jax.random.split(jax.random.key(level), 3)
    image = jax.random.normal(k1, (b, h, w, c))
    flow = 3 * jax.random.normal(k2, (b, h, w, 2))
    g = jax.random.normal(k3, (b, h, w, c))
    compiled, info = {}, {}
    for v, fn in fns.items():
      f = jax.jit(lambda i, fl, ct, fn=fn: (lambda o, vjp: (o,) + vjp(ct))(*jax.vjp(masked(fn), i, fl)))
      t0 = time.perf_counter()
      compiled[v] = f.lower(image, flow, g).compile()
      info[v] = (time.perf_counter() - t0, _kernel_count(compiled[v].as_text()))
      out = jax.block_until_ready(compiled[v](image, flow, g))
      if v != "jaxflow":
        ref = compiled["jaxflow"](image, flow, g)
        err = max(float(jnp.max(jnp.abs(a - r))) for a, r in zip(out, ref))
        assert err < 1e-3, f"warp {v} disagrees with jaxflow by {err}"
    times = {v: [] for v in fns}
    cpu = {v: [] for v in fns}
    for _ in range(repeats):
      for v in fns:
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled[v](image, flow, g))
        times[v].append(1e3 * (time.perf_counter() - t0))
        cpu[v].append(1e3 * (time.process_time() - c0))
    row = []
    for v in fns:
      ms, cms = float(np.median(times[v])), float(np.median(cpu[v]))
      totals[v][0] += ms
      totals[v][1] += cms
      row.append(f"{ms:13.1f} {cms:7.1f} {info[v][0]:9.2f} {info[v][1]:7d}")
    print(f"  {level:<6d} " + " ".join(row))
  print("  four warps: " + ", ".join(f"{v} {ms:.1f} ms wall / {cms:.1f} ms CPU" for v, (ms, cms) in totals.items()))
  base = totals["warp_s6"]
  print(f"  jaxflow vs warp_s6: {base[0] / totals['jaxflow'][0]:.2f}x wall, {base[1] / totals['jaxflow'][1]:.2f}x CPU")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--variants", default="jaxflow,scan,scan_ad,rows_ad,unrolled_ad,band_mm,dense")
  parser.add_argument("--quick", action="store_true", help="only PWC-Net level 2 and FlowNetC")
  parser.add_argument("--warp", action="store_true", help="also time jaxflow.ops.warp against session 6's and autodiff")
  parser.add_argument("--no-flownetc", action="store_true", help="skip the FlowNetC case")
  parser.add_argument("--step-s", type=float, default=14.67,
                      help="PWC-Net 384x512 b8 train step (s) for the share figure (default: session 8's quiet median)")
  args = parser.parse_args()
  # The trainer's process set-up (platform.configure, before the backend starts): what a training step runs with.
  from jaxflow import platform
  applied = platform.configure(cache_dir=None)
  variants = args.variants.split(",")
  for v in variants:
    if v not in VARIANTS:
      raise SystemExit(f"unknown variant {v!r}; choose from {sorted(VARIANTS)}")
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}; "
        f"load average {os.getloadavg()[0]:.2f}; XLA_FLAGS {applied['xla_flags']!r}")
  b = args.batch
  pwc = [(2, 96, 128, 32), (3, 48, 64, 64), (4, 24, 32, 96), (5, 12, 16, 128), (6, 6, 8, 196)]
  if args.quick:
    pwc = pwc[:1]
  totals: dict[str, list[float]] = {}
  for level, h, w, c in pwc:
    # Every variant is affordable at PWC-Net sizes (81 displacements), so all are timed.
    for v, (ms, cpu_ms) in run_case(f"PWC-Net level {level}", (b, h, w, c), 4, 1, variants, args.repeats).items():
      totals.setdefault(v, [0.0, 0.0])
      totals[v][0] += ms
      totals[v][1] += cpu_ms
  print(f"\nPWC-Net levels {pwc[0][0]}..{pwc[-1][0]} at batch {b}, sum of the medians (fwd+bwd):")
  # Multiply-adds of the cost volume: forward B*H*W*C*K*K, backward twice that; 2 FLOPs each.
  gflop = sum(3 * 2 * b * h * w * c * 81 for _, h, w, c in pwc) / 1e9
  for v, (ms, cpu_ms) in totals.items():
    ratio = (f", {ms / totals[variants[0]][0]:.2f}x wall / {cpu_ms / totals[variants[0]][1]:.2f}x CPU time of "
             f"{variants[0]}'s" if v != variants[0] else "")
    share = (f", {100 * ms / 1e3 / args.step_s:.2f} % of a {args.step_s:g} s step"
             if (b, len(pwc)) == (8, 5) else "")
    print(f"  {v:12s} {ms:9.1f} ms wall, {cpu_ms:9.1f} ms CPU{ratio}{share}; {gflop:.2f} GFLOP: "
          f"{gflop / ms * 1e3:.1f} GFLOP/s wall, {gflop / cpu_ms * 1e3:.1f} GFLOP/CPU-s")
  # FlowNetC: a 441 x 256 x 48 x 64 x B intermediate (10.6 GB at B = 8) is what the autodiff scans and the
  # dense variant build, so those are compiled for their memory analysis but not run; the unrolled variant
  # (441 separate ops) takes minutes to compile and is left out.
  if not args.no_flownetc:
    run_case("FlowNetC conv3", (b, 48, 64, 256), 20, 2, [v for v in variants if v != "unrolled_ad"], args.repeats,
             no_run=("scan_ad", "rows_ad", "dense"))
  if args.warp:
    run_warp(b, args.repeats)
  print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
