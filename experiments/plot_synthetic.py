"""Plots the synthetic Flying Chairs motion statistics and sample pairs.

  python -m experiments.plot_synthetic --out /tmp/synthetic [--num 64] [--seed 0] [--config.key=value ...]

Writes OUT_hist.png (histogram of flow magnitudes over all pixels of `num` pairs, log counts, with the share
under 10 px and past 100 px in the title; those figures are also printed) and OUT_samples.png (frame 1,
frame 2, flow in the Middlebury colour code when jaxflow.viz.flow_to_color is available, occlusion mask).
Config overrides are those of `python -m data_pipelines.synthetic_chairs`.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from data_pipelines import synthetic_chairs  # noqa: E402


def _flow_colour():
  try:
    from jaxflow import viz
  except ImportError:
    return None
  return getattr(viz, "flow_to_color", None)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Plot synthetic Flying Chairs statistics and samples.")
  parser.add_argument("--out", required=True, help="output prefix: OUT_hist.png, OUT_samples.png")
  parser.add_argument("--num", type=int, default=64, help="pairs in the histogram")
  parser.add_argument("--samples", type=int, default=4, help="pairs shown")
  parser.add_argument("--seed", type=int, default=0)
  args, rest = parser.parse_known_args(argv)
  config = synthetic_chairs.default_config()
  try:
    synthetic_chairs.apply_overrides(config, rest)
  except (KeyError, ValueError) as e:
    parser.error(str(e.args[0]) if e.args else str(e))
  gen = synthetic_chairs.make_generator(config)
  ds = tf.data.Dataset.range(max(args.num, args.samples)).map(
      lambda i: gen(tf.constant(args.seed, tf.int64), i), num_parallel_calls=tf.data.AUTOTUNE)
  mags, samples = [], []
  for ex in ds.as_numpy_iterator():
    mags.append(np.linalg.norm(ex["flow"], axis=-1).ravel())
    if len(samples) < args.samples:
      samples.append(ex)
  mag = np.concatenate(mags)
  under10, over100 = (mag < 10).mean(), (mag > 100).mean()
  h, w = config.image_size
  print(f"{len(mags)} pairs at {w}x{h}: median |flow| {np.median(mag):.2f} px, 99th percentile "
        f"{np.percentile(mag, 99):.1f} px, max {mag.max():.1f} px; {100 * under10:.1f}% under 10 px, "
        f"{100 * over100:.2f}% past 100 px")

  fig, ax = plt.subplots(figsize=(7, 4))
  ax.hist(mag, bins=np.arange(0, max(mag.max(), 10) + 2, 2), log=True, color="tab:blue")
  ax.set_xlabel("flow magnitude (px)")
  ax.set_ylabel("pixels (log scale)")
  ax.set_title(f"synthetic chairs {w}x{h}, {len(mags)} pairs: {100 * under10:.1f}% < 10 px, "
               f"{100 * over100:.2f}% > 100 px")
  fig.tight_layout()
  fig.savefig(f"{args.out}_hist.png", dpi=100)
  plt.close(fig)

  to_colour = _flow_colour()
  cols = 4 if to_colour is not None else 3
  fig, axes = plt.subplots(len(samples), cols, figsize=(4 * cols, 3 * len(samples)), squeeze=False)
  for row, ex in zip(axes, samples):
    panels = [("frame 1", ex["image1"]), ("frame 2", ex["image2"])]
    if to_colour is not None:
      panels.append(("flow (Middlebury colours)", to_colour(ex["flow"])))
    panels.append(("occlusion", ex["occlusion"]))
    for a, (title, img) in zip(row, panels):
      a.imshow(img, cmap="gray" if img.ndim == 2 else None)
      a.set_title(title)
      a.axis("off")
  fig.tight_layout()
  fig.savefig(f"{args.out}_samples.png", dpi=80)
  plt.close(fig)
  print(f"wrote {args.out}_hist.png and {args.out}_samples.png")


if __name__ == "__main__":
  main()
