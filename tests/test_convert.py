"""Converted official weights give the flow of independent PyTorch reference forward passes (1e-4 px).

Each test writes a checkpoint in the released format with random weights (torch.save state dicts; Torch7 .t7
files through tests/t7_writer.py), converts it with jaxflow.convert, and compares the jaxflow model's flow
with a forward pass written here in torch.nn.functional following the released code (conv2d,
conv_transpose2d, an explicit shifted-product correlation and a bilinear backward warp written in torch).
"""

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import t7_writer  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments.benchmarks import torch_reference  # noqa: E402  (the benchmark's plain-torch cost volume)
from jaxflow import convert as jconvert  # noqa: E402
from jaxflow.converters.common import ConversionError  # noqa: E402
from jaxflow.predictor import load  # noqa: E402

TOL = 1e-4


# ----------------------------------------------------------------------------------------------------------
# Torch references (NCHW)


def smooth_images(seed, h, w, batch=1):
  """Two smooth random RGB frames in [0, 1] (B, H, W, 3), the second a shifted, slightly changed copy."""
  rng = np.random.default_rng(seed)
  coarse = rng.random((batch, 3, h // 8 + 2, w // 8 + 2)).astype(np.float32)
  big = F.interpolate(torch.from_numpy(coarse), size=(h + 16, w + 16), mode="bicubic", align_corners=False)
  big = big.clamp(0, 1).numpy().transpose(0, 2, 3, 1)
  im1 = big[:, 8:8 + h, 8:8 + w]
  im2 = np.clip(big[:, 5:5 + h, 10:10 + w] + 0.02 * rng.standard_normal((batch, h, w, 3)), 0, 1)
  return np.ascontiguousarray(im1, np.float32), np.ascontiguousarray(im2, np.float32)


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def torch_warp(img, flow):
  """Backward bilinear warp, pixel centres at integers, each out-of-image corner contributes zero.

  Returns (warped (B, C, H, W), sum of in-image corner weights (B, H, W))."""
  b, c, h, w = img.shape
  gy, gx = torch.meshgrid(torch.arange(h, dtype=img.dtype), torch.arange(w, dtype=img.dtype), indexing="ij")
  x = gx + flow[:, 0]
  y = gy + flow[:, 1]
  x0, y0 = torch.floor(x), torch.floor(y)
  out = torch.zeros_like(img)
  wsum = torch.zeros((b, h, w), dtype=img.dtype)
  flat = img.reshape(b, c, h * w)
  for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
    xi, yi = x0 + dx, y0 + dy
    wt = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
    inside = ((xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)).to(img.dtype)
    idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long().reshape(b, 1, h * w).expand(b, c, h * w)
    vals = torch.gather(flat, 2, idx).reshape(b, c, h, w)
    out = out + vals * (wt * inside)[:, None]
    wsum = wsum + wt * inside
  return out, wsum


def lrelu(x):
  return F.leaky_relu(x, 0.1)


def up_bilinear(x, factor, align_corners=False):
  return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=align_corners)


def kaiming(*shape, gain=1.0):
  fan_in = int(np.prod(shape[1:]))
  return torch.randn(*shape) * (gain * np.sqrt(2.0 / fan_in))


def assert_flow_close(jax_flow, torch_flow_nchw, what):
  ref = torch_flow_nchw.detach().numpy().transpose(0, 2, 3, 1)
  got = np.asarray(jax_flow)
  assert got.shape == ref.shape, what
  err = np.abs(got - ref).max()
  assert err < TOL, f"{what}: max |jaxflow - reference| = {err:g} px (flow magnitude {np.abs(ref).max():g})"


# ----------------------------------------------------------------------------------------------------------
# SpyNet (Torch7 .t7 files)

SPY_WIDTHS = (8, 16, 24, 16, 8, 2)  # released G_k: 8 -> 32 -> 64 -> 32 -> 16 -> 2, 7x7; narrower here


def write_spynet(folder, levels, widths=SPY_WIDTHS, kernel=7, variant="F", seed=0, flat_level=None):
  """Writes modelL1_<variant>.t7 ... with random weights; returns [[(w, b) per conv] per level] as torch."""
  torch.manual_seed(seed)
  os.makedirs(folder, exist_ok=True)
  weights = []
  for k in range(levels):
    convs, mods = [], []
    for i in range(len(widths) - 1):
      w = kaiming(widths[i + 1], widths[i], kernel, kernel, gain=0.5 if i == len(widths) - 2 else 1.0)
      b = 0.1 * torch.randn(widths[i + 1])
      convs.append((w, b))
      mods.append(t7_writer.spatial_convolution(w.numpy(), b.numpy(), flat=(k == flat_level)))
      if i < len(widths) - 2:
        mods.append(t7_writer.relu())
    t7_writer.save(os.path.join(folder, f"modelL{k + 1}_{variant}.t7"), t7_writer.sequential(mods))
    weights.append(convs)
  return weights


def spynet_reference(weights, im1, im2):
  """The released recipe: ImageNet-normalised RGB, 2x2 average-pooling pyramid, level 1 on [i1, i2, 0],
  level k on [i1, warp(i2, up), up] with up = 2 x bilinear upsampling of the previous flow with the corners
  aligned (the released code's ScaleBHWD / the PyTorch port's align_corners=True), residual added; returns
  the finest flow (B, 2, H, W)."""
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
  a, b = (nchw(im1) - mean) / std, (nchw(im2) - mean) / std
  pyr = [(a, b)]
  for _ in range(len(weights) - 1):
    pyr.append((F.avg_pool2d(pyr[-1][0], 2), F.avg_pool2d(pyr[-1][1], 2)))
  pyr = pyr[::-1]
  flow = None
  for k, convs in enumerate(weights):
    i1, i2 = pyr[k]
    if flow is None:
      up = torch.zeros(i1.shape[0], 2, i1.shape[2], i1.shape[3])
      warped = i2
    else:
      up = up_bilinear(flow, 2, align_corners=True) * 2
      warped, _ = torch_warp(i2, up)
    x = torch.cat([i1, warped, up], 1)
    for i, (w, bias) in enumerate(convs):
      x = F.conv2d(x, w, bias, padding=w.shape[-1] // 2)
      if i < len(convs) - 1:
        x = F.relu(x)
    flow = up + x
  return flow


def test_spynet_t7_matches_reference(tmp_path):
  weights = write_spynet(str(tmp_path / "models"), levels=4, flat_level=2)
  result = jconvert.convert("spynet", str(tmp_path / "models"), str(tmp_path / "out"))
  assert result["model"]["levels"] == 4 and result["model"]["channels"] == list(SPY_WIDTHS[1:-1])
  assert result["model"]["kernel_size"] == 7
  im1, im2 = smooth_images(0, 64, 64)
  with torch.no_grad():
    ref = spynet_reference(weights, im1, im2)
  assert float(ref.abs().max()) > 0.5  # the warps move pixels: a non-trivial comparison
  predictor = load(str(tmp_path / "out"))
  assert_flow_close(predictor.predict(im1[0], im2[0])[None], ref, "spynet flow")
  # The paper's level-by-level structure: keeping the 2 coarsest levels is the reference on 2 levels.
  jconvert.convert("spynet", str(tmp_path / "models") + "/modelL", str(tmp_path / "out2"), levels=2)
  small1, small2 = smooth_images(1, 16, 16)
  with torch.no_grad():
    ref2 = spynet_reference(weights[:2], small1, small2)
  assert_flow_close(load(str(tmp_path / "out2")).predict(small1, small2), ref2, "spynet 2 levels")


def test_spynet_source_errors(tmp_path):
  folder = str(tmp_path / "m")
  write_spynet(folder, levels=2, widths=(8, 4, 2), kernel=3)
  write_spynet(folder, levels=2, widths=(8, 4, 2), kernel=3, variant="C")
  with pytest.raises(ConversionError, match=r"several released variants \['C', 'F'\]"):
    jconvert.convert_weights("spynet", folder)
  fields, _, _, _ = jconvert.convert_weights("spynet", folder, variant="C")
  assert fields["levels"] == 2 and fields["channels"] == [4]
  os.remove(os.path.join(folder, "modelL1_F.t7"))
  with pytest.raises(ConversionError, match=r"missing \[1\]"):
    jconvert.convert_weights("spynet", os.path.join(folder, "modelL*_F.t7"))
  with pytest.raises(FileNotFoundError, match="no level files"):
    jconvert.convert_weights("spynet", str(tmp_path / "empty_prefix"))
  bad = str(tmp_path / "bad")
  write_spynet(bad, levels=1, widths=(6, 4, 2), kernel=3)
  with pytest.raises(ConversionError, match="modelL1_F.t7.*maps 6 -> 2"):
    jconvert.convert_weights("spynet", bad)


# ----------------------------------------------------------------------------------------------------------
# PWC-Net (NVlabs PyTorch state dict)

# The released layout (6 levels, 3 convs each with the conv6aa quirk, dense 5-conv estimators, md = 4, 7-layer
# context network) with narrower widths (released: 16..196 / 128, 128, 96, 64, 32 / 128, 128, 128, 96, 64, 32).
PWC_PYRAMID = (8, 8, 16, 16, 24, 24)
PWC_EST = (16, 16, 12, 8, 8)
PWC_CTX = ((16, 1), (16, 2), (16, 4), (12, 8), (8, 16), (8, 1))


def pwc_state_dict(seed=0):
  """Random weights under the released names of pwc_dc_net (md = 4, 3 convs per level), narrow widths."""
  torch.manual_seed(seed)
  sd = {}

  def conv(name, cin, cout, k=3, seq=True, gain=1.0):
    prefix = f"{name}.0" if seq else name
    sd[f"{prefix}.weight"] = kaiming(cout, cin, k, k, gain=gain)
    sd[f"{prefix}.bias"] = 0.05 * torch.randn(cout)

  def deconv(name, cin, cout):
    sd[f"{name}.weight"] = kaiming(cin, cout, 4, 4, gain=0.5)  # ConvTranspose2d: (in, out, k, k)
    sd[f"{name}.bias"] = 0.05 * torch.randn(cout)

  prev = 3
  for l, c in enumerate(PWC_PYRAMID, start=1):
    names = ("aa", "a", "b") if l == 6 else ("a", "aa", "b")
    for j, n in enumerate(names):
      conv(f"conv{l}{n}", prev if j == 0 else c, c)
    prev = c
  nd = 81
  for l in (6, 5, 4, 3, 2):
    od = nd if l == 6 else nd + PWC_PYRAMID[l - 1] + 4
    for i, c in enumerate(PWC_EST):
      conv(f"conv{l}_{i}", od + sum(PWC_EST[:i]), c)
    conv(f"predict_flow{l}", od + sum(PWC_EST), 2, seq=False, gain=0.3)
    deconv(f"deconv{l}", 2, 2)  # the released module also defines deconv2 (unused)
    if l > 2:
      deconv(f"upfeat{l}", od + sum(PWC_EST), 2)
  prev = nd + PWC_PYRAMID[1] + 4 + sum(PWC_EST)
  for i, (c, _) in enumerate(PWC_CTX, start=1):
    conv(f"dc_conv{i}", prev, c)
    prev = c
  conv("dc_conv7", PWC_CTX[-1][0], 2, seq=False, gain=0.3)
  return sd


def pwc_reference(sd, im1, im2):
  """The released PWCDCNet forward pass (eval): returns (flow2 * 20 at 1/4 size, flow at the input size)."""
  def conv(x, name, stride=1, dilation=1, act=True):
    key = f"{name}.0" if f"{name}.0.weight" in sd else name
    y = F.conv2d(x, sd[f"{key}.weight"], sd[f"{key}.bias"], stride=stride, padding=dilation, dilation=dilation)
    return lrelu(y) if act else y

  def deconv(x, name):
    return F.conv_transpose2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], stride=2, padding=1)

  def pyramid(x):
    feats = []
    for l in range(1, 7):
      names = ("aa", "a", "b") if l == 6 else ("a", "aa", "b")
      for j, n in enumerate(names):
        x = conv(x, f"conv{l}{n}", stride=2 if j == 0 else 1)
      feats.append(x)
    return feats

  def estimator(x, l):
    for i in range(5):
      x = torch.cat([conv(x, f"conv{l}_{i}"), x], 1)
    return x

  def warp(x, flo):
    out, wsum = torch_warp(x, flo)
    mask = (wsum >= 0.9999).to(x.dtype)
    return out * mask[:, None]

  bgr1, bgr2 = nchw(im1)[:, [2, 1, 0]], nchw(im2)[:, [2, 1, 0]]
  c1, c2 = pyramid(bgr1), pyramid(bgr2)
  x = estimator(lrelu(torch_reference.cost_volume(c1[5], c2[5], 4, 1)), 6)
  scales = {5: 0.625, 4: 1.25, 3: 2.5, 2: 5.0}
  flow = None
  for l in (5, 4, 3, 2):
    flow = conv(x, f"predict_flow{l + 1}", act=False)
    up_flow, up_feat = deconv(flow, f"deconv{l + 1}"), deconv(x, f"upfeat{l + 1}")
    warped = warp(c2[l - 1], up_flow * scales[l])
    corr = lrelu(torch_reference.cost_volume(c1[l - 1], warped, 4, 1))
    x = estimator(torch.cat([corr, c1[l - 1], up_flow, up_feat], 1), l)
  flow2 = conv(x, "predict_flow2", act=False)
  y = x
  for i, (_, d) in enumerate(PWC_CTX, start=1):
    y = conv(y, f"dc_conv{i}", dilation=d)
  flow2 = flow2 + conv(y, "dc_conv7", act=False)
  return flow2 * 20.0, up_bilinear(flow2 * 20.0, 4)


def test_pwcnet_state_dict_matches_reference(tmp_path):
  sd = pwc_state_dict()
  torch.save(sd, str(tmp_path / "pwc_net.pth.tar"))
  result = jconvert.convert("pwcnet", str(tmp_path / "pwc_net.pth.tar"), str(tmp_path / "out"))
  fields = result["model"]
  assert fields["pyramid_channels"] == list(PWC_PYRAMID) and fields["convs_per_level"] == 3
  assert fields["search_range"] == 4 and fields["estimator_channels"] == list(PWC_EST)
  assert fields["output_level"] == 2 and fields["dense"] and fields["context"]
  assert fields["context_channels"] == [c for c, _ in PWC_CTX]
  assert any("deconv2" in n for n in result["notes"])
  assert result["params"] == sum(v.numel() for k, v in sd.items() if not k.startswith("deconv2"))
  im1, im2 = smooth_images(2, 64, 128)
  with torch.no_grad():
    ref_quarter, ref_full = pwc_reference(sd, im1, im2)
  assert float(ref_quarter.abs().max()) > 0.5
  predictor = load(str(tmp_path / "out"))
  out = jax.jit(predictor.model.apply)(predictor.variables, jnp.asarray(im1), jnp.asarray(im2))
  assert_flow_close(out["flows"][-1], ref_quarter, "pwcnet flow2 (1/4 resolution)")
  assert_flow_close(out["flow"], ref_full, "pwcnet full-resolution flow")


def test_pwcnet_shape_mismatch_names_the_layer(tmp_path):
  sd = pwc_state_dict()
  sd["conv4_2.0.weight"] = sd["conv4_2.0.weight"][:, :-1]
  torch.save({"state_dict": sd}, str(tmp_path / "bad.pth"))
  with pytest.raises(ConversionError, match=r"bad.pth: released layer 'conv4_2' -> params 'estimator4/conv2/kernel'"):
    jconvert.convert("pwcnet", str(tmp_path / "bad.pth"), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")  # nothing written on error
  sd = pwc_state_dict()
  sd["extra_head.weight"] = torch.zeros(3)
  torch.save(sd, str(tmp_path / "extra.pth"))
  with pytest.raises(ConversionError, match="extra_head.weight"):
    jconvert.convert_weights("pwcnet", str(tmp_path / "extra.pth"))


# ----------------------------------------------------------------------------------------------------------
# FlowNetS / FlowNetC (FlowNet2-PyTorch state dicts), small widths

ENC = (8, 8, 16, 16, 16, 16, 16, 16, 32, 32)  # conv1 ... conv6_1 (released: 64 ... 1024)
DEC = (16, 8, 8, 4)  # deconv5 ... deconv2 (released: 512, 256, 128, 64)
GEOM = ((7, 2), (5, 2), (5, 2), (3, 1), (3, 2), (3, 1), (3, 2), (3, 1), (3, 2), (3, 1))
NAMES = ("conv1", "conv2", "conv3", "conv3_1", "conv4", "conv4_1", "conv5", "conv5_1", "conv6", "conv6_1")


def flownet_state_dict(kind, batch_norm, seed=0, redir=8, corr=441):
  torch.manual_seed(seed)
  sd = {}

  def block(name, cin, cout, k):
    sd[f"{name}.0.weight"] = kaiming(cout, cin, k, k)
    if batch_norm:
      sd[f"{name}.1.weight"] = 1 + 0.1 * torch.randn(cout)
      sd[f"{name}.1.bias"] = 0.1 * torch.randn(cout)
      sd[f"{name}.1.running_mean"] = 0.1 * torch.randn(cout)
      sd[f"{name}.1.running_var"] = 0.5 + torch.rand(cout)
      sd[f"{name}.1.num_batches_tracked"] = torch.tensor(100)
    else:
      sd[f"{name}.0.bias"] = 0.05 * torch.randn(cout)

  prev = 3 if kind == "c" else 6
  for i, (name, (k, _)) in enumerate(zip(NAMES, GEOM)):
    if kind == "c" and name == "conv3_1":
      block("conv_redir", ENC[2], redir, 1)
      prev = redir + corr
    block(name, prev, ENC[i], k)
    prev = ENC[i]
  skips = {5: ENC[7], 4: ENC[5], 3: ENC[3], 2: ENC[1]}
  cin = ENC[9]
  for level, dec in zip((6, 5, 4, 3), DEC):
    sd[f"predict_flow{level}.weight"] = kaiming(2, cin, 3, 3, gain=0.3)
    sd[f"predict_flow{level}.bias"] = 0.05 * torch.randn(2)
    sd[f"upsampled_flow{level}_to_{level - 1}.weight"] = kaiming(2, 2, 4, 4, gain=0.5)
    if kind == "c":
      sd[f"upsampled_flow{level}_to_{level - 1}.bias"] = 0.05 * torch.randn(2)
    sd[f"deconv{level - 1}.0.weight"] = kaiming(cin, dec, 4, 4)
    sd[f"deconv{level - 1}.0.bias"] = 0.05 * torch.randn(dec)
    cin = skips[level - 1] + dec + 2
  sd["predict_flow2.weight"] = kaiming(2, cin, 3, 3, gain=0.3)
  sd["predict_flow2.bias"] = 0.05 * torch.randn(2)
  return sd


def flownet_reference(sd, kind, im1, im2, bgr=False):
  """FlowNet2-PyTorch's FlowNet2S / FlowNet2C forward (eval): returns (flow2 * 20, 4x bilinear upsampled)."""
  bn = "conv1.1.running_mean" in sd

  def block(x, name, k, s):
    y = F.conv2d(x, sd[f"{name}.0.weight"], sd.get(f"{name}.0.bias"), stride=s, padding=(k - 1) // 2)
    if bn:
      y = F.batch_norm(y, sd[f"{name}.1.running_mean"], sd[f"{name}.1.running_var"], sd[f"{name}.1.weight"],
                       sd[f"{name}.1.bias"], training=False, eps=1e-5)
    return lrelu(y)

  a, b = nchw(im1) * 255.0, nchw(im2) * 255.0  # FlowNet2-PyTorch: [0, 255] frames, rgb_max = 255
  mean = torch.stack([a, b], 2).reshape(a.shape[0], 3, -1).mean(-1).view(-1, 3, 1, 1)
  a, b = (a - mean) / 255.0, (b - mean) / 255.0
  if bgr:
    a, b = a[:, [2, 1, 0]], b[:, [2, 1, 0]]
  if kind == "s":
    x = block(torch.cat([a, b], 1), "conv1", 7, 2)
    conv2 = block(x, "conv2", 5, 2)
    x = block(conv2, "conv3", 5, 2)
  else:
    c1a, c1b = block(a, "conv1", 7, 2), block(b, "conv1", 7, 2)
    conv2, c2b = block(c1a, "conv2", 5, 2), block(c1b, "conv2", 5, 2)
    c3a, c3b = block(conv2, "conv3", 5, 2), block(c2b, "conv3", 5, 2)
    corr = lrelu(torch_reference.cost_volume(c3a, c3b, 20, 2))
    x = torch.cat([block(c3a, "conv_redir", 1, 1), corr], 1)
  skips = {}
  for name, (k, s) in zip(NAMES[3:], GEOM[3:]):
    x = block(x, name, k, s)
    skips[name] = x
  skip_of = {5: skips["conv5_1"], 4: skips["conv4_1"], 3: skips["conv3_1"], 2: conv2}
  for level in (6, 5, 4, 3):
    flow = F.conv2d(x, sd[f"predict_flow{level}.weight"], sd[f"predict_flow{level}.bias"], padding=1)
    up = f"upsampled_flow{level}_to_{level - 1}"
    flow_up = F.conv_transpose2d(flow, sd[f"{up}.weight"], sd.get(f"{up}.bias"), stride=2, padding=1)
    dec = lrelu(F.conv_transpose2d(x, sd[f"deconv{level - 1}.0.weight"], sd[f"deconv{level - 1}.0.bias"],
                                   stride=2, padding=1))
    x = torch.cat([skip_of[level - 1], dec, flow_up], 1)
  flow2 = F.conv2d(x, sd["predict_flow2.weight"], sd["predict_flow2.bias"], padding=1) * 20.0
  return flow2, up_bilinear(flow2, 4)


@pytest.mark.parametrize("kind,batch_norm,size,bgr", [("s", False, (64, 128), False), ("s", True, (128, 64), True),
                                                       ("c", False, (128, 128), False)])
def test_flownet_state_dict_matches_reference(tmp_path, kind, batch_norm, size, bgr):
  sd = flownet_state_dict(kind, batch_norm)
  path = str(tmp_path / f"FlowNet2-{kind.upper()}_checkpoint.pth.tar")
  torch.save({"state_dict": sd, "epoch": 3, "best_EPE": 1.5}, path)
  model = f"flownet_{kind}"
  result = jconvert.convert(model, path, str(tmp_path / "out"), bgr=bgr)
  fields = result["model"]
  assert fields["batch_norm"] == batch_norm
  assert fields["encoder_features"] == list(ENC) and fields["decoder_features"] == list(DEC)
  if kind == "c":
    assert fields["search_range"] == 20 and fields["corr_stride"] == 2 and fields["redir_features"] == 8
  im1, im2 = smooth_images(3, *size)
  with torch.no_grad():
    ref_quarter, ref_full = flownet_reference(sd, kind, im1, im2, bgr=bgr)
  assert float(ref_quarter.abs().max()) > 0.5
  predictor = load(str(tmp_path / "out"))
  assert ("batch_stats" in predictor.variables) == batch_norm
  out = jax.jit(predictor.model.apply)(predictor.variables, jnp.asarray(im1), jnp.asarray(im2))
  assert_flow_close(out["flows"][-1], ref_quarter, f"{model} flow2")
  assert_flow_close(out["flow"], ref_full, f"{model} full-resolution flow")


def test_flownet_wrong_model_and_wrong_shapes(tmp_path):
  sd = flownet_state_dict("s", False)
  torch.save({"state_dict": sd}, str(tmp_path / "s.pth"))
  with pytest.raises(ConversionError, match="is a FlowNetS.*flownet_c"):
    jconvert.convert_weights("flownet_c", str(tmp_path / "s.pth"))
  sd["deconv3.0.weight"] = sd["deconv3.0.weight"][:, :-1]
  torch.save({"state_dict": sd}, str(tmp_path / "s2.pth"))
  with pytest.raises(ConversionError, match="s2.pth.*'deconv3'|s2.pth.*deconv3"):
    jconvert.convert("flownet_s", str(tmp_path / "s2.pth"), str(tmp_path / "out"))
  big = flownet_state_dict("s", False)
  big["conv1.0.weight"] = torch.zeros(ENC[0], 12, 7, 7)
  torch.save(big, str(tmp_path / "s12.pth"))
  with pytest.raises(ConversionError, match="12 input channels"):
    jconvert.convert_weights("flownet_s", str(tmp_path / "s12.pth"))
