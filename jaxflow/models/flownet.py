"""FlowNetS and FlowNetC (Dosovitskiy et al., ICCV 2015), as in the released FlowNet2 PyTorch code.

Both networks share the contracting part from conv3_1 on and the whole refinement (expanding) part:

  conv3_1 3x3 256, conv4 3x3/2 512, conv4_1 512, conv5 3x3/2 512, conv5_1 512, conv6 3x3/2 1024, conv6_1 1024,
  then for level l = 6 .. 3: predict_flow_l (3x3 -> 2), upsampled_flow_l_to_{l-1} (4x4/2 deconv 2 -> 2) and
  deconv_{l-1} (4x4/2 deconv + LeakyReLU 0.1) to 512/256/128/64 channels, concatenated with the encoder skip
  and the upsampled flow (1026, 770, 386, 194 channels), and predict_flow2 at 1/4 of the input resolution.

FlowNetS stacks the two frames (6 channels) into conv1 7x7/2 64, conv2 5x5/2 128, conv3 5x5/2 256.
FlowNetC runs conv1-conv3 on each frame with shared weights, correlates the two conv3 maps (max displacement
20, displacement stride 2: 21 x 21 = 441 channels, LeakyReLU 0.1), and concatenates conv_redir (1x1 256 -> 32
on frame 1) before the correlation (32 + 441 = 473 channels) as the input of conv3_1.

Flow scaling: the network predicts flow / div_flow (div_flow = 20) at each level's spatial size, in pixels of
the input resolution (the ground truth is downsampled in space, not rescaled), so every prediction is
multiplied by div_flow here; `flows` are therefore in input pixels. `flow` is predict_flow2 upsampled 4x
bilinearly (as FlowNet2's `upsample1`).

Input normalisation follows FlowNet2-PyTorch: subtract the per-channel mean over both frames and all pixels
of each example (its `rgb_mean`), divide by rgb_max (1 here: inputs are already in [0, 1]).

Departures from the released code, all deliberate:
  - Initialisation is He-normal (layers.kaiming), not PyTorch's xavier_uniform / uniform biases.
  - FlowNetC runs its siamese tower once on the two frames merged into the batch axis (same
    weights, one kernel launch per layer). With batch_norm=True the statistics are therefore computed over
    both frames together instead of each frame separately.
  - Sizes that are not multiples of 64 are resized up to the next multiple and the flows rescaled to the
    caller's pixels, as the released Caffe deploy networks do (the PyTorch scripts crop instead).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxflow import ops
from jaxflow.models import layers, register

# Encoder widths of conv1, conv2, conv3, conv3_1, conv4, conv4_1, conv5, conv5_1, conv6, conv6_1.
ENCODER_FEATURES = (64, 128, 256, 256, 512, 512, 512, 512, 1024, 1024)
# Widths of deconv5, deconv4, deconv3, deconv2.
DECODER_FEATURES = (512, 256, 128, 64)
# The coarsest level is conv6, at 1/64 of the input: H and W must be multiples of this.
MULTIPLE = 64

_ENCODER_NAMES = ("conv1", "conv2", "conv3", "conv3_1", "conv4", "conv4_1", "conv5", "conv5_1", "conv6",
                  "conv6_1")
# (kernel, stride) of each encoder layer, from the released layer list.
_ENCODER_GEOMETRY = ((7, 2), (5, 2), (5, 2), (3, 1), (3, 2), (3, 1), (3, 2), (3, 1), (3, 2), (3, 1))


def _check_widths(model: str, encoder: Sequence[int], decoder: Sequence[int]) -> tuple[tuple[int, ...],
                                                                                        tuple[int, ...]]:
  encoder, decoder = tuple(int(c) for c in encoder), tuple(int(c) for c in decoder)
  if len(encoder) != len(ENCODER_FEATURES) or min(encoder) < 1:
    raise ValueError(f"{model}: encoder_features must be {len(ENCODER_FEATURES)} positive widths for "
                     f"{', '.join(_ENCODER_NAMES)}; got {encoder}")
  if len(decoder) != len(DECODER_FEATURES) or min(decoder) < 1:
    raise ValueError(f"{model}: decoder_features must be {len(DECODER_FEATURES)} positive widths for "
                     f"deconv5, deconv4, deconv3, deconv2; got {decoder}")
  return encoder, decoder


def _normalise_pair(image1: jax.Array, image2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Subtracts the per-example, per-channel mean over both frames (FlowNet2's rgb_mean); float32 in/out."""
  image1, image2 = image1.astype(jnp.float32), image2.astype(jnp.float32)
  mean = 0.5 * (image1.mean(axis=(1, 2), keepdims=True) + image2.mean(axis=(1, 2), keepdims=True))
  return image1 - mean, image2 - mean


def _conv_block(x: jax.Array, index_or_name: int | str, features: int, kernel: int, stride: int, *,
                batch_norm: bool, dtype: Any, train: bool) -> jax.Array:
  """conv (+ batch norm, then without conv bias) + LeakyReLU 0.1: FlowNet2-PyTorch's `conv` block.

  Must be called inside a compact method: the layers become submodules of the calling module, named
  `<name>` (kernel (k, k, cin, cout), bias (cout) unless batch_norm) and `<name>_bn` (scale, bias; running
  mean/var in the 'batch_stats' collection) when batch_norm.
  """
  name = index_or_name if isinstance(index_or_name, str) else _ENCODER_NAMES[index_or_name]
  x = layers.conv(features, kernel, stride, dtype=dtype, use_bias=not batch_norm, name=name)(x)
  if batch_norm:
    # PyTorch BatchNorm2d defaults: momentum 0.1 (flax: 0.9 decay of the running average), eps 1e-5.
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                     param_dtype=jnp.float32, name=f"{name}_bn")(x)
  return layers.leaky_relu(x, 0.1)


def _encoder_block(x: jax.Array, i: int, encoder: tuple[int, ...], batch_norm: bool, dtype: Any,
                   train: bool) -> jax.Array:
  """Encoder layer i (0 = conv1 ... 9 = conv6_1) with the released kernel size and stride."""
  kernel, stride = _ENCODER_GEOMETRY[i]
  return _conv_block(x, i, encoder[i], kernel, stride, batch_norm=batch_norm, dtype=dtype, train=train)


def _refine(out_conv2: jax.Array, in_conv3_1: jax.Array, encoder: tuple[int, ...], decoder: tuple[int, ...],
            *, batch_norm: bool, flow_upsample_bias: bool, dtype: Any, train: bool) -> list[jax.Array]:
  """The shared conv3_1 ... conv6_1 contraction and the expanding part (call inside a compact method).

  Inputs: conv2 features (B, H/4, W/4, c2) and the conv3_1 input (B, H/8, W/8, c) on the network grid (H, W).
  Returns the 5 predictions of flow / div_flow, [flow6 (B, H/64, W/64, 2), ..., flow2 (B, H/4, W/4, 2)], in
  the compute dtype.
  """
  block = lambda x, i: _encoder_block(x, i, encoder, batch_norm, dtype, train)
  out_conv3 = block(in_conv3_1, 3)
  out_conv4 = block(block(out_conv3, 4), 5)
  out_conv5 = block(block(out_conv4, 6), 7)
  x = block(block(out_conv5, 8), 9)

  skips = {5: out_conv5, 4: out_conv4, 3: out_conv3, 2: out_conv2}
  predictions = []
  for level in (6, 5, 4, 3):
    flow = layers.conv(2, 3, dtype=dtype, name=f"predict_flow{level}")(x)
    predictions.append(flow)
    # The released FlowNetS has no bias on these 2 -> 2 deconvolutions; the released FlowNetC has one.
    flow_up = layers.deconv(2, dtype=dtype, use_bias=flow_upsample_bias,
                            name=f"upsampled_flow{level}_to_{level - 1}")(flow)
    # The feature deconvolutions keep their bias and have no batch norm, even in the BN variants.
    features = layers.deconv(decoder[6 - level], dtype=dtype, name=f"deconv{level - 1}")(x)
    features = layers.leaky_relu(features, 0.1)
    x = jnp.concatenate([skips[level - 1].astype(dtype), features, flow_up], axis=-1)
  predictions.append(layers.conv(2, 3, dtype=dtype, name="predict_flow2")(x))
  return predictions


def _outputs(predictions: list[jax.Array], div_flow: float, network_size: tuple[int, int],
             input_size: tuple[int, int]) -> dict[str, Any]:
  """Turns flow/div_flow predictions on the network grid into the model contract's `flow` and `flows`."""
  flows = [p.astype(jnp.float32) * jnp.float32(div_flow) for p in predictions]
  flows = layers.flows_to_input_units(flows, network_size, input_size)
  return {"flow": layers.upsample_to_input(flows[-1], input_size), "flows": flows}


@register("flownet_s")
class FlowNetS(nn.Module):
  """FlowNetS ("simple"): both frames stacked into one 6-channel input.

  Called as `apply(variables, image1, image2, train=False)` with float32 RGB in [0, 1] of shape (B, H, W, 3);
  any H, W (resized internally to multiples of 64). Returns {'flow': (B, H, W, 2) float32 pixels,
  'flows': [flow6, flow5, flow4, flow3, flow2] at 1/64 ... 1/4 of the network grid, float32, in pixels of the
  input}. With batch_norm=True, pass `mutable=['batch_stats']` when train=True.

  Fields: batch_norm (FlowNet2's FlowNetS-BN: no conv biases, BN after every encoder conv), div_flow (the
  network predicts flow / div_flow), encoder_features (10 widths conv1 ... conv6_1), decoder_features
  (deconv5 ... deconv2), dtype (compute dtype; parameters stay float32).
  """
  batch_norm: bool = False
  div_flow: float = 20.0
  encoder_features: Sequence[int] = ENCODER_FEATURES
  decoder_features: Sequence[int] = DECODER_FEATURES
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image1: jax.Array, image2: jax.Array, train: bool = False) -> dict[str, Any]:
    layers.check_image_pair(image1, image2, "flownet_s")
    encoder, decoder = _check_widths("flownet_s", self.encoder_features, self.decoder_features)
    input_size = tuple(image1.shape[1:3])
    image1, image2 = layers.fit_to_multiple(image1, image2, MULTIPLE)
    network_size = tuple(image1.shape[1:3])
    image1, image2 = _normalise_pair(image1, image2)
    x = jnp.concatenate([image1, image2], axis=-1).astype(self.dtype)

    block = lambda x, i: _encoder_block(x, i, encoder, self.batch_norm, self.dtype, train)
    out_conv2 = block(block(x, 0), 1)
    out_conv3 = block(out_conv2, 2)
    predictions = _refine(out_conv2, out_conv3, encoder, decoder, batch_norm=self.batch_norm,
                          flow_upsample_bias=False, dtype=self.dtype, train=train)
    return _outputs(predictions, self.div_flow, network_size, input_size)


@register("flownet_c")
class FlowNetC(nn.Module):
  """FlowNetC ("correlation"): siamese conv1-conv3, a correlation layer on conv3, then FlowNetS's refinement.

  Same call and outputs as FlowNetS. Extra fields: search_range (max displacement of the correlation in
  conv3 pixels, 20), corr_stride (displacement stride, 2): (2 * search_range / corr_stride + 1)^2 correlation
  channels (441); redir_features (conv_redir width, 32).
  """
  batch_norm: bool = False
  div_flow: float = 20.0
  search_range: int = 20
  corr_stride: int = 2
  redir_features: int = 32
  encoder_features: Sequence[int] = ENCODER_FEATURES
  decoder_features: Sequence[int] = DECODER_FEATURES
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image1: jax.Array, image2: jax.Array, train: bool = False) -> dict[str, Any]:
    layers.check_image_pair(image1, image2, "flownet_c")
    encoder, decoder = _check_widths("flownet_c", self.encoder_features, self.decoder_features)
    if self.search_range < 0 or self.corr_stride < 1 or self.search_range % self.corr_stride:
      raise ValueError(f"flownet_c: search_range ({self.search_range}) must be a non-negative multiple of "
                       f"corr_stride ({self.corr_stride} >= 1)")
    input_size = tuple(image1.shape[1:3])
    image1, image2 = layers.fit_to_multiple(image1, image2, MULTIPLE)
    network_size = tuple(image1.shape[1:3])
    image1, image2 = _normalise_pair(image1, image2)
    batch = image1.shape[0]

    # Siamese tower: one pass over both frames (shared weights); layers.merge_frames keeps each device's pairs on
    # it when the batch is sharded.
    block = lambda x, i: _encoder_block(x, i, encoder, self.batch_norm, self.dtype, train)
    conv2 = block(block(layers.merge_frames(image1, image2).astype(self.dtype), 0), 1)
    conv3 = block(conv2, 2)
    out_conv2a, _ = layers.split_frames(conv2, batch)
    out_conv3a, out_conv3b = layers.split_frames(conv3, batch)

    corr = ops.correlation(out_conv3a, out_conv3b, int(self.search_range), int(self.corr_stride))
    corr = layers.leaky_relu(corr.astype(jnp.float32), 0.1).astype(self.dtype)
    redir = _conv_block(out_conv3a, "conv_redir", self.redir_features, 1, 1, batch_norm=self.batch_norm,
                        dtype=self.dtype, train=train)
    in_conv3_1 = jnp.concatenate([redir, corr], axis=-1)
    predictions = _refine(out_conv2a, in_conv3_1, encoder, decoder, batch_norm=self.batch_norm,
                          flow_upsample_bias=True, dtype=self.dtype, train=train)
    return _outputs(predictions, self.div_flow, network_size, input_size)


__all__ = ["DECODER_FEATURES", "ENCODER_FEATURES", "FlowNetC", "FlowNetS", "MULTIPLE"]
