r"""Where a training step's CPU time goes, per op class, jaxflow against the PyTorch reference.

  python -m experiments.benchmarks.step_profile --model pwcnet --height 192 --width 256 --batch 4 [--repeats 3]
      [--no-torch] [--layers 12]

--model: pwcnet, flownet_s, flownet_c or spynet, with the loss and optimiser of configs/<model>.py:chairs (as
train_throughput.py). --layers N also prints the N distinct convolutions with the most CPU time (all their
calls; forward / input gradient / weight gradient and GFLOP per CPU-second of each).

jaxflow: every convolution and transposed convolution of the model is recorded (shapes, strides, padding,
dilation) from one abstract trace; each distinct one is compiled on its own as three sub-programs, forward,
input gradient and weight gradient (the ones the training step uses: jaxflow.ops.conv's custom VJP on CPU), and
timed by process CPU time (medians of --repeats, each sub-program run alone). Their sums, times the number of
layers of that shape, give the convolution classes; the whole jitted training step is timed the same way, and
'everything else' (elementwise, concatenations, warps, cost volume, loss, optimiser, copies) is the
difference. Sub-programs timed alone miss fusion with neighbours, so the remainder is an estimate.

torch: `torch.profiler` over --repeats steps of experiments/benchmarks/torch_reference.py's training step, self
CPU time per aten op grouped into the same classes, scaled so that the classes add up to the step's process
CPU time (torch's profiler measures each op on the thread that calls it).

Both sides run with all cores; CPU seconds (process CPU time) are robust to other jobs on a shared machine.
Prints one table: class, jaxflow CPU-s, torch CPU-s, and the gap.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np


def _cpu_median(fn, args, repeats: int) -> float:
  import jax
  jax.block_until_ready(fn(*args))
  out = []
  for _ in range(repeats):
    c = time.process_time()
    jax.block_until_ready(fn(*args))
    out.append(time.process_time() - c)
  return statistics.median(out)


def record_convs(model, height: int, width: int, batch: int) -> list[tuple[str, tuple]]:
  """The model's convolutions from one abstract trace: [('conv' | 'dense conv' | 'deconv', (x shape (a tuple of
  the parts' shapes for a dense conv, jaxflow.ops.conv.conv2d_concat), w shape, strides, padding, dilation))],
  one entry per call (a layer applied to both frames at once counts once)."""
  import jax
  import jax.numpy as jnp
  from jaxflow.models import layers
  from jaxflow.ops import conv as conv_ops
  calls: list[tuple[str, tuple]] = []
  orig_conv, orig_cat = conv_ops.conv2d, conv_ops.conv2d_concat
  orig_ct = conv_ops.conv_transpose2d

  def rec_conv(x, w, strides=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), *, impl=None):
    calls.append(("conv", (tuple(x.shape), tuple(w.shape), tuple(strides), tuple(map(tuple, padding)),
                           tuple(dilation))))
    return orig_conv(x, w, strides, padding, dilation, impl=impl)

  def rec_ct(lhs, rhs, strides, padding, *, impl=None):
    calls.append(("deconv", (tuple(lhs.shape), tuple(rhs.shape), tuple(strides), tuple(map(tuple, padding)),
                             (1, 1))))
    return orig_ct(lhs, rhs, strides, padding, impl=impl)

  def rec_cat(xs, w, strides=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), *, impl=None):
    if len(xs) == 1:
      return rec_conv(xs[0], w, strides, padding, dilation, impl=impl)
    calls.append(("dense conv", (tuple(tuple(x.shape) for x in xs), tuple(w.shape), tuple(strides),
                                 tuple(map(tuple, padding)), tuple(dilation))))
    return orig_cat(xs, w, strides, padding, dilation, impl=impl)

  conv_ops.conv2d, layers.conv2d_concat = rec_conv, rec_cat
  layers.conv_transpose2d = rec_ct
  try:
    x = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32)
    jax.eval_shape(lambda a, b: model.init(jax.random.key(0), a, b), x, x)
  finally:
    conv_ops.conv2d, layers.conv2d_concat = orig_conv, orig_cat
    layers.conv_transpose2d = orig_ct
  return calls


def _conv_gflop(kind: str, xs, ws, out_shape) -> float:
  """Multiply-adds x 2 of one forward convolution, GFLOP (a transposed conv: its input positions x the kernel)."""
  kh, kw, cin, cout = ws
  if kind == "deconv":
    return 2e-9 * float(np.prod(xs[:3])) * kh * kw * cin * cout  # every input pixel meets every tap
  return 2e-9 * float(np.prod(out_shape[:3])) * kh * kw * cin * cout


def jax_profile(model_name: str, height: int, width: int, batch: int, repeats: int,
                layers: list | None = None) -> dict[str, float]:
  """CPU seconds per training step by class for one jaxflow model (see the module docstring). With `layers` a
  list, one row per distinct convolution is appended: (kind, shapes, calls, fwd, dx, dw CPU-s, GFLOP per call)."""
  import jax
  import jax.numpy as jnp
  from jax import lax
  from jaxflow.models import get_model
  from jaxflow.ops import conv as conv_ops
  from experiments.benchmarks.step_ab import build
  from experiments.benchmarks.train_throughput import _model_settings
  fields, loss_cfg, optim_cfg = _model_settings(model_name)
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k != "name"}
  model = get_model(model_name, **fields)
  calls = record_convs(model, height, width, batch)
  counts = collections.Counter(calls)
  rng = np.random.default_rng(0)
  out: dict[str, float] = collections.defaultdict(float)
  for (kind, (xs, ws, strides, padding, dilation)), n in counts.items():
    if kind == "dense conv":
      x = [jnp.asarray(rng.standard_normal(s, np.float32)) for s in xs]
    else:
      x = jnp.asarray(rng.standard_normal(xs, np.float32))
    w = jnp.asarray(rng.standard_normal(ws, np.float32) * 0.05)
    if kind == "dense conv":
      f = lambda x_, w_: conv_ops.conv2d_concat(x_, w_, strides, padding, dilation)
    elif kind == "conv":
      f = lambda x_, w_: conv_ops.conv2d(x_, w_, strides, padding, dilation)
    else:  # the models' transposed convolutions (layers.ConvTranspose)
      f = lambda x_, w_: conv_ops.conv_transpose2d(x_, w_, strides, padding)
    out_shape = jax.eval_shape(f, x, w).shape
    g = jnp.asarray(rng.standard_normal(out_shape, np.float32))
    fwd = jax.jit(f)
    dx = jax.jit(lambda x_, w_, g_: jax.vjp(lambda a: f(a, w_), x_)[1](g_)[0])
    dw = jax.jit(lambda x_, w_, g_: jax.vjp(lambda b: f(x_, b), w_)[1](g_)[0])
    t = [_cpu_median(fwd, (x, w), repeats), _cpu_median(dx, (x, w, g), repeats),
         _cpu_median(dw, (x, w, g), repeats)]
    for name, v in zip(("forward", "input gradient", "weight gradient"), t):
      out[f"{kind} {name}"] += n * v
    if layers is not None:
      layers.append((kind, str((xs, ws, strides, dilation)), n, *t,
                     _conv_gflop(kind, xs if kind != "dense conv" else xs[0], ws, out_shape)))
  compiled, state, batch_arrays, _ = build(model_name, height, width, batch, "auto", model_overrides=fields,
                                           loss_overrides=loss_cfg, optim_overrides=optim_cfg)
  step_cpu = []
  for _ in range(repeats + 1):
    c = time.process_time()
    state, m = compiled(state, batch_arrays)
    jax.block_until_ready(m)
    step_cpu.append(time.process_time() - c)
  total = statistics.median(step_cpu[1:])
  out["everything else"] = total - sum(out.values())
  out["step"] = total
  return dict(out)


# First match wins: the backward class is tested before the forward one (whose names are prefixes of it).
_TORCH_CLASSES = [
    ("conv backward (input + weight)", ("convolution_backward",)),
    ("conv forward", ("mkldnn_convolution", "aten::convolution", "aten::_convolution", "aten::conv2d",
                      "thnn_conv", "slow_conv", "_nnpack", "aten::conv_transpose2d", "aten::conv_")),
    ("concatenation", ("aten::cat",)),
    ("activation", ("leaky_relu",)),
    ("warp (grid_sample)", ("grid_sampler", "grid_sample")),
    ("optimizer", ("_foreach", "adam", "addcdiv", "lerp")),
]


def torch_profile(model_name: str, height: int, width: int, batch: int, repeats: int,
                  threads: int) -> dict[str, float]:
  """CPU seconds per training step by class for one torch reference model (see the module docstring)."""
  import torch
  from torch.profiler import ProfilerActivity, profile
  from experiments.benchmarks import torch_reference as tr
  from experiments.benchmarks.train_throughput import _model_settings
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  fields, loss_cfg, optim_cfg = _model_settings(model_name)
  model = tr.build(model_name, **{k: v for k, v in fields.items() if k != "name"})
  step = tr.make_train_step(model, loss_cfg, optim_cfg)
  rng = np.random.default_rng(0)
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
  b = {"image1": t(rng.random((batch, 3, height, width), dtype=np.float32)),
       "image2": t(rng.random((batch, 3, height, width), dtype=np.float32)),
       "flow": t(rng.normal(size=(batch, 2, height, width)).astype(np.float32) * 5),
       "valid": t(np.ones((batch, height, width), np.float32))}
  step(b)
  cpu = []
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(repeats):
      c = time.process_time()
      step(b)
      cpu.append(time.process_time() - c)
  total = statistics.median(cpu)
  by_class: dict[str, float] = collections.defaultdict(float)
  for e in prof.key_averages():
    name = e.key
    cls = next((c for c, keys in _TORCH_CLASSES if any(k in name for k in keys)), "everything else")
    by_class[cls] += e.self_cpu_time_total / 1e6 / repeats
  measured = sum(by_class.values())
  out = {k: v * total / measured for k, v in by_class.items()}
  out["step"] = total
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="pwcnet", choices=["pwcnet", "flownet_s", "flownet_c", "spynet"])
  p.add_argument("--layers", type=int, default=0, help="also list the N convolutions with the most CPU time")
  p.add_argument("--height", type=int, default=192)
  p.add_argument("--width", type=int, default=256)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
  p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker == "jax":
    rows: list = []
    prof = jax_profile(args.model, args.height, args.width, args.batch, args.repeats, rows)
    print(json.dumps({"classes": prof, "layers": rows}))
    return 0
  if args.worker == "torch":
    print(json.dumps({"classes": torch_profile(args.model, args.height, args.width, args.batch, args.repeats,
                                               args.torch_threads)}))
    return 0
  base = [sys.executable, "-m", "experiments.benchmarks.step_profile", "--model", args.model, "--height",
          str(args.height), "--width",
          str(args.width), "--batch", str(args.batch), "--repeats", str(args.repeats), "--torch-threads",
          str(args.torch_threads)]
  env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
  results = {}
  for kind in ["jax"] + ([] if args.no_torch else ["torch"]):
    r = subprocess.run(base + ["--worker", kind], capture_output=True, text=True, env=env, check=False)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode or not lines:
      sys.stderr.write(r.stderr[-3000:])
      raise SystemExit(f"step_profile: the {kind} worker failed (exit code {r.returncode})")
    results[kind] = json.loads(lines[-1])
  jx, tt = results["jax"]["classes"], results.get("torch", {}).get("classes", {})
  print(f"{args.model} {args.height}x{args.width} b{args.batch} float32, CPU-s per training step (medians of "
        f"{args.repeats}; load average {os.getloadavg()[0]:.1f})")
  print(f"{'class':34s} {'jaxflow':>9s} {'torch':>9s}")
  keys = [k for k in jx if k != "step"]
  for k in keys:
    print(f"{'jaxflow: ' + k:34s} {jx[k]:9.3f} {100 * jx[k] / jx['step']:5.1f} %")
  for k in [k for k in tt if k != "step"]:
    print(f"{'torch: ' + k:34s} {'':9s} {tt[k]:9.3f} {100 * tt[k] / tt['step']:5.1f} %")
  if tt:
    conv_j = sum(v for k, v in jx.items() if k.startswith(("conv", "deconv", "dense conv")))
    conv_t = sum(v for k, v in tt.items() if k.startswith("conv"))
    print(f"{'all convolutions':34s} {conv_j:9.3f} {conv_t:9.3f}  ratio {conv_j / conv_t:.2f}")
    print(f"{'everything else':34s} {jx['step'] - conv_j:9.3f} {tt['step'] - conv_t:9.3f}  ratio "
          f"{(jx['step'] - conv_j) / (tt['step'] - conv_t):.2f}")
  print(f"{'step':34s} {jx['step']:9.3f} {tt.get('step', float('nan')):9.3f}  CPU-time ratio torch / jaxflow "
        f"{tt.get('step', float('nan')) / jx['step']:.2f}")
  if args.layers:
    rows = sorted(results["jax"]["layers"], key=lambda r: -r[2] * sum(r[3:6]))[:args.layers]
    print(f"\nThe {len(rows)} costliest convolutions (CPU-ms for all calls; GFLOP per CPU-s of each pass):")
    print(f"{'kind':10s} {'(x, w, strides, dilation)':70s} {'calls':>5s} {'fwd':>7s} {'dx':>7s} {'dw':>7s} "
          f"{'GF/s fwd':>8s} {'dx':>6s} {'dw':>6s}")
    for kind, shapes, n, f, dx, dw, gf in rows:
      rate = lambda t: gf / t if t > 0 else float("nan")
      print(f"{kind:10s} {shapes[:70]:70s} {n:5d} {1e3 * n * f:7.1f} {1e3 * n * dx:7.1f} {1e3 * n * dw:7.1f} "
            f"{rate(f):8.1f} {rate(dx):6.1f} {rate(dw):6.1f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
