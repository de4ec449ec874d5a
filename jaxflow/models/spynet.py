"""SpyNet (Ranjan & Black, CVPR 2017): optical flow by a spatial pyramid of small residual networks.

Architecture (paper + released Torch/PyTorch code):
  - both frames normalised with the ImageNet mean/std (RGB, [0, 1] input), then a `levels`-level pyramid by
    2x2 average pooling;
  - at each level k (coarse to fine) a small network G_k of five 7x7 convolutions 32/64/32/16/2 (ReLU after
    all but the last) sees 8 channels [image1_k, warp(image2_k, up(V_{k-1})), up(V_{k-1})] and predicts a
    residual: V_k = up(V_{k-1}) + G_k(...); up = 2x bilinear upsampling with the values doubled;
  - the coarsest level sees [image1_0, image2_0, zeros].
Each G_k works in the pixels of its own level; `flows` reports every level in pixels of the input resolution.

Per level 240,050 parameters; 1,200,250 for the default 5 levels. The per-level networks are named `G0`
(coarsest) ... `G{levels-1}` (finest) so that the paper's sequential training (train G_k with G_0..G_{k-1}
frozen, initialised from the previous stage) can be driven by `trainable_mask` and `init_from_coarser`.

The released PyTorch port resizes inputs to multiples of 32 (it has 6 levels); here the network needs
multiples of 2**(levels - 1) and other sizes are resized up to that multiple (the model contract).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxflow.models import register
from jaxflow.models.layers import (check_image_pair, conv, fit_to_multiple, flows_to_input_units,
                                   upsample_to_input)
from jaxflow.ops import image_pyramid, resize_flow, warp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_LEVEL_NAME = re.compile(r"^G(\d+)$")


class SpyBasic(nn.Module):
  """One pyramid level's network G_k: 7x7 convolutions `channels` + a final conv to 2 channels (flow).

  Input (B, h, w, 8) = [image1, warped image2, upsampled flow]; output (B, h, w, 2) residual flow in pixels of
  this level, in the compute dtype.
  """
  channels: Sequence[int] = (32, 64, 32, 16)
  kernel_size: int = 7
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    for i, c in enumerate(self.channels):
      x = nn.relu(conv(c, self.kernel_size, dtype=self.dtype, name=f"conv{i}")(x))
    return conv(2, self.kernel_size, dtype=self.dtype, name=f"conv{len(self.channels)}")(x)


@register("spynet")
class SpyNet(nn.Module):
  """SpyNet. Fields are the config: `levels` pyramid levels (5 in the paper), the per-level `channels` and
  `kernel_size` of G_k, `upsample_align_corners` (the released code's corner-aligned 2x flow upsampling), and the
  compute `dtype` (parameters stay float32)."""
  levels: int = 5
  channels: Sequence[int] = (32, 64, 32, 16)
  kernel_size: int = 7
  # The released code upsamples the coarser flow with corner-aligned bilinear interpolation (the Torch7 code
  # with stn's ScaleBHWD; the PyTorch port that reproduces its outputs with interpolate(align_corners=True)).
  # We follow the released code by default; False gives the half-pixel convention of the rest of jaxflow.
  upsample_align_corners: bool = True
  dtype: Any = jnp.float32

  def _check_config(self) -> None:
    if not isinstance(self.levels, int) or self.levels < 1:
      raise ValueError(f"spynet: field 'levels' must be an integer >= 1, got {self.levels!r}")
    if self.kernel_size < 1 or self.kernel_size % 2 == 0:
      raise ValueError(f"spynet: field 'kernel_size' must be odd and positive, got {self.kernel_size!r}")
    if any(int(c) < 1 for c in self.channels):
      raise ValueError(f"spynet: field 'channels' must be positive widths, got {self.channels!r}")

  @nn.compact
  def __call__(self, image1: jax.Array, image2: jax.Array, train: bool = False) -> dict[str, Any]:
    """Flow from image1 to image2.

    Args:
      image1, image2: float32 RGB in [0, 1], (B, H, W, 3), any H, W.
      train: unused (no batch norm or dropout); part of the common model signature.
    Returns:
      {'flow': (B, H, W, 2) float32 pixels, 'flows': [levels arrays, coarse to fine, level k of spatial size
       (H'/2**(levels-1-k), W'/2**(levels-1-k)) with H', W' the network size, values in input pixels]}.
    """
    del train
    check_image_pair(image1, image2, "spynet")
    self._check_config()
    b, h, w, _ = image1.shape
    im1, im2 = fit_to_multiple(image1.astype(jnp.float32), image2.astype(jnp.float32), 2 ** (self.levels - 1))
    nh, nw = im1.shape[1], im1.shape[2]

    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    # Pyramids of the normalised frames, coarse to fine (image_pyramid returns fine to coarse).
    pyr1 = image_pyramid((im1 - mean) / std, self.levels)[::-1]
    pyr2 = image_pyramid((im2 - mean) / std, self.levels)[::-1]

    flow = None
    level_flows = []
    for k in range(self.levels):
      i1, i2 = pyr1[k], pyr2[k]
      if flow is None:
        up = jnp.zeros(i1.shape[:3] + (2,), jnp.float32)
        warped = i2  # warping by a zero flow is the identity
      else:
        up = resize_flow(flow, (i1.shape[1], i1.shape[2]),  # 2x bilinear, values doubled
                         align_corners=self.upsample_align_corners)
        warped = warp(i2, up)
      x = jnp.concatenate([i1, warped.astype(jnp.float32), up], axis=-1)
      residual = SpyBasic(tuple(self.channels), self.kernel_size, self.dtype, name=f"G{k}")(x)
      flow = up + residual.astype(jnp.float32)
      level_flows.append(flow)

    # Level k's flow is in pixels of a grid 2**(levels-1-k) times coarser than the network input.
    flows = [f * float(2 ** (self.levels - 1 - k)) for k, f in enumerate(level_flows)]
    flows = flows_to_input_units(flows, (nh, nw), (h, w))
    return {"flow": upsample_to_input(flows[-1], (h, w)).astype(jnp.float32),
            "flows": [f.astype(jnp.float32) for f in flows]}


def _level_of_path(path: Sequence[Any]) -> int | None:
  for entry in path:
    key = getattr(entry, "key", None)
    if isinstance(key, str):
      m = _LEVEL_NAME.match(key)
      if m:
        return int(m.group(1))
  return None


def _level_container(tree: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
  """Returns the mapping that holds G0, G1, ... and whether it was wrapped in {'params': ...}."""
  if not isinstance(tree, Mapping):
    raise TypeError(f"spynet: expected a params mapping (model.init(...)['params'] or the variables dict), "
                    f"got {type(tree).__name__}")
  if any(_LEVEL_NAME.match(str(k)) for k in tree):
    return tree, False
  if "params" in tree and isinstance(tree["params"], Mapping):
    inner = tree["params"]
    if any(_LEVEL_NAME.match(str(k)) for k in inner):
      return inner, True
  raise ValueError(f"spynet: no per-level networks G0, G1, ... found in params with keys {sorted(tree)}")


def _available_levels(container: Mapping[str, Any]) -> list[int]:
  return sorted(int(_LEVEL_NAME.match(str(k)).group(1)) for k in container if _LEVEL_NAME.match(str(k)))


def trainable_mask(params: Mapping[str, Any], trainable_levels: int | Iterable[int]) -> Any:
  """A pytree of bools with the structure of `params`: True for the leaves of G_k with k in `trainable_levels`.

  For the paper's sequential training (train G_k with the coarser levels frozen), map the mask to labels and
  use `optax.multi_transform({'train': adam, 'freeze': optax.set_to_zero()}, labels)`. Note that
  `optax.masked(adam, mask)` alone does NOT freeze: it passes the raw gradients of unmasked leaves through.

  Args:
    params: SpyNet params (`variables['params']`) or the whole variables dict {'params': ...}.
    trainable_levels: one level index or several (0 = coarsest G0); every index must exist in `params`.
  Returns:
    The same tree structure as `params` with bool leaves.
  """
  container, _ = _level_container(params)
  available = _available_levels(container)
  wanted = {trainable_levels} if isinstance(trainable_levels, int) else set(trainable_levels)
  bad = sorted(k for k in wanted if not isinstance(k, int) or k not in available)
  if bad:
    raise ValueError(f"spynet.trainable_mask: level(s) {bad} not in params; available levels {available}")
  return jax.tree_util.tree_map_with_path(lambda path, _: _level_of_path(path) in wanted, params)


def init_from_coarser(params_new: Mapping[str, Any], params_old: Mapping[str, Any]) -> Any:
  """Copies every level G0..G{n-1} of a trained coarser SpyNet (`params_old`, n levels) into `params_new`.

  The levels that only the new model has keep their (fresh) values from `params_new`. Both arguments may be
  params or {'params': params} dicts; the result has the structure of `params_new`. Raises ValueError when the
  old model has a level the new one lacks or when a copied level's parameter shapes differ.
  """
  new_container, new_wrapped = _level_container(params_new)
  old_container, _ = _level_container(params_old)
  new_levels, old_levels = _available_levels(new_container), _available_levels(old_container)
  missing = [k for k in old_levels if k not in new_levels]
  if missing:
    raise ValueError(f"spynet.init_from_coarser: old params have level(s) {missing} that the new model "
                     f"(levels {new_levels}) does not have")
  merged = dict(new_container)
  for k in old_levels:
    name = f"G{k}"
    new_shapes = jax.tree.map(jnp.shape, new_container[name])
    old_shapes = jax.tree.map(jnp.shape, old_container[name])
    if new_shapes != old_shapes:
      raise ValueError(f"spynet.init_from_coarser: level {name} parameter shapes differ: new {new_shapes}, "
                       f"old {old_shapes}")
    merged[name] = old_container[name]
  if new_wrapped:
    out = dict(params_new)
    out["params"] = merged
    return out
  return merged


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SpyBasic", "SpyNet", "init_from_coarser", "trainable_mask"]
