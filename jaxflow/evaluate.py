"""`python -m jaxflow.evaluate`: checkpoint (and classical baselines) x datasets -> metric table and JSON.

  python -m jaxflow.evaluate --workdir RUN --datasets sintel_clean,sintel_final,kitti2015:/data/kitti2015
  python -m jaxflow.evaluate --checkpoint RUN/checkpoints/300000 --datasets middlebury --baselines zero,dis \
      --json results.json
  python -m jaxflow.evaluate --checkpoint RUN --export sintel --root /data/Sintel --out submission/

Datasets (NAME[:PATH]; without PATH the folder is $JAXFLOW_DATA/<default sub-folder>, the layout of the
shared sample data):
  flying_chairs_val (alias chairs), flying_chairs_all    ROOT/data/NNNNN_{img1,img2}.ppm, NNNNN_flow.flo and
                                                         ROOT/FlyingChairs_train_val.txt (1 = train, 2 = val)
  sintel_clean, sintel_final     ROOT/training/{clean,final}/<scene>/frame_NNNN.png, training/flow/<scene>/*.flo,
                                 optional training/{invalid,occlusions}/<scene>/frame_NNNN.png
  kitti2015[_noc], kitti2012[_noc]  ROOT/training/{image_2 | colored_0}/NNNNNN_1{0,1}.png and
                                 ROOT/training/flow_{occ,noc}/NNNNNN_10.png (16-bit); if that folder is absent a
                                 single other training/flow*/ folder is used (e.g. the sample's
                                 flow_gt_occ_or_noc)
  middlebury                     ROOT/other-data/<Seq>/frame1{0,1}.png, ROOT/other-gt-flow/<Seq>/flow10.flo
  synthetic_val[:N]              the trainer's held-out synthetic set (data_pipelines.pipeline, config.data of
                                 the run), optionally only its first N pairs; needs TensorFlow.

Metrics (jaxflow.metrics summed forms, so every number is a mean over all valid pixels of the dataset): EPE,
1/3/5 px outlier rates, KITTI Fl-all, Sintel s0-10 / s10-40 / s40+ and occluded / non-occluded EPE. Pixels
with unknown ground truth (Middlebury > 1e9, KITTI B = 0, Sintel invalid mask) are excluded. Sintel pairs
without occlusion masks count in every metric except the occluded / non-occluded split. Frames are fed at
their original size: the models resize internally and return flow at the input size (checked).

Outputs: a table on stdout; with --json PATH, {"checkpoint", "step", "results": {method: {dataset: metrics}}}
rewritten after every finished dataset, and per-pair rows appended to PATH with suffix .jsonl as they are
computed, so an interrupted evaluation keeps what it computed (--resume skips finished datasets).

Classical baselines (--baselines zero,farneback,dis) run on the same pairs: 'zero' predicts no motion;
'farneback' and 'dis' are OpenCV's Farneback and DIS (medium preset) methods on grey frames and need OpenCV
(`pip install opencv-python`), which jaxflow does not depend on.

Submission export: `export_sintel` writes <out>/<pass>/<scene>/frame_NNNN.flo for the Sintel test set and
`export_kitti` writes <out>/NNNNNN_10.png (KITTI 16-bit flow PNGs) for the KITTI test set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from jaxflow import flow_io
from jaxflow.infer import Progress

# Sub-folders of $JAXFLOW_DATA (the shared sample data) used when a dataset is given without a path.
DEFAULT_ROOTS = {"flying_chairs": "flyingchairs", "sintel": "sintel", "kitti2015": "kitti/kitti2015",
                 "kitti2012": "kitti/kitti2012", "middlebury": "middlebury"}
ALIASES = {"chairs": "flying_chairs_val", "sintel": "sintel_clean", "kitti": "kitti2015"}
DATASETS = ("flying_chairs_val", "flying_chairs_all", "sintel_clean", "sintel_final", "kitti2015", "kitti2015_noc",
            "kitti2012", "kitti2012_noc", "middlebury", "synthetic_val")
BASELINES = ("zero", "farneback", "dis")


# ----------------------------------------------------------------------------------------------------------
# Datasets as lists of files, read with numpy (no TensorFlow).


@dataclasses.dataclass
class PairFiles:
  """The files of one evaluation pair. flow_format: 'flo' or 'kitti'; masks: optional 'invalid' / 'occlusion'."""
  id: str
  image1: str
  image2: str
  flow: str
  flow_format: str = "flo"
  masks: dict[str, str] = dataclasses.field(default_factory=dict)


def _mask(path: str, shape: tuple[int, int]) -> np.ndarray:
  """float32 (H, W): 1 where a mask PNG is > 127 (Sintel: 255 = set); the size must match the flow."""
  image = flow_io.read_image(path)
  if image.shape[:2] != shape:
    raise ValueError(f"{path}: mask is {image.shape[1]}x{image.shape[0]} (W x H), expected {shape[1]}x{shape[0]} "
                     f"like the flow")
  return (image[..., 0] > 127.0 / 255.0).astype(np.float32)


def load_pair(pair: PairFiles) -> dict[str, Any]:
  """Reads one pair: image1, image2 float32 (H, W, 3) in [0, 1]; flow (H, W, 2) px; valid (H, W); occlusion?

  Raises errors naming the file: missing or unreadable files, frames or flow of different sizes.
  """
  im1 = flow_io.read_image(pair.image1)
  im2 = flow_io.read_image(pair.image2)
  if im1.shape != im2.shape:
    raise ValueError(f"{pair.image2}: frame is {im2.shape[1]}x{im2.shape[0]} (W x H) but {pair.image1} is "
                     f"{im1.shape[1]}x{im1.shape[0]}; the two frames of a pair must have the same size")
  if pair.flow_format == "kitti":
    flow, valid = flow_io.read_kitti_flow(pair.flow)
    flow = flow * valid[..., None]
  else:
    flow = flow_io.read_flo(pair.flow)
    valid = flow_io.flow_valid_mask(flow)
  if flow.shape[:2] != im1.shape[:2]:
    raise ValueError(f"{pair.flow}: flow is {flow.shape[1]}x{flow.shape[0]} (W x H) but the frame {pair.image1} "
                     f"is {im1.shape[1]}x{im1.shape[0]}")
  out = {"id": pair.id, "image1": im1, "image2": im2, "flow": flow}
  if "invalid" in pair.masks:
    valid = valid * (1.0 - _mask(pair.masks["invalid"], flow.shape[:2]))
  if "occlusion" in pair.masks:
    out["occlusion"] = _mask(pair.masks["occlusion"], flow.shape[:2])
  out["valid"] = valid.astype(np.float32)
  return out


def _require_dir(dataset: str, folder: str, what: str) -> str:
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{dataset}: folder {folder!r} ({what}) does not exist")
  return folder


def _require_files(dataset: str, pair: Mapping[str, str]) -> None:
  for key, path in pair.items():
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{dataset}: {path} ({key}) does not exist")


def list_flying_chairs(root: str, split: str = "val") -> list[PairFiles]:
  """FlyingChairs pairs of `split` ('val', 'train' or 'all'); missing files of a listed pair are errors."""
  name = f"flying_chairs_{split}"
  data = next((d for d in (os.path.join(root, "data"), os.path.join(root, "FlyingChairs_release", "data"), root)
               if os.path.isdir(d) and any(f.endswith("_img1.ppm") for f in os.listdir(d))), None)
  if data is None:
    raise FileNotFoundError(f"{name}: no NNNNN_img1.ppm under {root!r} (looked in data/, "
                            f"FlyingChairs_release/data/ and the folder itself)")
  if split == "all":
    ids = sorted(int(f[:5]) for f in os.listdir(data) if re.fullmatch(r"\d{5}_img1\.ppm", f))
  else:
    split_file = next((p for p in (os.path.join(root, "FlyingChairs_train_val.txt"),
                                   os.path.join(os.path.dirname(data), "FlyingChairs_train_val.txt"))
                       if os.path.isfile(p)), None)
    if split_file is None:
      raise FileNotFoundError(f"{name}: split file FlyingChairs_train_val.txt not found in {root!r}; "
                              f"use flying_chairs_all to evaluate every pair present")
    with open(split_file) as f:
      codes = [line.strip() for line in f if line.strip()]
    want = {"train": "1", "val": "2"}[split]
    present = set(os.listdir(data))
    ids = [i + 1 for i, c in enumerate(codes) if c == want and f"{i + 1:05d}_img1.ppm" in present]
  pairs = []
  for i in ids:
    files = {s: os.path.join(data, f"{i:05d}_{s}") for s in ("img1.ppm", "img2.ppm", "flow.flo")}
    _require_files(name, files)
    pairs.append(PairFiles(f"{i:05d}", files["img1.ppm"], files["img2.ppm"], files["flow.flo"]))
  if not pairs:
    raise FileNotFoundError(f"{name}: no {split} pair in {data!r} (the split file marks pairs 1 = train, 2 = val)")
  return pairs


def list_sintel(root: str, pass_name: str) -> list[PairFiles]:
  """Sintel training pairs of a pass: every training/flow/<scene>/frame_NNNN.flo with its frames NNNN, NNNN+1."""
  name = f"sintel_{pass_name}"
  train = os.path.join(root, "training")
  image_dir = _require_dir(name, os.path.join(train, pass_name), f"{pass_name} frames")
  flow_dir = _require_dir(name, os.path.join(train, "flow"), "ground-truth flow")
  pairs = []
  for scene in sorted(os.listdir(flow_dir)):
    for f in sorted(os.listdir(os.path.join(flow_dir, scene))):
      m = re.fullmatch(r"frame_(\d+)\.flo", f)
      if not m:
        continue
      n = int(m.group(1))
      files = {"image1": os.path.join(image_dir, scene, f"frame_{n:04d}.png"),
               "image2": os.path.join(image_dir, scene, f"frame_{n + 1:04d}.png"),
               "flow": os.path.join(flow_dir, scene, f)}
      _require_files(name, files)
      masks = {}
      for key, folder in (("invalid", "invalid"), ("occlusion", "occlusions")):
        path = os.path.join(train, folder, scene, f"frame_{n:04d}.png")
        if os.path.isfile(path):
          masks[key] = path
      pairs.append(PairFiles(f"{scene}/frame_{n:04d}", files["image1"], files["image2"], files["flow"], "flo",
                             masks))
  if not pairs:
    raise FileNotFoundError(f"{name}: no frame_NNNN.flo under {flow_dir!r}")
  return pairs


def list_kitti(root: str, version: int, variant: str = "occ") -> list[PairFiles]:
  """KITTI training pairs: NNNNNN_10.png / _11.png frames and the NNNNNN_10.png flow of flow_{variant}."""
  name = f"kitti{version}" + ("_noc" if variant == "noc" else "")
  train = os.path.join(root, "training")
  image_dir = _require_dir(name, os.path.join(train, {2015: "image_2", 2012: "colored_0"}[version]), "frames")
  gt_dir = os.path.join(train, f"flow_{variant}")
  if not os.path.isdir(gt_dir):
    others = sorted(d for d in os.listdir(train) if d.startswith("flow") and os.path.isdir(os.path.join(train, d)))
    if len(others) != 1:
      raise FileNotFoundError(f"{name}: folder {gt_dir!r} (ground-truth flow) does not exist"
                              + (f"; found several other flow folders {others}" if others else ""))
    gt_dir = os.path.join(train, others[0])
  pairs = []
  for f in sorted(os.listdir(gt_dir)):
    if not re.fullmatch(r"\d+_10\.png", f):
      continue
    files = {"image1": os.path.join(image_dir, f), "image2": os.path.join(image_dir, f.replace("_10.", "_11.")),
             "flow": os.path.join(gt_dir, f)}
    _require_files(name, files)
    pairs.append(PairFiles(f[:-4], files["image1"], files["image2"], files["flow"], "kitti"))
  if not pairs:
    raise FileNotFoundError(f"{name}: no NNNNNN_10.png flow in {gt_dir!r}")
  return pairs


def list_middlebury(root: str) -> list[PairFiles]:
  """Middlebury 'other' sequences with public ground truth: other-gt-flow/<Seq>/flow10.flo."""
  image_dir = _require_dir("middlebury", os.path.join(root, "other-data"), "frames")
  gt_dir = _require_dir("middlebury", os.path.join(root, "other-gt-flow"), "ground-truth flow")
  pairs = []
  for seq in sorted(os.listdir(gt_dir)):
    files = {"image1": os.path.join(image_dir, seq, "frame10.png"),
             "image2": os.path.join(image_dir, seq, "frame11.png"), "flow": os.path.join(gt_dir, seq, "flow10.flo")}
    if not os.path.isfile(files["flow"]):
      continue
    _require_files("middlebury", files)
    pairs.append(PairFiles(seq, files["image1"], files["image2"], files["flow"]))
  if not pairs:
    raise FileNotFoundError(f"middlebury: no <Seq>/flow10.flo under {gt_dir!r}")
  return pairs


class FileDataset:
  """A named list of PairFiles, read lazily (`ds[i]` -> the dict of `load_pair`)."""

  def __init__(self, name: str, pairs: Sequence[PairFiles]):
    self.name = name
    self.pairs = list(pairs)

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return load_pair(self.pairs[i])


class SyntheticDataset:
  """The trainer's held-out synthetic set ('synthetic_val' of data_pipelines.pipeline), first `limit` pairs."""

  def __init__(self, data_config: Mapping[str, Any] | None = None, limit: int | None = None):
    import ml_collections  # pylint: disable=import-outside-toplevel
    from data_pipelines import pipeline  # pylint: disable=import-outside-toplevel

    data = pipeline.default_config()
    if data_config:
      _update(data, data_config)
    if limit is not None:
      data.val_size = int(limit)
    self.name = "synthetic_val"
    self._config = ml_collections.ConfigDict({"data": data, "batch_size": 1})
    _, self._n = pipeline.eval_dataset(self._config, "synthetic_val", batch_size=1)
    self._pipeline = pipeline

  def __len__(self) -> int:
    return self._n

  def __iter__(self):
    it = self._pipeline.eval_iterator(self._config, "synthetic_val", batch_size=1)
    for i, batch in enumerate(it):
      ex = {k: v[0] for k, v in batch.items()}
      ex["id"] = f"{i:06d}"
      yield ex

  def __getitem__(self, i: int) -> dict[str, Any]:
    raise TypeError("SyntheticDataset is read sequentially; iterate over it")


def _update(config: Any, values: Mapping[str, Any]) -> None:
  """Copies a run's config.json `data` entry onto the pipeline defaults (keys the defaults know; JSON lists
  become tuples)."""
  for k, v in values.items():
    if k not in config:
      continue
    if isinstance(v, Mapping):
      _update(config[k], v)
    else:
      config[k] = tuple(v) if isinstance(v, list) else v


def parse_dataset_spec(spec: str) -> tuple[str, str | None]:
  """'NAME[:PATH]' -> (canonical name, path or None); unknown names raise naming the known ones."""
  name, _, path = spec.strip().partition(":")
  name = ALIASES.get(name, name)
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {spec.split(':')[0]!r}; expected one of {list(DATASETS)} "
                     f"(aliases {ALIASES})")
  return name, (path or None)


def _default_root(name: str) -> str:
  key = "kitti2015" if name.startswith("kitti2015") else "kitti2012" if name.startswith("kitti2012") else \
      "flying_chairs" if name.startswith("flying_chairs") else name.split("_")[0]
  base = os.environ.get("JAXFLOW_DATA")
  if not base:
    raise ValueError(f"dataset {name!r} has no path: give it as {name}:PATH or set JAXFLOW_DATA to the folder "
                     f"holding {DEFAULT_ROOTS[key]}/")
  return os.path.join(base, DEFAULT_ROOTS[key])


def make_dataset(spec: str, data_config: Mapping[str, Any] | None = None):
  """A dataset from 'NAME[:PATH]' (see the module docstring): FileDataset, or SyntheticDataset for synthetic_val."""
  name, path = parse_dataset_spec(spec)
  if name == "synthetic_val":
    if path is not None and not path.isdigit():
      raise ValueError(f"synthetic_val:{path}: the part after ':' is the number of pairs (an integer)")
    return SyntheticDataset(data_config, int(path) if path else None)
  root = path or _default_root(name)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{name}: dataset folder {root!r} does not exist")
  if name.startswith("flying_chairs"):
    pairs = list_flying_chairs(root, name.rsplit("_", 1)[1])
  elif name.startswith("sintel"):
    pairs = list_sintel(root, name.split("_")[1])
  elif name.startswith("kitti"):
    pairs = list_kitti(root, int(name[5:9]), "noc" if name.endswith("_noc") else "occ")
  else:
    pairs = list_middlebury(root)
  return FileDataset(name, pairs)


# ----------------------------------------------------------------------------------------------------------
# Methods: learned predictors, baselines, and test hooks.


class Method:
  """Something that predicts flow for a list of same-sized examples: predict(examples) -> (B, H, W, 2)."""
  name = "method"

  def predict(self, examples: Sequence[Mapping[str, Any]]) -> np.ndarray:
    raise NotImplementedError


class PredictorMethod(Method):
  """A jaxflow Predictor (or any fn(image1 (B,H,W,3), image2) -> (B,H,W,2) flow)."""

  def __init__(self, predictor: Callable[[np.ndarray, np.ndarray], np.ndarray], name: str = "model"):
    self.predictor = predictor
    self.name = name

  def predict(self, examples):
    a = np.stack([e["image1"] for e in examples])
    b = np.stack([e["image2"] for e in examples])
    return np.asarray(self.predictor(a, b))


class ZeroMethod(Method):
  """No motion: its EPE is the mean flow magnitude of the ground truth."""
  name = "zero"

  def predict(self, examples):
    return np.zeros((len(examples),) + examples[0]["image1"].shape[:2] + (2,), np.float32)


class OracleMethod(Method):
  """Returns the ground truth (a test hook: every error metric is 0)."""
  name = "oracle"

  def predict(self, examples):
    return np.stack([np.where(e["valid"][..., None] > 0.5, e["flow"], 0.0) for e in examples]).astype(np.float32)


def _gray_u8(image: np.ndarray) -> np.ndarray:
  gray = image @ np.asarray([0.299, 0.587, 0.114], np.float32)
  return np.round(np.clip(gray, 0, 1) * 255).astype(np.uint8)


class FarnebackMethod(Method):
  """OpenCV Farneback (pyramid 0.5, 3 levels, window 15, 3 iterations, poly_n 5, sigma 1.2) on grey frames."""
  name = "farneback"

  def __init__(self):
    self.cv2 = require_cv2("farneback")

  def predict(self, examples):
    return np.stack([self.cv2.calcOpticalFlowFarneback(_gray_u8(e["image1"]), _gray_u8(e["image2"]), None,
                                                       0.5, 3, 15, 3, 5, 1.2, 0) for e in examples]).astype(np.float32)


class DISMethod(Method):
  """OpenCV DIS optical flow (medium preset) on grey frames."""
  name = "dis"

  def __init__(self):
    self.cv2 = require_cv2("dis")
    self.dis = self.cv2.DISOpticalFlow_create(self.cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)

  def predict(self, examples):
    return np.stack([self.dis.calc(_gray_u8(e["image1"]), _gray_u8(e["image2"]), None)
                     for e in examples]).astype(np.float32)


def require_cv2(what: str):
  try:
    import cv2  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(f"baseline {what!r} needs OpenCV, which is not installed (jaxflow does not depend on it): "
                      f"pip install opencv-python") from None
  return cv2


def cv2_available() -> bool:
  try:
    import cv2  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    return True
  except ImportError:
    return False


def make_baseline(name: str) -> Method:
  """'zero', 'farneback' or 'dis' (the OpenCV ones raise ImportError naming opencv-python without cv2)."""
  makers = {"zero": ZeroMethod, "farneback": FarnebackMethod, "dis": DISMethod}
  if name not in makers:
    raise ValueError(f"unknown baseline {name!r}; expected one of {list(makers)}")
  return makers[name]()


# ----------------------------------------------------------------------------------------------------------
# Evaluation loop.


def _batches(dataset, batch_size: int, max_pairs: int | None) -> Iterable[list[dict[str, Any]]]:
  """Consecutive same-sized examples, at most batch_size per batch."""
  it = iter(dataset) if isinstance(dataset, SyntheticDataset) else (dataset[i] for i in range(len(dataset)))
  group: list[dict[str, Any]] = []
  for n, ex in enumerate(it):
    if max_pairs is not None and n >= max_pairs:
      break
    if group and (len(group) == batch_size or group[0]["image1"].shape != ex["image1"].shape):
      yield group
      group = []
    group.append(ex)
  if group:
    yield group


def _json_value(v: Any) -> Any:
  v = float(v) if not isinstance(v, int) else v
  return None if isinstance(v, float) and math.isnan(v) else v


def evaluate_dataset(method: Method, dataset, *, batch_size: int = 1, max_pairs: int | None = None,
                     jsonl: str | None = None, progress: bool = False) -> dict[str, Any]:
  """Evaluates `method` on every pair of `dataset`; returns dataset-level metrics (jaxflow.metrics.finalize).

  Returns:
    {'epe', 'outlier_1px', 'outlier_3px', 'outlier_5px', 'fl_all', 's0_10', 's10_40', 's40plus',
     'num_pixels', 'num_pairs'} (means over all valid pixels of the set; rates as fractions), plus
    'epe_occ', 'epe_noc' and 'num_pairs_with_occlusion' when some pairs have occlusion masks.
  Appends one JSON row per pair to `jsonl` (method, dataset, id, its own metrics) as soon as it is computed.
  """
  from jaxflow import metrics  # pylint: disable=import-outside-toplevel

  n_total = len(dataset) if max_pairs is None else min(len(dataset), max_pairs)
  bar = Progress(n_total, f"{method.name} on {dataset.name}", enabled=progress)
  total = occ_total = None
  n_pairs = n_occ = 0
  out_file = open(jsonl, "a") if jsonl else None
  try:
    for group in _batches(dataset, batch_size, max_pairs):
      pred = np.asarray(method.predict(group), np.float32)
      want = (len(group),) + group[0]["flow"].shape
      if pred.shape != want:
        raise ValueError(f"method {method.name!r} returned flow of shape {pred.shape} for {dataset.name} pairs "
                         f"{[e['id'] for e in group]}; expected {want}")
      for ex, p in zip(group, pred):
        sums = metrics.flow_metric_sums(p[None], ex["flow"][None], ex["valid"][None])
        total = metrics.accumulate_sums(total, sums)
        row = metrics.finalize(metrics.accumulate_sums(None, sums))
        if "occlusion" in ex:
          occ = metrics.flow_metric_sums(p[None], ex["flow"][None], ex["valid"][None], ex["occlusion"][None])
          occ = {k: v for k, v in occ.items() if k.startswith(("occ_", "noc_"))}
          occ_total = metrics.accumulate_sums(occ_total, occ)
          row.update(metrics.finalize({**metrics.accumulate_sums(None, sums), **metrics.accumulate_sums(None, occ)}))
          n_occ += 1
        n_pairs += 1
        if out_file:
          out_file.write(json.dumps({"method": method.name, "dataset": dataset.name, "id": ex["id"],
                                     **{k: _json_value(v) for k, v in row.items()}}) + "\n")
          out_file.flush()
        bar.update()
  finally:
    if out_file:
      out_file.close()
  if total is None:
    raise ValueError(f"{dataset.name}: no pairs to evaluate")
  result = metrics.finalize({**total, **(occ_total or {})})
  result["num_pairs"] = n_pairs
  if n_occ:
    result["num_pairs_with_occlusion"] = n_occ
  return result


def _write_json(path: str, payload: Mapping[str, Any]) -> None:
  """Atomic write (temporary file + rename), NaN written as null."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(_sanitize(payload), f, indent=2, sort_keys=True, allow_nan=False)
  os.replace(path + ".tmp", path)


def _sanitize(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _sanitize(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_sanitize(v) for v in tree]
  if isinstance(tree, float) and not math.isfinite(tree):
    return None
  return tree


def run(methods: Sequence[Method], datasets: Sequence[Any], *, json_path: str | None = None,
        header: Mapping[str, Any] | None = None, batch_size: int = 1, max_pairs: int | None = None,
        resume: bool = False, progress: bool = False) -> dict[str, dict[str, dict[str, Any]]]:
  """Evaluates every method on every dataset: {method: {dataset: metrics}}.

  With json_path, the JSON file ({**header, 'results': ...}) is rewritten after every finished dataset and
  per-pair rows are appended to json_path's '.jsonl' sibling. resume=True starts from an existing JSON file
  and skips the (method, dataset) entries it already holds.
  """
  results: dict[str, dict[str, dict[str, Any]]] = {}
  jsonl = None
  if json_path:
    jsonl = os.path.splitext(json_path)[0] + ".jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    if resume and os.path.isfile(json_path):
      with open(json_path) as f:
        results = json.load(f).get("results", {})
  for method in methods:
    for ds in datasets:
      if ds.name in results.get(method.name, {}):
        continue
      res = evaluate_dataset(method, ds, batch_size=batch_size, max_pairs=max_pairs, jsonl=jsonl, progress=progress)
      results.setdefault(method.name, {})[ds.name] = res
      if json_path:
        _write_json(json_path, {**(header or {}), "results": results})
  return results


# Columns of the printed table: (title, metric key, scale, format, datasets prefix it applies to or None = all).
_COLUMNS = (
    ("EPE", "epe", 1.0, "{:.3f}", None),
    ("1px%", "outlier_1px", 100.0, "{:.2f}", None),
    ("3px%", "outlier_3px", 100.0, "{:.2f}", None),
    ("5px%", "outlier_5px", 100.0, "{:.2f}", None),
    ("Fl-all%", "fl_all", 100.0, "{:.2f}", "kitti"),
    ("s0-10", "s0_10", 1.0, "{:.3f}", "sintel"),
    ("s10-40", "s10_40", 1.0, "{:.3f}", "sintel"),
    ("s40+", "s40plus", 1.0, "{:.3f}", "sintel"),
    ("occ", "epe_occ", 1.0, "{:.3f}", "sintel"),
    ("noc", "epe_noc", 1.0, "{:.3f}", "sintel"),
)


def format_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
  """A fixed-width text table: one row per (dataset, method); '-' where a metric does not apply or is empty."""
  head = ["dataset", "method", "pairs"] + [c[0] for c in _COLUMNS]
  rows = []
  datasets = sorted({d for per in results.values() for d in per}, key=lambda d: (DATASETS.index(d)
                                                                                  if d in DATASETS else 99, d))
  for d in datasets:
    for m, per in results.items():
      if d not in per:
        continue
      r = per[d]
      cells = [d, m, str(r.get("num_pairs", ""))]
      for _, key, scale, fmt, only in _COLUMNS:
        v = r.get(key)
        ok = (only is None or d.startswith(only)) and v is not None and not (isinstance(v, float) and math.isnan(v))
        cells.append(fmt.format(v * scale) if ok else "-")
      rows.append(cells)
  widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
  line = lambda cells: "  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in
                                 enumerate(zip(cells, widths)))
  return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


# ----------------------------------------------------------------------------------------------------------
# Benchmark submission export.


def export_sintel(predict: Callable[[np.ndarray, np.ndarray], np.ndarray], root: str, out_dir: str,
                  passes: Sequence[str] = ("clean", "final"), progress: bool = True) -> list[str]:
  """Sintel test submission tree: <out_dir>/<pass>/<scene>/frame_NNNN.flo for frames 1 .. N-1 of every scene.

  Args:
    predict: fn(image1 (H, W, 3) float32 [0, 1], image2) -> (H, W, 2) flow (e.g. a Predictor).
    root: the MPI-Sintel folder holding test/<pass>/<scene>/frame_NNNN.png (or the test folder itself).
  Returns:
    the written paths.
  """
  test = os.path.join(root, "test") if os.path.isdir(os.path.join(root, "test")) else root
  jobs = []
  for pass_name in passes:
    pass_dir = _require_dir("sintel test", os.path.join(test, pass_name), f"{pass_name} frames")
    for scene in sorted(os.listdir(pass_dir)):
      frames = sorted(f for f in os.listdir(os.path.join(pass_dir, scene)) if re.fullmatch(r"frame_\d+\.png", f))
      for f1, f2 in zip(frames[:-1], frames[1:]):
        jobs.append((os.path.join(pass_dir, scene, f1), os.path.join(pass_dir, scene, f2),
                     os.path.join(out_dir, pass_name, scene, f1[:-4] + ".flo")))
  if not jobs:
    raise FileNotFoundError(f"sintel test: no scene with two frame_NNNN.png under {test!r} for passes {passes}")
  bar = Progress(len(jobs), "export sintel", enabled=progress)
  for p1, p2, out in jobs:
    im1, im2 = flow_io.read_image(p1), flow_io.read_image(p2)
    _check_same(p1, im1, p2, im2)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    flow_io.write_flo(out, np.asarray(predict(im1, im2)))
    bar.update()
  return [j[2] for j in jobs]


def export_kitti(predict: Callable[[np.ndarray, np.ndarray], np.ndarray], root: str, out_dir: str,
                 image_dir: str = "image_2", progress: bool = True) -> list[str]:
  """KITTI test submission: <out_dir>/NNNNNN_10.png (16-bit flow PNG, all pixels valid) for every test pair.

  root holds testing/<image_dir>/NNNNNN_1{0,1}.png (image_2 for KITTI 2015, colored_0 for 2012), or is the
  testing folder itself.
  """
  test = os.path.join(root, "testing") if os.path.isdir(os.path.join(root, "testing")) else root
  frames_dir = _require_dir("kitti test", os.path.join(test, image_dir), "frames")
  firsts = sorted(f for f in os.listdir(frames_dir) if re.fullmatch(r"\d+_10\.png", f))
  if not firsts:
    raise FileNotFoundError(f"kitti test: no NNNNNN_10.png in {frames_dir!r}")
  os.makedirs(out_dir, exist_ok=True)
  bar = Progress(len(firsts), "export kitti", enabled=progress)
  written = []
  for f in firsts:
    p1, p2 = os.path.join(frames_dir, f), os.path.join(frames_dir, f.replace("_10.", "_11."))
    if not os.path.isfile(p2):
      raise FileNotFoundError(f"kitti test: {p2} (second frame of {f}) does not exist")
    im1, im2 = flow_io.read_image(p1), flow_io.read_image(p2)
    _check_same(p1, im1, p2, im2)
    out = os.path.join(out_dir, f)
    flow_io.write_kitti_flow(out, np.asarray(predict(im1, im2)), np.ones(im1.shape[:2], np.float32))
    written.append(out)
    bar.update()
  return written


def _check_same(p1: str, im1: np.ndarray, p2: str, im2: np.ndarray) -> None:
  if im1.shape != im2.shape:
    raise ValueError(f"{p2}: frame is {im2.shape[1]}x{im2.shape[0]} (W x H) but {p1} is {im1.shape[1]}x"
                     f"{im1.shape[0]}; the two frames of a pair must have the same size")


# ----------------------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m jaxflow.evaluate", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  src = p.add_mutually_exclusive_group()
  src.add_argument("--workdir", help="training run folder (its latest checkpoint, or --step)")
  src.add_argument("--checkpoint", help="checkpoint folder WORKDIR/checkpoints/<step> (or a workdir)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step of --workdir (default: latest)")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="compute dtype override")
  p.add_argument("--datasets", default="", help="comma-separated NAME[:PATH]; names: " + ", ".join(DATASETS))
  p.add_argument("--baselines", default="", help="comma-separated classical baselines: " + ", ".join(BASELINES))
  p.add_argument("--json", default=None, help="write results here (and per-pair rows to its .jsonl sibling)")
  p.add_argument("--resume", action="store_true", help="skip (method, dataset) results already in --json")
  p.add_argument("--batch_size", type=int, default=1, help="pairs per forward pass (same-sized pairs only)")
  p.add_argument("--max_pairs", type=int, default=None, help="evaluate only the first N pairs of each dataset")
  p.add_argument("--export", choices=("sintel", "kitti"), default=None, help="write a benchmark submission")
  p.add_argument("--root", default=None, help="--export: the dataset folder holding test/ (Sintel) or testing/")
  p.add_argument("--out", default=None, help="--export: output folder")
  p.add_argument("--quiet", action="store_true", help="no progress lines")
  p.add_argument("--compilation_cache", default=None,
                 help="persistent XLA compilation cache directory (a second evaluation of the same model and frame size skips compilation); default $JAXFLOW_COMPILATION_CACHE or ~/.cache/jaxflow/xla; 'none' disables it")
  args = p.parse_args(argv)
  if args.export:
    if not (args.workdir or args.checkpoint) or not args.root or not args.out:
      p.error("--export needs --workdir or --checkpoint, --root and --out")
  elif not args.datasets:
    p.error("--datasets is required (e.g. --datasets sintel_clean,kitti2015:/data/kitti2015)")
  elif not (args.workdir or args.checkpoint or args.baselines):
    p.error("give --workdir or --checkpoint (and/or --baselines)")
  if args.batch_size < 1:
    p.error(f"--batch_size must be >= 1, got {args.batch_size}")
  return args


def configure_caches(flag: str | None, dataset_specs: Sequence[str] = ()) -> str | None:
  """Sets up JAX's persistent compilation cache from the `--compilation_cache` flag (see
  `platform.configure_from_flag`) and, when synthetic_val is among `dataset_specs`, TensorFlow's XLA cache beside it
  (the input pipeline's compiled renderer; must run before TensorFlow is imported). Returns JAX's cache directory
  or None."""
  from jaxflow import platform  # pylint: disable=import-outside-toplevel

  cache_dir = platform.configure_from_flag(flag)["cache_dir"]
  if cache_dir and any(parse_dataset_spec(s)[0] == "synthetic_val" for s in dataset_specs if s.strip()):
    from data_pipelines import tf_cache  # pylint: disable=import-outside-toplevel
    tf_cache.enable_xla_cache(cache_dir)
  return cache_dir


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  configure_caches(args.compilation_cache, args.datasets.split(","))
  methods: list[Method] = [make_baseline(b.strip()) for b in args.baselines.split(",") if b.strip()]
  header: dict[str, Any] = {}
  data_config = None
  if args.workdir or args.checkpoint:
    from jaxflow import predictor as predictor_lib  # pylint: disable=import-outside-toplevel
    model = predictor_lib.load(args.workdir or args.checkpoint, args.step, dtype=args.dtype)
    header = {"checkpoint": model.checkpoint, "step": model.step, "model": model.model_config}
    if args.export:
      fn = lambda a, b: model(a, b)
      if args.export == "sintel":
        written = export_sintel(fn, args.root, args.out, progress=not args.quiet)
      else:
        written = export_kitti(fn, args.root, args.out, progress=not args.quiet)
      print(f"wrote {len(written)} {args.export} submission file(s) under {args.out}")
      return 0
    methods.insert(0, PredictorMethod(model, name=model.model_config.get("name", "model")))
    config_path = os.path.join(os.path.dirname(os.path.dirname(model.checkpoint)), "config.json")
    with open(config_path) as f:
      data_config = json.load(f).get("data")
  datasets = [make_dataset(s, data_config) for s in args.datasets.split(",") if s.strip()]
  t0 = time.time()
  results = run(methods, datasets, json_path=args.json, header=header, batch_size=args.batch_size,
                max_pairs=args.max_pairs, resume=args.resume, progress=not args.quiet)
  print(format_table(results))
  print(f"({time.time() - t0:.1f} s" + (f"; results in {args.json}" if args.json else "") + ")")
  return 0


if __name__ == "__main__":
  sys.exit(main())
