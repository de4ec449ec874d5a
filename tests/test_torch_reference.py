"""The PyTorch reference models of the throughput benchmark are jaxflow's networks.

experiments/benchmarks/torch_reference.py: each torch model has jaxflow's exact parameter count, and its
state dict converted by jaxflow's own converter (PWC-Net / FlowNet: the PyTorch state-dict converters; SpyNet:
the Torch7 level files the released model ships, written with tests/t7_writer.py) gives a jaxflow forward pass
equal to the torch forward pass at 64x64. The torch multiscale loss and the Adam + coupled weight decay step
equal jaxflow.losses / jaxflow.optim on the same inputs.
"""

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import t7_writer  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments.benchmarks import torch_reference as tr  # noqa: E402
from jaxflow import convert as jconvert  # noqa: E402
from jaxflow import losses, optim  # noqa: E402
from jaxflow.models import get_model  # noqa: E402

MODELS = ("pwcnet", "spynet", "flownet_s", "flownet_c")
README_COUNTS = {"pwcnet": 8_749_214, "spynet": 1_200_250, "flownet_s": 38_676_506, "flownet_c": 39_175_298}
TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
  """Small torch ops on a shared 2-core machine: a second OpenMP thread only adds spin-waiting."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def jax_param_count(name):
  model = get_model(name)
  spec = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  shapes = jax.eval_shape(lambda k, a, b: model.init({"params": k}, a, b), jax.random.key(0), spec, spec)
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("name", MODELS)
def test_parameter_counts_equal_jaxflow(name):
  torch_count = tr.param_count(tr.build(name))
  assert torch_count == jax_param_count(name) == README_COUNTS[name]


def test_released_pwcnet_layout_count():
  # The released pwc_dc_net (3 convs per level) count from the README.
  assert tr.param_count(tr.PWCNet(convs_per_level=3)) == 9_374_274


def smooth_pair(seed, h, w, batch=2):
  """Two smooth RGB frames (B, H, W, 3) in [0, 1], the second shifted by (3, -2) px plus a little noise."""
  rng = np.random.default_rng(seed)
  coarse = torch.from_numpy(rng.random((batch, 3, h // 8 + 2, w // 8 + 2)).astype(np.float32))
  big = torch.nn.functional.interpolate(coarse, size=(h + 16, w + 16), mode="bicubic", align_corners=False)
  big = big.clamp(0, 1).numpy().transpose(0, 2, 3, 1)
  im1 = big[:, 8:8 + h, 8:8 + w]
  im2 = np.clip(big[:, 6:6 + h, 11:11 + w] + 0.02 * rng.standard_normal((batch, h, w, 3)), 0, 1)
  return np.ascontiguousarray(im1, np.float32), np.ascontiguousarray(im2, np.float32)


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def randomise_biases(model, seed):
  """Nonzero biases (the He init leaves them at zero) so that their conversion is exercised too."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.copy_(0.05 * torch.randn(p.shape, generator=g))


def convert_torch_model(name, model, folder):
  """Writes the model's weights in the released file format and converts them with jaxflow.convert."""
  sd = model.state_dict()
  if name == "spynet":
    for k, convs in enumerate(tr.spynet_level_weights(sd)):
      mods = []
      for i, (w, b) in enumerate(convs):
        mods.append(t7_writer.spatial_convolution(w.numpy(), b.numpy()))
        if i < len(convs) - 1:
          mods.append(t7_writer.relu())
      t7_writer.save(os.path.join(folder, f"modelL{k + 1}_F.t7"), t7_writer.sequential(mods))
    source = folder
  else:
    source = os.path.join(folder, "weights.pth")
    torch.save(sd if name == "pwcnet" else {"state_dict": sd}, source)
  fields, variables, _, _ = jconvert.convert_weights(name, source)
  return fields, variables


@pytest.mark.parametrize("name", MODELS)
def test_converted_state_dict_gives_the_same_forward(tmp_path, name):
  torch.manual_seed(0)
  model = tr.build(name)
  randomise_biases(model, 1)
  model.eval()
  im1, im2 = smooth_pair(2, 64, 64)
  with torch.no_grad():
    ref = model(nchw(im1), nchw(im2))
  fields, variables = convert_torch_model(name, model, str(tmp_path))
  jmodel = get_model(fields.pop("name"), **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
  out = jax.jit(jmodel.apply)(variables, jnp.asarray(im1), jnp.asarray(im2))
  assert len(out["flows"]) == len(ref["flows"])
  for level, (got, want) in enumerate(zip(out["flows"] + [out["flow"]], ref["flows"] + [ref["flow"]])):
    want = want.numpy().transpose(0, 2, 3, 1)
    assert np.asarray(got).shape == want.shape, (name, level)
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(np.asarray(got) - want).max())
    assert err < TOL * scale, f"{name} output {level}: max |jaxflow - torch| = {err:g} (|flow| max {scale:g})"
  # Not a trivial comparison: the final flow is far from zero.
  assert float(ref["flow"].abs().max()) > 0.5


def test_warp_and_cost_volume_building_blocks():
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.standard_normal((1, 2, 6, 7)).astype(np.float32))
  # An integer flow of (+1, +2) px samples x(y + 2, x + 1); rows/cols that leave the image get 0 and weight 0.
  flow = torch.zeros(1, 2, 6, 7)
  flow[:, 0], flow[:, 1] = 1.0, 2.0
  warped, weight = tr.backward_warp(x, flow)
  np.testing.assert_allclose(warped[0, :, :4, :6].numpy(), x[0, :, 2:, 1:].numpy(), atol=1e-6)
  assert float(warped[0, :, 4:].abs().max()) == 0.0 and float(warped[0, :, :, 6:].abs().max()) == 0.0
  assert float(weight[0, 0, :4, :6].min()) > 0.9999 and float(weight[0, 0, 4:].max()) < 1e-6
  # The cost volume of a map with itself peaks at zero displacement (channel 4 of 9 for r = 1) and equals
  # the channel mean of the product at each displacement.
  f = torch.from_numpy(rng.standard_normal((1, 4, 5, 5)).astype(np.float32))
  cv = tr.cost_volume(f, f, 1)
  assert cv.shape == (1, 9, 5, 5)
  np.testing.assert_allclose(cv[0, 4].numpy(), (f[0] * f[0]).mean(0).numpy(), rtol=1e-6)
  # dy = -1, dx = +1 is channel 2: f(y, x) * f(y - 1, x + 1).
  np.testing.assert_allclose(cv[0, 2, 1:, :4].numpy(), (f[0, :, 1:, :4] * f[0, :, :4, 1:]).mean(0).numpy(),
                             rtol=1e-5)
  assert float(cv[0, 2, 0].abs().max()) == 0.0


@pytest.mark.parametrize("kind,reduction", [("multiscale_epe", "mean"), ("multiscale_epe", "sum"), ("robust", "sum")])
def test_multiscale_loss_equals_jaxflow(kind, reduction):
  rng = np.random.default_rng(1)
  gt = (rng.standard_normal((2, 16, 32, 2)) * 4).astype(np.float32)
  valid = (rng.random((2, 16, 32)) > 0.3).astype(np.float32)
  preds = [(rng.standard_normal((2, 16 // f, 32 // f, 2)) * 4).astype(np.float32) for f in (8, 4, 2, 1)]
  cfg = {"kind": kind, "weights": (0.32, 0.08, 0.02, 0.01), "div_flow": 20.0, "reduction": reduction,
         "q": 0.4, "eps": 0.01}
  want, _ = losses.multiscale_loss([jnp.asarray(p) for p in preds], jnp.asarray(gt), jnp.asarray(valid),
                                   cfg["weights"], kind=kind, div_flow=20.0, reduction=reduction, q=0.4, eps=0.01)
  got = tr.multiscale_loss([torch.from_numpy(p.transpose(0, 3, 1, 2)) for p in preds],
                           torch.from_numpy(gt.transpose(0, 3, 1, 2)), torch.from_numpy(valid), cfg)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_adam_with_coupled_decay_equals_jaxflow_optimizer():
  rng = np.random.default_rng(2)
  kernel = rng.standard_normal((3, 3, 2, 4)).astype(np.float32)
  bias = rng.standard_normal((4,)).astype(np.float32)
  grads = [(rng.standard_normal(kernel.shape).astype(np.float32), rng.standard_normal(bias.shape).astype(np.float32))
           for _ in range(3)]
  cfg = optim.default_config()
  cfg.schedule = "constant"
  cfg.base_lr = 1e-2  # large enough that the decay term and Adam's moments matter at 1e-6
  cfg.weight_decay = 0.1
  tx = optim.make_optimizer(cfg, 10)
  params = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
  state = tx.init(params)
  for gk, gb in grads:
    updates, state = tx.update({"kernel": jnp.asarray(gk), "bias": jnp.asarray(gb)}, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)

  module = torch.nn.Conv2d(2, 4, 3)
  with torch.no_grad():
    module.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1)))
    module.bias.copy_(torch.from_numpy(bias))
  opt = tr.make_optimizer(module, dict(cfg))
  for gk, gb in grads:
    module.weight.grad = torch.from_numpy(np.ascontiguousarray(gk.transpose(3, 2, 0, 1)))
    module.bias.grad = torch.from_numpy(gb)
    opt.step()
  np.testing.assert_allclose(module.weight.detach().numpy().transpose(2, 3, 1, 0), np.asarray(params["kernel"]),
                             atol=1e-6)
  np.testing.assert_allclose(module.bias.detach().numpy(), np.asarray(params["bias"]), atol=1e-6)
  # The decay acted on the kernel only: without it the kernel would differ, the bias would not.
  assert np.abs(module.weight.detach().numpy().transpose(2, 3, 1, 0) - kernel).max() > 1e-3


def test_train_step_reduces_the_loss_and_rejects_bad_sizes():
  torch.manual_seed(0)
  model = tr.build("spynet", levels=3)
  loss_cfg = {"kind": "multiscale_epe", "weights": (1.0, 1.0, 1.0), "div_flow": 1.0, "reduction": "mean",
              "q": 0.4, "eps": 0.01}
  step = tr.make_train_step(model, loss_cfg, {"base_lr": 1e-3})
  im1, im2 = smooth_pair(3, 32, 32)
  batch = {"image1": nchw(im1), "image2": nchw(im2), "flow": torch.zeros(2, 2, 32, 32) + torch.tensor([3.0, -2.0]).view(1, 2, 1, 1),
           "valid": torch.ones(2, 32, 32)}
  first = step(batch)["loss"]
  for _ in range(10):
    last = step(batch)["loss"]
  assert last < 0.7 * first
  with pytest.raises(ValueError, match=r"multiples of 4.*\(30, 32\)"):
    model(torch.zeros(1, 3, 30, 32), torch.zeros(1, 3, 30, 32))
  with pytest.raises(ValueError, match="batch_norm"):
    tr.build("flownet_s", batch_norm=True)


def test_cosine_cost_volume_pwcnet_equals_jaxflow(tmp_path):
  # configs/pwcnet.py:local trains with cost_volume_norm='cosine': the torch reference must build and match it.
  torch.manual_seed(3)
  model = tr.build("pwcnet", cost_volume_norm="cosine")
  randomise_biases(model, 4)
  model.eval()
  im1, im2 = smooth_pair(5, 64, 64)
  with torch.no_grad():
    ref = model(nchw(im1), nchw(im2))["flow"].numpy().transpose(0, 2, 3, 1)
  fields, variables = convert_torch_model("pwcnet", model, str(tmp_path))
  fields.pop("name")
  fields["cost_volume_norm"] = "cosine"
  jmodel = get_model("pwcnet", **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
  got = np.asarray(jax.jit(jmodel.apply)(variables, jnp.asarray(im1), jnp.asarray(im2))["flow"])
  scale = max(1.0, float(np.abs(ref).max()))
  assert float(np.abs(got - ref).max()) < TOL * scale
  # The normalisation changes the network's output (the test would not notice a missing one otherwise).
  with torch.no_grad():
    plain = tr.build("pwcnet")
    plain.load_state_dict(model.state_dict())
    plain.eval()
    other = plain(nchw(im1), nchw(im2))["flow"].numpy().transpose(0, 2, 3, 1)
  assert float(np.abs(other - ref).max()) > 10 * TOL * scale
  with pytest.raises(ValueError, match="cost_volume_norm"):
    tr.build("pwcnet", cost_volume_norm="l2")
