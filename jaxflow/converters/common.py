"""Layout conversions shared by the weight converters, and the error they raise.

PyTorch / Torch7 -> flax:
  - Conv2d / SpatialConvolution weight (O, I, kH, kW) -> nn.Conv kernel (kH, kW, I, O). Both frameworks
    compute a cross-correlation, so no flip is needed.
  - ConvTranspose2d weight (I, O, kH, kW) -> nn.ConvTranspose kernel (kH, kW, I, O), spatially FLIPPED: PyTorch's
    transposed convolution is the adjoint of a convolution (a correlation of the zero-upsampled input with the
    flipped kernel), while flax's ConvTranspose (transpose_kernel=False) correlates the zero-upsampled input
    with the kernel as given. The padding (PyTorch padding=1 for k=4, s=2 <-> lax padding 2 on each side) is in
    jaxflow.models.layers.deconv.
  - BatchNorm2d weight / bias / running_mean / running_var -> params scale / bias, batch_stats mean / var.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


class ConversionError(ValueError):
  """The source weights do not fit the expected architecture; the message names the file and the layer."""


def as_numpy(x: Any) -> np.ndarray:
  """A torch tensor or array-like -> float32 numpy (on the CPU)."""
  if hasattr(x, "detach"):
    x = x.detach().cpu().numpy()
  return np.asarray(x, dtype=np.float32)


def conv_kernel(weight: Any, layer: str, source: str, in_channels: int | None = None,
                out_channels: int | None = None) -> np.ndarray:
  """(O, I, kH, kW) convolution weight -> (kH, kW, I, O); checks the rank and, if given, I and O."""
  w = as_numpy(weight)
  if w.ndim != 4:
    raise ConversionError(f"{source}: layer {layer!r}: expected a 4-D (out, in, kH, kW) convolution weight, got "
                          f"shape {w.shape}")
  if in_channels is not None and w.shape[1] != in_channels:
    raise ConversionError(f"{source}: layer {layer!r}: weight {w.shape} has {w.shape[1]} input channels, "
                          f"expected {in_channels}")
  if out_channels is not None and w.shape[0] != out_channels:
    raise ConversionError(f"{source}: layer {layer!r}: weight {w.shape} has {w.shape[0]} output channels, "
                          f"expected {out_channels}")
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def deconv_kernel(weight: Any, layer: str, source: str) -> np.ndarray:
  """(I, O, kH, kW) PyTorch transposed-convolution weight -> flax ConvTranspose kernel (kH, kW, I, O), flipped."""
  w = as_numpy(weight)
  if w.ndim != 4:
    raise ConversionError(f"{source}: layer {layer!r}: expected a 4-D (in, out, kH, kW) transposed-convolution "
                          f"weight, got shape {w.shape}")
  return np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1))


def vector(x: Any, layer: str, source: str, size: int) -> np.ndarray:
  v = as_numpy(x)
  if v.shape != (size,):
    raise ConversionError(f"{source}: layer {layer!r}: expected a vector of {size} values, got shape {v.shape}")
  return v


def check_tree(converted: Mapping[str, Any], expected: Mapping[str, Any], what: str, source: str,
               origins: Mapping[str, str] | None = None) -> None:
  """Raises ConversionError naming the first leaf whose presence or shape differs from the model's tree.

  `origins` maps a jaxflow module path ('estimator4/conv2') to the released layer name, quoted in the message.
  """
  origins = origins or {}

  def layer(key: str) -> str:
    module = key.rsplit("/", 1)[0]
    return f"released layer '{origins[module]}' -> " if module in origins else ""

  def flat(tree: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for k, v in tree.items():
      key = f"{prefix}/{k}" if prefix else str(k)
      if isinstance(v, Mapping):
        out.update(flat(v, key))
      else:
        out[key] = tuple(v.shape) if hasattr(v, "shape") else tuple(np.shape(v))
    return out

  have, want = flat(converted), flat(expected)
  for key in sorted(want):
    if key not in have:
      raise ConversionError(f"{source}: {layer(key)}{what} '{key}' (shape {want[key]}) of the jaxflow model has "
                            f"no source weight")
    if have[key] != want[key]:
      raise ConversionError(f"{source}: {layer(key)}{what} '{key}': converted shape {have[key]}, the jaxflow "
                            f"model expects {want[key]}")
  extra = sorted(set(have) - set(want))
  if extra:
    raise ConversionError(f"{source}: converted {what} '{extra[0]}' does not exist in the jaxflow model")


__all__ = ["ConversionError", "as_numpy", "check_tree", "conv_kernel", "deconv_kernel", "vector"]
