"""Reading and writing optical-flow files and images, with numpy, zlib and pillow only.

Formats (all flows are float32 (H, W, 2), channel 0 = u (right), channel 1 = v (down), in pixels):

* Middlebury ``.flo``: 4-byte tag ``PIEH`` (the float32 202021.25), int32 width, int32 height, then
  height * width * (u, v) float32, little-endian, row-major. A component with |value| > 1e9 marks
  unknown flow; readers keep those values, and :func:`flow_valid_mask` turns them into a mask.
* KITTI 16-bit PNG: uint16 RGB with u = (R - 2^15) / 64, v = (G - 2^15) / 64, valid = B > 0.
  Pillow cannot read 16-bit RGB PNGs without truncating them to 8 bits, so this module carries a small
  PNG codec (8/16-bit gray, gray+alpha, RGB, RGBA; non-interlaced; all five filter types on read).
* PFM (FlyingThings3D / SceneFlow): text header ``PF`` (3 channels) or ``Pf`` (1 channel), ``width
  height``, and a scale whose sign gives the byte order (negative = little-endian), then float32 rows
  stored bottom to top. Flow PFMs have 3 channels; :func:`read_pfm_flow` drops the third.
* Images (PNG, PPM, JPEG, ...): float32 RGB in [0, 1], (H, W, 3); grayscale is replicated to 3
  channels and alpha is dropped.

Every malformed file raises :class:`FlowFileError` (a ``ValueError``) naming the file and the problem.
This module deliberately imports neither TensorFlow nor JAX.
"""

from __future__ import annotations

import os
import pathlib
import struct
import zlib
from typing import Union

import numpy as np

PathLike = Union[str, os.PathLike]

FLO_TAG = b"PIEH"
FLO_TAG_FLOAT = 202021.25
# Middlebury convention: a flow component whose magnitude exceeds this is "unknown".
UNKNOWN_FLOW_THRESH = 1e9
# The value writers use to mark unknown flow (any magnitude above the threshold would do).
UNKNOWN_FLOW = 1e10

KITTI_OFFSET = 2.0**15
KITTI_SCALE = 64.0
# Range of flow a KITTI PNG can hold: (0 - 2^15) / 64 ... (65535 - 2^15) / 64, in steps of 1/64 px.
KITTI_MIN_FLOW = -KITTI_OFFSET / KITTI_SCALE
KITTI_MAX_FLOW = (65535.0 - KITTI_OFFSET) / KITTI_SCALE

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type -> channels (palette, type 3, is not supported by the numpy codec).
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}
_PNG_TYPE_FOR_CHANNELS = {v: k for k, v in _PNG_CHANNELS.items()}


class FlowFileError(ValueError):
  """A flow or image file is malformed or holds something other than what was expected."""


def _read_bytes(path: PathLike) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no such file") from None


# ----------------------------------------------------------------------------------------------
# Middlebury .flo


def flow_valid_mask(flow: np.ndarray) -> np.ndarray:
  """Mask of known flow: float32 (...,) that is 1 where both components are finite and |.| <= 1e9.

  Args:
    flow: (..., 2) flow in pixels (numpy or anything np.asarray accepts).
  Returns:
    float32 array of shape flow.shape[:-1].
  """
  flow = np.asarray(flow)
  if flow.ndim < 1 or flow.shape[-1] != 2:
    raise ValueError(f"flow_valid_mask: expected a (..., 2) flow, got shape {flow.shape}")
  with np.errstate(invalid="ignore"):
    known = np.all(np.isfinite(flow) & (np.abs(flow) <= UNKNOWN_FLOW_THRESH), axis=-1)
  return known.astype(np.float32)


def _check_flow_array(flow, where: str) -> np.ndarray:
  flow = np.asarray(flow)
  if flow.ndim != 3 or flow.shape[-1] != 2 or flow.shape[0] < 1 or flow.shape[1] < 1:
    raise ValueError(f"{where}: expected a flow of shape (H, W, 2) with H, W >= 1, got {flow.shape}")
  if not np.issubdtype(flow.dtype, np.number):
    raise ValueError(f"{where}: expected a numeric flow, got dtype {flow.dtype}")
  return flow


def read_flo(path: PathLike) -> np.ndarray:
  """Reads a Middlebury .flo file.

  Returns:
    float32 (H, W, 2) flow in pixels, (u, v). Unknown pixels keep their stored values (|.| > 1e9);
    use :func:`flow_valid_mask` for the mask.
  Raises:
    FlowFileError: wrong tag, non-positive size, or a file size that does not match the header.
  """
  data = _read_bytes(path)
  if len(data) < 12:
    raise FlowFileError(f"{path}: .flo file too short for its 12-byte header ({len(data)} bytes)")
  if data[:4] != FLO_TAG:
    raise FlowFileError(f"{path}: not a .flo file: tag is {data[:4]!r}, expected {FLO_TAG!r} (float 202021.25)")
  width, height = struct.unpack("<ii", data[4:12])
  if width <= 0 or height <= 0:
    raise FlowFileError(f"{path}: invalid .flo size width={width}, height={height} (both must be positive)")
  expected = 12 + 8 * width * height
  if len(data) != expected:
    kind = "truncated" if len(data) < expected else "has trailing bytes"
    raise FlowFileError(
        f"{path}: .flo file {kind}: {len(data)} bytes, expected {expected} for {width}x{height} (W x H)")
  flow = np.frombuffer(data, dtype="<f4", count=2 * width * height, offset=12)
  return flow.reshape(height, width, 2).astype(np.float32)


def write_flo(path: PathLike, flow) -> None:
  """Writes a (H, W, 2) flow (pixels) as a Middlebury .flo file (float32, little-endian).

  Unknown flow should be marked with a large value such as :data:`UNKNOWN_FLOW` (1e10); NaN and
  infinity are rejected because other readers treat them inconsistently.
  """
  flow = _check_flow_array(flow, f"write_flo({path})")
  flow = flow.astype("<f4")
  if not np.all(np.isfinite(flow)):
    raise ValueError(f"write_flo({path}): flow has non-finite values (or values beyond float32); "
                     f"mark unknown flow with UNKNOWN_FLOW = 1e10 instead")
  height, width = flow.shape[:2]
  with open(path, "wb") as f:
    f.write(FLO_TAG)
    f.write(struct.pack("<ii", width, height))
    f.write(np.ascontiguousarray(flow).tobytes())


# ----------------------------------------------------------------------------------------------
# PNG codec (numpy + zlib)


def _unfilter(raw: np.ndarray, height: int, width: int, bpp: int, path) -> np.ndarray:
  """Undoes PNG scanline filtering. raw: uint8 (height, 1 + width * bpp) -> uint8 (height, width, bpp).

  Every filter predicts byte (r, c) from its left (r, c-1), up (r-1, c) and up-left (r-1, c-1)
  neighbours (in pixel units of bpp bytes), so all pixels on an anti-diagonal r + c = k can be
  decoded together once diagonal k - 1 is done: H + W - 1 vectorised steps instead of H * W.
  Images that use only the None, Sub and Up filters are decoded row by row instead.
  """
  ftype = raw[:, 0]
  if np.any(ftype > 4):
    bad = int(np.argmax(ftype > 4))
    raise FlowFileError(f"{path}: PNG row {bad} has invalid filter type {int(ftype[bad])} (expected 0-4)")
  filt = raw[:, 1:].reshape(height, width, bpp).astype(np.int16)
  if np.all(ftype <= 2):
    # None / Sub / Up only: each row is a vectorised function of the row above.
    out = np.empty_like(filt)
    prev = np.zeros((width, bpp), np.int16)
    for r in range(height):
      if ftype[r] == 0:
        prev = filt[r]
      elif ftype[r] == 1:
        prev = np.cumsum(filt[r], axis=0, dtype=np.int64).astype(np.int16) & 0xFF
      else:
        prev = (filt[r] + prev) & 0xFF
      out[r] = prev
    return out.astype(np.uint8)
  # General case: a padded output (zero row above, zero column to the left) stored flat as
  # ((H + 1) * (W + 1), bpp). Pixel (r, c) sits at (r + 1) * (W + 1) + c + 1, so the pixels of one
  # anti-diagonal are equally spaced W apart: every step works on strided slices, no gathers.
  stride = width + 1
  out = np.zeros(((height + 1) * stride, bpp), np.int16)
  src = np.zeros_like(out)
  src.reshape(height + 1, stride, bpp)[1:, 1:] = filt
  masks = [(ftype == t)[:, None].astype(np.int16) for t in range(5)]
  has_avg, has_paeth = bool(masks[3].any()), bool(masks[4].any())
  for k in range(height + width - 1):
    r0, r1 = max(0, k - width + 1), min(height, k + 1)
    first = (r0 + 1) * stride + (k - r0) + 1
    sl = slice(first, first + (r1 - r0 - 1) * width + 1, width)
    a = out[first - 1:sl.stop - 1:width]
    b = out[first - stride:sl.stop - stride:width]
    pred = a * masks[1][r0:r1] + b * masks[2][r0:r1]
    if has_avg:
      pred += ((a + b) >> 1) * masks[3][r0:r1]
    if has_paeth:
      c = out[first - stride - 1:sl.stop - stride - 1:width]
      pa = np.abs(b - c)
      pb = np.abs(a - c)
      pc = np.abs(a + b - 2 * c)
      paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
      pred += paeth * masks[4][r0:r1]
    out[sl] = (src[sl] + pred) & 0xFF
  return out.reshape(height + 1, stride, bpp)[1:, 1:].astype(np.uint8)


def read_png(path: PathLike) -> np.ndarray:
  """Decodes a non-interlaced 8- or 16-bit gray / gray+alpha / RGB / RGBA PNG with numpy + zlib.

  Returns:
    uint8 or uint16 (big-endian decoded) array of shape (H, W, C), C in {1, 2, 3, 4}.
  Raises:
    FlowFileError: not a PNG, bad CRC, truncated data, palette / sub-byte / interlaced images.
  """
  data = _read_bytes(path)
  if data[:8] != _PNG_SIGNATURE:
    raise FlowFileError(f"{path}: not a PNG file (bad signature {data[:8]!r})")
  pos = 8
  header = None
  idat = []
  seen_end = False
  while pos < len(data):
    if pos + 12 > len(data):
      raise FlowFileError(f"{path}: truncated PNG chunk header at byte {pos}")
    (length,) = struct.unpack(">I", data[pos:pos + 4])
    ctype = data[pos + 4:pos + 8]
    body = data[pos + 8:pos + 8 + length]
    if pos + 12 + length > len(data):
      raise FlowFileError(f"{path}: truncated PNG chunk {ctype!r} at byte {pos}")
    (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
    if zlib.crc32(ctype + body) & 0xFFFFFFFF != crc:
      raise FlowFileError(f"{path}: PNG chunk {ctype!r} at byte {pos} has a bad CRC (corrupt file)")
    pos += 12 + length
    if ctype == b"IHDR":
      if length != 13:
        raise FlowFileError(f"{path}: PNG IHDR chunk has length {length}, expected 13")
      header = struct.unpack(">IIBBBBB", body)
    elif ctype == b"IDAT":
      idat.append(body)
    elif ctype == b"IEND":
      seen_end = True
      break
  if header is None:
    raise FlowFileError(f"{path}: PNG has no IHDR chunk")
  if not seen_end:
    raise FlowFileError(f"{path}: truncated PNG (no IEND chunk)")
  width, height, depth, color_type, compression, filter_method, interlace = header
  if width == 0 or height == 0:
    raise FlowFileError(f"{path}: PNG has zero size {width}x{height}")
  if color_type not in _PNG_CHANNELS:
    raise FlowFileError(f"{path}: PNG colour type {color_type} not supported (expected 0, 2, 4 or 6; no palette)")
  if depth not in (8, 16):
    raise FlowFileError(f"{path}: PNG bit depth {depth} not supported (expected 8 or 16)")
  if compression != 0 or filter_method != 0:
    raise FlowFileError(f"{path}: PNG compression/filter method {compression}/{filter_method}, expected 0/0")
  if interlace != 0:
    raise FlowFileError(f"{path}: interlaced PNGs are not supported")
  channels = _PNG_CHANNELS[color_type]
  bpp = channels * depth // 8
  try:
    raw = zlib.decompress(b"".join(idat))
  except zlib.error as e:
    raise FlowFileError(f"{path}: PNG image data does not decompress ({e})") from None
  expected = height * (1 + width * bpp)
  if len(raw) != expected:
    raise FlowFileError(f"{path}: PNG image data has {len(raw)} bytes, expected {expected} "
                        f"for {width}x{height}, {depth}-bit, {channels} channel(s)")
  rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + width * bpp)
  pixels = _unfilter(rows, height, width, bpp, path)
  if depth == 16:
    return pixels.reshape(height, width * channels * 2).view(">u2").reshape(height, width, channels).astype(np.uint16)
  return pixels.reshape(height, width, channels)


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
  return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body) & 0xFFFFFFFF)


def write_png(path: PathLike, array, compress_level: int = 6) -> None:
  """Encodes a uint8 or uint16 array (H, W) or (H, W, C), C in {1, 2, 3, 4}, as a PNG with numpy + zlib.

  Rows use the Sub filter (byte minus the same byte of the pixel to the left), which suits smooth
  flow maps. The bit depth follows the dtype (uint8 -> 8, uint16 -> 16).
  """
  array = np.asarray(array)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in _PNG_TYPE_FOR_CHANNELS or 0 in array.shape:
    raise ValueError(f"write_png({path}): expected (H, W) or (H, W, C) with C in 1-4, got shape {array.shape}")
  if array.dtype == np.uint8:
    depth = 8
    bytes_ = array
  elif array.dtype == np.uint16:
    depth = 16
    bytes_ = array.astype(">u2").view(np.uint8)
  else:
    raise ValueError(f"write_png({path}): expected uint8 or uint16, got dtype {array.dtype}")
  height, width, channels = array.shape
  bpp = channels * depth // 8
  bytes_ = bytes_.reshape(height, width, bpp).astype(np.int16)
  sub = bytes_.copy()
  sub[:, 1:] -= bytes_[:, :-1]
  rows = np.empty((height, 1 + width * bpp), np.uint8)
  rows[:, 0] = 1
  rows[:, 1:] = (sub & 0xFF).astype(np.uint8).reshape(height, width * bpp)
  ihdr = struct.pack(">IIBBBBB", width, height, depth, _PNG_TYPE_FOR_CHANNELS[channels], 0, 0, 0)
  with open(path, "wb") as f:
    f.write(_PNG_SIGNATURE)
    f.write(_png_chunk(b"IHDR", ihdr))
    f.write(_png_chunk(b"IDAT", zlib.compress(rows.tobytes(), compress_level)))
    f.write(_png_chunk(b"IEND", b""))


# ----------------------------------------------------------------------------------------------
# KITTI 16-bit PNG flow


def read_kitti_flow(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads a KITTI flow PNG (uint16 RGB).

  Returns:
    flow: float32 (H, W, 2), u = (R - 2^15) / 64, v = (G - 2^15) / 64 pixels. Invalid pixels keep their
      decoded values (usually -512 for R = G = 0): always use the mask.
    valid: float32 (H, W), 1 where B > 0.
  Raises:
    FlowFileError: the PNG is not 16-bit RGB, or is malformed.
  """
  png = read_png(path)
  if png.dtype != np.uint16 or png.shape[-1] != 3:
    depth = 16 if png.dtype == np.uint16 else 8
    raise FlowFileError(f"{path}: KITTI flow PNG must be 16-bit RGB, got {depth}-bit with {png.shape[-1]} channel(s)")
  flow = (png[..., :2].astype(np.float32) - np.float32(KITTI_OFFSET)) / np.float32(KITTI_SCALE)
  valid = (png[..., 2] > 0).astype(np.float32)
  return flow, valid


def write_kitti_flow(path: PathLike, flow, valid=None) -> None:
  """Writes a (H, W, 2) flow (pixels) as a KITTI 16-bit PNG.

  Encoding: R = round(u * 64 + 2^15), G = round(v * 64 + 2^15), clipped to [0, 65535], i.e. flow is
  rounded to the nearest 1/64 px (ties to even) and clipped to [-512, 511.984375]; B = 1 where valid.
  Values that are multiples of 1/64 inside that range round-trip exactly.

  Args:
    flow: (H, W, 2) flow in pixels.
    valid: optional (H, W) mask (> 0 = valid). When None, pixels with known flow (finite, |.| <= 1e9)
      are valid. Invalid pixels are written with R = G = 2^15 (zero flow) if their flow is not finite.
  Raises:
    ValueError: wrong shapes, or non-finite / unknown flow at a pixel marked valid.
  """
  flow = _check_flow_array(flow, f"write_kitti_flow({path})").astype(np.float64)
  known = flow_valid_mask(flow) > 0
  if valid is None:
    valid_b = known
  else:
    valid = np.asarray(valid)
    if valid.shape != flow.shape[:2]:
      raise ValueError(f"write_kitti_flow({path}): valid has shape {valid.shape}, expected {flow.shape[:2]}")
    valid_b = valid > 0
    if np.any(valid_b & ~known):
      raise ValueError(f"write_kitti_flow({path}): {int(np.sum(valid_b & ~known))} pixel(s) marked valid "
                       f"have non-finite or unknown (|.| > 1e9) flow")
  safe = np.where(known[..., None], flow, 0.0)
  encoded = np.clip(np.round(safe * KITTI_SCALE + KITTI_OFFSET), 0, 65535).astype(np.uint16)
  png = np.concatenate([encoded, valid_b[..., None].astype(np.uint16)], axis=-1)
  write_png(path, png)


# ----------------------------------------------------------------------------------------------
# PFM


def _pfm_header(data: bytes, path) -> tuple[str, int, int, float, int]:
  """Parses 'PF|Pf', width, height, scale separated by whitespace; returns (tag, w, h, scale, data offset)."""
  tokens = []
  pos = 0
  while len(tokens) < 4:
    while pos < len(data) and data[pos:pos + 1].isspace():
      pos += 1
    start = pos
    while pos < len(data) and not data[pos:pos + 1].isspace():
      pos += 1
    if start == pos or pos >= len(data):
      raise FlowFileError(f"{path}: truncated PFM header (expected 'PF'/'Pf', width, height, scale)")
    tokens.append(data[start:pos])
  pos += 1  # exactly one whitespace character separates the header from the data
  tag = tokens[0].decode("latin-1")
  if tag not in ("PF", "Pf"):
    raise FlowFileError(f"{path}: not a PFM file: tag {tokens[0]!r}, expected b'PF' or b'Pf'")
  try:
    width, height = int(tokens[1]), int(tokens[2])
    scale = float(tokens[3])
  except ValueError:
    raise FlowFileError(f"{path}: bad PFM header values {tokens[1:]!r} (expected int width, int height, "
                        f"float scale)") from None
  if width <= 0 or height <= 0:
    raise FlowFileError(f"{path}: invalid PFM size width={width}, height={height} (both must be positive)")
  if scale == 0 or not np.isfinite(scale):
    raise FlowFileError(f"{path}: PFM scale is {scale}; it must be non-zero and finite (sign = byte order)")
  return tag, width, height, scale, pos


def read_pfm(path: PathLike) -> np.ndarray:
  """Reads a PFM file.

  Returns:
    float32 (H, W) for 'Pf' files or (H, W, 3) for 'PF' files, top row first (the file stores rows
    bottom to top). A negative scale means little-endian data, a positive one big-endian; the
    magnitude of the scale is not applied.
  """
  data = _read_bytes(path)
  tag, width, height, scale, offset = _pfm_header(data, path)
  channels = 3 if tag == "PF" else 1
  expected = width * height * channels * 4
  if len(data) - offset != expected:
    kind = "truncated" if len(data) - offset < expected else "has trailing bytes"
    raise FlowFileError(f"{path}: PFM data {kind}: {len(data) - offset} bytes after the header, expected "
                        f"{expected} for {width}x{height}x{channels}")
  dtype = "<f4" if scale < 0 else ">f4"
  array = np.frombuffer(data, dtype=dtype, count=width * height * channels, offset=offset)
  array = array.reshape((height, width, channels) if channels == 3 else (height, width))
  return np.ascontiguousarray(array[::-1]).astype(np.float32)


def read_pfm_flow(path: PathLike) -> np.ndarray:
  """Reads a FlyingThings3D-style flow PFM: 3 channels (u, v, 0) -> float32 (H, W, 2) pixels."""
  array = read_pfm(path)
  if array.ndim != 3:
    raise FlowFileError(f"{path}: flow PFM must have 3 channels ('PF'), got a 1-channel 'Pf' file")
  return np.ascontiguousarray(array[..., :2])


def write_pfm(path: PathLike, array, little_endian: bool = True, scale: float = 1.0) -> None:
  """Writes float data as PFM: (H, W) -> 'Pf'; (H, W, 3) -> 'PF'; (H, W, 2) flow -> 'PF' with a zero third channel.

  Rows are stored bottom to top; the scale is written as -|scale| (little-endian) or +|scale| (big-endian).
  """
  array = np.asarray(array)
  if array.ndim == 3 and array.shape[-1] == 2:
    array = np.concatenate([array, np.zeros_like(array[..., :1])], axis=-1)
  if not ((array.ndim == 2) or (array.ndim == 3 and array.shape[-1] == 3)) or 0 in array.shape:
    raise ValueError(f"write_pfm({path}): expected (H, W), (H, W, 2) or (H, W, 3), got shape {array.shape}")
  if scale == 0 or not np.isfinite(scale):
    raise ValueError(f"write_pfm({path}): scale must be non-zero and finite, got {scale}")
  tag = b"PF" if array.ndim == 3 else b"Pf"
  height, width = array.shape[:2]
  signed_scale = -abs(scale) if little_endian else abs(scale)
  dtype = "<f4" if little_endian else ">f4"
  with open(path, "wb") as f:
    f.write(tag + b"\n" + f"{width} {height}\n".encode() + f"{signed_scale!r}\n".encode())
    f.write(np.ascontiguousarray(array[::-1]).astype(dtype).tobytes())


# ----------------------------------------------------------------------------------------------
# Generic dispatch and images


def read_flow(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads any supported flow file by extension: .flo, .pfm, .png (KITTI).

  Returns:
    (flow float32 (H, W, 2), valid float32 (H, W)); for .flo / .pfm, valid marks known flow.
  """
  suffix = pathlib.Path(path).suffix.lower()
  if suffix == ".flo":
    flow = read_flo(path)
  elif suffix == ".pfm":
    flow = read_pfm_flow(path)
  elif suffix == ".png":
    return read_kitti_flow(path)
  else:
    raise FlowFileError(f"{path}: unknown flow file extension {suffix!r} (expected .flo, .pfm or .png)")
  return flow, flow_valid_mask(flow)


def read_image(path: PathLike) -> np.ndarray:
  """Reads an image (PNG, PPM, JPEG, ...) as float32 RGB in [0, 1], shape (H, W, 3).

  Grayscale is replicated to 3 channels; alpha is dropped. 16-bit PNGs keep full precision (/ 65535).
  """
  from PIL import Image, UnidentifiedImageError  # pylint: disable=import-outside-toplevel

  with open(path, "rb") as f:
    head = f.read(26)
  if head[:8] == _PNG_SIGNATURE and len(head) >= 26 and head[24] == 16:
    pixels = read_png(path).astype(np.float32) / np.float32(65535)
    if pixels.shape[-1] in (2, 4):
      pixels = pixels[..., :-1]
    if pixels.shape[-1] == 1:
      pixels = np.repeat(pixels, 3, axis=-1)
    return pixels
  try:
    with Image.open(path) as img:
      img.load()
      if img.mode in ("I;16", "I;16B", "I;16L"):
        gray = np.asarray(img, dtype=np.float32) / np.float32(65535)
        return np.repeat(gray[..., None], 3, axis=-1)
      if img.mode in ("I", "F"):
        raise FlowFileError(f"{path}: image mode {img.mode!r} (32-bit integer / float) has no known [0, 1] range")
      rgb = img.convert("RGB")
      return np.asarray(rgb, dtype=np.float32) / np.float32(255)
  except (UnidentifiedImageError, OSError) as e:
    raise FlowFileError(f"{path}: cannot read image ({e})") from None


def write_image(path: PathLike, image) -> None:
  """Writes an RGB (H, W, 3) or gray (H, W) image; format from the extension (PNG, PPM, JPEG, ...).

  Float input is taken as [0, 1] and stored as round(clip(x, 0, 1) * 255) in 8 bits; uint8 is stored as is.
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel

  image = np.asarray(image)
  if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3))) or 0 in image.shape:
    raise ValueError(f"write_image({path}): expected (H, W), (H, W, 1) or (H, W, 3), got shape {image.shape}")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if np.issubdtype(image.dtype, np.floating):
    if not np.all(np.isfinite(image)):
      raise ValueError(f"write_image({path}): image has non-finite values")
    image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
  elif image.dtype != np.uint8:
    raise ValueError(f"write_image({path}): expected float in [0, 1] or uint8, got dtype {image.dtype}")
  Image.fromarray(image).save(path)
