"""FlyingChairs (Dosovitskiy et al., ICCV 2015) read from the manually downloaded release files.

Layout (the release zip plus the split file from the dataset page):

  ROOT/data/NNNNN_img1.ppm, NNNNN_img2.ppm, NNNNN_flow.flo      (or ROOT/FlyingChairs_release/data/...)
  ROOT/FlyingChairs_train_val.txt                                (line i: 1 = pair i is train, 2 = val)

A plain tf.data reader rather than a tensorflow-datasets builder: a builder would copy the 22,872 pairs into
TFRecords (another ~30 GB) and need a preparation step, while decoding the release files with TF ops inside a
parallel `map` already reads at full speed. PPM is decoded with TF string ops (data_pipelines.readers), since
`tf.io.decode_image` does not read PPM.

Partial downloads: only the pairs of the split whose three files exist are used; if none exist the error names
the folder.
"""

from __future__ import annotations

import os

import tensorflow as tf

from data_pipelines import readers

SPLIT_FILE = "FlyingChairs_train_val.txt"
NUM_PAIRS = 22872
_SPLIT_CODES = {"train": 1, "val": 2}


def find_data_dir(root: str) -> str:
  """The folder holding NNNNN_img1.ppm files: ROOT/data, ROOT/FlyingChairs_release/data, or ROOT itself."""
  for cand in (os.path.join(root, "data"), os.path.join(root, "FlyingChairs_release", "data"), root):
    if os.path.isdir(cand) and any(f.endswith("_img1.ppm") for f in os.listdir(cand)):
      return cand
  raise FileNotFoundError(f"flying_chairs: no NNNNN_img1.ppm files under {root!r} (looked in data/, "
                          "FlyingChairs_release/data/ and the root itself); set config.data.roots.flying_chairs")


def read_split(path: str) -> list[int]:
  """The split codes of the split file, one per pair (pair i+1 at position i); errors name the file and line."""
  codes = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      if line not in ("1", "2"):
        raise ValueError(f"{path}: line {n} is {line!r}, expected 1 (train) or 2 (val)")
      codes.append(int(line))
  return codes


def load_example(paths: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """Reads one pair: image1, image2 float32 (H, W, 3) in [0, 1], flow (H, W, 2) pixels, valid ones (H, W)."""
  im1 = readers.decode_ppm(tf.io.read_file(paths["image1"]), paths["image1"])
  im2 = readers.decode_ppm(tf.io.read_file(paths["image2"]), paths["image2"])
  flow = readers.decode_flo(tf.io.read_file(paths["flow"]), paths["flow"])
  im1, im2, flow = readers.check_same_size(paths["flow"], im1, im2, flow)
  return {"image1": im1, "image2": im2, "flow": flow, "valid": tf.ones_like(flow[..., 0])}


def list_examples(root: str, split: str = "train") -> readers.FileDataset:
  """The FlyingChairs pairs of `split` ('train', 'val' or 'all') whose files exist under `root`.

  'train'/'val' need the split file (in ROOT or next to the data folder); 'all' uses every complete pair found.
  """
  if split not in ("train", "val", "all"):
    raise ValueError(f"flying_chairs: unknown split {split!r}; expected 'train', 'val' or 'all'")
  data_dir = find_data_dir(root)
  present = set(os.listdir(data_dir))
  complete = lambda i: all(f"{i:05d}_{s}" in present for s in ("img1.ppm", "img2.ppm", "flow.flo"))
  if split == "all":
    ids = sorted(int(f[:5]) for f in present if f.endswith("_img1.ppm") and f[:5].isdigit())
    ids = [i for i in ids if complete(i)]
  else:
    candidates = [os.path.join(root, SPLIT_FILE), os.path.join(os.path.dirname(data_dir), SPLIT_FILE)]
    split_path = next((p for p in candidates if os.path.isfile(p)), None)
    if split_path is None:
      raise FileNotFoundError(f"flying_chairs: split file {SPLIT_FILE} not found (looked at {candidates}); "
                              "download it from the FlyingChairs page or use split='all'")
    codes = read_split(split_path)
    want = _SPLIT_CODES[split]
    ids = [i + 1 for i, c in enumerate(codes) if c == want and complete(i + 1)]
  if not ids:
    raise FileNotFoundError(f"flying_chairs: no complete {split} pair (NNNNN_img1.ppm, NNNNN_img2.ppm, "
                            f"NNNNN_flow.flo) in {data_dir!r}")
  j = lambda i, s: os.path.join(data_dir, f"{i:05d}_{s}")
  files = {"image1": [j(i, "img1.ppm") for i in ids], "image2": [j(i, "img2.ppm") for i in ids],
           "flow": [j(i, "flow.flo") for i in ids]}
  return readers.FileDataset(f"flying_chairs_{split}", files, load_example)
