"""PWC-Net (Sun et al., CVPR 2018): pyramid, warping and cost volume.

Architecture, following the released PyTorch model (NVlabs/PWC-Net, `pwc_dc_net`) where it differs from the
paper:
  - a shared feature pyramid of L = len(pyramid_channels) levels (16/32/64/96/128/196); level l has stride 2**l
    and `convs_per_level` 3x3 convs, the first of stride 2 (paper: 2 per level; released code: 3, i.e.
    conv{l}a stride 2, conv{l}aa, conv{l}b), each followed by LeakyReLU 0.1;
  - from the top level L down to `output_level` (2): warp the second image's features by the upsampled flow,
    cost volume with search range `search_range` ((2r+1)**2 = 81 channels, mean over channels) + LeakyReLU,
    DenseNet flow estimator 128/128/96/64/32 (each conv's output concatenated IN FRONT of its input, as in the
    released code), a 3x3 conv to the flow; below the top, the estimator input is
    [cost volume, features1, upsampled flow, upsampled features];
  - 4x4/2 transposed convs (with bias) upsample the flow (upflow) and the estimator features (upfeat) to the
    next level; the output level has neither (the released model does not use them: the parameter count
    8,749,214 / 9,374,274 for 2 / 3 convs per level confirms this);
  - the network works in units of flow / div_flow (20); before warping level l the upsampled flow is
    multiplied by div_flow / 2**l (0.625, 1.25, 2.5, 5.0 for levels 5..2) to become pixels of level l;
  - context network: dilated 3x3 convs 128/128/128/96/64/32 with dilations 1/2/4/8/16/1 (LeakyReLU) and a
    3x3 conv to 2 channels whose output is added to the output level's flow;
  - the output-level flow times div_flow is bilinearly upsampled (no value rescale: it is already in input
    pixels, FlowNet convention) to the input size.

Input: the released model expects BGR in [0, 1] (its demo script reads RGB with imread, reverses the channels
and divides by 255; no mean subtraction). This module takes the project's RGB in [0, 1] and reverses the
channels itself, so weights converted from the released model work unchanged.
Sizes: the network needs multiples of 2**L (64); other sizes are resized up (as the released demo does).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxflow.models import register
from jaxflow.models.layers import (ConcatConv, check_image_pair, conv, deconv, fit_to_multiple, flows_to_input_units,
                                   leaky_relu, merge_frames, split_frames, upsample_to_input)
from jaxflow.ops import correlation, warp_with_mask

COST_VOLUME_NORMS = ("none", "cosine")


def _unit_rms(f: jax.Array) -> jax.Array:
  """(..., C) -> float32 f / sqrt(mean_c f**2 + 1e-6): unit RMS over channels; all-zero vectors stay zero."""
  f = f.astype(jnp.float32)
  return f * jax.lax.rsqrt(jnp.mean(jnp.square(f), axis=-1, keepdims=True) + 1e-6)


class FeaturePyramid(nn.Module):
  """Shared feature extractor: (B, H, W, 3) -> [level 1 (B, H/2, W/2, c1), ..., level L (B, H/2**L, ...)]."""
  channels: Sequence[int]
  convs_per_level: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    x = x.astype(self.dtype)
    out = []
    for l, c in enumerate(self.channels, start=1):
      for j in range(self.convs_per_level):
        x = leaky_relu(conv(c, 3, stride=2 if j == 0 else 1, dtype=self.dtype, name=f"level{l}_conv{j}")(x))
      out.append(x)
    return out


class FlowEstimator(nn.Module):
  """Per-level (densely connected) flow estimator.

  Input: a list of (B, h, w, c_i) arrays whose channel concatenation (in list order) is the estimator's input
  x (B, h, w, c_in). Returns (flow (B, h, w, 2) in flow/div_flow units, compute dtype; the output features as a
  list of parts whose concatenation is (B, h, w, c_in + sum(channels)) if dense, else [(B, h, w, channels[-1])]).

  The dense concatenations are never materialised as saved activations: every conv is a `ConcatConv` of the
  parts (same parameters and values as a conv of the concatenation), so each layer's output is kept once for
  the backward pass instead of once per later layer.
  """
  channels: Sequence[int]
  dense: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, parts: Sequence[jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
    parts = [p.astype(self.dtype) for p in parts]
    for i, c in enumerate(self.channels):
      y = leaky_relu(ConcatConv(c, 3, dtype=self.dtype, name=f"conv{i}")(parts))
      # Released code: x = cat(conv(x), x) -- the new features come first.
      parts = [y] + parts if self.dense else [y]
    flow = ConcatConv(2, 3, dtype=self.dtype, name="predict_flow")(parts)
    return flow, parts


class ContextNetwork(nn.Module):
  """Dilated convolutions on the output level's estimator features -> (B, h, w, 2) flow refinement."""
  channels: Sequence[int] = (128, 128, 128, 96, 64, 32)
  dilations: Sequence[int] = (1, 2, 4, 8, 16, 1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array | Sequence[jax.Array]) -> jax.Array:
    """x: (B, h, w, C) features, or a list of parts whose channel concatenation they are."""
    parts = [x] if isinstance(x, jax.Array) else list(x)
    for i, (c, d) in enumerate(zip(self.channels, self.dilations)):
      if i == 0:
        x = leaky_relu(ConcatConv(c, 3, dilation=d, dtype=self.dtype, name="conv0")(parts))
      else:
        x = leaky_relu(conv(c, 3, dilation=d, dtype=self.dtype, name=f"conv{i}")(x))
    return conv(2, 3, dtype=self.dtype, name="predict_flow")(x)


@register("pwcnet")
class PWCNet(nn.Module):
  """PWC-Net. Fields are the config (defaults: paper's network; `convs_per_level=3` for the released one)."""
  search_range: int = 4
  pyramid_channels: Sequence[int] = (16, 32, 64, 96, 128, 196)
  convs_per_level: int = 2
  estimator_channels: Sequence[int] = (128, 128, 96, 64, 32)
  dense: bool = True
  context: bool = True
  context_channels: Sequence[int] = (128, 128, 128, 96, 64, 32)
  context_dilations: Sequence[int] = (1, 2, 4, 8, 16, 1)
  output_level: int = 2
  div_flow: float = 20.0
  dtype: Any = jnp.float32
  # 'none': the paper's and released code's cost volume, mean over channels of f1 * f2. 'cosine': a training
  # option, not in the paper: each feature vector is divided by its RMS over channels first, so the cost volume is
  # the cosine similarity in [-1, 1]. No parameter changes. At initialisation the raw product is dominated by the
  # features' norms and picks the true match at only ~10 % of level-2 pixels of a translated texture, against
  # 100 % for the cosine; the paper's network then sits on a zero-flow plateau for hundreds of steps, which
  # hides any learning in a short CPU run (configs/pwcnet.py:local uses 'cosine'; see its docstring).
  # Normalising features before the cost volume is also what UFlow (Jonschkowski et al., ECCV 2020) reports as
  # important for learning.
  cost_volume_norm: str = "none"

  def setup(self) -> None:
    self._check_config()
    self.pyramid = FeaturePyramid(tuple(self.pyramid_channels), self.convs_per_level, self.dtype)
    self.estimators = {l: FlowEstimator(tuple(self.estimator_channels), self.dense, self.dtype,
                                        name=f"estimator{l}") for l in self.decoder_levels}
    self.upflows = {l: deconv(2, 4, 2, dtype=self.dtype, name=f"upflow{l}")
                    for l in self.decoder_levels if l > self.output_level}
    self.upfeats = {l: deconv(2, 4, 2, dtype=self.dtype, name=f"upfeat{l}")
                    for l in self.decoder_levels if l > self.output_level}
    if self.context:
      self.context_net = ContextNetwork(tuple(self.context_channels), tuple(self.context_dilations), self.dtype,
                                        name="context")

  def _check_config(self) -> None:
    n = len(self.pyramid_channels)
    if n < 1:
      raise ValueError("pwcnet: field 'pyramid_channels' must list at least one level")
    if not 1 <= self.output_level <= n:
      raise ValueError(f"pwcnet: field 'output_level' must be in [1, {n}] (len(pyramid_channels)), "
                       f"got {self.output_level}")
    if self.search_range < 0:
      raise ValueError(f"pwcnet: field 'search_range' must be >= 0, got {self.search_range}")
    if self.convs_per_level < 1:
      raise ValueError(f"pwcnet: field 'convs_per_level' must be >= 1, got {self.convs_per_level}")
    if len(self.estimator_channels) < 1:
      raise ValueError("pwcnet: field 'estimator_channels' must list at least one width")
    if len(self.context_channels) != len(self.context_dilations):
      raise ValueError(f"pwcnet: fields 'context_channels' {tuple(self.context_channels)} and "
                       f"'context_dilations' {tuple(self.context_dilations)} must have the same length")
    if self.cost_volume_norm not in COST_VOLUME_NORMS:
      raise ValueError(f"pwcnet: field 'cost_volume_norm' must be one of {COST_VOLUME_NORMS}, "
                       f"got {self.cost_volume_norm!r}")
    if self.div_flow <= 0:
      raise ValueError(f"pwcnet: field 'div_flow' must be positive, got {self.div_flow}")

  @property
  def decoder_levels(self) -> list[int]:
    """Pyramid levels with a flow estimator, coarse to fine: L, L-1, ..., output_level."""
    return list(range(len(self.pyramid_channels), self.output_level - 1, -1))

  def preprocess(self, image: jax.Array) -> jax.Array:
    """RGB in [0, 1] -> what the released model expects: BGR in [0, 1] (channel reversal only)."""
    return image.astype(jnp.float32)[..., ::-1]

  def features(self, image: jax.Array) -> list[jax.Array]:
    """Feature pyramid of an RGB [0, 1] image (B, H, W, 3), H, W multiples of 2**L.

    Returns L arrays (compute dtype), index l - 1 holding level l: (B, H/2**l, W/2**l, pyramid_channels[l-1]).
    """
    return self.pyramid(self.preprocess(image))

  def cost_volume(self, f1: jax.Array, f2: jax.Array) -> jax.Array:
    """LeakyReLU(correlation) of (B, h, w, C) features over a (2r+1)**2 window: (B, h, w, (2r+1)**2) float32,
    channel (dy + r) * (2r + 1) + (dx + r) for displacement (dx, dy); products and sums in float32.

    With cost_volume_norm='cosine' each feature vector is first divided by sqrt(mean_c f**2 + 1e-6) (all-zero
    vectors, e.g. warped from outside the image, stay zero), so the correlation is a cosine similarity.
    """
    # jaxflow.ops.correlation multiplies and accumulates in float32 whatever the feature dtype.
    if self.cost_volume_norm == "cosine":
      f1, f2 = _unit_rms(f1), _unit_rms(f2)
    return leaky_relu(correlation(f1, f2, self.search_range, 1))

  def warp_features(self, features: jax.Array, up_flow: jax.Array, level: int) -> jax.Array:
    """Backward-warps level-`level` features by a flow in network units (flow / div_flow, input pixels).

    The flow is multiplied by div_flow / 2**level (0.625 at level 5 ... 5.0 at level 2 for div_flow 20) to
    become pixels of that level. As in the released code, a warped position whose bilinear footprint leaves
    the image (in-image corner weights summing to < 0.9999) is set to zero. Sampling coordinates in float32;
    returns (B, h, w, C) in the features' dtype.
    """
    scale = self.div_flow / 2.0 ** level
    warped, mask = warp_with_mask(features, up_flow.astype(jnp.float32) * scale)
    return warped * mask[..., None].astype(warped.dtype)

  def __call__(self, image1: jax.Array, image2: jax.Array, train: bool = False) -> dict[str, Any]:
    """Flow from image1 to image2.

    Args:
      image1, image2: float32 RGB in [0, 1], (B, H, W, 3), any H, W.
      train: unused (PWC-Net has no batch norm or dropout); part of the common model signature.
    Returns:
      {'flow': (B, H, W, 2) float32 pixels,
       'flows': [one array per level L..output_level, coarse to fine, level l of size (H'/2**l, W'/2**l) with
                 H', W' the network size (multiples of 2**L), float32, values in input pixels]}.
    """
    del train
    check_image_pair(image1, image2, "pwcnet")
    b, h, w, _ = image1.shape
    top = len(self.pyramid_channels)
    im1, im2 = fit_to_multiple(image1.astype(jnp.float32), image2.astype(jnp.float32), 2 ** top)
    nh, nw = im1.shape[1], im1.shape[2]

    # One pass of the shared pyramid over both frames (per image: no batch statistics); layers.merge_frames keeps
    # each device's pairs on it when the batch is sharded.
    feats = [split_frames(f, b) for f in self.features(merge_frames(im1, im2))]
    feats1, feats2 = [f[0] for f in feats], [f[1] for f in feats]

    level_flows = []
    up_flow = up_feat = None
    parts = flow = None
    for l in self.decoder_levels:
      f1, f2 = feats1[l - 1], feats2[l - 1]
      # The estimator input x = [cost volume, features1, upsampled flow, upsampled features] is passed as its
      # parts (FlowEstimator: the concatenation is never a saved activation).
      if up_flow is None:
        parts = [self.cost_volume(f1, f2)]
      else:
        parts = [self.cost_volume(f1, self.warp_features(f2, up_flow, l)), f1, up_flow, up_feat]
      flow, parts = self.estimators[l]([p.astype(self.dtype) for p in parts])
      flow = flow.astype(jnp.float32)
      if l > self.output_level:
        up_flow = self.upflows[l](flow).astype(jnp.float32)
        up_feat = self.upfeats[l](jnp.concatenate(parts, axis=-1))
      level_flows.append(flow)

    if self.context:
      level_flows[-1] = level_flows[-1] + self.context_net(parts).astype(jnp.float32)

    flows = [f * self.div_flow for f in level_flows]  # network units -> pixels of the network input
    flows = flows_to_input_units(flows, (nh, nw), (h, w))
    return {"flow": upsample_to_input(flows[-1], (h, w)).astype(jnp.float32),
            "flows": [f.astype(jnp.float32) for f in flows]}


__all__ = ["ContextNetwork", "FeaturePyramid", "FlowEstimator", "PWCNet"]
