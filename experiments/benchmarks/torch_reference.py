"""PyTorch reference models for the training-throughput benchmark: PWC-Net, FlowNetS, FlowNetC and SpyNet.

Plain `torch.nn` modules in NCHW, written the way a competent PyTorch user would: Conv2d / ConvTranspose2d,
`torch.nn.functional.grid_sample` for backward warping, a cost volume of shifted products over a zero-padded
feature map, `torch.optim.Adam`. No custom kernels, no torch.compile. They are the same networks as jaxflow's
(same layers, widths, parameter counts, flow scaling and input normalisation; tests/test_torch_reference.py
converts their state dicts with jaxflow's converters and compares the forward passes), so a step of each is the
same amount of work:

  PWCNet     8,749,214 parameters with the jaxflow defaults (2 convs per pyramid level; 9,374,274 with 3).
             state_dict names of NVlabs/PWC-Net's `pwc_dc_net` (conv{l}a / conv{l}aa / conv{l}b,
             conv{l}_{i}, predict_flow{l}, deconv{l}, upfeat{l}, dc_conv1..7), read by jaxflow.converters.pwcnet.
  FlowNetS  38,676,506; FlowNetC 39,175,298: names of flownet2-pytorch's FlowNet2-S / FlowNet2-C (conv1.0 ...,
             conv_redir, deconv{l}.0, predict_flow{l}, upsampled_flow{l}_to_{l-1}), read by
             jaxflow.converters.flownet.
  SpyNet     1,200,250 (5 levels): names of the PyTorch port of the released model
             (netBasic.{k}.netBasic.{0,2,4,6,8}); `spynet_level_weights` gives the per-level (weight, bias) lists
             that the released Torch7 files hold (jaxflow's SpyNet converter reads those).

Every model takes RGB frames in [0, 1], (B, 3, H, W) float32, H and W multiples of the model's `multiple`
(64 for PWC-Net / FlowNet, 2**(levels-1) for SpyNet; no resizing here), and returns
  {'flow': (B, 2, H, W) pixels, 'flows': [coarse ... fine], each (B, 2, h_l, w_l) in pixels of the input},
like jaxflow's models (in NCHW). Channel 0 is u (x), channel 1 is v (y).

`make_train_step(model, loss_config, optim_config)` returns a function doing one training step on a batch of
NCHW tensors: forward, jaxflow's multiscale loss (jaxflow.losses: weights coarse to fine, errors on
flow / div_flow, masked block-average downsampling of the ground truth, 'mean' or 'sum' reduction, EPE or the
robust penalty), backward, Adam with coupled (Caffe-style) weight decay on kernels only, as jaxflow.optim.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------------------
# Shared pieces


def _he_init(module: nn.Module) -> None:
  """He (MSRA) normal init with fan_in = k * k * in_channels, zero biases: jaxflow's layers.kaiming."""
  for m in module.modules():
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
      w = m.weight
      # Conv2d weight (O, I, k, k); ConvTranspose2d weight (I, O, k, k): the input channels are I in both.
      cin = w.shape[1] if isinstance(m, nn.Conv2d) else w.shape[0]
      std = math.sqrt(2.0 / (cin * w.shape[2] * w.shape[3]))
      with torch.no_grad():
        w.normal_(0.0, std)
        if m.bias is not None:
          m.bias.zero_()


def conv_lrelu(cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1,
               bias: bool = True) -> nn.Sequential:
  """Sequential(Conv2d 'same'-padded, LeakyReLU 0.1): the released `conv` helper (state dict `<name>.0.*`)."""
  pad = (kernel - 1) // 2 * dilation
  return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, pad, dilation=dilation, bias=bias),
                       nn.LeakyReLU(0.1))


def deconv4x4(cin: int, cout: int, bias: bool = True) -> nn.ConvTranspose2d:
  """ConvTranspose2d(kernel 4, stride 2, padding 1): exactly doubles H and W."""
  return nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=bias)


def backward_warp(x: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  """Bilinear backward warp with grid_sample: out(p) = x(p + flow(p)), pixel centres at integers.

  x (B, C, H, W), flow (B, 2, H, W) in pixels (u, v). Corners outside the image contribute zero (zero padding).
  Returns (warped (B, C, H, W), in-image bilinear weight (B, 1, H, W), 1 where the footprint is inside).
  """
  b, _, h, w = x.shape
  ys = torch.arange(h, dtype=flow.dtype, device=flow.device).view(1, h, 1).expand(b, h, w)
  xs = torch.arange(w, dtype=flow.dtype, device=flow.device).view(1, 1, w).expand(b, h, w)
  gx = (xs + flow[:, 0]) * (2.0 / max(w - 1, 1)) - 1.0
  gy = (ys + flow[:, 1]) * (2.0 / max(h - 1, 1)) - 1.0
  grid = torch.stack([gx, gy], dim=-1)
  warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
  ones = torch.ones((b, 1, h, w), dtype=x.dtype, device=x.device)
  weight = F.grid_sample(ones, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
  return warped, weight


def cost_volume(f1: torch.Tensor, f2: torch.Tensor, max_disp: int, stride: int = 1) -> torch.Tensor:
  """Mean over channels of f1(y, x) * f2(y + dy, x + dx) for dy, dx in -max_disp..max_disp step `stride`.

  f1, f2 (B, C, H, W) -> (B, D, H, W), D = (2 max_disp / stride + 1)^2, channel order dy-major (as jaxflow's
  correlation and the released Correlation layer); f2 is zero outside the image. Shifted products over a
  zero-padded f2, one displacement at a time.
  """
  _, _, h, w = f1.shape
  padded = F.pad(f2, (max_disp, max_disp, max_disp, max_disp))
  out = []
  for dy in range(-max_disp, max_disp + 1, stride):
    for dx in range(-max_disp, max_disp + 1, stride):
      shifted = padded[:, :, max_disp + dy:max_disp + dy + h, max_disp + dx:max_disp + dx + w]
      out.append((f1 * shifted).mean(dim=1))
  return torch.stack(out, dim=1)


def _check_size(x: torch.Tensor, multiple: int, name: str) -> None:
  if x.ndim != 4 or x.shape[1] != 3:
    raise ValueError(f"{name}: expected RGB frames of shape (B, 3, H, W), got {tuple(x.shape)}")
  if x.shape[2] % multiple or x.shape[3] % multiple:
    raise ValueError(f"{name}: H and W must be multiples of {multiple} (the reference does not resize), got "
                     f"{tuple(x.shape[2:])}")


def param_count(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# PWC-Net


class PWCNet(nn.Module):
  """PWC-Net (Sun et al. 2018) as in jaxflow/models/pwcnet.py and the released `pwc_dc_net`.

  Defaults are jaxflow's: pyramid 16/32/64/96/128/196 with `convs_per_level` 3x3 convs (first of stride 2),
  cost volume r = 4 (81 channels) + LeakyReLU, dense estimators 128/128/96/64/32 (new features in front),
  4x4/2 deconvs upflow/upfeat above the output level (2), dilated context network, div_flow 20.
  """

  def _normed(self, f1: torch.Tensor, f2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """jaxflow's cost_volume_norm: 'cosine' divides each feature vector by sqrt(mean_c f^2 + 1e-6)."""
    if self.cost_volume_norm != "cosine":
      return f1, f2
    return tuple(f * torch.rsqrt(f.square().mean(dim=1, keepdim=True) + 1e-6) for f in (f1, f2))

  def __init__(self, search_range: int = 4, pyramid_channels: Sequence[int] = (16, 32, 64, 96, 128, 196),
               convs_per_level: int = 2, estimator_channels: Sequence[int] = (128, 128, 96, 64, 32),
               context_channels: Sequence[int] = (128, 128, 128, 96, 64, 32),
               context_dilations: Sequence[int] = (1, 2, 4, 8, 16, 1), output_level: int = 2,
               div_flow: float = 20.0, cost_volume_norm: str = "none"):
    super().__init__()
    if cost_volume_norm not in ("none", "cosine"):
      raise ValueError(f"torch reference pwcnet: cost_volume_norm must be 'none' or 'cosine', got {cost_volume_norm!r}")
    self.search_range, self.div_flow, self.output_level = search_range, div_flow, output_level
    self.cost_volume_norm = cost_volume_norm
    self.top = len(pyramid_channels)
    self.multiple = 2 ** self.top
    self.convs_per_level = convs_per_level
    self.context_dilations = tuple(context_dilations)
    prev = 3
    for l, c in enumerate(pyramid_channels, start=1):
      for j, n in enumerate(self._pyramid_names(l)):
        setattr(self, f"conv{l}{n}", conv_lrelu(prev if j == 0 else c, c, stride=2 if j == 0 else 1))
      prev = c
    nd = (2 * search_range + 1) ** 2
    est_total = sum(estimator_channels)
    for l in self.decoder_levels:
      cin = nd if l == self.top else nd + pyramid_channels[l - 1] + 4
      for i, c in enumerate(estimator_channels):
        setattr(self, f"conv{l}_{i}", conv_lrelu(cin + sum(estimator_channels[:i]), c))
      setattr(self, f"predict_flow{l}", nn.Conv2d(cin + est_total, 2, 3, 1, 1))
      if l > output_level:
        setattr(self, f"deconv{l}", deconv4x4(2, 2))
        setattr(self, f"upfeat{l}", deconv4x4(cin + est_total, 2))
    out_cin = nd + pyramid_channels[output_level - 1] + 4 + est_total
    prev = out_cin
    for i, (c, d) in enumerate(zip(context_channels, context_dilations), start=1):
      setattr(self, f"dc_conv{i}", conv_lrelu(prev, c, dilation=d))
      prev = c
    setattr(self, f"dc_conv{len(context_channels) + 1}", nn.Conv2d(prev, 2, 3, 1, 1))
    self.n_context = len(context_channels)
    _he_init(self)

  def _pyramid_names(self, level: int) -> tuple[str, ...]:
    if self.convs_per_level == 2:
      return ("a", "b")
    if self.convs_per_level == 3:
      return ("aa", "a", "b") if level == 6 else ("a", "aa", "b")  # the released level-6 naming quirk
    raise ValueError(f"PWCNet reference: convs_per_level must be 2 or 3, got {self.convs_per_level}")

  @property
  def decoder_levels(self) -> list[int]:
    return list(range(self.top, self.output_level - 1, -1))

  def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
    feats = []
    for l in range(1, self.top + 1):
      for n in self._pyramid_names(l):
        x = getattr(self, f"conv{l}{n}")(x)
      feats.append(x)
    return feats

  def estimator(self, x: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
    i = 0
    while hasattr(self, f"conv{level}_{i}"):
      x = torch.cat([getattr(self, f"conv{level}_{i}")(x), x], dim=1)
      i += 1
    return getattr(self, f"predict_flow{level}")(x), x

  def forward(self, image1: torch.Tensor, image2: torch.Tensor) -> dict[str, Any]:
    """image1, image2 (B, 3, H, W) RGB in [0, 1] -> {'flow': (B, 2, H, W), 'flows': levels top..2}, pixels."""
    _check_size(image1, self.multiple, "PWCNet")
    b = image1.shape[0]
    feats = self.pyramid(torch.cat([image1, image2], dim=0).flip(1))  # RGB -> BGR, both frames at once
    f1s, f2s = [f[:b] for f in feats], [f[b:] for f in feats]
    flows = []
    up_flow = up_feat = x = None
    for l in self.decoder_levels:
      f1, f2 = f1s[l - 1], f2s[l - 1]
      if up_flow is None:
        x = F.leaky_relu(cost_volume(*self._normed(f1, f2), self.search_range), 0.1)
      else:
        warped, weight = backward_warp(f2, up_flow * (self.div_flow / 2.0 ** l))
        warped = warped * (weight >= 0.9999).to(warped.dtype)
        corr = F.leaky_relu(cost_volume(*self._normed(f1, warped), self.search_range), 0.1)
        x = torch.cat([corr, f1, up_flow, up_feat], dim=1)
      flow, x = self.estimator(x, l)
      if l > self.output_level:
        up_flow = getattr(self, f"deconv{l}")(flow)
        up_feat = getattr(self, f"upfeat{l}")(x)
      flows.append(flow)
    y = x
    for i in range(1, self.n_context + 1):
      y = getattr(self, f"dc_conv{i}")(y)
    flows[-1] = flows[-1] + getattr(self, f"dc_conv{self.n_context + 1}")(y)
    flows = [f * self.div_flow for f in flows]
    full = F.interpolate(flows[-1], size=image1.shape[2:], mode="bilinear", align_corners=False)
    return {"flow": full, "flows": flows}


# ----------------------------------------------------------------------------------------------------------
# FlowNetS / FlowNetC

ENCODER_NAMES = ("conv1", "conv2", "conv3", "conv3_1", "conv4", "conv4_1", "conv5", "conv5_1", "conv6", "conv6_1")
ENCODER_GEOMETRY = ((7, 2), (5, 2), (5, 2), (3, 1), (3, 2), (3, 1), (3, 2), (3, 1), (3, 2), (3, 1))
ENCODER_FEATURES = (64, 128, 256, 256, 512, 512, 512, 512, 1024, 1024)
DECODER_FEATURES = (512, 256, 128, 64)


class _FlowNetBase(nn.Module):
  """Shared refinement (conv3_1 ... conv6_1, predict_flow6..2, deconvs) of FlowNetS / FlowNetC."""

  multiple = 64

  def _build_refinement(self, cin_conv3_1: int, encoder: Sequence[int], decoder: Sequence[int],
                        flow_upsample_bias: bool) -> None:
    prev = cin_conv3_1
    for i in range(3, 10):
      k, s = ENCODER_GEOMETRY[i]
      setattr(self, ENCODER_NAMES[i], conv_lrelu(prev, encoder[i], k, s))
      prev = encoder[i]
    skips = {5: encoder[7], 4: encoder[5], 3: encoder[3], 2: encoder[1]}
    cin = encoder[9]
    for level, dec in zip((6, 5, 4, 3), decoder):
      setattr(self, f"predict_flow{level}", nn.Conv2d(cin, 2, 3, 1, 1))
      setattr(self, f"upsampled_flow{level}_to_{level - 1}", deconv4x4(2, 2, bias=flow_upsample_bias))
      setattr(self, f"deconv{level - 1}", nn.Sequential(deconv4x4(cin, dec), nn.LeakyReLU(0.1)))
      cin = skips[level - 1] + dec + 2
    self.predict_flow2 = nn.Conv2d(cin, 2, 3, 1, 1)

  def _refine(self, out_conv2: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
    out_conv3 = self.conv3_1(x)
    out_conv4 = self.conv4_1(self.conv4(out_conv3))
    out_conv5 = self.conv5_1(self.conv5(out_conv4))
    x = self.conv6_1(self.conv6(out_conv5))
    skips = {5: out_conv5, 4: out_conv4, 3: out_conv3, 2: out_conv2}
    preds = []
    for level in (6, 5, 4, 3):
      flow = getattr(self, f"predict_flow{level}")(x)
      preds.append(flow)
      flow_up = getattr(self, f"upsampled_flow{level}_to_{level - 1}")(flow)
      x = torch.cat([skips[level - 1], getattr(self, f"deconv{level - 1}")(x), flow_up], dim=1)
    preds.append(self.predict_flow2(x))
    return preds

  def _outputs(self, preds: list[torch.Tensor], size: Sequence[int]) -> dict[str, Any]:
    flows = [p * self.div_flow for p in preds]
    return {"flow": F.interpolate(flows[-1], size=tuple(size), mode="bilinear", align_corners=False),
            "flows": flows}

  @staticmethod
  def _normalise(image1: torch.Tensor, image2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Subtract the per-example, per-channel mean over both frames (FlowNet2's rgb_mean; rgb_max 1)."""
    mean = 0.5 * (image1.mean(dim=(2, 3), keepdim=True) + image2.mean(dim=(2, 3), keepdim=True))
    return image1 - mean, image2 - mean


class FlowNetS(_FlowNetBase):
  """FlowNetS as in jaxflow/models/flownet.py (no batch norm): 6-channel stacked input, div_flow 20."""

  def __init__(self, encoder_features: Sequence[int] = ENCODER_FEATURES,
               decoder_features: Sequence[int] = DECODER_FEATURES, div_flow: float = 20.0):
    super().__init__()
    self.div_flow = div_flow
    enc = tuple(encoder_features)
    self.conv1 = conv_lrelu(6, enc[0], 7, 2)
    self.conv2 = conv_lrelu(enc[0], enc[1], 5, 2)
    self.conv3 = conv_lrelu(enc[1], enc[2], 5, 2)
    self._build_refinement(enc[2], enc, tuple(decoder_features), flow_upsample_bias=False)
    _he_init(self)

  def forward(self, image1: torch.Tensor, image2: torch.Tensor) -> dict[str, Any]:
    _check_size(image1, self.multiple, "FlowNetS")
    a, b = self._normalise(image1, image2)
    out_conv2 = self.conv2(self.conv1(torch.cat([a, b], dim=1)))
    return self._outputs(self._refine(out_conv2, self.conv3(out_conv2)), image1.shape[2:])


class FlowNetC(_FlowNetBase):
  """FlowNetC as in jaxflow/models/flownet.py: siamese conv1-3 (run on each frame, as the released code),
  correlation (max displacement 20, stride 2: 441 channels) + LeakyReLU, conv_redir 1x1 -> 32, refinement."""

  def __init__(self, encoder_features: Sequence[int] = ENCODER_FEATURES,
               decoder_features: Sequence[int] = DECODER_FEATURES, search_range: int = 20, corr_stride: int = 2,
               redir_features: int = 32, div_flow: float = 20.0):
    super().__init__()
    self.div_flow, self.search_range, self.corr_stride = div_flow, search_range, corr_stride
    enc = tuple(encoder_features)
    self.conv1 = conv_lrelu(3, enc[0], 7, 2)
    self.conv2 = conv_lrelu(enc[0], enc[1], 5, 2)
    self.conv3 = conv_lrelu(enc[1], enc[2], 5, 2)
    self.conv_redir = conv_lrelu(enc[2], redir_features, 1, 1)
    n_corr = (2 * search_range // corr_stride + 1) ** 2
    self._build_refinement(redir_features + n_corr, enc, tuple(decoder_features), flow_upsample_bias=True)
    _he_init(self)

  def forward(self, image1: torch.Tensor, image2: torch.Tensor) -> dict[str, Any]:
    _check_size(image1, self.multiple, "FlowNetC")
    a, b = self._normalise(image1, image2)
    conv2a = self.conv2(self.conv1(a))
    conv3a = self.conv3(conv2a)
    conv3b = self.conv3(self.conv2(self.conv1(b)))
    corr = F.leaky_relu(cost_volume(conv3a, conv3b, self.search_range, self.corr_stride), 0.1)
    x = torch.cat([self.conv_redir(conv3a), corr], dim=1)
    return self._outputs(self._refine(conv2a, x), image1.shape[2:])


# ----------------------------------------------------------------------------------------------------------
# SpyNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SpyBasic(nn.Module):
  """One level's G_k: 7x7 convs 8 -> 32 -> 64 -> 32 -> 16 -> 2, ReLU between (state dict netBasic.{0,2,..})."""

  def __init__(self, channels: Sequence[int] = (32, 64, 32, 16), kernel_size: int = 7):
    super().__init__()
    layers: list[nn.Module] = []
    prev = 8
    for c in tuple(channels) + (2,):
      layers += [nn.Conv2d(prev, c, kernel_size, 1, kernel_size // 2), nn.ReLU()]
      prev = c
    self.netBasic = nn.Sequential(*layers[:-1])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.netBasic(x)


class SpyNet(nn.Module):
  """SpyNet (Ranjan & Black 2017) as in jaxflow/models/spynet.py: ImageNet-normalised RGB, 2x2 average-pooling
  pyramid, V_k = up(V_{k-1}) + G_k([I1_k, warp(I2_k, up), up]), up = 2x bilinear (corners aligned) times 2,
  warp by grid_sample with zero padding; each level in its own pixels."""

  def __init__(self, levels: int = 5, channels: Sequence[int] = (32, 64, 32, 16), kernel_size: int = 7):
    super().__init__()
    self.levels = levels
    self.multiple = 2 ** (levels - 1)
    self.netBasic = nn.ModuleList([SpyBasic(channels, kernel_size) for _ in range(levels)])
    self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
    self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
    _he_init(self)

  def forward(self, image1: torch.Tensor, image2: torch.Tensor) -> dict[str, Any]:
    _check_size(image1, self.multiple, "SpyNet")
    pyr = [((image1 - self.mean) / self.std, (image2 - self.mean) / self.std)]
    for _ in range(self.levels - 1):
      pyr.append((F.avg_pool2d(pyr[-1][0], 2), F.avg_pool2d(pyr[-1][1], 2)))
    pyr = pyr[::-1]
    flow = None
    level_flows = []
    for k in range(self.levels):
      i1, i2 = pyr[k]
      if flow is None:
        up = i1.new_zeros((i1.shape[0], 2, i1.shape[2], i1.shape[3]))
        warped = i2
      else:
        up = F.interpolate(flow, scale_factor=2, mode="bilinear", align_corners=True) * 2.0
        warped, _ = backward_warp(i2, up)
      flow = up + self.netBasic[k](torch.cat([i1, warped, up], dim=1))
      level_flows.append(flow)
    flows = [f * float(2 ** (self.levels - 1 - k)) for k, f in enumerate(level_flows)]
    return {"flow": flows[-1], "flows": flows}


def spynet_level_weights(state_dict: Mapping[str, torch.Tensor]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
  """[[(weight (O, I, k, k), bias (O,)) per conv] per level, coarsest first] from a SpyNet state dict: the
  content of the released modelL{k}_*.t7 files."""
  levels = []
  k = 0
  while f"netBasic.{k}.netBasic.0.weight" in state_dict:
    convs = []
    i = 0
    while f"netBasic.{k}.netBasic.{i}.weight" in state_dict:
      convs.append((state_dict[f"netBasic.{k}.netBasic.{i}.weight"], state_dict[f"netBasic.{k}.netBasic.{i}.bias"]))
      i += 2
    levels.append(convs)
    k += 1
  if not levels:
    raise KeyError(f"no 'netBasic.0.netBasic.0.weight' in the state dict (keys start {sorted(state_dict)[:4]})")
  return levels


# ----------------------------------------------------------------------------------------------------------
# Registry, loss, optimiser, training step

_CONSTRUCTORS: dict[str, Callable[..., nn.Module]] = {
    "pwcnet": PWCNet, "flownet_s": FlowNetS, "flownet_c": FlowNetC, "spynet": SpyNet}

# Model fields of jaxflow's config that only change numerics or jaxflow-internal choices, not the network.
_IGNORED_FIELDS = {"name", "dtype", "dense", "context", "batch_norm", "upsample_align_corners"}


def build(name: str, **fields: Any) -> nn.Module:
  """The reference model for a jaxflow model name and (a subset of) its config fields.

  Fields the reference does not implement with a non-default value (dense=False, context=False,
  batch_norm=True, upsample_align_corners=False) raise a ValueError naming the field.
  """
  if name not in _CONSTRUCTORS:
    raise ValueError(f"unknown model {name!r}; torch references exist for {sorted(_CONSTRUCTORS)}")
  unsupported = {"dense": False, "context": False, "batch_norm": True, "upsample_align_corners": False}
  for key, bad in unsupported.items():
    if key in fields and bool(fields[key]) == bad:
      raise ValueError(f"torch reference {name}: field {key}={fields[key]!r} is not implemented")
  kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items() if k not in _IGNORED_FIELDS}
  try:
    return _CONSTRUCTORS[name](**kwargs)
  except TypeError as e:
    raise ValueError(f"torch reference {name}: unsupported config field(s) in {sorted(kwargs)}: {e}") from e


def downsample_flow(flow: torch.Tensor, valid: torch.Tensor, size: Sequence[int]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
  """Ground truth (B, 2, H, W) and mask (B, H, W) to `size` by masked block averaging (integer factors only).

  Returns ((B, 2, h, w) flow, zero where invalid; (B, h, w) {0, 1} mask): jaxflow.losses.downsample_flow."""
  h, w = int(size[0]), int(size[1])
  big_h, big_w = flow.shape[2], flow.shape[3]
  valid = (valid > 0).to(flow.dtype)
  if (h, w) == (big_h, big_w):
    return flow * valid[:, None], valid
  if big_h % h or big_w % w:
    raise ValueError(f"downsample_flow: the reference needs integer factors, got {(big_h, big_w)} -> {(h, w)}")
  fy, fx = big_h // h, big_w // w
  weighted = F.avg_pool2d(flow * valid[:, None], (fy, fx))
  count = F.avg_pool2d(valid[:, None], (fy, fx))[:, 0]
  level_valid = (count > 0).to(flow.dtype)
  return weighted / torch.where(count > 0, count, torch.ones_like(count))[:, None], level_valid


def multiscale_loss(flows: Sequence[torch.Tensor], flow: torch.Tensor, valid: torch.Tensor,
                    loss_config: Mapping[str, Any]) -> torch.Tensor:
  """jaxflow.losses.multiscale_loss in torch: sum_l weight_l * reduce(error_l), errors on flow / div_flow.

  flows: predictions coarse to fine (B, 2, h_l, w_l) in input pixels; flow (B, 2, H, W); valid (B, H, W).
  loss_config: kind ('multiscale_epe' | 'robust'), weights, div_flow, reduction ('mean' | 'sum'), q, eps.
  """
  weights = tuple(loss_config["weights"])
  if len(weights) != len(flows):
    raise ValueError(f"loss weights {weights} do not match the model's {len(flows)} predictions")
  scale = 1.0 / float(loss_config["div_flow"])
  total = flow.new_zeros(())
  for pred, weight in zip(flows, weights):
    target, level_valid = downsample_flow(flow, valid, pred.shape[2:])
    diff = (pred.float() - target) * scale
    if loss_config["kind"] == "multiscale_epe":
      sq = (diff * diff).sum(dim=1)
      error = torch.where(sq > 0, torch.sqrt(torch.where(sq > 0, sq, torch.ones_like(sq))), torch.zeros_like(sq))
    elif loss_config["kind"] == "robust":
      error = (diff.abs().sum(dim=1) + float(loss_config["eps"])) ** float(loss_config["q"])
    else:
      raise ValueError(f"unknown loss kind {loss_config['kind']!r}")
    summed = (error * level_valid).sum()
    if loss_config["reduction"] == "mean":
      level = summed / level_valid.sum().clamp(min=1.0)
    elif loss_config["reduction"] == "sum":
      level = summed / error.shape[0]
    else:
      raise ValueError(f"unknown reduction {loss_config['reduction']!r}")
    total = total + float(weight) * level
  return total


def make_optimizer(model: nn.Module, optim_config: Mapping[str, Any]) -> torch.optim.Adam:
  """Adam (b1, b2, eps, base_lr from jaxflow.optim's config) with coupled weight decay (torch's Adam
  weight_decay adds wd * p to the gradient, Caffe's rule) on kernels only unless decay_biases."""
  wd = float(optim_config.get("weight_decay", 4e-4))
  decay_biases = bool(optim_config.get("decay_biases", False))
  kernels = [p for p in model.parameters() if p.ndim > 1 or decay_biases]
  others = [p for p in model.parameters() if not (p.ndim > 1 or decay_biases)]
  groups = [{"params": kernels, "weight_decay": wd}, {"params": others, "weight_decay": 0.0}]
  return torch.optim.Adam(groups, lr=float(optim_config.get("base_lr", 1e-4)),
                          betas=(float(optim_config.get("b1", 0.9)), float(optim_config.get("b2", 0.999))),
                          eps=float(optim_config.get("eps", 1e-8)))


def make_train_step(model: nn.Module, loss_config: Mapping[str, Any], optim_config: Mapping[str, Any],
                    dtype: str = "float32") -> Callable[[Mapping[str, torch.Tensor]], dict[str, float]]:
  """One training step on a batch {image1, image2 (B, 3, H, W), flow (B, 2, H, W), valid (B, H, W)}.

  dtype 'bfloat16' runs the forward under torch.autocast (CPU bf16; parameters, loss and optimiser float32).
  Returns the step function; it returns {'loss': float, 'epe': float} (a host sync, like jaxflow's logging).
  """
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
  opt = make_optimizer(model, optim_config)
  model.train()

  def step(batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      out = model(batch["image1"], batch["image2"])
    loss = multiscale_loss([f.float() for f in out["flows"]], batch["flow"], batch["valid"], loss_config)
    loss.backward()
    opt.step()
    with torch.no_grad():
      err = torch.linalg.vector_norm(out["flow"].float() - batch["flow"], dim=1)
      valid = batch["valid"]
      epe = (err * valid).sum() / valid.sum().clamp(min=1.0)
    return {"loss": float(loss.detach()), "epe": float(epe)}

  return step


__all__ = ["FlowNetC", "FlowNetS", "PWCNet", "SpyNet", "backward_warp", "build", "cost_volume", "downsample_flow",
           "make_optimizer", "make_train_step", "multiscale_loss", "param_count", "spynet_level_weights"]
