"""Middlebury flow benchmark (Baker et al., IJCV 2011) sequences with public ground truth ('other' set).

Layout (the official other-color-twoframes / other-gray-twoframes / other-gt-flow zips):

  ROOT/other-data/<Seq>/frame10.png, frame11.png        (ROOT/other-data-gray/... with gray=True)
  ROOT/other-gt-flow/<Seq>/flow10.flo

Flow components above 1e9 mark unknown flow: valid = 0 there and the flow is set to 0. Grey frames are
replicated to 3 channels. Sequences differ in size, so batch with batch size 1. A plain tf.data reader (see
flying_chairs.py for why not a tensorflow-datasets builder).
"""

from __future__ import annotations

import os

import tensorflow as tf

from data_pipelines import readers


def load_example(paths: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """One Middlebury pair -> element dict; unknown flow (> 1e9) is invalid and zeroed."""
  im1 = readers.decode_png_rgb(tf.io.read_file(paths["image1"]))
  im2 = readers.decode_png_rgb(tf.io.read_file(paths["image2"]))
  flow = readers.decode_flo(tf.io.read_file(paths["flow"]), paths["flow"])
  valid = tf.cast(tf.reduce_all(tf.abs(flow) <= readers.FLO_UNKNOWN, axis=-1), tf.float32)
  flow = flow * valid[..., None]
  im1, im2, flow, valid = readers.check_same_size(paths["flow"], im1, im2, flow, valid)
  return {"image1": im1, "image2": im2, "flow": flow, "valid": valid}


def list_examples(root: str, gray: bool = False) -> readers.FileDataset:
  """The Middlebury sequences under `root` that have frame10, frame11 and flow10.flo."""
  image_dir = readers.require_dir("middlebury", os.path.join(root, "other-data-gray" if gray else "other-data"),
                                  "frames")
  gt_dir = readers.require_dir("middlebury", os.path.join(root, "other-gt-flow"), "ground-truth flow")
  files = {"image1": [], "image2": [], "flow": []}
  for seq in sorted(os.listdir(gt_dir)):
    ex = {"image1": os.path.join(image_dir, seq, "frame10.png"), "image2": os.path.join(image_dir, seq, "frame11.png"),
          "flow": os.path.join(gt_dir, seq, "flow10.flo")}
    if readers.existing(ex.values()):
      for k, v in ex.items():
        files[k].append(v)
  if not files["flow"]:
    raise FileNotFoundError(f"middlebury: no sequence with frame10.png, frame11.png in {image_dir!r} and "
                            f"flow10.flo in {gt_dir!r}")
  return readers.FileDataset("middlebury", files, load_example)
