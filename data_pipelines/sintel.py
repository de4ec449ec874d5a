"""MPI-Sintel (Butler et al., ECCV 2012) training set read from the manually downloaded files.

Layout (the official MPI-Sintel-complete zip):

  ROOT/training/{clean,final}/<scene>/frame_NNNN.png
  ROOT/training/flow/<scene>/frame_NNNN.flo           flow from frame NNNN to NNNN+1
  ROOT/training/occlusions/<scene>/frame_NNNN.png     255 = pixel of frame NNNN occluded in frame NNNN+1
  ROOT/training/invalid/<scene>/frame_NNNN.png        255 = invalid flow

Elements: image1, image2, flow, valid = not invalid, and `occlusion` (1 = occluded) when masks=True. A plain
tf.data reader (see flying_chairs.py for why not a tensorflow-datasets builder). The test split has no flow and
is not read here.

Partial downloads: only the pairs whose files all exist (both frames, the flow and, with masks=True, both
masks) are used; with none the error names the folder.
"""

from __future__ import annotations

import os

import tensorflow as tf

from data_pipelines import readers

PASSES = ("clean", "final")


def load_example(paths: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """One Sintel pair -> element dict (float32; flow in pixels, valid (H, W), occlusion (H, W) with masks)."""
  im1 = readers.decode_png_rgb(tf.io.read_file(paths["image1"]))
  im2 = readers.decode_png_rgb(tf.io.read_file(paths["image2"]))
  flow = readers.decode_flo(tf.io.read_file(paths["flow"]), paths["flow"])
  out = {"image1": im1, "image2": im2, "flow": flow}
  if "invalid" in paths:
    invalid = readers.decode_png_mask(tf.io.read_file(paths["invalid"]))
    occ = readers.decode_png_mask(tf.io.read_file(paths["occlusion"]))
    out["valid"], out["occlusion"] = 1.0 - invalid, occ
  else:
    out["valid"] = tf.ones_like(flow[..., 0])
  keys = list(out)
  checked = readers.check_same_size(paths["flow"], *[out[k] for k in keys])
  return dict(zip(keys, checked))


def list_examples(root: str, pass_name: str = "clean", masks: bool = True,
                  scenes: tuple[str, ...] = ()) -> readers.FileDataset:
  """The Sintel training pairs of `pass_name` ('clean' or 'final') under `root` (all scenes, or `scenes`)."""
  if pass_name not in PASSES:
    raise ValueError(f"sintel: unknown pass {pass_name!r}; expected one of {PASSES}")
  train = os.path.join(root, "training")
  image_dir = readers.require_dir("sintel", os.path.join(train, pass_name), f"{pass_name} frames")
  flow_dir = readers.require_dir("sintel", os.path.join(train, "flow"), "ground-truth flow")
  all_scenes = sorted(os.listdir(flow_dir))
  if scenes:
    unknown = sorted(set(scenes) - set(all_scenes))
    if unknown:
      raise ValueError(f"sintel: scenes {unknown} not in {flow_dir!r}; found {all_scenes}")
    all_scenes = [s for s in all_scenes if s in scenes]
  files = {k: [] for k in ("image1", "image2", "flow") + (("invalid", "occlusion") if masks else ())}
  for scene in all_scenes:
    for f in sorted(os.listdir(os.path.join(flow_dir, scene))):
      if not (f.startswith("frame_") and f.endswith(".flo")):
        continue
      n = int(f[6:-4])
      ex = {"image1": os.path.join(image_dir, scene, f"frame_{n:04d}.png"),
            "image2": os.path.join(image_dir, scene, f"frame_{n + 1:04d}.png"),
            "flow": os.path.join(flow_dir, scene, f)}
      if masks:
        ex["invalid"] = os.path.join(train, "invalid", scene, f"frame_{n:04d}.png")
        ex["occlusion"] = os.path.join(train, "occlusions", scene, f"frame_{n:04d}.png")
      if readers.existing(ex.values()):
        for k, v in ex.items():
          files[k].append(v)
  if not files["flow"]:
    what = "complete pair (frames, .flo" + (", invalid and occlusion masks)" if masks else ")")
    raise FileNotFoundError(f"sintel: no {what} under {train!r}")
  return readers.FileDataset(f"sintel_{pass_name}", files, load_example)
