"""KITTI 2012 and 2015 flow training sets read from the manually downloaded files.

Layout (official zips, ROOT = the folder holding training/):

  KITTI 2015: ROOT/training/image_2/NNNNNN_10.png, NNNNNN_11.png, ROOT/training/flow_{occ,noc}/NNNNNN_10.png
  KITTI 2012: ROOT/training/colored_0/NNNNNN_10.png, NNNNNN_11.png, ROOT/training/flow_{occ,noc}/NNNNNN_10.png

Flow PNGs are 16-bit RGB: u = (R - 2^15) / 64, v = (G - 2^15) / 64, valid = B > 0 (flow zeroed where invalid).
'occ' ground truth covers all pixels with flow, 'noc' only the non-occluded ones. `flow_dir` overrides the flow
folder name (e.g. a sample folder whose occ/noc kind is unknown). Images differ in size between pairs
(about 375 x 1242), so batch them with batch size 1 or crop them. A plain tf.data reader (see flying_chairs.py).
"""

from __future__ import annotations

import os

import tensorflow as tf

from data_pipelines import readers

IMAGE_DIRS = {2015: "image_2", 2012: "colored_0"}


def load_example(paths: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """One KITTI pair -> element dict (float32 RGB [0, 1], flow in pixels, valid from the B channel)."""
  im1 = readers.decode_png_rgb(tf.io.read_file(paths["image1"]))
  im2 = readers.decode_png_rgb(tf.io.read_file(paths["image2"]))
  flow, valid = readers.decode_kitti_flow(tf.io.read_file(paths["flow"]), paths["flow"])
  im1, im2, flow, valid = readers.check_same_size(paths["flow"], im1, im2, flow, valid)
  return {"image1": im1, "image2": im2, "flow": flow, "valid": valid}


def list_examples(root: str, version: int = 2015, variant: str = "occ", flow_dir: str = "") -> readers.FileDataset:
  """The KITTI `version` (2012 or 2015) training pairs with `variant` ('occ' or 'noc') ground truth."""
  if version not in IMAGE_DIRS:
    raise ValueError(f"kitti: unknown version {version!r}; expected 2012 or 2015")
  if variant not in ("occ", "noc"):
    raise ValueError(f"kitti: unknown variant {variant!r}; expected 'occ' or 'noc'")
  train = os.path.join(root, "training")
  image_dir = readers.require_dir(f"kitti{version}", os.path.join(train, IMAGE_DIRS[version]), "frames")
  gt_dir = readers.require_dir(f"kitti{version}", os.path.join(train, flow_dir or f"flow_{variant}"),
                               "ground-truth flow PNGs")
  files = {"image1": [], "image2": [], "flow": []}
  for f in sorted(os.listdir(gt_dir)):
    if not f.endswith("_10.png"):
      continue
    ex = {"image1": os.path.join(image_dir, f), "image2": os.path.join(image_dir, f.replace("_10.png", "_11.png")),
          "flow": os.path.join(gt_dir, f)}
    if readers.existing(ex.values()):
      for k, v in ex.items():
        files[k].append(v)
  if not files["flow"]:
    raise FileNotFoundError(f"kitti{version}: no complete pair (NNNNNN_10.png, NNNNNN_11.png in {image_dir!r} "
                            f"and NNNNNN_10.png in {gt_dir!r})")
  return readers.FileDataset(f"kitti{version}_{variant}", files, load_example)
