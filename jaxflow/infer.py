"""`python -m jaxflow.infer`: flow of an image pair, a folder of frames or a video, as .flo and colour PNGs.

  python -m jaxflow.infer IMAGE1 IMAGE2 --checkpoint PATH -o OUT
  python -m jaxflow.infer --frames DIR  --workdir RUN -o OUT      # consecutive pairs of the sorted frames
  python -m jaxflow.infer --video FILE  --workdir RUN -o OUT      # needs OpenCV (cv2), see below

For each pair (frame t -> frame t+1) OUT/<stem of frame t>.flo holds the flow (Middlebury .flo, pixels, u
right, v down) and OUT/<stem>.png its Middlebury colour coding (`jaxflow.viz.flow_to_color`, normalised by
the largest flow of that pair). Video input writes OUT/frame_NNNNNN.{flo,png} and OUT/side_by_side.mp4
(frame | colour-coded flow). Video IO uses OpenCV when it is installed; jaxflow does not depend on it, so
without it `--video` raises an error naming the missing package (`pip install opencv-python`).
A progress line is printed to stderr for inputs of more than one pair.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from typing import Callable, Iterator, Sequence

import numpy as np

from jaxflow import flow_io, viz

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".tif", ".tiff", ".webp")
PredictFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class Progress:
  """A one-line text progress indicator on stderr: `label  k/n  rate/s  ETA`; silent when disabled."""

  def __init__(self, total: int, label: str = "", enabled: bool = True, stream=None):
    self.total = int(total)
    self.label = label
    self.enabled = enabled
    self.stream = stream if stream is not None else sys.stderr
    self.start = time.time()
    self.done = 0
    # On a terminal the line is redrawn in place; in a log file a line is written every ~10 %.
    self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self._next_log = 0

  def update(self, n: int = 1) -> None:
    self.done += n
    if not self.enabled:
      return
    elapsed = max(time.time() - self.start, 1e-9)
    rate = self.done / elapsed
    eta = (self.total - self.done) / rate if rate > 0 else float("inf")
    eta_s = f"{int(eta) // 60}:{int(eta) % 60:02d}" if np.isfinite(eta) else "?"
    text = f"{self.label} {self.done}/{self.total}  {rate:.2f}/s  ETA {eta_s}"
    if self._tty:
      self.stream.write(f"\r{text}   " + ("\n" if self.done >= self.total else ""))
    elif self.done >= self._next_log or self.done >= self.total:
      self.stream.write(text + "\n")
      self._next_log = self.done + max(1, self.total // 10)
    self.stream.flush()


def write_flow_outputs(out_stem: str | os.PathLike, flow: np.ndarray) -> tuple[str, str]:
  """Writes OUT_STEM.flo and OUT_STEM.png (flow_to_color of that flow); returns both paths."""
  out_stem = os.fspath(out_stem)
  flo, png = out_stem + ".flo", out_stem + ".png"
  flow_io.write_flo(flo, flow)
  flow_io.write_image(png, viz.flow_to_color(flow))
  return flo, png


def list_frames(folder: str | os.PathLike) -> list[str]:
  """Image files of a folder sorted by name; errors name the folder when it is missing or has < 2 frames."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"--frames {folder!r}: no such folder")
  frames = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
  if len(frames) < 2:
    raise ValueError(f"--frames {folder!r}: found {len(frames)} image file(s) ({', '.join(IMAGE_EXTENSIONS)}); "
                     f"need at least 2 frames")
  return frames


def read_frame(path: str, expected_shape: tuple[int, ...] | None = None, first: str = "") -> np.ndarray:
  """float32 RGB (H, W, 3) in [0, 1]; a frame whose size differs from `expected_shape` raises naming both files."""
  image = flow_io.read_image(path)
  if expected_shape is not None and image.shape != expected_shape:
    raise ValueError(f"{path}: frame is {image.shape[1]}x{image.shape[0]} (W x H) but {first} is "
                     f"{expected_shape[1]}x{expected_shape[0]}; all frames must have the same size")
  return image


def infer_pairs(predict: PredictFn, pairs: Sequence[tuple[str, str]], out_dir: str | os.PathLike,
                progress: bool = True) -> list[tuple[str, str]]:
  """Predicts each (frame1 path, frame2 path) pair and writes OUT_DIR/<stem of frame1>.{flo,png}.

  Returns the written (.flo, .png) paths, in order. Frames of a pair must have the same size.
  """
  os.makedirs(out_dir, exist_ok=True)
  bar = Progress(len(pairs), "infer", enabled=progress and len(pairs) > 1)
  written = []
  cache: dict[str, np.ndarray] = {}
  for p1, p2 in pairs:
    im1 = cache.pop(p1, None)
    if im1 is None:
      im1 = read_frame(p1)
    im2 = read_frame(p2, im1.shape, p1)
    cache = {p2: im2}
    flow = predict(im1, im2)
    written.append(write_flow_outputs(os.path.join(out_dir, pathlib.Path(p1).stem), flow))
    bar.update()
  return written


def _require_cv2(what: str):
  try:
    import cv2  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(f"{what} needs OpenCV, which is not installed (jaxflow does not depend on it): "
                      f"pip install opencv-python") from None
  return cv2


def read_video(path: str | os.PathLike) -> Iterator[np.ndarray]:
  """Frames of a video as float32 RGB (H, W, 3) in [0, 1] (OpenCV)."""
  cv2 = _require_cv2("--video")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--video {os.fspath(path)!r}: no such file")
  cap = cv2.VideoCapture(os.fspath(path))
  if not cap.isOpened():
    raise ValueError(f"--video {os.fspath(path)!r}: OpenCV cannot open this file")
  try:
    while True:
      ok, bgr = cap.read()
      if not ok:
        break
      yield bgr[..., ::-1].astype(np.float32) / np.float32(255)
  finally:
    cap.release()


def infer_video(predict: PredictFn, path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True,
                fps: float | None = None) -> str:
  """Flow of every consecutive frame pair of a video: OUT/frame_NNNNNN.{flo,png} and OUT/side_by_side.mp4."""
  cv2 = _require_cv2("--video")
  os.makedirs(out_dir, exist_ok=True)
  cap = cv2.VideoCapture(os.fspath(path))
  total = max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) - 1, 1)
  fps = fps or cap.get(cv2.CAP_PROP_FPS) or 25.0
  cap.release()
  bar = Progress(total, "infer", enabled=progress)
  writer = None
  video_out = os.path.join(out_dir, "side_by_side.mp4")
  prev = None
  try:
    for i, frame in enumerate(read_video(path)):
      if prev is not None:
        flow = predict(prev, frame)
        write_flow_outputs(os.path.join(out_dir, f"frame_{i - 1:06d}"), flow)
        side = np.concatenate([np.round(prev * 255).astype(np.uint8), viz.flow_to_color(flow)], axis=1)
        if writer is None:
          h, w = side.shape[:2]
          writer = cv2.VideoWriter(video_out, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        writer.write(np.ascontiguousarray(side[..., ::-1]))
        bar.update()
      prev = frame
  finally:
    if writer is not None:
      writer.release()
  if prev is None or writer is None:
    raise ValueError(f"--video {os.fspath(path)!r}: fewer than 2 frames could be read")
  return video_out


def consecutive_pairs(frames: Sequence[str]) -> list[tuple[str, str]]:
  return list(zip(frames[:-1], frames[1:]))


def _load_predictor(args: argparse.Namespace):
  from jaxflow import predictor  # pylint: disable=import-outside-toplevel
  return predictor.load(args.workdir or args.checkpoint, args.step, dtype=args.dtype)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m jaxflow.infer", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("images", nargs="*", help="IMAGE1 IMAGE2: one pair of frames")
  p.add_argument("--frames", help="folder of frames: flow of every consecutive pair (sorted by name)")
  p.add_argument("--video", help="video file (needs OpenCV)")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="training run folder (its latest checkpoint)")
  src.add_argument("--checkpoint", help="checkpoint folder (WORKDIR/checkpoints/<step>) or workdir")
  p.add_argument("--step", type=int, default=None, help="checkpoint step of --workdir (default: latest)")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="compute dtype override")
  p.add_argument("-o", "--out", required=True, help="output folder")
  p.add_argument("--quiet", action="store_true", help="no progress line")
  p.add_argument("--compilation_cache", default=None,
                 help="persistent XLA compilation cache directory (a second evaluation of the same model and frame size skips compilation); default $JAXFLOW_COMPILATION_CACHE or ~/.cache/jaxflow/xla; 'none' disables it")
  args = p.parse_args(argv)
  given = sum([bool(args.images), bool(args.frames), bool(args.video)])
  if given != 1:
    p.error("give exactly one input: IMAGE1 IMAGE2, --frames DIR or --video FILE")
  if args.images and len(args.images) != 2:
    p.error(f"expected two images IMAGE1 IMAGE2, got {len(args.images)}: {args.images}")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if args.video:
    _require_cv2("--video")  # fail before loading the model
  if args.images:
    for path in args.images:
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such image file")
    pairs = [tuple(args.images)]
  elif args.frames:
    pairs = consecutive_pairs(list_frames(args.frames))
  from jaxflow import platform  # pylint: disable=import-outside-toplevel
  platform.configure_from_flag(args.compilation_cache)
  model = _load_predictor(args)
  if args.video:
    out = infer_video(model, args.video, args.out, progress=not args.quiet)
    print(f"wrote {out} and the .flo / .png of every pair to {args.out}")
    return 0
  written = infer_pairs(model, pairs, args.out, progress=not args.quiet)
  print(f"wrote {len(written)} flow file(s) (.flo + colour .png) to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
