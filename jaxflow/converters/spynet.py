"""SpyNet: the authors' Lua Torch7 models (`modelL1_F.t7` ... `modelL6_F.t7` and the other released variants).

Each file is one level's network G_k, an nn.Sequential of five SpatialConvolution layers 8->32->64->32->16->2,
7x7, stride 1, padding 3 (ReLU between), weight (O, I, 7, 7) (or the older flattened (O, I*7*7)) float32 + bias.
modelL1 is the coarsest level (jaxflow `G0`), modelL{k} is `G{k-1}`. The number of level files found sets
`model.levels` (or `levels=N` keeps the N coarsest).

The released recipe and how jaxflow's SpyNet reproduces it (jaxflow/models/spynet.py):
  - input RGB in [0, 1] normalised with the ImageNet mean/std: same (the Lua code loads RGB with image.load);
  - sizes rounded up to multiples of 32 by bilinear resizing: jaxflow resizes to multiples of 2**(levels-1)
    (32 for 6 levels);
  - pyramid by 2x2 average pooling: same;
  - level 1 input [img1, img2, zeros], level k [img1, warp(img2, up), up], G_k adds a residual to up: same;
    flow channel 0 = u (x), 1 = v (y), in pixels of the level: same;
  - up = 2x bilinear upsampling (stn's ScaleBHWD) times 2: jaxflow uses half-pixel-centre bilinear upsampling
    (jax.image.resize); the sampling grid of ScaleBHWD may differ from it at the borders (see the report);
  - warp: bilinear backward warp in pixels with zero padding outside: same convention as jaxflow.ops.warp.
  - The Lua code picks the number of levels from the image size (5 levels up to 512 px, 6 above); jaxflow
    always runs `levels` levels.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

import numpy as np

from jaxflow.converters import t7
from jaxflow.converters.common import ConversionError, conv_kernel, vector

_LEVEL_FILE = re.compile(r"modelL(\d+)(?:_([^./]+))?\.t7$")


def find_level_files(source: str, variant: str | None = None) -> list[str]:
  """The per-level .t7 files, coarsest (level 1) first.

  Args:
    source: a folder holding modelL<k>_<variant>.t7 files, a glob pattern ('models/modelL*_F.t7'), or a path
      prefix ('models/modelL' -> models/modelL*.t7).
    variant: the released variant suffix ('F', 'C', '3', '4') to pick when a folder holds several.
  Raises:
    FileNotFoundError when nothing matches; ConversionError for several variants or missing levels.
  """
  if os.path.isdir(source):
    pattern = os.path.join(source, f"modelL*_{variant}.t7" if variant else "modelL*.t7")
  elif any(c in source for c in "*?["):
    pattern = source
  else:
    pattern = source + "*.t7"
  files = sorted(glob.glob(pattern))
  matches = [(f, _LEVEL_FILE.search(os.path.basename(f))) for f in files]
  matches = [(f, m) for f, m in matches if m]
  if not matches:
    raise FileNotFoundError(f"spynet: no level files modelL<k>[_<variant>].t7 match {pattern!r} (the released "
                            f"SpyNet models are modelL1_F.t7 ... modelL6_F.t7)")
  variants = sorted({m.group(2) or "" for _, m in matches})
  if len(variants) > 1:
    raise ConversionError(f"spynet: {source!r} holds several released variants {variants}; choose one with "
                          f"--variant (e.g. F = Sintel final, C = Sintel clean, 3 / 4 = Chairs) or a glob")
  by_level: dict[int, str] = {}
  for f, m in matches:
    level = int(m.group(1))
    if level in by_level:
      raise ConversionError(f"spynet: two files for level {level}: {by_level[level]} and {f}")
    by_level[level] = f
  levels = sorted(by_level)
  expected = list(range(1, len(levels) + 1))
  if levels != expected:
    missing = sorted(set(range(1, max(levels) + 1)) - set(levels))
    raise ConversionError(f"spynet: levels must be 1..n without gaps; found {levels} in {pattern!r}, missing "
                          f"{missing}")
  return [by_level[k] for k in levels]


def read_level(path: str) -> list[tuple[np.ndarray, np.ndarray]]:
  """[(weight (O, I, kH, kW), bias (O,)), ...] of the SpatialConvolution layers of one level file, in order.

  Checks stride 1 and 'same' padding ((k - 1) / 2), which is what jaxflow's SpyBasic computes.
  """
  obj = t7.load(path)
  convs = t7.find_modules(obj, lambda m: "SpatialConvolution" in m.torch_class)
  if not convs:
    name = getattr(obj, "torch_class", type(obj).__name__)
    raise ConversionError(f"{path}: no SpatialConvolution layers found in the stored {name}")
  out = []
  for i, m in enumerate(convs):
    layer = f"{m.torch_class} #{i + 1}"
    for field in ("weight", "nInputPlane", "nOutputPlane", "kW", "kH"):
      if field not in m:
        raise ConversionError(f"{path}: layer {layer}: missing field {field!r}")
    n_in, n_out, kh, kw = int(m["nInputPlane"]), int(m["nOutputPlane"]), int(m["kH"]), int(m["kW"])
    w = np.asarray(m["weight"], np.float32)
    if w.size != n_out * n_in * kh * kw:
      raise ConversionError(f"{path}: layer {layer}: weight of shape {w.shape} does not hold "
                            f"{n_out}x{n_in}x{kh}x{kw} values")
    w = w.reshape(n_out, n_in, kh, kw)  # older SpatialConvolution(MM) stores it as (O, I*kH*kW)
    if kh != kw or kh % 2 == 0:
      raise ConversionError(f"{path}: layer {layer}: kernel {kh}x{kw}; jaxflow's SpyNet needs square odd kernels")
    stride = (int(m.get("dW", 1)), int(m.get("dH", 1)))
    pad = (int(m.get("padW", 0)), int(m.get("padH", 0)))
    if stride != (1, 1) or pad != ((kw - 1) // 2, (kh - 1) // 2):
      raise ConversionError(f"{path}: layer {layer}: stride {stride}, padding {pad}; expected stride 1 and "
                            f"'same' padding {(kw - 1) // 2} as in the released SpyNet")
    bias = m.get("bias")
    bias = np.zeros((n_out,), np.float32) if bias is None else vector(bias, layer, path, n_out)
    out.append((w, bias))
  return out


def convert(source: str, *, levels: int | None = None, variant: str | None = None
            ) -> tuple[dict[str, Any], dict[str, Any], list[str], dict[str, str]]:
  """Released SpyNet .t7 files -> (model fields, {'params': ...}, notes, origins).

  The model fields (levels, channels, kernel_size) are read from the files, so a checkpoint of other widths
  converts to the matching jaxflow SpyNet.
  """
  files = find_level_files(source, variant)
  if levels is not None:
    if not 1 <= levels <= len(files):
      raise ConversionError(f"spynet: levels={levels} but {len(files)} level files were found ({files})")
    files = files[:levels]
  params: dict[str, Any] = {}
  shape_of_first: list[tuple[int, ...]] | None = None
  kernel = None
  for k, path in enumerate(files):
    layers = read_level(path)
    shapes = [w.shape for w, _ in layers]
    if shapes[0][1] != 8 or shapes[-1][0] != 2:
      raise ConversionError(f"{path}: level network maps {shapes[0][1]} -> {shapes[-1][0]} channels; SpyNet's G_k "
                            f"maps 8 ([image1, warped image2, flow]) -> 2 (flow)")
    for i in range(1, len(shapes)):
      if shapes[i][1] != shapes[i - 1][0]:
        raise ConversionError(f"{path}: layer {i + 1} takes {shapes[i][1]} channels but layer {i} gives "
                              f"{shapes[i - 1][0]}")
    if shape_of_first is None:
      shape_of_first, kernel = shapes, shapes[0][2]
    elif shapes != shape_of_first:
      raise ConversionError(f"{path}: layer shapes {shapes} differ from level 1's {shape_of_first}; jaxflow's "
                            f"SpyNet uses one architecture for every level")
    params[f"G{k}"] = {f"conv{i}": {"kernel": conv_kernel(w, f"conv{i}", path), "bias": b}
                       for i, (w, b) in enumerate(layers)}
  channels = [s[0] for s in shape_of_first[:-1]]
  fields = {"name": "spynet", "levels": len(files), "channels": channels, "kernel_size": int(kernel)}
  notes = [f"level {k + 1}: {os.path.basename(f)} -> G{k}" for k, f in enumerate(files)]
  origins = {f"G{k}/conv{i}": f"{os.path.basename(f)} SpatialConvolution #{i + 1}"
             for k, f in enumerate(files) for i in range(len(shape_of_first))}
  return fields, {"params": params}, notes, origins


__all__ = ["convert", "find_level_files", "read_level"]
