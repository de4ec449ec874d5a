r"""Plots a training run's curves from its metrics.jsonl: training EPE and the held-out validation EPE against
the zero-flow EPE of the same validation pairs.

  python experiments/plot_training_curve.py --workdir runs/pwcnet_local --out docs/pwcnet_local_curve.png
"""

from __future__ import annotations

import argparse
import json
import os


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: is {workdir!r} a training workdir?")
  rows = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not a JSON line ({e})") from e
  return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  pts = sorted({int(r["step"]): float(r[key]) for r in rows if key in r and r[key] is not None}.items())
  return [p[0] for p in pts], [p[1] for p in pts]


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True, help="PNG path")
  p.add_argument("--val", default="synthetic_val", help="name of the evaluation set to plot")
  p.add_argument("--title", default=None)
  args = p.parse_args(argv)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_metrics(args.workdir)
  fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
  steps, epe = series(rows, "train/epe")
  if steps:
    ax.plot(steps, epe, color="0.6", lw=1, label="train EPE (augmented crops)")
  vsteps, vepe = series(rows, f"{args.val}/epe")
  if not vsteps:
    raise ValueError(f"no '{args.val}/epe' in {args.workdir}/metrics.jsonl: was periodic evaluation enabled?")
  ax.plot(vsteps, vepe, "o-", color="C0", label=f"{args.val} EPE")
  zsteps, zepe = series(rows, f"{args.val}/zero_epe")
  if zsteps:
    ax.axhline(zepe[-1], color="C3", ls="--", label=f"zero-flow EPE ({zepe[-1]:.2f})")
  ax.set_xlabel("step")
  ax.set_ylabel("end-point error (px)")
  ax.set_title(args.title or os.path.basename(os.path.normpath(args.workdir)))
  ax.grid(alpha=0.3)
  ax.legend()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(args.out)
  print(f"wrote {args.out}: {len(vsteps)} evaluations, last {args.val}/epe {vepe[-1]:.3f} at step {vsteps[-1]}")


if __name__ == "__main__":
  main()
