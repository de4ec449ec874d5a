"""FlowNetS / FlowNetC: the released PyTorch checkpoints of the FlowNet 2 family (NVIDIA flownet2-pytorch:
FlowNet2-S / FlowNet2-C, and FlowNetS/C-BN variants), state dict under `state_dict` (or bare).

Released names -> jaxflow (jaxflow/models/flownet.py):
  conv1 ... conv6_1, conv_redir (FlowNetC)     Sequential(Conv2d[, BatchNorm2d], LeakyReLU):
    <name>.0.weight / .0.bias (no bias with BN)  -> <name>/kernel, <name>/bias
    <name>.1.weight / bias / running_mean / var  -> params <name>_bn/scale, bias; batch_stats <name>_bn/mean, var
  deconv5 ... deconv2  Sequential(ConvTranspose2d, LeakyReLU): <name>.0.*  -> deconv{l} (kernel flipped)
  predict_flow6 ... predict_flow2 (Conv2d)                                -> predict_flow{l}
  upsampled_flow6_to_5 ... 3_to_2 (ConvTranspose2d; bias only in FlowNetC) -> upsampled_flow{l}_to_{l-1}

Model fields read from the shapes: batch_norm, encoder_features, decoder_features; FlowNetC also
redir_features and search_range (from the correlation channels, (2 * search_range / corr_stride + 1)^2, with
the released corr_stride 2). div_flow is the released 20.

Input: flownet2-pytorch feeds RGB (its loader reads images with imageio / PIL) scaled to [0, 255], subtracts
the per-channel mean over both frames and divides by rgb_max = 255; jaxflow's models take RGB in [0, 1] and
subtract the same mean, which is identical. For checkpoints that expect BGR input (e.g. converted straight
from the Caffe models, whose scripts feed BGR) pass `bgr=True`: conv1's input channels are reversed so the
jaxflow model still takes RGB.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jaxflow.converters.common import ConversionError, conv_kernel, deconv_kernel, vector
from jaxflow.converters.torch_state import StateDict, load_state_dict

ENCODER_NAMES = ("conv1", "conv2", "conv3", "conv3_1", "conv4", "conv4_1", "conv5", "conv5_1", "conv6", "conv6_1")
CORR_STRIDE = 2


def _conv_block(sd: StateDict, name: str, batch_norm: bool, params: dict, stats: dict,
                in_channels: int | None = None) -> int:
  w = sd.get(f"{name}.0.weight")
  params[name] = {"kernel": conv_kernel(w, name, sd.source, in_channels=in_channels)}
  out = w.shape[0]
  if batch_norm:
    if f"{name}.0.bias" in sd:
      raise ConversionError(f"{sd.source}: layer {name!r} has a conv bias and batch norm; the FlowNet2 BN "
                            f"variants have no conv bias")
    params[f"{name}_bn"] = {"scale": vector(sd.get(f"{name}.1.weight"), f"{name}.1", sd.source, out),
                            "bias": vector(sd.get(f"{name}.1.bias"), f"{name}.1", sd.source, out)}
    stats[f"{name}_bn"] = {"mean": vector(sd.get(f"{name}.1.running_mean"), f"{name}.1", sd.source, out),
                           "var": vector(sd.get(f"{name}.1.running_var"), f"{name}.1", sd.source, out)}
  else:
    params[name]["bias"] = vector(sd.get(f"{name}.0.bias"), name, sd.source, out)
  return out


def _deconv(sd: StateDict, prefix: str, layer: str, with_bias: bool) -> dict[str, Any]:
  w = sd.get(f"{prefix}.weight")
  out = {"kernel": deconv_kernel(w, layer, sd.source)}
  if with_bias:
    out["bias"] = vector(sd.get(f"{prefix}.bias"), layer, sd.source, w.shape[1])
  elif f"{prefix}.bias" in sd:
    raise ConversionError(f"{sd.source}: layer {layer!r} has a bias, which the released FlowNetS (and jaxflow's) "
                          f"flow upsampling does not have")
  return out


def convert(source: str, model: str, *, bgr: bool = False, trust_pickle: bool = False
            ) -> tuple[dict[str, Any], dict[str, Any], list[str], dict[str, str]]:
  """Released FlowNet2-family FlowNetS / FlowNetC state dict -> (model fields, variables, notes, origins)."""
  if model not in ("flownet_s", "flownet_c"):
    raise ValueError(f"flownet converter: model must be 'flownet_s' or 'flownet_c', got {model!r}")
  sd = StateDict(load_state_dict(source, trust_pickle=trust_pickle), source)
  is_c = "conv_redir.0.weight" in sd
  if "conv1.0.weight" not in sd:
    raise ConversionError(f"{source}: no 'conv1.0.weight': not a FlowNet2-PyTorch FlowNetS/FlowNetC state dict "
                          f"(keys start {sorted(sd.tensors)[:6]})")
  if is_c != (model == "flownet_c"):
    kind = "FlowNetC (it has conv_redir)" if is_c else "FlowNetS (no conv_redir)"
    raise ConversionError(f"{source}: the checkpoint is a {kind}, but --model {model} was requested")
  batch_norm = "conv1.1.running_mean" in sd
  notes: list[str] = []
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}

  in_channels = 3 if is_c else 6
  conv1_in = sd.shape("conv1.0.weight")[1]
  if conv1_in != in_channels:
    raise ConversionError(f"{source}: conv1.0.weight takes {conv1_in} input channels; a standalone "
                          f"{'FlowNetC' if is_c else 'FlowNetS'} takes {in_channels} (the FlowNetS inside FlowNet2 "
                          f"stacks takes 12 and is not supported)")
  encoder = []
  prev = in_channels
  for i, name in enumerate(ENCODER_NAMES):
    if is_c and name == "conv3_1":
      redir = _conv_block(sd, "conv_redir", batch_norm, params, stats, in_channels=encoder[2])
      corr = sd.shape("conv3_1.0.weight")[1] - redir
      d = math.isqrt(max(corr, 0))
      if corr <= 0 or d * d != corr or d % 2 == 0:
        raise ConversionError(f"{source}: conv3_1 takes {corr + redir} channels = conv_redir {redir} + {corr}; the "
                              f"correlation gives a square odd number (2 * search_range / stride + 1)^2")
      prev = redir + corr
    encoder.append(_conv_block(sd, name, batch_norm, params, stats, in_channels=prev))
    prev = encoder[-1]
  if bgr:
    k = params["conv1"]["kernel"]
    groups = [k[:, :, 0:3][:, :, ::-1]] if is_c else [k[:, :, 0:3][:, :, ::-1], k[:, :, 3:6][:, :, ::-1]]
    params["conv1"]["kernel"] = np.ascontiguousarray(np.concatenate(groups, axis=2))
    notes.append("conv1 input channels reversed (BGR checkpoint -> RGB model input)")

  decoder = []
  for level in (6, 5, 4, 3):
    params[f"predict_flow{level}"] = {
        "kernel": conv_kernel(sd.get(f"predict_flow{level}.weight"), f"predict_flow{level}", source),
        "bias": vector(sd.get(f"predict_flow{level}.bias"), f"predict_flow{level}", source, 2)}
    up = f"upsampled_flow{level}_to_{level - 1}"
    params[up] = _deconv(sd, up, up, with_bias=is_c)
    dec = f"deconv{level - 1}"
    params[dec] = _deconv(sd, f"{dec}.0", dec, with_bias=True)
    decoder.append(params[dec]["kernel"].shape[3])
  params["predict_flow2"] = {"kernel": conv_kernel(sd.get("predict_flow2.weight"), "predict_flow2", source),
                             "bias": vector(sd.get("predict_flow2.bias"), "predict_flow2", source, 2)}
  sd.check_all_used()

  fields: dict[str, Any] = {"name": model, "batch_norm": batch_norm, "div_flow": 20.0,
                            "encoder_features": encoder, "decoder_features": decoder}
  if is_c:
    fields.update(redir_features=params["conv_redir"]["kernel"].shape[3], corr_stride=CORR_STRIDE,
                  search_range=(d - 1) // 2 * CORR_STRIDE)
  variables = {"params": params}
  if batch_norm:
    variables["batch_stats"] = stats
  # Every jaxflow module carries its released layer's name (plus _bn for batch norm): origins are the identity.
  origins = {name: name for name in params}
  origins.update({f"{name}_bn": f"{name}.1" for name in params})
  return fields, variables, notes, origins


__all__ = ["convert"]
