"""PWC-Net: the released PyTorch model (NVlabs/PWC-Net `pwc_dc_net`, the `feature-uparrow` variant with three
convolutions per pyramid level), a state dict (bare or under 'state_dict').

Released names -> jaxflow (jaxflow/models/pwcnet.py), every `conv(...)` being Sequential(Conv2d, LeakyReLU)
stored as `<name>.0.weight` / `.0.bias`:
  conv{l}a, conv{l}aa, conv{l}b (l = 1..5; level 6 is conv6aa (stride 2), conv6a, conv6b in the released
      code)                              -> pyramid/level{l}_conv{0,1,2} (the stride-2 conv first)
  conv{l}_0 .. conv{l}_4                 -> estimator{l}/conv0 .. conv4 (dense: new features first, same order)
  predict_flow{l} (plain Conv2d)         -> estimator{l}/predict_flow
  deconv{l}, upfeat{l} (ConvTranspose2d) -> upflow{l}, upfeat{l} (kernels flipped, see common.py)
  dc_conv1 .. dc_conv6, dc_conv7 (plain) -> context/conv0 .. conv5, context/predict_flow
The released module also defines deconv2 (and some ports upfeat2) at the output level, which its forward
pass never uses; they are skipped.

Model fields are read from the shapes: pyramid_channels, convs_per_level (3, or 2 without conv{l}aa),
estimator_channels, search_range ((2r+1)^2 = conv6_0 input channels), dense, context, context_channels,
output_level. Not recoverable from shapes and taken from the released code: div_flow 20, context dilations
1, 2, 4, 8, 16, 1. Input: the released model takes BGR in [0, 1]; jaxflow's PWCNet takes RGB and reverses the
channels itself, so the weights are used unchanged. Flow channel 0 = u (the x of grid_sample).
"""

from __future__ import annotations

import math
from typing import Any

from jaxflow.converters.common import ConversionError, conv_kernel, deconv_kernel, vector
from jaxflow.converters.torch_state import StateDict, load_state_dict

RELEASED_DILATIONS = (1, 2, 4, 8, 16, 1)


def _conv(sd: StateDict, name: str, sequential: bool = True, in_channels: int | None = None) -> dict[str, Any]:
  prefix = f"{name}.0" if sequential else name
  # Tolerate either form: some ports store predict_flow / dc_conv7 inside a Sequential, others plain.
  alt = name if sequential else f"{name}.0"
  w = sd.get(f"{prefix}.weight", f"{alt}.weight")
  kernel = conv_kernel(w, name, sd.source, in_channels=in_channels)
  if f"{prefix}.bias" in sd or f"{alt}.bias" in sd:
    bias = vector(sd.get(f"{prefix}.bias", f"{alt}.bias"), name, sd.source, w.shape[0])
  else:
    raise ConversionError(f"{sd.source}: layer {name!r} has no bias in the checkpoint; the released PWC-Net's "
                          f"convolutions all have one")
  return {"kernel": kernel, "bias": bias}


def _deconv(sd: StateDict, name: str) -> dict[str, Any]:
  w = sd.get(f"{name}.weight", f"{name}.0.weight")
  bias_key = f"{name}.bias" if f"{name}.bias" in sd else f"{name}.0.bias"
  return {"kernel": deconv_kernel(w, name, sd.source), "bias": vector(sd.get(bias_key), name, sd.source, w.shape[1])}


def _out_channels(sd: StateDict, name: str) -> int | None:
  for key in (f"{name}.0.weight", f"{name}.weight"):
    if key in sd:
      return sd.shape(key)[0]
  return None


def _in_channels(sd: StateDict, name: str) -> int:
  for key in (f"{name}.0.weight", f"{name}.weight"):
    if key in sd:
      return sd.shape(key)[1]
  raise ConversionError(f"{sd.source}: no layer {name!r} in the checkpoint")


def _pyramid_order(sd: StateDict, level: int) -> list[str]:
  names = [n for n in (f"conv{level}a", f"conv{level}aa", f"conv{level}b") if _out_channels(sd, n) is not None]
  if f"conv{level}aa" in names and len(names) == 3 and level == 6:
    # Released quirk: at level 6 the stride-2 conv is conv6aa, then conv6a, conv6b.
    return [f"conv{level}aa", f"conv{level}a", f"conv{level}b"]
  return names


def convert(source: str, *, trust_pickle: bool = False) -> tuple[dict[str, Any], dict[str, Any], list[str], dict[str, str]]:
  """Released PWC-Net state dict -> (model fields, {'params': ...}, notes, origins)."""
  sd = StateDict(load_state_dict(source, trust_pickle=trust_pickle), source)
  notes: list[str] = []
  origins: dict[str, str] = {}  # jaxflow module path -> released layer name, for error messages

  # Feature pyramid.
  pyramid: dict[str, Any] = {}
  channels: list[int] = []
  convs_per_level = None
  prev = 3
  level = 1
  while _out_channels(sd, f"conv{level}a") is not None or _out_channels(sd, f"conv{level}aa") is not None:
    names = _pyramid_order(sd, level)
    if convs_per_level is None:
      convs_per_level = len(names)
    elif len(names) != convs_per_level:
      raise ConversionError(f"{source}: pyramid level {level} has layers {names}, level 1 has {convs_per_level}; "
                            f"jaxflow's PWC-Net uses the same number of convolutions per level")
    width = _out_channels(sd, names[0])
    for j, name in enumerate(names):
      pyramid[f"level{level}_conv{j}"] = _conv(sd, name, in_channels=prev if j == 0 else width)
      origins[f"pyramid/level{level}_conv{j}"] = name
      if pyramid[f"level{level}_conv{j}"]["kernel"].shape[3] != width:
        got = pyramid[f"level{level}_conv{j}"]["kernel"].shape[3]
        raise ConversionError(f"{source}: layer {name!r} has {got} output channels, the other convolutions of "
                              f"level {level} have {width}")
    channels.append(width)
    prev = width
    level += 1
  if not channels:
    raise ConversionError(f"{source}: no feature-pyramid layers conv1a/conv1aa/conv1b: not a released PWC-Net "
                          f"state dict (keys start {sorted(sd.tensors)[:6]})")
  top = len(channels)

  # Decoder levels: top .. output_level (those with a predict_flow).
  decoder = [l for l in range(top, 0, -1) if _out_channels(sd, f"predict_flow{l}") is not None]
  if not decoder or decoder[0] != top or decoder != list(range(top, decoder[-1] - 1, -1)):
    raise ConversionError(f"{source}: expected predict_flow{top}, predict_flow{top - 1}, ... down to the output "
                          f"level; found levels {decoder}")
  output_level = decoder[-1]
  est_channels = []
  i = 0
  while _out_channels(sd, f"conv{top}_{i}") is not None:
    est_channels.append(_out_channels(sd, f"conv{top}_{i}"))
    i += 1
  if not est_channels:
    raise ConversionError(f"{source}: no flow-estimator layers conv{top}_0, conv{top}_1, ...")
  corr = _in_channels(sd, f"conv{top}_0")
  r = (math.isqrt(corr) - 1) // 2
  if (2 * r + 1) ** 2 != corr:
    raise ConversionError(f"{source}: conv{top}_0 takes {corr} channels; the top level's input is the cost volume "
                          f"of (2r+1)^2 channels")
  dense = len(est_channels) > 1 and _in_channels(sd, f"conv{top}_1") == corr + est_channels[0]

  params: dict[str, Any] = {"pyramid": pyramid}
  for l in decoder:
    est: dict[str, Any] = {}
    for j in range(len(est_channels)):
      est[f"conv{j}"] = _conv(sd, f"conv{l}_{j}")
      origins[f"estimator{l}/conv{j}"] = f"conv{l}_{j}"
    est["predict_flow"] = _conv(sd, f"predict_flow{l}", sequential=False)
    origins[f"estimator{l}/predict_flow"] = f"predict_flow{l}"
    params[f"estimator{l}"] = est
    if l > output_level:
      params[f"upflow{l}"] = _deconv(sd, f"deconv{l}")
      params[f"upfeat{l}"] = _deconv(sd, f"upfeat{l}")
      origins[f"upflow{l}"], origins[f"upfeat{l}"] = f"deconv{l}", f"upfeat{l}"
  unused = [k for k in sd.tensors if k.split(".")[0] in (f"deconv{output_level}", f"upfeat{output_level}")]
  if unused:
    sd.ignore(unused)
    notes.append(f"skipped {sorted(unused)}: defined by the released module but unused by its forward pass")

  context = _out_channels(sd, "dc_conv1") is not None
  context_channels: list[int] = []
  if context:
    n = 1
    while _out_channels(sd, f"dc_conv{n + 1}") is not None:
      n += 1
    # dc_conv1 .. dc_conv{n-1} are conv + LeakyReLU; dc_conv{n} (dc_conv7) is the plain conv to the flow.
    ctx: dict[str, Any] = {}
    for j in range(1, n):
      ctx[f"conv{j - 1}"] = _conv(sd, f"dc_conv{j}")
      origins[f"context/conv{j - 1}"] = f"dc_conv{j}"
      context_channels.append(ctx[f"conv{j - 1}"]["kernel"].shape[3])
    ctx["predict_flow"] = _conv(sd, f"dc_conv{n}", sequential=False)
    origins["context/predict_flow"] = f"dc_conv{n}"
    params["context"] = ctx
    if len(context_channels) != len(RELEASED_DILATIONS):
      raise ConversionError(f"{source}: context network with {len(context_channels)} dilated convolutions; the "
                            f"dilations are not stored in the weights and are known only for the released 6 "
                            f"({RELEASED_DILATIONS})")
  sd.check_all_used()

  fields: dict[str, Any] = {
      "name": "pwcnet", "search_range": r, "pyramid_channels": channels, "convs_per_level": convs_per_level,
      "estimator_channels": est_channels, "dense": bool(dense), "context": bool(context),
      "output_level": output_level, "div_flow": 20.0}
  if context:
    fields["context_channels"] = context_channels
    fields["context_dilations"] = list(RELEASED_DILATIONS)
  return fields, {"params": params}, notes, origins


__all__ = ["RELEASED_DILATIONS", "convert"]
