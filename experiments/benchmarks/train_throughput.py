r"""Training throughput of jaxflow against a PyTorch reference on the same machine, and against its matmul peak.

  python experiments/benchmarks/train_throughput.py --model pwcnet --height 384 --width 512 --batch 8
  python experiments/benchmarks/train_throughput.py --model spynet --height 128 --width 128 --batch 4 \
      --rounds 3 --steps 2                                          # a quick run, about a minute
  python -m experiments.benchmarks.train_throughput --all [--dtype bfloat16] --json /tmp/throughput.json
  python -m experiments.benchmarks.train_throughput --model pwcnet ... --no-torch     # jaxflow only
  python -m experiments.benchmarks.train_throughput --roofline /tmp/throughput.json --pipeline-rate 15.6

What is measured, per configuration (model, H x W, batch, dtype):
  jaxflow   the real trainer step: jaxflow.steps.make_train_step (model, the model config's multiscale loss,
            jaxflow.optim's Adam + coupled weight decay), jitted with the state donated, parameters replicated
            and the batch sharded over a ('data',) mesh, on random inputs already on the device(s), compiled
            with the model config's XLA compiler options (config.compiler_options, as the trainer does;
            --compiler-options overrides them for an A/B).
  torch     experiments/benchmarks/torch_reference.py: the same network (same parameter count; a test proves
            the forward passes equal), the same loss and optimiser, NCHW, eager PyTorch.
Each framework runs in its own worker subprocess (own imports, own peak RSS). Both are set up and warmed up;
then the parent alternates rounds: --steps steps of jaxflow, --steps steps of torch, --rounds times, so a
change of machine load hits both; step times are medians over all timed steps. A jaxflow step is timed to the
completion of its metrics (block_until_ready); a torch step ends with loss.item().

Reported (printed, and in --json as a list of dicts, one per configuration):
  pairs_per_s, torch_pairs_per_s, ratio (jaxflow / torch), step_s, torch_step_s (medians), cpu_s_per_step and
  torch_cpu_s_per_step (process CPU time per step: robust to other jobs on the machine);
  flops_per_step, bytes_accessed_per_step (XLA cost analysis of the compiled step, whole mesh);
  model_flops_per_step: the model's nominal FLOPs (direct convolutions): the step lowered with XLA's own
  convolutions and counted before compiling, so a fast path that multiplies less (e.g. Winograd) does not lower
  it; achieved_gflops and fraction_of_peak (model_flops_per_step / step_s against the machine's matmul peak, the best of a
  2048^3 matmul in jax and in torch, measured before and after the rounds in the same run in the same dtype; torch's achieved rate uses the
  same FLOP count, since the network is the same); fraction_of_peak_cpu and torch_fraction_of_peak_cpu: the same
  per CPU-second (step FLOPs / CPU-s per step against matmul FLOPs / CPU-s), and cpu_ratio (torch CPU-s per step
  / jaxflow CPU-s per step): the figures that stay meaningful when other jobs load the machine;
  compile_s (lowering + XLA compile of the step), init_s (parameter + optimiser state init);
  first_step_s: wall time from launching a fresh Python process (before it imports jax) to the end of the
  first finished training step, with an empty persistent compilation cache (cold); first_step_warm_s: the same
  in a second fresh process with the cache the first one wrote (warm); with --skip-cold the measured worker
  starts on an empty cache, so its start is reported as the cold one (first_step_s) and there is no warm figure;
  startup_overhead_s / startup_overhead_warm_s: the first step's time minus the median step (import, init,
  data transfer, compile or cache load); import_s, init_s, data_s, compile_s and their _warm twins split it; torch_first_step_s likewise for torch;
  startup / startup_warm: the split of each start as the trainer does it (parameter shapes `abstract_s`,
  executable-cache `key_s` and `load_s` on a hit or `lower_s` + `compile_s` + `store_s` on a miss,
  `compile_cpu_s`, the first step's own `first_step_exec_s` / `_cpu_s`, and `process_cpu_s` up to the end of the
  first step; --no-exec-cache, --init-method traced and --no-prefetch give earlier start-up paths for A/B);
  peak_rss_mib (VmHWM of the warm, measured jaxflow worker), peak_rss_cold_mib (the cold worker, which also compiled),
  torch_peak_rss_mib; and the exact settings (devices, threads, XLA_FLAGS, versions, commit, load average).
--roofline JSON projects the step time of each result on one accelerator from its FLOPs and bytes per step
(datasheet peaks in ACCELERATORS) and the input rate needed to feed it.

Warm-start A/B switches of the jaxflow worker (environment variables, for experiments/benchmarks/warm_start.py
--env-b): JAXFLOW_BENCH_LATE_LOAD=1 starts the cached step's background load after the imports and the model
build (session 5's point) instead of right after `import jax`, and draws the parameters there too;
JAXFLOW_BENCH_LATE_DRAWS=1 only draws the parameters in create_train_state instead of in the background from the
start. Neither changes any value (the first step's loss is the same).

Threads: torch uses torch.set_num_threads(--torch-threads, default all usable cores); jaxflow uses
--jax-devices CPU devices (1: one device whose XLA intra-op thread pool uses all cores; 2: a 2-device mesh via
--xla_force_host_platform_device_count, the batch split over them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

MODELS = ("flownet_s", "flownet_c", "spynet", "pwcnet")
# --all: each model at its paper's training crop and batch, plus the PWC-Net figure of issue #8.
#   FlowNetS / FlowNetC: 384 x 448 crops (FlowNet: 448 x 384), batch 8.
#   SpyNet: configs/spynet.py trains every stage on 384 x 512 Chairs images (all 5 pyramid levels present, the
#     finest at 384 x 512); the paper's batch is 32, here 8 like the others (the step cost is linear in batch).
#   PWC-Net: 384 x 448 crops, batch 8 (paper); 384 x 512 batch 8 is the headline.
ALL_RUNS = (("pwcnet", 384, 512, 8), ("pwcnet", 384, 448, 8), ("flownet_s", 384, 448, 8),
            ("flownet_c", 384, 448, 8), ("spynet", 384, 512, 8))
PREFIX = "@@ "  # worker -> parent protocol lines on stdout; everything else is passed through to stderr
MATMUL_N = 2048


def _usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _peak_rss_mib() -> float:
  """Peak resident set of this process image (MiB): VmHWM, which starts afresh at exec. (ru_maxrss would carry
  the parent's peak over fork + exec: a worker of a 650 MiB parent would never report less.)"""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.0  # kB
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # not Linux: KiB (macOS: bytes)


def _minor_faults() -> int:
  """Minor page faults of this process so far (first touches of fresh memory)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _reply(obj: dict[str, Any]) -> None:
  sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
  sys.stdout.flush()


def _host_batch(batch: int, height: int, width: int):
  """Random inputs (B, H, W, ...) float32 numpy: images in [0, 1], flow ~ N(0, 5^2) px, all pixels valid."""
  import numpy as np
  rng = np.random.default_rng(0)
  shape = (batch, height, width)
  return {"image1": rng.random(shape + (3,), dtype=np.float32), "image2": rng.random(shape + (3,), dtype=np.float32),
          "flow": (rng.standard_normal(shape + (2,)) * 5).astype(np.float32),
          "valid": np.ones(shape, np.float32)}


# ----------------------------------------------------------------------------------------------------------
# Workers (run as `--worker jax|torch --spec JSON` subprocesses; import their framework only there)


def _command_loop(run_steps, matmul_peak, nominal_flops=None) -> None:
  """Serves the parent: 'run N' -> step times; 'peak' -> matmul FLOP/s; 'nominal' -> the step's FLOPs with the
  framework's own convolutions (jax worker); 'quit'."""
  for line in sys.stdin:
    cmd = line.split()
    if not cmd:
      continue
    if cmd[0] == "run":
      times, cpu, faults = [], [], []
      for _ in range(int(cmd[1])):
        t, c, f = time.perf_counter(), time.process_time(), _minor_faults()
        info = run_steps()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        faults.append(_minor_faults() - f)
      _reply({"times": times, "cpu": cpu, "minor_faults": faults, "loss": info["loss"],
              "peak_rss_mib": _peak_rss_mib()})
    elif cmd[0] == "peak":
      wall, cpu = matmul_peak()
      _reply({"peak_flops_per_s": wall, "peak_flops_per_cpu_s": cpu})
    elif cmd[0] == "nominal" and nominal_flops is not None:
      _reply(nominal_flops())
    elif cmd[0] == "quit":
      _reply({"bye": True, "peak_rss_mib": _peak_rss_mib()})
      return
    else:
      _reply({"error": f"unknown command {line.strip()!r}"})


def _options(spec: dict[str, Any]) -> dict[str, Any] | None:
  """The step's XLA compiler options (the model config's, or --compiler-options'), as the trainer passes them."""
  from jaxflow import platform as jaxflow_platform
  return jaxflow_platform.compiler_options(spec.get("compiler_options") or {}, "compiler option ")


def _fast_tier(spec: dict[str, Any]) -> bool:
  """As the trainer: the first step runs on the step compiled with the options + LLVM -O0 when the model config's
  fast_compile_steps (or --fast-compile-steps) is > 0 and the backend is CPU."""
  import jax
  return int(spec.get("fast_compile_steps", 0)) > 0 and jax.default_backend() == "cpu"


def _first_entry(spec: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
  """As the trainer: the train step's entry (name, compiler options) to prefetch, its fast tier's when tiered."""
  from jaxflow import exec_cache
  return exec_cache.first_entry("train_step", _options(spec), _fast_tier(spec))


def _lookup_parts(spec: dict[str, Any]) -> dict[str, str]:
  """What names the cached train step's pointer before any model is built (the run's settings as JSON)."""
  return {k: json.dumps(spec[k], sort_keys=True) for k in ("model", "loss", "optim", "dtype")}


def _jax_worker(spec: dict[str, Any]) -> None:
  import functools

  import jax
  # As the trainer: a warm start begins loading the step's executable right after `import jax`, in a thread
  # (XLA's load releases the GIL), so it overlaps the other imports, the model build and the state init.
  pending = None
  early = spec.get("prefetch", True) and spec.get("exec_cache", True) and not os.environ.get("JAXFLOW_BENCH_LATE_LOAD")
  if early:
    from jaxflow import exec_cache, platform as jaxflow_platform
    jaxflow_platform.configure(cache_dir=os.environ["JAX_COMPILATION_CACHE_DIR"], min_compile_time_secs=0)
    # Tiered: the O0 tier first; the full step is loaded after it, in the background.
    first_name, first_options = _first_entry(spec)
    pending = exec_cache.prefetch(first_name, _lookup_parts(spec), exec_cache.default_dir(), first_options)
  # Likewise the parameters' host draws (the abstract tree this run's settings led to last), in threads.
  host_pending = None
  if early and not os.environ.get("JAXFLOW_BENCH_LATE_DRAWS"):
    from jaxflow import param_init
    host_pending = param_init.prefetch_host_variables(_lookup_parts(spec), 0, exec_cache.default_dir())
  import jax.numpy as jnp
  import ml_collections

  from jaxflow import losses, optim, parallel
  from jaxflow import steps as steps_lib
  from jaxflow.models import get_model
  from jaxflow import exec_cache, param_init
  from jaxflow.train_state import INIT_SIZE, create_train_state, make_init_fn
  try:  # the process set-up the trainer uses (XLA flags, conv implementation), with this run's cache dir
    from jaxflow import platform as jaxflow_platform
  except ImportError:
    jaxflow_platform = None
  if jaxflow_platform is not None:
    applied = jaxflow_platform.configure(cache_dir=os.environ["JAX_COMPILATION_CACHE_DIR"], min_compile_time_secs=0)
  else:
    applied = {}
  t_import = time.time()

  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["model"].items() if k != "name"}
  fields["dtype"] = spec["dtype"]
  model = get_model(spec["model"]["name"], **fields)
  h, w, b = spec["height"], spec["width"], spec["batch"]
  mesh = parallel.make_mesh()
  parallel.check_batch_size(b, mesh)
  optim_cfg = optim.default_config()
  optim_cfg.update(spec["optim"])
  tx = optim.make_optimizer(optim_cfg, 1_000_000)
  loss_cfg = ml_collections.ConfigDict(spec["loss"])
  rep = parallel.replicated(mesh)
  # The trainer's start-up path: parameter shapes from an abstract trace (or its JSON copy), values drawn on
  # the host, the small init program and the train step through jaxflow.exec_cache (unless --no-exec-cache).
  cache_dir = exec_cache.default_dir() if spec.get("exec_cache", True) else None
  parts = {"model": repr(model), "loss": json.dumps(spec["loss"], sort_keys=True),
           "optim": json.dumps(spec["optim"], sort_keys=True)}
  image_shape = (1, INIT_SIZE, INIT_SIZE, 3)
  if spec.get("prefetch", True) and not early:  # the load started after the imports and the model build
    first_name, first_options = _first_entry(spec)
    pending = exec_cache.prefetch(first_name, _lookup_parts(spec), cache_dir, first_options)
  variables = param_init.abstract_variables(model, image_shape, cache_dir=cache_dir, lookup_parts=_lookup_parts(spec))
  t_abstract = time.time()
  state, abstract = create_train_state(make_init_fn(model, tx, image_shape, variables=variables), 0, rep,
                                       method=spec.get("init_method", "host"), exec_cache_dir=cache_dir,
                                       cache_key_parts=parts, host_prefetch=host_pending)
  jax.block_until_ready(state)
  t_init = time.time()
  state_sharding = jax.tree.map(lambda a: a.sharding, abstract)
  step_fn = jax.jit(steps_lib.make_train_step(model, tx, functools.partial(losses.compute_loss, loss_cfg)),
                    in_shardings=(state_sharding, parallel.data_sharding(mesh)), out_shardings=(state_sharding, rep),
                    donate_argnums=0, compiler_options=_options(spec))
  batch = parallel.to_global(_host_batch(b, h, w), mesh)
  jax.block_until_ready(batch)
  t_data = time.time()
  if spec.get("lower_only"):  # diagnostics: is the lowered step identical across processes?
    import hashlib
    lowered = step_fn.lower(state, batch)
    _reply({"stablehlo_sha256": hashlib.sha256(lowered.as_text().encode()).hexdigest(),
            "stablehlo_debug_sha256": hashlib.sha256(lowered.as_text(debug_info=True).encode()).hexdigest()})
    return
  kw = dict(log=lambda m: print(m, file=sys.stderr), prefetched=pending, lookup_parts=_lookup_parts(spec),
            options_prefix="compiler option ")
  tiered = None
  if _fast_tier(spec):  # the trainer's tiers (exec_cache.TieredStep): O0 for the first step, the full one after
    tiered = exec_cache.TieredStep.build(step_fn, "train_step", parts, cache_dir, _options(spec),
                                         int(spec["fast_compile_steps"]), **kw)
    cached, full = tiered.fast, tiered.full
  else:
    cached = exec_cache.CachedFunction(step_fn, "train_step", parts, cache_dir, _options(spec), **kw)
  t_trace = time.time()
  if cache_dir is None:  # split tracing from lowering (the exec cache's miss path lowers in one call)
    step_fn.trace(state, batch)
  t_trace = time.time() - t_trace
  c_compile = time.process_time()
  compiled = cached.compile(state, batch)
  abstract = None
  if tiered is not None:
    tiered.fast.compiled = compiled
    abstract = exec_cache.abstract_args((state, batch))  # the full compile starts after the first step (trainer)
  c_compile = time.process_time() - c_compile
  t_compile = time.time()
  startup = {"abstract_s": t_abstract - t_import, "exec_cache_hit": cached.hit, "trace_s": t_trace,
             "first_step_tier": "O0 (fast_compile_steps)" if tiered is not None else "full",
             "early_draws_used": bool(host_pending is not None and host_pending.used),
             "compile_cpu_s": c_compile, **{f"{k}_s": v for k, v in cached.timings.items()}}
  if spec.get("compile_only"):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    n = mesh.devices.size
    _reply({"compile_s": t_compile - t_data, "flops_per_step": float(cost["flops"]) * n,
            "bytes_accessed_per_step": float(cost["bytes accessed"]) * n, "devices": n,
            "peak_rss_mib": _peak_rss_mib(), "jax_version": jax.__version__})
    return
  c_first, f_first = time.process_time(), _minor_faults()
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  t_first = time.time()
  startup["first_step_exec_s"], startup["first_step_exec_cpu_s"] = t_first - t_compile, time.process_time() - c_first
  startup["first_step_exec_minor_faults"] = _minor_faults() - f_first
  if tiered is not None:  # as exec_cache.TieredStep: the O0 entry's write, then the full compile, in the background
    tiered.tiers.append((0, "fast"))
    tiered.start_full(abstract)
  startup["process_cpu_s"] = time.process_time()
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - a deserialized executable may not carry its cost analysis
    cost = None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  devices = mesh.devices.size
  # The cost analysis of an SPMD-partitioned module counts one device's share: scale to the whole mesh.
  flops = float(cost.get("flops", float("nan"))) * devices if cost else float("nan")
  bytes_accessed = float(cost.get("bytes accessed", float("nan"))) * devices if cost else float("nan")
  t0 = spec["t0"]
  # --timeline-steps: wall seconds from the process start to the end of each of the first N steps (the trainer's
  # tiers: steps < fast_compile_steps on O0, then the full step, waited for at the switch).
  step_times = [t_first - t0]
  for i in range(1, int(spec.get("timeline_steps", 0))):
    fn = (lambda s, b: tiered(i, s, b)) if tiered is not None else compiled
    state, metrics = fn(state, batch)
    jax.block_until_ready(metrics)
    step_times.append(time.time() - t0)
  if len(step_times) > 1:
    startup["step_times_s"] = step_times
    startup["timeline_process_cpu_s"] = time.process_time()
  _reply({"import_s": t_import - t0, "init_s": t_init - t_import, "data_s": t_data - t_init,
          "compile_s": t_compile - t_data, "first_step_s": t_first - t0, "flops_per_step": flops,
          "bytes_accessed_per_step": bytes_accessed, "devices": devices, "backend": jax.default_backend(),
          "loss": float(metrics["loss"]), "peak_rss_mib": _peak_rss_mib(), "jax_version": jax.__version__,
          "platform_configure": {k: v for k, v in applied.items() if k != "cache_dir"}, "startup": startup,
          "tensorflow_imported": "tensorflow" in sys.modules})
  if tiered is not None:  # the steady rounds run the full program (a cold worker: it is stored before exiting)
    tiered.wait_full()
    compiled = full.compiled
  if spec.get("first_step_only"):
    return
  holder = {"state": state}

  def run_step():
    holder["state"], m = compiled(holder["state"], batch)
    return {"loss": float(jax.block_until_ready(m)["loss"])}

  for _ in range(spec["warmup"]):
    run_step()

  def matmul_peak() -> float:
    dtype = jnp.dtype(spec["dtype"])
    sharding = parallel.data_sharding(mesh)
    x = jax.device_put(jnp.ones((devices, MATMUL_N, MATMUL_N), dtype), sharding)
    y = jax.device_put(jnp.ones((devices, MATMUL_N, MATMUL_N), dtype), sharding)
    f = jax.jit(lambda p, q: jnp.einsum("bij,bjk->bik", p, q, preferred_element_type=jnp.float32))
    f(x, y).block_until_ready()
    best, best_cpu = float("inf"), float("inf")
    for _ in range(8):
      t, c = time.perf_counter(), time.process_time()
      f(x, y).block_until_ready()
      best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
    flops = 2.0 * devices * MATMUL_N ** 3
    return flops / best, flops / best_cpu

  def nominal_flops() -> dict[str, float]:
    # The model's FLOPs as the usual convention counts them (direct convolutions): the step lowered with XLA's
    # own convolutions (conv impl 'lax') and counted by XLA's cost analysis of the lowered module, not compiled.
    # A CPU fast path that does fewer multiplies (e.g. Winograd) lowers the compiled program's count, so the
    # fraction of peak is computed from this figure.
    from jaxflow.ops import conv as conv_ops
    old = conv_ops.get_default_impl()
    conv_ops.set_default_impl("lax")
    try:
      fn = jax.jit(steps_lib.make_train_step(model, tx, functools.partial(losses.compute_loss, loss_cfg)),
                   in_shardings=(state_sharding, parallel.data_sharding(mesh)), out_shardings=(state_sharding, rep))
      cost = fn.lower(holder["state"], batch).cost_analysis()
    finally:
      conv_ops.set_default_impl(old)
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"model_flops_per_step": float(cost["flops"]) * devices}

  _reply({"ready": True})
  _command_loop(run_step, matmul_peak, nominal_flops)


def _torch_worker(spec: dict[str, Any]) -> None:
  import torch
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  from experiments.benchmarks import torch_reference as tr
  t_import = time.time()
  torch.set_num_threads(spec["torch_threads"])
  torch.manual_seed(0)
  model = tr.build(spec["model"]["name"], **{k: v for k, v in spec["model"].items() if k != "name"})
  step = tr.make_train_step(model, spec["loss"], spec["optim"], spec["dtype"])
  host = _host_batch(spec["batch"], spec["height"], spec["width"])
  batch = {k: torch.from_numpy(v.transpose(0, 3, 1, 2).copy() if v.ndim == 4 else v) for k, v in host.items()}
  t_init = time.time()
  info = step(batch)
  t_first = time.time()
  _reply({"import_s": t_import - spec["t0"], "init_s": t_init - t_import, "first_step_s": t_first - spec["t0"],
          "loss": info["loss"], "params": tr.param_count(model), "threads": torch.get_num_threads(),
          "peak_rss_mib": _peak_rss_mib(), "torch_version": torch.__version__})
  for _ in range(spec["warmup"]):
    step(batch)

  def matmul_peak() -> float:
    dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    x = torch.ones(MATMUL_N, MATMUL_N, dtype=dtype)
    y = torch.ones(MATMUL_N, MATMUL_N, dtype=dtype)
    torch.mm(x, y)
    best, best_cpu = float("inf"), float("inf")
    for _ in range(8):
      t, c = time.perf_counter(), time.process_time()
      torch.mm(x, y)
      best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
    return 2.0 * MATMUL_N ** 3 / best, 2.0 * MATMUL_N ** 3 / best_cpu

  _reply({"ready": True})
  _command_loop(lambda: step(batch), matmul_peak)


# ----------------------------------------------------------------------------------------------------------
# Parent


class Worker:
  """A worker subprocess; `request` sends a command line and returns its JSON reply."""

  def __init__(self, kind: str, spec: dict[str, Any], env: dict[str, str]):
    spec = dict(spec, t0=time.time())
    self.kind = kind
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", kind, "--spec",
                                  json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                 text=True, bufsize=1)

  def read(self) -> dict[str, Any]:
    for line in self.proc.stdout:
      if line.startswith(PREFIX):
        reply = json.loads(line[len(PREFIX):])
        if "error" in reply:
          raise RuntimeError(f"{self.kind} worker: {reply['error']}")
        return reply
      sys.stderr.write(f"[{self.kind}] {line}")
    code = self.proc.wait()
    raise RuntimeError(f"{self.kind} worker exited with code {code} before answering (see its stderr above)")

  def request(self, command: str) -> dict[str, Any]:
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    return self.read()

  def close(self) -> dict[str, Any] | None:
    reply = None
    if self.proc.poll() is None:
      try:
        reply = self.request("quit")
      except (RuntimeError, BrokenPipeError):
        pass
      try:
        self.proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    return reply


def _model_settings(name: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """(model fields, loss config, optim config) of configs/<name>.py:chairs, as plain JSON-able dicts.

  The benchmark trains every parameter (SpyNet's per-stage freezing is not applied), with the paper config's
  loss (weights, div_flow, reduction) and optimiser (Adam, coupled decay 4e-4 on kernels, base lr).
  """
  import importlib
  config = importlib.import_module(f"configs.{name}").get_config("chairs")
  plain = lambda d: {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.to_dict().items()}
  model = plain(config.model)
  model.pop("dtype", None)
  return model, plain(config.loss), plain(config.optim)


def model_compiler_options(name: str) -> dict[str, str]:
  """The XLA compiler options of configs/<name>.py:chairs (config.compiler_options: what the trainer compiles the
  step with), as a plain dict."""
  import importlib
  config = importlib.import_module(f"configs.{name}").get_config("chairs")
  return {k: v for k, v in (config.get("compiler_options") or {}).items()}


def model_fast_compile_steps(name: str, height: int, width: int, batch: int) -> int:
  """The model config's fast_compile_steps (how many first steps the trainer runs on the O0 tier) at this size:
  configs/<name>.py:local's at or below its 128x128 batch-4 size, else configs/<name>.py:chairs's (PWC-Net's
  local variant sets 1, every other variant 0)."""
  import importlib
  variant = "local" if height * width * batch <= 128 * 128 * 4 else "chairs"
  return int(importlib.import_module(f"configs.{name}").get_config(variant).get("fast_compile_steps", 0))


def parse_options(text: str | None, name: str) -> dict[str, str]:
  """--compiler-options: None or 'config' -> the model config's; 'none' or '' -> none (XLA's defaults);
  'NAME=VALUE NAME=VALUE' -> those."""
  if text is None or text.strip() == "config":
    return model_compiler_options(name)
  if text.strip().lower() in ("", "none"):
    return {}
  out = {}
  for tok in text.split():
    if "=" not in tok:
      raise ValueError(f"--compiler-options: {tok!r} is not NAME=VALUE (or give 'config' / 'none')")
    k, v = tok.split("=", 1)
    out[k] = v
  return out


def _jax_env(devices: int, cache_dir: str) -> dict[str, str]:
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "")
  if devices > 1:
    flags = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  if flags:
    env["XLA_FLAGS"] = flags
  env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
  env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


def _split(st: dict[str, Any]) -> str:
  """One line of a worker's start-up split (seconds; see the module docstring)."""
  keys = ("abstract_s", "trace_s", "key_s", "load_s", "load_background_s", "lower_s", "compile_s", "store_s", "compile_cpu_s",
          "first_step_exec_s", "first_step_exec_cpu_s", "process_cpu_s")
  return (f"exec cache {'hit' if st.get('exec_cache_hit') else 'miss/off'}"
          f"{', early draws used' if st.get('early_draws_used') else ''}; "
          + ", ".join(f"{k[:-2]} {st[k]:.2f}" for k in keys if k in st))


def _git_commit() -> str:
  try:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         timeout=10)
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def benchmark(name: str, height: int, width: int, batch: int, args: argparse.Namespace) -> dict[str, Any]:
  """One configuration: cold + warm jaxflow workers, a torch worker, A/B rounds; returns the result dict."""
  model, loss, optim_cfg = _model_settings(name)
  spec = {"model": model, "loss": loss, "optim": optim_cfg, "height": height, "width": width, "batch": batch,
          "dtype": args.dtype, "warmup": args.warmup, "torch_threads": args.torch_threads,
          "exec_cache": not args.no_exec_cache, "init_method": args.init_method, "prefetch": not args.no_prefetch,
          "compiler_options": parse_options(args.compiler_options, name),
          "fast_compile_steps": (model_fast_compile_steps(name, height, width, batch) if args.fast_compile_steps is None
                                 else args.fast_compile_steps), "timeline_steps": args.timeline_steps}
  result: dict[str, Any] = {
      "model": name, "dtype": args.dtype, "height": height, "width": width, "batch": batch,
      "jax_devices": args.jax_devices, "torch_threads": args.torch_threads,
      "torch_omp_wait_policy": args.torch_omp_wait, "steps": args.steps,
      "rounds": args.rounds, "warmup": args.warmup, "cores": _usable_cores(), "cpu": _cpu_model(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "compiler_options": spec["compiler_options"],
      "fast_compile_steps": spec["fast_compile_steps"],
      "commit": _git_commit(),
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "loadavg_start": os.getloadavg()[0], "loss_config": loss}
  print(f"  jaxflow step's XLA compiler options: {spec['compiler_options'] or '(XLA defaults)'}", flush=True)
  with tempfile.TemporaryDirectory(prefix="jaxflow_bench_cache_") as cache:
    env = _jax_env(args.jax_devices, cache)
    if args.cost_only:
      worker = Worker("jax", dict(spec, compile_only=True), env)
      try:
        result.update(worker.read())
      finally:
        worker.proc.wait()
      return result
    if not args.skip_cold:
      # Cold: a fresh process, empty persistent compilation cache (it fills it).
      cold = Worker("jax", dict(spec, first_step_only=True), env)
      try:
        c = cold.read()
      finally:
        cold.close()
        cold.proc.wait()
      result.update(first_step_s=c["first_step_s"], compile_s=c["compile_s"], init_s=c["init_s"],
                    import_s=c["import_s"], peak_rss_cold_mib=c["peak_rss_mib"], startup=c["startup"],
                    cold_flops_per_step=c["flops_per_step"], cold_bytes_accessed_per_step=c["bytes_accessed_per_step"])
      print(f"  cold start: first step after {c['first_step_s']:.1f} s (import {c['import_s']:.1f}, init "
            f"{c['init_s']:.1f}, compile {c['compile_s']:.1f}); {c['flops_per_step'] / 1e9:.1f} GFLOP, "
            f"{c['bytes_accessed_per_step'] / 1e9:.2f} GB per step", flush=True)
      print(f"  cold split: {_split(c['startup'])}", flush=True)
      print(f"  cold first step ran on: {c['startup'].get('first_step_tier', 'full')}"
            + (f"; steps 1..{len(c['startup']['step_times_s'])} done after "
               + ", ".join(f"{t:.1f}" for t in c['startup']['step_times_s']) + " s"
               if 'step_times_s' in c['startup'] else ""), flush=True)
    # Warm: a second fresh process reusing the cache; it stays up as the measured jaxflow worker.
    jaxw = Worker("jax", spec, env)
    torchw = None
    try:
      wm = jaxw.read()
      result.update(flops_per_step=wm["flops_per_step"], bytes_accessed_per_step=wm["bytes_accessed_per_step"],
                    backend=wm["backend"], jax_version=wm["jax_version"],
                    platform_configure=wm["platform_configure"])
      if wm["flops_per_step"] != wm["flops_per_step"] and "cold_flops_per_step" in result:  # NaN: loaded executable
        result.update(flops_per_step=result["cold_flops_per_step"],
                      bytes_accessed_per_step=result["cold_bytes_accessed_per_step"])
      # With --skip-cold this worker is the first to use the (empty) cache: its start is a cold one.
      tag = "" if args.skip_cold else "_warm"
      result.update({f"first_step{tag}_s": wm["first_step_s"], f"compile{tag}_s": wm["compile_s"],
                     f"init{tag}_s": wm["init_s"], f"import{tag}_s": wm["import_s"], f"data{tag}_s": wm["data_s"],
                     f"startup{tag}": wm["startup"]})
      print(f"  {'cold (--skip-cold: empty cache)' if args.skip_cold else 'warm'} start: first step after "
            f"{wm['first_step_s']:.1f} s (import {wm['import_s']:.1f}, init {wm['init_s']:.1f}, data "
            f"{wm['data_s']:.1f}, compile {wm['compile_s']:.1f})", flush=True)
      print(f"  {'cold' if args.skip_cold else 'warm'} split: {_split(wm['startup'])}; TensorFlow imported before the "
            f"first step: {wm['tensorflow_imported']}; first step ran on: "
            f"{wm['startup'].get('first_step_tier', 'full')}", flush=True)
      jaxw.read()  # ready (warmed up)
      if not args.no_torch:
        torch_env = dict(os.environ)
        if args.torch_omp_wait != "default":
          torch_env["OMP_WAIT_POLICY"] = args.torch_omp_wait.upper()
        torchw = Worker("torch", spec, torch_env)
        tm = torchw.read()
        result.update(torch_first_step_s=tm["first_step_s"], torch_params=tm["params"],
                      torch_threads=tm["threads"], torch_version=tm["torch_version"])
        torchw.read()
      reply = jaxw.request("peak")
      peaks, cpu_peaks = {"jax": reply["peak_flops_per_s"]}, {"jax": reply["peak_flops_per_cpu_s"]}
      if torchw:
        reply = torchw.request("peak")
        peaks["torch"], cpu_peaks["torch"] = reply["peak_flops_per_s"], reply["peak_flops_per_cpu_s"]
      times: dict[str, list[float]] = {"jax": [], "torch": []}
      cpu: dict[str, list[float]] = {"jax": [], "torch": []}
      for r in range(args.rounds):
        for key, wk in (("jax", jaxw), ("torch", torchw)):
          if wk is None:
            continue
          rep = wk.request(f"run {args.steps}")
          times[key] += rep["times"]
          cpu[key] += rep["cpu"]
          result[f"{key}_loss"] = rep["loss"]
        print(f"  round {r + 1}/{args.rounds}: jaxflow {statistics.median(times['jax'][-args.steps:]):.3f} s/step"
              + (f", torch {statistics.median(times['torch'][-args.steps:]):.3f} s/step" if torchw else ""),
              flush=True)
      # The matmul peak again after the rounds (each worker's best of both): a single measurement can fall in a
      # slow moment (another process's threads still spinning, the host's frequency); the higher figure gives the
      # lower, conservative fraction of peak.
      for key, wk in (("jax", jaxw), ("torch", torchw)):
        if wk is not None:
          reply = wk.request("peak")
          peaks[key] = max(peaks[key], reply["peak_flops_per_s"])
          cpu_peaks[key] = max(cpu_peaks[key], reply["peak_flops_per_cpu_s"])
      result["model_flops_per_step"] = jaxw.request("nominal")["model_flops_per_step"]
      result["peak_rss_mib"] = jaxw.close()["peak_rss_mib"]
      if torchw:
        result["torch_peak_rss_mib"] = torchw.close()["peak_rss_mib"]
    finally:
      jaxw.close()
      if torchw:
        torchw.close()
  peak, cpu_peak = max(peaks.values()), max(cpu_peaks.values())
  step_s = statistics.median(times["jax"])
  cpu_step = statistics.median(cpu["jax"])
  # Achieved FLOP/s and the fraction of peak count the model's nominal FLOPs (direct convolutions, as papers and
  # MFU figures do), the same number for jaxflow and torch; flops_per_step stays the compiled program's count.
  flops = result.get("model_flops_per_step", result["flops_per_step"])
  # Load-robust variant: FLOPs per CPU-second of the step against FLOPs per CPU-second of the matmul.
  result.update(peak_gflops_per_cpu_s=cpu_peak / 1e9, fraction_of_peak_cpu=flops / cpu_step / cpu_peak)
  result.update(step_times=times["jax"], step_s=step_s, cpu_s_per_step=cpu_step,
                pairs_per_s=batch / step_s, achieved_gflops=flops / step_s / 1e9,
                peak_gflops=peak / 1e9, jax_matmul_gflops=peaks["jax"] / 1e9,
                fraction_of_peak=flops / step_s / peak, loadavg_end=os.getloadavg()[0])
  # Start-up overhead: the first step's time from process start minus a steady step (import, init, data, compile).
  for tag in ("", "_warm"):
    if f"first_step{tag}_s" in result:
      result[f"startup_overhead{tag}_s"] = result[f"first_step{tag}_s"] - step_s
  if torchw:
    t_step = statistics.median(times["torch"])
    result.update(torch_step_times=times["torch"], torch_step_s=t_step,
                  torch_cpu_s_per_step=statistics.median(cpu["torch"]), torch_pairs_per_s=batch / t_step,
                  torch_fraction_of_peak_cpu=flops / statistics.median(cpu["torch"]) / cpu_peak,
                  cpu_ratio=statistics.median(cpu["torch"]) / cpu_step,
                  ratio=t_step / step_s, torch_achieved_gflops=flops / t_step / 1e9,
                  torch_fraction_of_peak=flops / t_step / peak,
                  torch_matmul_gflops=peaks["torch"] / 1e9)
  return result


# Datasheet peaks of one accelerator (dense; no structured sparsity), FLOP/s and HBM bytes/s:
#   NVIDIA A100 SXM 80GB datasheet: FP32 19.5 TFLOP/s, TF32 Tensor Core 156, BF16 Tensor Core 312; HBM2e
#     2,039 GB/s (the 40GB A100: 1,555 GB/s).
#   NVIDIA H100 SXM5 datasheet: FP32 67 TFLOP/s, TF32 Tensor Core 494.7 (989 with sparsity), BF16 989.4
#     (1,979 with sparsity); HBM3 3.35 TB/s.
#   Google Cloud TPU v4 (per chip, 2 TensorCores): 275 TFLOP/s bf16, 1,200 GB/s HBM2; per core half of each.
#   Google Cloud TPU v5e (per chip = 1 TensorCore): 197 TFLOP/s bf16, 819 GB/s HBM2.
ACCELERATORS = (
    # name, compute precision, peak FLOP/s, HBM bytes/s
    ("A100 SXM FP32", "float32", 19.5e12, 2.039e12),
    ("A100 SXM TF32", "float32", 156e12, 2.039e12),
    ("A100 SXM BF16", "bfloat16", 312e12, 2.039e12),
    ("H100 SXM FP32", "float32", 67e12, 3.35e12),
    ("H100 SXM TF32", "float32", 494.7e12, 3.35e12),
    ("H100 SXM BF16", "bfloat16", 989.4e12, 3.35e12),
    ("TPU v4 core BF16", "bfloat16", 137.5e12, 0.6e12),
    ("TPU v5e chip BF16", "bfloat16", 197e12, 0.819e12),
)


def roofline(results: list[dict[str, Any]], pipeline_pairs_per_core_s: float | None = None) -> str:
  """A markdown table projecting each measured configuration's step time on one accelerator.

  step = max(flops_per_step / peak, bytes_accessed_per_step / bandwidth) with the datasheet figures above.
  float32 results are projected on FP32 and TF32 peaks, bfloat16 results on BF16 peaks; a float32 result is
  also projected on BF16 peaks as an estimate (same FLOPs, half the bytes), marked 'bf16 est.'. The needed
  input rate is batch / step (pairs/s) and, given the synthetic pipeline's pairs/s per CPU core, the host cores
  that would feed it. A lower bound on the step time: it assumes every op runs at peak or at full bandwidth.
  """
  cores_col = pipeline_pairs_per_core_s is not None
  lines = ["| model | size, batch | dtype | GFLOP/step | GB/step | accelerator | bound | step (ms) | pairs/s needed"
           + (" | pipeline cores |" if cores_col else " |"),
           "|---|---|---|---|---|---|---|---|---" + ("|---|" if cores_col else "|")]
  for r in results:
    for acc, precision, peak, bandwidth in ACCELERATORS:
      if precision == r["dtype"]:
        dtype, nbytes = r["dtype"], r["bytes_accessed_per_step"]
      elif precision == "bfloat16" and r["dtype"] == "float32":
        dtype, nbytes = "bf16 est.", 0.5 * r["bytes_accessed_per_step"]
      else:
        continue
      compute, memory = r["flops_per_step"] / peak, nbytes / bandwidth
      step = max(compute, memory)
      rate = r["batch"] / step
      row = (f"| {r['model']} | {r['height']}x{r['width']}, {r['batch']} | {dtype} | "
             f"{r['flops_per_step'] / 1e9:.0f} | {nbytes / 1e9:.1f} | {acc} | "
             f"{'compute' if compute >= memory else 'memory'} | {1e3 * step:.1f} | {rate:.0f}")
      if cores_col:
        row += f" | {rate / pipeline_pairs_per_core_s:.0f}"
      lines.append(row + " |")
  return "\n".join(lines)


def _summary(r: dict[str, Any]) -> str:
  if "step_s" not in r:  # --cost-only
    return (f"{r['model']:9s} {r['dtype']:8s} {r['height']}x{r['width']} b{r['batch']}: "
            f"{r['flops_per_step'] / 1e9:.0f} GFLOP & {r['bytes_accessed_per_step'] / 1e9:.1f} GB per step "
            f"(XLA cost analysis), compile {r['compile_s']:.1f} s")
  s = (f"{r['model']:9s} {r['dtype']:8s} {r['height']}x{r['width']} b{r['batch']}: jaxflow {r['pairs_per_s']:.2f} "
       f"pairs/s ({r['step_s']:.2f} s/step, {r['achieved_gflops']:.0f} GFLOP/s = "
       f"{100 * r['fraction_of_peak']:.0f}% of {r['peak_gflops']:.0f})")
  if "ratio" in r:
    s += (f", torch {r['torch_pairs_per_s']:.2f} pairs/s ({100 * r['torch_fraction_of_peak']:.0f}% of peak), "
          f"ratio {r['ratio']:.2f} (CPU-time ratio {r['cpu_ratio']:.2f}; per CPU-s jaxflow "
          f"{100 * r['fraction_of_peak_cpu']:.0f}% / torch {100 * r['torch_fraction_of_peak_cpu']:.0f}% of the "
          f"matmul's {r['peak_gflops_per_cpu_s']:.0f} GFLOP/CPU-s)")
  s += (f"; {r.get('model_flops_per_step', r['flops_per_step']) / 1e9:.0f} GFLOP nominal, compiled program "
        f"{r['flops_per_step'] / 1e9:.0f} GFLOP & {r['bytes_accessed_per_step'] / 1e9:.1f} GB/step; first step ")
  if "first_step_s" in r:
    s += (f"cold {r['first_step_s']:.1f} s (compile {r['compile_s']:.1f} s, overhead over a step "
          f"{r.get('startup_overhead_s', float('nan')):.1f} s)")
  if "first_step_warm_s" in r:
    s += (f"{' / ' if 'first_step_s' in r else ''}warm {r['first_step_warm_s']:.1f} s (overhead "
          f"{r.get('startup_overhead_warm_s', float('nan')):.1f} s)")
  s += f"; peak RSS jaxflow {r['peak_rss_mib']:.0f} MiB"
  if "peak_rss_cold_mib" in r:
    s += f" (cold process {r['peak_rss_cold_mib']:.0f})"
  if "torch_peak_rss_mib" in r:
    s += f", torch {r['torch_peak_rss_mib']:.0f} MiB"
  return s


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description="Training throughput: jaxflow vs a PyTorch reference, vs the peak.")
  parser.add_argument("--model", choices=MODELS)
  parser.add_argument("--all", action="store_true",
                      help="every model at its paper crop and batch, plus PWC-Net 384x512 b8 (see ALL_RUNS)")
  parser.add_argument("--height", type=int, default=128)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--steps", type=int, default=2, help="steps per framework per round")
  parser.add_argument("--rounds", type=int, default=5, help="A/B rounds (jaxflow steps, then torch steps)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first, per worker")
  parser.add_argument("--jax-devices", type=int, default=1,
                      help="CPU devices for jaxflow: 1 (intra-op threads) or 2 (a 2-device mesh)")
  parser.add_argument("--torch-threads", type=int, default=_usable_cores())
  parser.add_argument("--torch-omp-wait", default="passive", choices=("passive", "active", "default"),
                      help="OMP_WAIT_POLICY of the torch worker. passive (default): idle OpenMP threads sleep; "
                           "with active spinning a 2-thread torch step runs 3.5x slower whenever another "
                           "process competes for the cores (measured here), which would make a shared machine "
                           "favour jaxflow")
  parser.add_argument("--no-torch", action="store_true", help="jaxflow only")
  parser.add_argument("--cost-only", action="store_true",
                      help="only compile the jaxflow step and report its FLOPs and bytes (for --roofline)")
  parser.add_argument("--fast-compile-steps", type=int, default=None,
                      help="first steps on the O0-compiled step, as the trainer (default: the model config's "
                           "fast_compile_steps, of its local variant at <= 128x128 b4, else of chairs; 0 = the full "
                           "program from the first step)")
  parser.add_argument("--timeline-steps", type=int, default=0,
                      help="the cold worker also runs this many steps and reports when each finished (from its start)")
  parser.add_argument("--skip-cold", action="store_true",
                      help="no cold-start process (first_step_s and peak_rss_cold_mib are then not measured)")
  parser.add_argument("--no-exec-cache", action="store_true",
                      help="compile the train step through jit + the persistent compilation cache only (no "
                           "jaxflow.exec_cache executables): the start-up path before the executable cache")
  parser.add_argument("--no-prefetch", action="store_true",
                      help="load the cached train step when it is first called instead of in a thread during the "
                           "state init (the start-up path before exec_cache.prefetch; for A/B)")
  parser.add_argument("--init-method", default="host", choices=("host", "traced"),
                      help="parameter init: host (numpy draws, jaxflow.param_init) or traced (a compiled model.init)")
  parser.add_argument("--compiler-options", default=None,
                      help="XLA compiler options of jaxflow's step: 'config' (default: the model config's "
                           "config.compiler_options, as the trainer), 'none' (XLA's defaults) or 'NAME=VALUE ...'")
  parser.add_argument("--json", default=None, help="write the results (a list of dicts) to this file")
  parser.add_argument("--roofline", metavar="JSON", default=None,
                      help="print the accelerator projection table of a results file and exit")
  parser.add_argument("--pipeline-rate", type=float, default=None,
                      help="with --roofline: synthetic pipeline pairs/s per CPU core (pipeline_throughput.py)")
  parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  parser.add_argument("--spec", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    (_jax_worker if args.worker == "jax" else _torch_worker)(json.loads(args.spec))
    return 0
  if args.roofline:
    with open(args.roofline) as f:
      print(roofline(json.load(f), args.pipeline_rate))
    return 0
  if not args.all and not args.model:
    parser.error("give --model NAME or --all")
  for key in ("steps", "rounds", "jax_devices", "torch_threads", "batch", "height", "width"):
    if getattr(args, key) < 1:
      parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
  if args.warmup < 0:
    parser.error("--warmup must be >= 0")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if root not in sys.path:
    sys.path.insert(0, root)  # `python experiments/benchmarks/train_throughput.py` finds configs/
  runs = list(ALL_RUNS) if args.all else [(args.model, args.height, args.width, args.batch)]
  print(f"{_cpu_model()}, {_usable_cores()} usable cores; dtype {args.dtype}; jaxflow on {args.jax_devices} CPU "
        f"device(s), torch {args.torch_threads} thread(s); {args.rounds} rounds x {args.steps} steps each",
        flush=True)
  results = []
  for name, h, w, b in runs:
    print(f"{name} {h}x{w} batch {b} {args.dtype}", flush=True)
    r = benchmark(name, h, w, b, args)
    results.append(r)
    print(_summary(r), flush=True)
    if args.json:  # rewritten after every configuration, so a long --all run keeps what it measured
      with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
  if len(results) > 1:
    print("\nsummary")
    for r in results:
      print(_summary(r))
  return 0


if __name__ == "__main__":
  sys.exit(main())
