"""FlyingThings3D (Mayer et al., CVPR 2016) optical flow read from the manually downloaded files.

Layout (the official 'full' release):

  ROOT/frames_{cleanpass,finalpass}/{TRAIN,TEST}/{A,B,C}/NNNN/{left,right}/FFFF.png
  ROOT/optical_flow/{TRAIN,TEST}/{A,B,C}/NNNN/into_future/{left,right}/OpticalFlowIntoFuture_FFFF_{L,R}.pfm

The pair is (frame F, frame F+1) with the into-future flow of frame F. Flow is PFM: rows stored bottom to top,
the sign of the scale gives the byte order (negative = little-endian), 3 channels of which the third (zero) is
dropped. valid is all ones. The released list of unused hard samples is not applied. A plain tf.data reader
(see flying_chairs.py for why not a tensorflow-datasets builder).
"""

from __future__ import annotations

import os

import tensorflow as tf

from data_pipelines import readers

PASSES = {"clean": "frames_cleanpass", "final": "frames_finalpass"}


def load_example(paths: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """One FlyingThings3D pair -> element dict (flow = first two PFM channels, valid ones)."""
  im1 = readers.decode_png_rgb(tf.io.read_file(paths["image1"]))
  im2 = readers.decode_png_rgb(tf.io.read_file(paths["image2"]))
  pfm = readers.decode_pfm(tf.io.read_file(paths["flow"]), paths["flow"])
  with tf.control_dependencies([readers.check(tf.shape(pfm)[-1] >= 2, "flow PFM must have 3 channels (PF):",
                                              paths["flow"])]):
    flow = tf.identity(pfm[..., :2])
  im1, im2, flow = readers.check_same_size(paths["flow"], im1, im2, flow)
  return {"image1": im1, "image2": im2, "flow": flow, "valid": tf.ones_like(flow[..., 0])}


def list_examples(root: str, pass_name: str = "clean", split: str = "TRAIN",
                  cameras: tuple[str, ...] = ("left",)) -> readers.FileDataset:
  """The FlyingThings3D forward pairs of `split` ('TRAIN' or 'TEST') for the given cameras."""
  if pass_name not in PASSES:
    raise ValueError(f"things: unknown pass {pass_name!r}; expected one of {tuple(PASSES)}")
  if split not in ("TRAIN", "TEST"):
    raise ValueError(f"things: unknown split {split!r}; expected 'TRAIN' or 'TEST'")
  frames = readers.require_dir("things", os.path.join(root, PASSES[pass_name], split), "frames")
  flows = readers.require_dir("things", os.path.join(root, "optical_flow", split), "optical flow")
  files = {"image1": [], "image2": [], "flow": []}
  for letter in sorted(os.listdir(flows)):
    for seq in sorted(os.listdir(os.path.join(flows, letter))):
      for cam in cameras:
        fdir = os.path.join(flows, letter, seq, "into_future", cam)
        if not os.path.isdir(fdir):
          continue
        for f in sorted(os.listdir(fdir)):
          if not (f.startswith("OpticalFlowIntoFuture_") and f.endswith(".pfm")):
            continue
          n = int(f.split("_")[1])
          ex = {"image1": os.path.join(frames, letter, seq, cam, f"{n:04d}.png"),
                "image2": os.path.join(frames, letter, seq, cam, f"{n + 1:04d}.png"),
                "flow": os.path.join(fdir, f)}
          if readers.existing(ex.values()):
            for k, v in ex.items():
              files[k].append(v)
  if not files["flow"]:
    raise FileNotFoundError(f"things: no complete pair (frames and into_future flow) under {root!r} "
                            f"for {split}/{pass_name}/{cameras}")
  return readers.FileDataset(f"things_{pass_name}", files, load_example)
