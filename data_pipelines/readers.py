"""File decoders as TF graph ops, shared by the real-dataset readers.

Every decoder takes the raw file bytes (a scalar string tensor, from `tf.io.read_file`) and the file name (used
only in error messages) and returns float32 tensors, so decoding runs inside `tf.data.Dataset.map` with
`num_parallel_calls`, without Python. Corrupt files fail with an InvalidArgumentError naming the file and what
was expected.

Formats:
- `.flo` (Middlebury): tag float32 202021.25 ('PIEH'), int32 width, int32 height, then H*W*(u, v) float32
  little-endian, row-major.
- binary PPM (P6, 8-bit) and PFM ('PF' colour / 'Pf' grey): a whitespace-separated ASCII header of 4 tokens
  (magic, width, height, maxval or scale), one whitespace byte, then the raster. `tf.io.decode_image` does not
  read PPM, so the header is parsed here with string ops. PFM rows run bottom to top and a negative scale means
  little-endian data.
- PNG: `tf.io.decode_png`, 8- or 16-bit.
"""

from __future__ import annotations

import os
from typing import Sequence

import tensorflow as tf

FLO_TAG = 202021.25
# Middlebury marks unknown flow with components above 1e9.
FLO_UNKNOWN = 1e9
_HEADER_BYTES = 128


def check(cond: tf.Tensor, message: str, *data) -> tf.Operation:
  """An assertion whose error prints `message` and the given tensors (file name, sizes)."""
  return tf.debugging.Assert(cond, [message, *data], summarize=8)


def read_file(path: tf.Tensor) -> tf.Tensor:
  """The bytes of a file as a scalar string tensor (fails with NotFoundError naming the path)."""
  return tf.io.read_file(path)


def decode_flo(data: tf.Tensor, name: tf.Tensor | str = "") -> tf.Tensor:
  """Decodes a Middlebury .flo file -> float32 (H, W, 2) flow in pixels (unknown values left as stored)."""
  size = tf.strings.length(data)
  msg = "not a valid .flo file (expected tag PIEH, int32 width, int32 height, H*W*2 float32):"
  with tf.control_dependencies([check(size >= 12, msg, name, size)]):
    tag = tf.io.decode_raw(tf.strings.substr(data, 0, 4), tf.float32, little_endian=True)[0]
    wh = tf.io.decode_raw(tf.strings.substr(data, 4, 8), tf.int32, little_endian=True)
  w, h = wh[0], wh[1]
  checks = [
      check(tf.equal(tag, FLO_TAG), msg + " wrong tag", name, tag),
      check(tf.reduce_all(wh > 0), msg + " bad width/height", name, wh),
      check(tf.equal(tf.cast(size, tf.int64), 12 + 8 * tf.cast(w, tf.int64) * tf.cast(h, tf.int64)),
            msg + " file size does not match width*height", name, size, wh),
  ]
  with tf.control_dependencies(checks):
    flow = tf.io.decode_raw(tf.strings.substr(data, 12, size - 12), tf.float32, little_endian=True)
  return tf.reshape(flow, tf.stack([h, w, 2]))


def _parse_header(data: tf.Tensor, name: tf.Tensor | str, fmt: str) -> tuple[tf.Tensor, tf.Tensor]:
  """Splits a PPM/PFM header: returns (4 header tokens as strings, byte offset of the raster)."""
  prefix = tf.io.decode_raw(tf.strings.substr(data, 0, _HEADER_BYTES), tf.uint8)
  n = tf.shape(prefix)[0]
  is_ws = ((prefix == 32) | (prefix == 10) | (prefix == 13) | (prefix == 9))
  # End of a token: a non-whitespace byte followed by whitespace.
  ends = tf.where(tf.logical_not(is_ws[:-1]) & is_ws[1:])[:, 0]
  msg = f"not a valid {fmt} file (expected a 4-token ASCII header: magic, width, height, maxval/scale):"
  with tf.control_dependencies([check(tf.shape(ends)[0] >= 4, msg, name, n)]):
    header_end = tf.cast(ends[3], tf.int32) + 1  # index of the single whitespace byte after token 4
  tokens = tf.strings.split(tf.strings.substr(data, 0, header_end))
  return tokens[:4], header_end + 1


def decode_ppm(data: tf.Tensor, name: tf.Tensor | str = "") -> tf.Tensor:
  """Decodes a binary 8-bit PPM (P6) -> float32 (H, W, 3) RGB in [0, 1]."""
  tokens, offset = _parse_header(data, name, "PPM (P6)")
  w = tf.strings.to_number(tokens[1], tf.int32)
  h = tf.strings.to_number(tokens[2], tf.int32)
  maxval = tf.strings.to_number(tokens[3], tf.int32)
  size = tf.strings.length(data)
  msg = "not a binary 8-bit PPM (expected magic P6, maxval 255, W*H*3 raster bytes):"
  checks = [
      check(tf.equal(tokens[0], "P6"), msg + " magic", name, tokens[0]),
      check(tf.equal(maxval, 255), msg + " maxval", name, maxval),
      check(tf.equal(size - offset, w * h * 3), msg + " size mismatch (name, w, h, bytes)", name, w, h, size),
  ]
  with tf.control_dependencies(checks):
    raster = tf.io.decode_raw(tf.strings.substr(data, offset, w * h * 3), tf.uint8)
  return tf.reshape(tf.cast(raster, tf.float32) / 255.0, tf.stack([h, w, 3]))


def decode_pfm(data: tf.Tensor, name: tf.Tensor | str = "") -> tf.Tensor:
  """Decodes a PFM ('PF' -> (H, W, 3), 'Pf' -> (H, W, 1)) to float32, rows top to bottom."""
  tokens, offset = _parse_header(data, name, "PFM")
  magic = tokens[0]
  w = tf.strings.to_number(tokens[1], tf.int32)
  h = tf.strings.to_number(tokens[2], tf.int32)
  scale = tf.strings.to_number(tokens[3], tf.float32)
  channels = tf.where(tf.equal(magic, "PF"), 3, 1)
  size = tf.strings.length(data)
  nbytes = w * h * channels * 4
  msg = "not a valid PFM (expected magic PF or Pf, width, height, scale, W*H*C float32):"
  checks = [
      check(tf.logical_or(tf.equal(magic, "PF"), tf.equal(magic, "Pf")), msg + " magic", name, magic),
      check(tf.equal(size - offset, nbytes), msg + " size mismatch (name, w, h, bytes)", name, w, h, size),
  ]
  with tf.control_dependencies(checks):
    raster = tf.strings.substr(data, offset, nbytes)
  # The sign of the scale gives the byte order: negative = little-endian.
  values = tf.cond(scale < 0,
                   lambda: tf.io.decode_raw(raster, tf.float32, little_endian=True),
                   lambda: tf.io.decode_raw(raster, tf.float32, little_endian=False))
  return tf.reverse(tf.reshape(values, tf.stack([h, w, channels])), axis=[0])


def decode_png_rgb(data: tf.Tensor, name: tf.Tensor | str = "") -> tf.Tensor:
  """Decodes an 8-bit PNG (grey, RGB or RGBA) -> float32 (H, W, 3) RGB in [0, 1]."""
  del name  # decode_png's own error is clear enough; the dataset map adds the file name.
  return tf.cast(tf.io.decode_png(data, channels=3, dtype=tf.uint8), tf.float32) / 255.0


def decode_png_mask(data: tf.Tensor, name: tf.Tensor | str = "") -> tf.Tensor:
  """Decodes an 8-bit mask PNG -> float32 (H, W), 1 where the pixel is > 127 (Sintel: 255 = set)."""
  del name
  return tf.cast(tf.io.decode_png(data, channels=1, dtype=tf.uint8)[..., 0] > 127, tf.float32)


def decode_kitti_flow(data: tf.Tensor, name: tf.Tensor | str = "") -> tuple[tf.Tensor, tf.Tensor]:
  """Decodes a KITTI 16-bit flow PNG -> (flow (H, W, 2) pixels, valid (H, W)).

  u = (R - 2^15) / 64, v = (G - 2^15) / 64, valid = B > 0; flow is zeroed where invalid.
  """
  png = tf.io.decode_png(data, channels=3, dtype=tf.uint16)
  png = tf.cast(png, tf.float32)
  valid = tf.cast(png[..., 2] > 0, tf.float32)
  flow = (png[..., :2] - 32768.0) / 64.0 * valid[..., None]
  return flow, valid


def check_same_size(name: tf.Tensor | str, *tensors: tf.Tensor) -> list[tf.Tensor]:
  """Asserts that all tensors share H, W (the first two dims); returns them with the check attached."""
  h, w = tf.shape(tensors[0])[0], tf.shape(tensors[0])[1]
  checks = []
  for t in tensors[1:]:
    same = tf.logical_and(tf.equal(tf.shape(t)[0], h), tf.equal(tf.shape(t)[1], w))
    checks.append(check(same, "frames, flow and masks must have the same H, W (file, shapes):", name,
                        tf.shape(tensors[0]), tf.shape(t)))
  with tf.control_dependencies(checks):
    return [tf.identity(t) for t in tensors]


def existing(paths: Sequence[str]) -> bool:
  """True when every path exists."""
  return all(os.path.exists(p) for p in paths)


class FileDataset:
  """A list of examples on disk (one path per key per example) and a TF function that loads one example.

  `files` maps a key ('image1', 'image2', 'flow', ...) to the list of paths, one per example; `load` takes a dict
  of scalar path tensors and returns the element dict of the data contract. `element(i)` loads example i (an int
  tensor) in graph mode, so a pipeline can map example ids to elements with parallel calls.
  """

  def __init__(self, name: str, files: dict[str, list[str]], load) -> None:
    lengths = {k: len(v) for k, v in files.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"{name}: every file key needs one path per example, got counts {lengths}")
    if not next(iter(lengths.values())):
      raise ValueError(f"{name}: no examples")
    self.name = name
    self.files = {k: list(v) for k, v in files.items()}
    self._load = load
    self._tables = None

  def __len__(self) -> int:
    return len(next(iter(self.files.values())))

  def element(self, i: tf.Tensor) -> dict[str, tf.Tensor]:
    """Loads example i (int tensor in [0, len)) -> element dict (unbatched)."""
    if self._tables is None:
      self._tables = {k: tf.constant(v) for k, v in self.files.items()}
    paths = {k: tf.gather(t, i) for k, t in self._tables.items()}
    return self._load(paths)

  def as_dataset(self, num_parallel_calls: int = tf.data.AUTOTUNE) -> tf.data.Dataset:
    """All examples in order, decoded in parallel (deterministic order)."""
    ds = tf.data.Dataset.range(len(self))
    return ds.map(tf.autograph.experimental.do_not_convert(self.element), num_parallel_calls=num_parallel_calls, deterministic=True)


def missing_folder_error(name: str, folder: str, what: str) -> FileNotFoundError:
  return FileNotFoundError(f"{name}: no {what} found under {folder!r}; check the dataset root in config.data "
                           f"(see data_pipelines/{name.split('_')[0]}.py for the expected layout)")


def require_dir(name: str, folder: str, what: str) -> str:
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{name}: folder {folder!r} ({what}) does not exist; check the dataset root in "
                            "config.data")
  return folder
