r"""Ablation sweeps: expand a config's `sweep(add)` into runs, run them one after another, tabulate the results.

  python -m experiments.sweep --config configs/ablations/pwcnet_ablation.py:local --workdir runs/pwc_ablation --print
  python -m experiments.sweep --config configs/ablations/pwcnet_ablation.py:local --workdir runs/pwc_ablation --run \
      --config.total_steps=200
  python -m experiments.sweep --config configs/ablations/pwcnet_ablation.py:local --workdir runs/pwc_ablation --collect

A config module's `sweep(add)` calls `add(name=..., **{"dotted.key": value, ...})` once per run. Each run is a
subprocess `python -m jaxflow.train --config FILE:ARG --workdir ROOT/NAME --config.key=value ...`; string values
may contain `{root}` (the sweep directory), e.g. to initialise a stage from the previous run's workdir. Extra
`--config.key=value` arguments apply to every run. Overrides are checked against the config before anything
runs (unknown keys and wrong types are errors naming the run and the key). The final metrics of each run (the
`"final": true` row of its metrics.jsonl) are collected into one table, printed and written to
ROOT/sweep_results.json. A run whose workdir already has a final row is not run again.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Any


def load_config_module(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location(f"_sweep_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def expand(config_spec: str) -> tuple[str, str, Any, list[tuple[str, dict[str, Any]]]]:
  """'configs/x.py:arg' -> (path, arg, base config, [(run name, overrides), ...])."""
  path, _, arg = config_spec.partition(":")
  module = load_config_module(path)
  if not hasattr(module, "sweep"):
    raise ValueError(f"{path} defines no sweep(add) function")
  base = module.get_config(arg or None)
  runs: list[tuple[str, dict[str, Any]]] = []

  def add(name: str | None = None, **overrides: Any) -> None:
    name = name or ",".join(f"{k}={v}" for k, v in overrides.items()) or f"run{len(runs)}"
    if any(n == name for n, _ in runs):
      raise ValueError(f"{path}: sweep run name {name!r} is used twice")
    runs.append((name, dict(overrides)))

  module.sweep(add)
  if not runs:
    raise ValueError(f"{path}: sweep(add) added no runs")
  return path, arg, base, runs


def _substitute(value: Any, root: str) -> Any:
  return value.replace("{root}", root) if isinstance(value, str) else value


def check_overrides(base: Any, name: str, overrides: dict[str, Any]) -> None:
  """Applies the overrides to a copy of the (locked) config: unknown keys / wrong types raise naming them."""
  cfg = copy.deepcopy(base)
  for key, value in overrides.items():
    parts = key.split(".")
    node = cfg
    try:
      for p in parts[:-1]:
        node = node[p]
      if parts[-1] not in node:
        raise KeyError(parts[-1])
      node[parts[-1]] = value
    except (KeyError, AttributeError) as e:
      raise ValueError(f"sweep run {name!r}: unknown config key {key!r}") from e
    except TypeError as e:
      raise ValueError(f"sweep run {name!r}: bad value {value!r} for config key {key!r}: {e}") from e


def _format_value(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(_format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def command(path: str, arg: str, root: str, name: str, overrides: dict[str, Any], extra: list[str]) -> list[str]:
  spec = f"{path}:{arg}" if arg else path
  cmd = [sys.executable, "-m", "jaxflow.train", f"--config={spec}", f"--workdir={os.path.join(root, name)}"]
  cmd += [f"--config.{k}={_format_value(_substitute(v, root))}" for k, v in overrides.items()]
  return cmd + list(extra)


def final_metrics(workdir: str) -> dict[str, Any] | None:
  """The last `"final": true` row of WORKDIR/metrics.jsonl, or None if the run has not finished."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  final = None
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        if row.get("final"):
          final = row
  return final


def table(rows: list[dict[str, Any]]) -> str:
  keys = sorted({k for r in rows for k in r.get("metrics", {})})
  header = ["run", "status"] + keys
  lines = [header]
  for r in rows:
    m = r.get("metrics", {})
    lines.append([r["name"], r["status"]] + [f"{m[k]:.4f}" if isinstance(m.get(k), float) else str(m.get(k, "-"))
                                             for k in keys])
  widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
  return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="configs/<file>.py[:arg] defining sweep(add)")
  parser.add_argument("--workdir", required=True, help="sweep directory; run NAME uses WORKDIR/NAME")
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--print", action="store_true", help="print the commands (default)")
  mode.add_argument("--run", action="store_true", help="run them one after another, then tabulate")
  mode.add_argument("--collect", action="store_true", help="only tabulate the runs' final metrics")
  args, extra = parser.parse_known_args(argv)
  bad = [e for e in extra if not e.startswith("--config.")]
  if bad:
    parser.error(f"unrecognised arguments {bad} (only --config.key=value overrides are passed through)")
  root = os.path.abspath(args.workdir)
  path, arg, base, runs = expand(args.config)
  for name, overrides in runs:
    check_overrides(base, name, {k: _substitute(v, root) for k, v in overrides.items()})
  if not (args.run or args.collect):
    for name, overrides in runs:
      print(" ".join(command(path, arg, root, name, overrides, extra)))
    return 0
  results = []
  for name, overrides in runs:
    workdir = os.path.join(root, name)
    status = "done"
    if args.run and final_metrics(workdir) is None:
      cmd = command(path, arg, root, name, overrides, extra)
      print(f"[sweep] {name}: {' '.join(cmd)}", flush=True)
      start = time.time()
      rc = subprocess.run(cmd).returncode
      status = "done" if rc == 0 else f"failed (exit {rc})"
      print(f"[sweep] {name}: {status} in {time.time() - start:.0f} s", flush=True)
    final = final_metrics(workdir)
    if final is None and status == "done":
      status = "missing"
    metrics = {k: v for k, v in (final or {}).items() if isinstance(v, (int, float)) and k not in ("step", "final")}
    results.append({"name": name, "overrides": overrides, "status": status, "metrics": metrics,
                    "best": (final or {}).get("best")})
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "sweep_results.json"), "w") as f:
    json.dump(results, f, indent=2, default=str)
  print(table(results))
  return 0 if all(r["status"] == "done" for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
