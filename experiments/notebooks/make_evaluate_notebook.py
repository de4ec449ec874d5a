"""Writes experiments/notebooks/evaluate.ipynb with nbformat (the notebook's source of truth is this script).

  python experiments/notebooks/make_evaluate_notebook.py            # rewrite the notebook (outputs cleared)
  python experiments/notebooks/make_evaluate_notebook.py --execute  # and run it in place (needs nbclient)

Environment variables read by the notebook:
  JAXFLOW_DATA          the sample data folder (default: <repo>/../shared/data)
  JAXFLOW_CHECKPOINT    a workdir or checkpoint folder to evaluate; unset = train the `local` config first
  JAXFLOW_NB_MODEL      model to train when there is no checkpoint (configs/<model>.py:local; default pwcnet)
  JAXFLOW_NB_OVERRIDES  JSON {dotted.config.key: value} applied to that config (CI: a tiny model, few steps)
  JAXFLOW_NB_WORKDIR    where to train (default: a temporary folder)
  JAXFLOW_NB_DATASETS   comma-separated evaluation sets (default: every sample set found)
"""

from __future__ import annotations

import argparse
import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOK = os.path.join(HERE, "evaluate.ipynb")

CELLS = [
    ("md", """# Evaluating a jaxflow model on the benchmark samples

This notebook loads a trained checkpoint (or trains the `local` config for a few minutes when none is given),
evaluates it on the small samples of FlyingChairs, MPI-Sintel, KITTI 2015 and Middlebury in `shared/data`,
and looks at the predictions: frames, colour-coded predicted and true flow, error maps, the colour key, a
metrics table, a comparison with classical methods (when OpenCV is installed) and, finally, the correlation
idea of FlowNetC.

Everything is configured by environment variables (see `make_evaluate_notebook.py`, which writes this
notebook): `JAXFLOW_DATA`, `JAXFLOW_CHECKPOINT`, `JAXFLOW_NB_MODEL`, `JAXFLOW_NB_OVERRIDES`,
`JAXFLOW_NB_WORKDIR`, `JAXFLOW_NB_DATASETS`."""),
    ("code", """import importlib
import json
import os
import pathlib
import tempfile

import matplotlib.pyplot as plt
import numpy as np

import jaxflow
from jaxflow import evaluate, flow_io, viz

REPO = pathlib.Path.cwd().resolve()
while not (REPO / "pyproject.toml").exists() and REPO != REPO.parent:
  REPO = REPO.parent
DATA = pathlib.Path(os.environ.get("JAXFLOW_DATA") or REPO.parent / "shared" / "data")
os.environ["JAXFLOW_DATA"] = str(DATA)  # evaluate.make_dataset finds the samples through it
CHECKPOINT = os.environ.get("JAXFLOW_CHECKPOINT", "")
MODEL = os.environ.get("JAXFLOW_NB_MODEL", "pwcnet")
OVERRIDES = json.loads(os.environ.get("JAXFLOW_NB_OVERRIDES", "{}"))
print("data:", DATA, "| checkpoint:", CHECKPOINT or f"(none: training configs/{MODEL}.py:local)")"""),
    ("md", """## 1. A model

With `JAXFLOW_CHECKPOINT` set, that run (or checkpoint folder) is loaded. Otherwise the `local` variant of
`configs/<model>.py` is trained from scratch on synthetic Flying Chairs pairs generated on the fly (a few
minutes on a CPU; CI shrinks it through `JAXFLOW_NB_OVERRIDES`). Expect a briefly trained model to be far
from the published numbers: the point here is the evaluation machinery."""),
    ("code", """if not CHECKPOINT:
  from jaxflow import trainer
  config = importlib.import_module(f"configs.{MODEL}").get_config("local")
  with config.unlocked():
    config.log_tensorboard = False
    config.log_images = False
    for key, value in OVERRIDES.items():
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = tuple(value) if isinstance(value, list) else value
  CHECKPOINT = os.environ.get("JAXFLOW_NB_WORKDIR") or tempfile.mkdtemp(prefix=f"jaxflow_{MODEL}_")
  result = trainer.train_and_evaluate(config, CHECKPOINT)
  print("trained", result["step"], "steps; final held-out metrics:", result["final"])

predictor = jaxflow.load(CHECKPOINT)
print(predictor)"""),
    ("md", """## 2. Metrics on the samples

`jaxflow.evaluate` reads each set in its original layout, runs the model on every pair at its original size
(the models resize internally and return full-size flow) and sums errors over all valid pixels, so each
number is a mean over every valid pixel of the set: EPE, the 1/3/5 px outlier rates, KITTI's Fl-all, and for
Sintel the speed bands and occluded / non-occluded EPE. The zero-flow row is the baseline any useful method
must beat; Farneback and DIS (OpenCV) run on the same pairs when OpenCV is installed."""),
    ("code", """wanted = os.environ.get("JAXFLOW_NB_DATASETS", "")
names = [n for n in wanted.split(",") if n] or ["flying_chairs_all", "sintel_clean", "sintel_final", "kitti2015",
                                               "middlebury"]
datasets = []
for name in names:
  try:
    datasets.append(evaluate.make_dataset(name))
  except FileNotFoundError as e:
    print("skipped:", e)

methods = [evaluate.PredictorMethod(predictor, name=predictor.model_config["name"]), evaluate.ZeroMethod()]
if evaluate.cv2_available():
  methods += [evaluate.make_baseline("farneback"), evaluate.make_baseline("dis")]
else:
  print("OpenCV is not installed: no classical baselines (pip install opencv-python to add them)")
results = evaluate.run(methods, datasets)
print(evaluate.format_table(results))"""),
    ("md", """## 3. Looking at one Sintel pair

Frames, the predicted and the true flow in the Middlebury colour code (both normalised by the largest true
speed, so their colours compare), the KITTI-style error map (blue = small error, red = outlier; black =
invalid) and the colour key: direction is hue, speed is saturation."""),
    ("code", """sintel = evaluate.make_dataset("sintel_clean")
example = sintel[len(sintel) - 1]  # the pair with occlusion and invalid masks
pred = predictor(example["image1"], example["image2"])
gt, valid = example["flow"], example["valid"]
radius = viz.max_flow_radius(gt)

panels = [("frame 1", example["image1"]), ("frame 2", example["image2"]),
          ("predicted flow", viz.flow_to_color(pred, radius)), ("true flow", viz.flow_to_color(gt, radius)),
          ("error map", viz.error_map(pred, gt, valid)), ("colour key", viz.color_wheel(151))]
others = [m for m in methods if m.name in ("farneback", "dis")]
panels += [(m.name, viz.flow_to_color(m.predict([example])[0], radius)) for m in others]
fig, axes = plt.subplots(2, (len(panels) + 1) // 2, figsize=(4.2 * ((len(panels) + 1) // 2), 5.5))
for ax, (title, image) in zip(axes.T.ravel(), panels):
  ax.imshow(image)
  ax.set_title(title)
for ax in axes.ravel():
  ax.axis("off")
plt.tight_layout()
plt.show()
epe = np.sqrt(np.sum((pred - gt) ** 2, -1))[valid > 0.5]
print(f"{example['id']}: EPE {epe.mean():.3f} px over {epe.size} valid pixels (true speed up to {radius:.1f} px)")"""),
    ("md", """## 4. The correlation idea of FlowNetC

FlowNetC compares a feature of frame 1 with the features of frame 2 at every displacement in a window: the
cost volume holds one dot product per displacement, and where frame 1's content moved to, the match peaks.
Here, on the first FlyingChairs pair at half resolution, the 'features' are normalised 7 x 7 colour patches
(so a dot product is a normalised cross-correlation) and `jaxflow.ops.correlation` scores every displacement
within +-12 px (+-24 px at full resolution). For a textured point on a moving chair, the peak of its cost
map lands on the true flow (within a pixel) without any learning; FlowNetC learns features for which this
works everywhere."""),
    ("code", """import jax.numpy as jnp
from jaxflow.ops import correlation


def patch_features(image, k=7):
  \"\"\"(H, W, 3) -> (H, W, 3 k^2): every pixel's k x k colour patch, zero-mean and unit-norm.\"\"\"
  pad = np.pad(image, ((k // 2, k // 2), (k // 2, k // 2), (0, 0)), mode="edge")
  h, w = image.shape[:2]
  patches = np.concatenate([pad[dy:dy + h, dx:dx + w] for dy in range(k) for dx in range(k)], -1)
  patches = patches - patches.mean(-1, keepdims=True)
  return patches / (np.linalg.norm(patches, axis=-1, keepdims=True) + 1e-6)


pair = evaluate.make_dataset("flying_chairs_all")[0]
scale, d = 2, 12
small = lambda im: im[::scale, ::scale]
f1, f2 = patch_features(small(pair["image1"])), patch_features(small(pair["image2"]))
# Mean over channels of f1(x) * f2(x + d), times the channel count: a correlation coefficient in [-1, 1].
cost = np.asarray(correlation(jnp.asarray(f1[None]), jnp.asarray(f2[None]), d))[0] * f1.shape[-1]
flow_small = pair["flow"][::scale, ::scale] / scale
speed = np.hypot(flow_small[..., 0], flow_small[..., 1])

# The most textured point (7 x 7 grey contrast) among those moving 3 .. d-2 px, away from the border.
gray = small(pair["image1"]).mean(-1)
h, w = gray.shape
padded = np.pad(gray, 3, mode="edge")
contrast = np.std([padded[a:a + h, b:b + w] for a in range(7) for b in range(7)], axis=0)
score = np.where((speed > 3) & (speed < d - 2), contrast, 0)
score[:2 * d] = score[-2 * d:] = 0
score[:, :2 * d] = score[:, -2 * d:] = 0
y, x = np.unravel_index(np.argmax(score), score.shape)
window = cost[y, x].reshape(2 * d + 1, 2 * d + 1)  # rows dy = -d..d, columns dx = -d..d (dy-major channels)
py, px = np.unravel_index(np.argmax(window), window.shape)
peak = (int(px - d), int(py - d))
true = flow_small[y, x]
print(f"point (x={x}, y={y}) at half resolution: cost-volume peak at (dx, dy) = {peak}, "
      f"true flow ({true[0]:.2f}, {true[1]:.2f}), correlation at the peak {window.max():.3f}")

fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
axes[0].imshow(small(pair["image1"]))
axes[0].add_patch(plt.Rectangle((x - 3.5, y - 3.5), 7, 7, fill=False, color="yellow", lw=2))
axes[0].set_title("frame 1: the 7 x 7 patch")
axes[1].imshow(small(pair["image2"]))
axes[1].add_patch(plt.Rectangle((x - d - 0.5, y - d - 0.5), 2 * d + 1, 2 * d + 1, fill=False, color="cyan",
                                lw=2))
axes[1].plot([x + peak[0]], [y + peak[1]], "r+", ms=14, mew=2)
axes[1].set_title("frame 2: search window and best match (+)")
im = axes[2].imshow(window, extent=(-d - 0.5, d + 0.5, d + 0.5, -d - 0.5), cmap="magma")
axes[2].plot([true[0]], [true[1]], "c+", ms=14, mew=2, label="true flow")
axes[2].set_xlabel("dx (px)")
axes[2].set_ylabel("dy (px)")
axes[2].legend(loc="lower right")
axes[2].set_title("cost volume of the point")
plt.colorbar(im, ax=axes[2])
plt.tight_layout()
plt.show()
assert np.hypot(peak[0] - true[0], peak[1] - true[1]) <= 1.5, "the correlation peak should match the true flow"
"""),
    ("md", """## 5. From here

* `python -m jaxflow.evaluate --workdir RUN --datasets sintel_clean,sintel_final,kitti2015:/data/kitti2015
  --baselines zero,dis --json results.json` gives the same table on full datasets (and a per-pair `.jsonl`).
* `python -m jaxflow.infer FRAME1 FRAME2 --workdir RUN -o out/` writes `.flo` files and colour PNGs.
* `jaxflow.load(RUN)(image1, image2)` is the Python API used above."""),
]


def build() -> nbformat.NotebookNode:
  nb = new_notebook()
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  nb.metadata["language_info"] = {"name": "python"}
  nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
  return nb


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--execute", action="store_true", help="run the notebook in place after writing it")
  parser.add_argument("--out", default=NOTEBOOK)
  args = parser.parse_args()
  nb = build()
  if args.execute:
    from nbclient import NotebookClient  # pylint: disable=import-outside-toplevel
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
  nbformat.write(nb, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
