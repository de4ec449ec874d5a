"""Building blocks shared by the models: convolutions with a compute dtype, input checks, size fitting.

Parameters are always float32 (`param_dtype`); `dtype` is the compute dtype from the config. Every model
builds its convolutions through `conv` / `deconv` here, so a faster convolution for a given backend can be
swapped in at one place: on CPU, `conv` computes its weight gradient as dense matmuls
(jaxflow.ops.conv; forward values and parameter names/shapes are those of `nn.Conv`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxflow.ops import resize_flow
from jaxflow.ops.conv import conv2d_concat, conv_transpose2d, flax_conv_general_dilated

# FlowNet/PWC-Net use MSRA (He) initialisation in the released Caffe/PyTorch code.
kaiming = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def leaky_relu(x: jax.Array, slope: float = 0.1) -> jax.Array:
  """max-style LeakyReLU: x where x >= 0, slope * x elsewhere; same shape and dtype as x.

  For slope > 0 the gradient is taken from the output (`_leaky_relu_out`): y >= 0 exactly where x >= 0, so the
  backward pass keeps y, which the next layer keeps anyway as its input, instead of x (autodiff of the `where`
  kept every pre-activation alive until the backward pass). Same values and gradients."""
  if _LEAKY_FROM_OUTPUT and isinstance(slope, (int, float)) and slope > 0:
    return _leaky_relu_out(x, float(slope))
  return jnp.where(x >= 0, x, slope * x)


# False: autodiff of the plain `where` (session 7; benchmarks set it to compare, read at trace time).
_LEAKY_FROM_OUTPUT = True


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _leaky_relu_out(x: jax.Array, slope: float) -> jax.Array:
  return jnp.where(x >= 0, x, slope * x)


def _leaky_relu_out_fwd(x: jax.Array, slope: float) -> tuple[jax.Array, jax.Array]:
  y = jnp.where(x >= 0, x, slope * x)
  return y, y


def _leaky_relu_out_bwd(slope: float, y: jax.Array, g: jax.Array) -> tuple[jax.Array]:
  # slope > 0: sign(y) = sign(x), and y = x for x = +-0 (>= 0) and NaN for x = NaN (not >= 0).
  return (jnp.where(y >= 0, g, slope * g),)


_leaky_relu_out.defvjp(_leaky_relu_out_fwd, _leaky_relu_out_bwd)


def conv(features: int, kernel: int, stride: int = 1, dilation: int = 1, *, dtype: Any = jnp.float32,
         use_bias: bool = True, name: str | None = None) -> nn.Conv:
  """A 'same'-padded 2D convolution: padding (kernel - 1) // 2 * dilation on each side, like the released code."""
  pad = (kernel - 1) // 2 * dilation
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 kernel_dilation=(dilation, dilation), use_bias=use_bias, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=kaiming, conv_general_dilated=flax_conv_general_dilated,
                 name=name)


class ConcatConv(nn.Module):
  """`conv(features, kernel, dilation=...)` applied to the channel concatenation of a list of inputs.

  Same parameters as `conv`'s nn.Conv ('kernel' (k, k, sum C_i, features) float32 with its initialiser,
  'bias' (features,) zeros) and the same values as that conv of `jnp.concatenate(parts, -1)`; on CPU the
  concatenation is not kept for the backward pass (jaxflow.ops.conv.conv2d_concat), which is what densely
  connected layers need. Stride 1, 'same' padding like `conv`.
  """
  features: int
  kernel_size: int = 3
  dilation: int = 1
  dtype: Any = jnp.float32
  kernel_init: Any = kaiming
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, parts: Sequence[jax.Array]) -> jax.Array:
    """parts: (B, h, w, C_i) arrays, concatenated in this order. Returns (B, h, w, features), compute dtype."""
    k, cin = self.kernel_size, sum(p.shape[-1] for p in parts)
    kernel = self.param("kernel", self.kernel_init, (k, k, cin, self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    pad = (k - 1) // 2 * self.dilation
    y = conv2d_concat([p.astype(self.dtype) for p in parts], kernel.astype(self.dtype), (1, 1),
                      ((pad, pad), (pad, pad)), (self.dilation, self.dilation))
    return y + bias.astype(self.dtype)


class ConvTranspose(nn.Module):
  """`nn.ConvTranspose` (2-D, explicit padding, transpose_kernel=False) with the same parameters ('kernel'
  (kh, kw, C_in, features) float32, 'bias' (features,) zeros) and values, computed by
  jaxflow.ops.conv.conv_transpose2d: on CPU one matrix product and an overlap-add, whose gradients are matmuls
  (XLA:CPU's own transposed-convolution weight gradient ran at 2-5 GFLOP per CPU-second); XLA's elsewhere.
  """
  features: int
  kernel_size: tuple[int, int] = (4, 4)
  strides: tuple[int, int] = (2, 2)
  padding: tuple[tuple[int, int], tuple[int, int]] = ((2, 2), (2, 2))
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Any = kaiming
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x (B, h, w, C_in) -> (B, h', w', features) in the compute dtype (h' = (h-1)*s + 1 + pads - k + 1)."""
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), jnp.float32)
    y = conv_transpose2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(self.dtype)
    return y


def deconv(features: int, kernel: int = 4, stride: int = 2, *, dtype: Any = jnp.float32,
           use_bias: bool = True, name: str | None = None) -> ConvTranspose:
  """A transposed convolution that exactly doubles the size for kernel 4, stride 2 (PyTorch padding=1)."""
  # PyTorch ConvTranspose2d(k=4, s=2, p=1) output = 2 * input; in lax terms the dilated input is padded by
  # k - 1 - p = 2 on each side.
  pad = kernel - 1 - (kernel - stride) // 2
  return ConvTranspose(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                       use_bias=use_bias, dtype=dtype, name=name)


def check_image_pair(image1: Any, image2: Any, model: str) -> None:
  """Raises a ValueError/TypeError saying what was expected when the two frames are not a valid pair."""
  for label, im in (("image1", image1), ("image2", image2)):
    shape = getattr(im, "shape", None)
    dtype = getattr(im, "dtype", None)
    if shape is None or len(shape) != 4:
      raise ValueError(f"{model}: {label} must be a 4-D (B, H, W, 3) array, got shape {shape}")
    if shape[-1] != 3:
      raise ValueError(f"{model}: {label} must have 3 (RGB) channels in the last axis, got shape {shape}")
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"{model}: {label} must be floating point RGB in [0, 1], got dtype {dtype}; "
                      "convert integer images with image.astype(float32) / 255")
  if tuple(image1.shape) != tuple(image2.shape):
    raise ValueError(f"{model}: image1 and image2 must have the same shape, got {image1.shape} and {image2.shape}")


# How both frames of a pair share one pass of a siamese tower / pyramid: None = interleaved per image when the
# program runs on several devices, concatenated on one; True / False force it (tests, benchmark A/B).
_INTERLEAVE_FRAMES: bool | None = None


def _interleave() -> bool:
  return jax.device_count() > 1 if _INTERLEAVE_FRAMES is None else bool(_INTERLEAVE_FRAMES)


def merge_frames(frame1: jax.Array, frame2: jax.Array) -> jax.Array:
  """Both frames (B, ...) as one batch (2B, ...) for a shared-weight pass; undo with `split_frames`.

  On several devices the frames are interleaved per pair ((B, 2, ...) merged), so under a batch-sharded jit each
  device's pairs stay on it: a concatenation along the sharded batch axis and the slices [:B] / [B:] would move
  images between devices (all-to-alls). On one device they are concatenated: the interleaved form's strided
  slices measured ~6 % more CPU time per PWC-Net step at 384x512 b8. Same values either way (per-image layers)."""
  if _interleave():
    pairs = jnp.stack([frame1, frame2], axis=1)
    return pairs.reshape((2 * frame1.shape[0],) + pairs.shape[2:])
  return jnp.concatenate([frame1, frame2], axis=0)


def split_frames(x: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
  """(2B, ...) from a pass over `merge_frames`' batch -> the two frames' (B, ...) parts."""
  if _interleave():
    pairs = x.reshape((batch, 2) + x.shape[1:])
    return pairs[:, 0], pairs[:, 1]
  return x[:batch], x[batch:]


def fit_to_multiple(image1: jax.Array, image2: jax.Array, multiple: int) -> tuple[jax.Array, jax.Array]:
  """Resizes both frames (bilinear) up to the next multiple of `multiple` in H and W; no-op if already there."""
  b, h, w, c = image1.shape
  nh, nw = math.ceil(h / multiple) * multiple, math.ceil(w / multiple) * multiple
  if (nh, nw) == (h, w):
    return image1, image2
  resize = lambda im: jax.image.resize(im, (b, nh, nw, c), method="bilinear", antialias=False)
  return resize(image1), resize(image2)


def flows_to_input_units(flows: Sequence[jax.Array], network_size: tuple[int, int],
                         input_size: tuple[int, int]) -> list[jax.Array]:
  """Rescales flow values from pixels of the (resized) network input to pixels of the caller's input.

  Spatial sizes stay those of each level; only u is scaled by W/W_net and v by H/H_net.
  """
  (nh, nw), (h, w) = network_size, input_size
  if (nh, nw) == (h, w):
    return list(flows)
  scale = jnp.asarray([w / nw, h / nh], jnp.float32)
  return [f * scale.astype(f.dtype) for f in flows]


def upsample_to_input(flow: jax.Array, input_size: tuple[int, int]) -> jax.Array:
  """Bilinear upsampling of a flow whose values are already in input pixels to the input size (no rescale)."""
  b, h, w, _ = flow.shape
  if (h, w) == tuple(input_size):
    return flow
  return jax.image.resize(flow, (b, input_size[0], input_size[1], 2), method="bilinear", antialias=False)


__all__ = ["ConcatConv", "ConvTranspose", "check_image_pair", "conv", "deconv", "fit_to_multiple", "flows_to_input_units", "kaiming",
           "leaky_relu", "resize_flow", "upsample_to_input"]
