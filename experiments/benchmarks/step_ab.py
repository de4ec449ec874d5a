r"""A/B timing of one model's jitted training step under two convolution-gradient implementations, alternated
in one process (robust to the load of a shared machine): wall and process-CPU seconds per step, medians.

  python -m experiments.benchmarks.step_ab --model pwcnet --height 192 --width 256 --batch 4 --repeats 5

Prints per variant: compile seconds, median step wall / CPU seconds, pairs/s, and the ratio B / A
(A = 'lax': XLA's convolution gradients; B = 'matmul': jaxflow.ops.conv's matmul weight gradient; also
'matmul-scan': the matmul weight gradient with the per-tap scan at stride 1 instead of the blocked product;
'matmul-s4': session 4's CPU path, without the patch product for small convolutions and with XLA's transposed
convolutions; 'matmul-s5': session 5's CPU path, without the 'split' weight gradient and with a slice per tap
instead of a gather in the blocked one; 'matmul-s6': session 6's CPU path, XLA's forward and input-gradient
convolutions where Winograd F(4x4, 3x3) now runs; 'matmul-s7': session 7's, the 'blocked' weight gradient where
Winograd's now runs; 'matmul-mem7': the default with session 7's memory behaviour: its Winograd loop
(winograd._LOOP 'map'), LeakyReLU by autodiff of the where (layers._LEAKY_FROM_OUTPUT False) and concatenations'
input gradients whole and sliced); 'matmul-cv8': the default with session 8's cost volume (jnp 'tiled_gather')
instead of the C++ kernel (jaxflow.ops.correlation_ffi); 'matmul-s9': session 9's CPU path (XLA's convolution, not
the tap product, for the forward of few output channels).

A variant may add XLA compiler options for its step after a '+': 'IMPL+config' compiles with the model config's
config.compiler_options (as the trainer does), 'IMPL+NAME=VALUE[+NAME=VALUE]' with those; plain 'IMPL' with XLA's
defaults. E.g. `--variants matmul,matmul+config` (PWC-Net: its YNNPACK option, off / on).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import jax
import numpy as np


def build(model_name: str, height: int, width: int, batch: int, impl: str, dtype: str = "float32",
          model_overrides: dict | None = None, lower_only: bool = False, loss_overrides: dict | None = None,
          optim_overrides: dict | None = None, compiler_options: dict | None = None):
  """The jitted training step (state donated) on random inputs: (compiled, state, batch, compile seconds), or
  (jitted step, state, batch) with lower_only. loss_overrides / optim_overrides: fields set on the default
  loss / optimiser configs (e.g. a model config's, as train_throughput.py uses). compiler_options: the step's
  XLA compiler options (None: XLA's defaults)."""
  from jaxflow import losses, optim
  from jaxflow import steps as steps_lib
  from jaxflow.models import get_model
  from jaxflow.ops import conv as conv_ops
  from jaxflow.models import layers as layers_lib
  from jaxflow.ops import winograd as winograd_ops
  from jaxflow.train_state import INIT_SIZE, create_train_state, make_init_fn
  # 'matmul-cv8': the default with session 8's cost volume (jnp 'tiled_gather') instead of the C++ kernel.
  import sys as _sys  # the correlation module (jaxflow.ops.correlation is the function)
  _sys.modules["jaxflow.ops.correlation"]._CPU_TILED = "tiled_gather" if impl == "matmul-cv8" else "ffi"
  jax.clear_caches()
  # 'matmul-scan': the matmul weight gradient with the per-tap scan for stride 1 (the default before 'blocked').
  conv_ops._STRIDE1_MODE = "scan" if impl == "matmul-scan" else "blocked"
  # 'matmul-s4': session 4's CPU path (no patch product for small convolutions, XLA's transposed convolutions).
  conv_ops._IM2COL_MAX_POSITIONS = 0 if impl == "matmul-s4" else 1536
  conv_ops._MATMUL_TRANSPOSE = impl != "matmul-s4"
  # 'matmul-s5' (and 'matmul-s4'): no 'split' weight gradient (session 5's stride-1 modes).
  conv_ops._SPLIT = conv_ops._GATHER_TAPS = impl not in ("matmul-s5", "matmul-s4")
  # 'matmul-s6' (and the earlier ones): XLA's forward and input-gradient convolutions, no Winograd.
  conv_ops._WINOGRAD = impl not in ("matmul-s6", "matmul-s5", "matmul-s4")
  # 'matmul-s7' (and the earlier ones): the 'blocked' weight gradient where Winograd's now runs.
  conv_ops._WINOGRAD_WGRAD = impl not in ("matmul-s7", "matmul-s6", "matmul-s5", "matmul-s4")
  # 'matmul-mem7': session 7's memory behaviour (Winograd loop, LeakyReLU residual, whole concat input gradients).
  winograd_ops._LOOP = "map" if impl == "matmul-mem7" else "write"
  layers_lib._LEAKY_FROM_OUTPUT = impl != "matmul-mem7"
  conv_ops._SPLIT_DX_MIN_BYTES = 2**62 if impl == "matmul-mem7" else 16 * 2**20
  # 'matmul-gather9': before the data-parallel fix (warp backward loop unpartitioned, PWC-Net frames concatenated).
  import importlib as _importlib
  _importlib.import_module("jaxflow.ops.warp")._PARTITION_BWD = impl != "matmul-gather9"
  layers_lib._INTERLEAVE_FRAMES = False if impl == "matmul-gather9" else None
  # 'matmul-s9': session 9's CPU path: XLA's convolution for the forward of few output channels (no tap product).
  conv_ops._TAPS_MAX_COUT = 0 if impl == "matmul-s9" else 8
  impl = "matmul" if impl in ("matmul-s9", "matmul-cv8", "matmul-scan", "matmul-s4", "matmul-s5", "matmul-s6",
                              "matmul-s7", "matmul-mem7", "matmul-gather9") else impl
  conv_ops.set_default_impl(impl)
  model = get_model(model_name, dtype=dtype, **(model_overrides or {}))
  shape = (batch, height, width, 3)
  rng = np.random.default_rng(0)
  host = {"image1": rng.random(shape, dtype=np.float32), "image2": rng.random(shape, dtype=np.float32),
          "flow": rng.normal(size=shape[:3] + (2,)).astype(np.float32) * 5, "valid": np.ones(shape[:3], np.float32)}
  n_levels = len(jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), host["image1"][:1], host["image2"][:1])[0])["flows"])
  loss_cfg = losses.default_config()
  loss_cfg.weights = losses.FLOWNET_WEIGHTS if n_levels == 5 else (1.0,) * n_levels
  if loss_overrides:
    loss_cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in loss_overrides.items()})
  optim_cfg = optim.default_config()
  if optim_overrides:
    optim_cfg.update(optim_overrides)
  tx = optim.make_optimizer(optim_cfg, 1000)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state, _ = create_train_state(make_init_fn(model, tx, (1, INIT_SIZE, INIT_SIZE, 3)), 0, dev)
  step = jax.jit(steps_lib.make_train_step(model, tx, functools.partial(losses.compute_loss, loss_cfg)),
                 donate_argnums=0, compiler_options=compiler_options or None)
  batch_arrays = jax.device_put(host, dev)
  if lower_only:
    conv_ops.set_default_impl("auto")
    conv_ops._IM2COL_MAX_POSITIONS, conv_ops._MATMUL_TRANSPOSE, conv_ops._SPLIT = 1536, True, True
    conv_ops._GATHER_TAPS = conv_ops._WINOGRAD = conv_ops._WINOGRAD_WGRAD = True
    conv_ops._TAPS_MAX_COUT = 8
    winograd_ops._LOOP, layers_lib._LEAKY_FROM_OUTPUT, conv_ops._SPLIT_DX_MIN_BYTES = "write", True, 16 * 2**20
    return step, state, batch_arrays
  t = time.perf_counter()
  compiled = step.lower(state, batch_arrays).compile()
  compile_s = time.perf_counter() - t
  conv_ops.set_default_impl("auto")
  conv_ops._STRIDE1_MODE = "blocked"
  conv_ops._IM2COL_MAX_POSITIONS, conv_ops._MATMUL_TRANSPOSE, conv_ops._SPLIT = 1536, True, True
  conv_ops._GATHER_TAPS = conv_ops._WINOGRAD = conv_ops._WINOGRAD_WGRAD = True
  conv_ops._TAPS_MAX_COUT = 8
  winograd_ops._LOOP, layers_lib._LEAKY_FROM_OUTPUT, conv_ops._SPLIT_DX_MIN_BYTES = "write", True, 16 * 2**20
  return compiled, state, batch_arrays, compile_s


def add_step_args(p: argparse.ArgumentParser, height: int = 192, width: int = 256, batch: int = 4) -> None:
  """The model / size / batch flags shared by the step benchmarks (step_ab, step_memory, compile_time)."""
  p.add_argument("--model", default="pwcnet")
  p.add_argument("--height", type=int, default=height)
  p.add_argument("--width", type=int, default=width)
  p.add_argument("--batch", type=int, default=batch)


def split_variant(variant: str, model_name: str) -> tuple[str, dict | None]:
  """'matmul+config' -> ('matmul', the model config's compiler options); 'matmul+NAME=VALUE+...' -> those."""
  impl, *opts = variant.split("+")
  options: dict = {}
  for o in opts:
    if o == "config":
      import importlib
      from jaxflow import platform
      config = importlib.import_module(f"configs.{model_name}").get_config("chairs")
      options.update(platform.compiler_options(config.get("compiler_options") or {}) or {})
    elif "=" in o:
      k, v = o.split("=", 1)
      options[k] = v
    else:
      raise ValueError(f"variant {variant!r}: {o!r} is neither 'config' nor NAME=VALUE")
  return impl, options or None


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_step_args(p)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--variants", default="lax,matmul")
  args = p.parse_args(argv)
  variants = args.variants.split(",")
  runs = {}
  for v in variants:
    impl, options = split_variant(v, args.model)
    c = time.process_time()
    compiled, state, batch, compile_s = build(args.model, args.height, args.width, args.batch, impl, args.dtype,
                                              compiler_options=options)
    c = time.process_time() - c
    w, c1 = time.perf_counter(), time.process_time()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    first = (time.perf_counter() - w, time.process_time() - c1)
    runs[v] = [compiled, state, batch]
    print(f"{v}: compile {compile_s:.1f} s (build + compile {c:.1f} CPU-s), first execution {first[0]:.2f} s "
          f"({first[1]:.2f} CPU-s); options {options or '(XLA defaults)'}", flush=True)
  time_alternated(runs, args.repeats, f"{args.model} {args.height}x{args.width} b{args.batch}", args.batch)
  return 0


def time_alternated(runs: dict[str, list], repeats: int, label: str, batch: int) -> dict[str, tuple[float, float]]:
  """Runs each variant's step (runs[v] = [compiled, state, batch]; the state is replaced by each step's output)
  `repeats` times, alternating the variants, and prints the median wall and CPU time per step of each and its
  speed-up over the first. Returns {variant: (median wall s, median CPU s)}."""
  times = {v: ([], []) for v in runs}
  for _ in range(repeats):
    for v, r in runs.items():
      w, c = time.perf_counter(), time.process_time()
      r[1], m = r[0](r[1], r[2])
      jax.block_until_ready(m)
      times[v][0].append(time.perf_counter() - w)
      times[v][1].append(time.process_time() - c)
  out, base, first = {}, None, next(iter(runs))
  for v in runs:
    wall, cpu = statistics.median(times[v][0]), statistics.median(times[v][1])
    base = base or (wall, cpu)
    out[v] = (wall, cpu)
    print(f"{label} {v:7s}: step wall {wall * 1e3:.0f} ms (cpu {cpu * 1e3:.0f} ms), {batch / wall:.2f} pairs/s; "
          f"speed-up vs {first}: wall {base[0] / wall:.2f}x, cpu {base[1] / cpu:.2f}x", flush=True)
  return out


if __name__ == "__main__":
  sys.exit(main())
