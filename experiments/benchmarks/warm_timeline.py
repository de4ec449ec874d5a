r"""Per-thread timeline of one warm start to the end of the first training step (train_throughput's worker).

  python -m experiments.benchmarks.warm_timeline --model pwcnet --cache-dir /tmp/cache [--bin-ms 100]

Runs experiments/benchmarks/train_throughput.py's jax worker in this process (first step only, 128x128 b4 unless
told otherwise) with a sampler thread that every 10 ms reads each thread's CPU seconds (/proc/self/task/*/stat,
so XLA's own threads are seen too) and the Python stacks of the Python threads. Prints, per thread with at least
30 CPU-ms, its CPU use per --bin-ms bin (percent of one core) and what its Python stack was doing most often in
the bin: the outermost module being imported under the worker, else the three outermost frames under it.
Threads without Python frames (XLA's thread pool: the executable's rebuild, the step's execution) show CPU only.
Fill the cache first (a warm_start or train_throughput run with the same --cache-dir); Linux only. The sampler
costs ~5 % of one core.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

T0 = time.time()  # before anything heavy is imported: the worker's clock starts here

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments.benchmarks import train_throughput as tt  # noqa: E402  (jax-free)

_TICK = os.sysconf("SC_CLK_TCK")


class Sampler:
  """Samples every thread's CPU seconds and the Python threads' stacks every `interval` seconds."""

  def __init__(self, interval: float = 0.01):
    self.interval = interval
    self.samples: list[tuple[float, dict[int, float], dict[int, list[str]]]] = []
    self.names: dict[int, str] = {}
    self._stop = False
    self._thread = threading.Thread(target=self._run, daemon=True, name="timeline-sampler")

  def start(self) -> None:
    self._thread.start()

  def stop(self) -> None:
    self._stop = True
    self._thread.join()
    self.names[threading.get_native_id()] = "main"

  def _run(self) -> None:
    me = threading.get_native_id()
    while not self._stop:
      t = time.time() - T0
      cpu: dict[int, float] = {}
      for tid in os.listdir("/proc/self/task"):
        try:
          with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
          cpu[int(tid)] = (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
        except (OSError, IndexError, ValueError):
          pass
      native = {th.ident: th.native_id for th in threading.enumerate()}
      self.names.update({th.native_id: th.name for th in threading.enumerate()})
      stacks: dict[int, list[str]] = {}
      for ident, frame in sys._current_frames().items():
        nid = native.get(ident)
        if nid is None or nid == me:
          continue
        stack = []
        while frame is not None and len(stack) < 500:
          stack.append(f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}")
          frame = frame.f_back
        stacks[nid] = stack
      self.samples.append((t, cpu, stacks))
      time.sleep(self.interval)


def label(stack: list[str]) -> str:
  """What a stack (innermost frame first) is doing, seen from the worker function."""
  idx = next((i for i, s in enumerate(stack) if s.endswith(":_jax_worker") or s.endswith(":run")), len(stack))
  inner = stack[:idx]
  imports = [s for s in inner if s.endswith(":<module>")]
  if imports:
    return "import " + imports[-1].split(":")[0] + " > " + imports[0].split(":")[0]
  return " < ".join(inner[-3:][::-1]) + (" ... " + stack[0] if stack else "")


def report(sampler: Sampler, bin_s: float) -> str:
  lines = []
  tids = sorted({tid for _, cpu, _ in sampler.samples for tid in cpu})
  for tid in tids:
    seq = [(t, cpu[tid], stacks.get(tid)) for t, cpu, stacks in sampler.samples if tid in cpu]
    if not seq or seq[-1][1] - seq[0][1] < 0.03:
      continue
    lines.append(f"thread {tid} ({sampler.names.get(tid, '?')}): {seq[-1][1]:.2f} CPU-s, seen {seq[0][0]:.2f}-"
                 f"{seq[-1][0]:.2f} s")
    start, before = 0.0, 0.0
    while start < seq[-1][0]:
      window = [s for s in seq if start <= s[0] < start + bin_s]
      if window:
        used = window[-1][1] - before
        before = window[-1][1]
        top = collections.Counter(label(s[2]) for s in window if s[2]).most_common(1)
        if used > 0.005 or top:
          lines.append(f"  {start:6.2f} s {100 * used / bin_s:4.0f} %  {top[0][0][:140] if top else ''}")
      start += bin_s
  return "\n".join(lines)


def _spec(model: str, height: int, width: int, batch: int, options: str = "config") -> dict[str, Any]:
  # The parent side of warm_start builds the spec by importing the model's config, which imports jax: done in
  # a child process so this process's timeline starts with jax not imported.
  code = ("import json, sys; from experiments.benchmarks import warm_start as ws; "
          f"print(json.dumps(ws._spec({model!r}, {height}, {width}, {batch}, {options!r})))")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", choices=tt.MODELS, required=True)
  parser.add_argument("--cache-dir", required=True, help="a compilation cache already holding this configuration")
  parser.add_argument("--height", type=int, default=128)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--bin-ms", type=float, default=100.0)
  parser.add_argument("--compiler-options", default="config",
                      help="the step's XLA compiler options: 'config' (the model config's, as the trainer), 'none' "
                           "(XLA's defaults) or 'NAME=VALUE ...'")
  parser.add_argument("--spec-json", default=None, help="the worker spec as a JSON file (else built in a child)")
  args = parser.parse_args(argv)
  if args.spec_json:
    with open(args.spec_json) as f:
      spec = json.load(f)
  else:
    spec = _spec(args.model, args.height, args.width, args.batch, args.compiler_options)
  # The worker's clock starts at this process's start (T0), so its import figure includes the spec's child.
  os.environ.update({k: v for k, v in tt._jax_env(1, os.path.abspath(args.cache_dir)).items()
                     if k not in os.environ or k.startswith(("JAX_", "XLA_"))})
  sampler = Sampler()
  sampler.start()
  tt._jax_worker(dict(spec, first_step_only=True, t0=T0))
  sampler.stop()
  print(report(sampler, args.bin_ms / 1000.0), file=sys.stderr)
  print(f"process CPU {time.process_time():.2f} s, wall {time.time() - T0:.2f} s", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
