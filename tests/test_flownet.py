"""FlowNetS / FlowNetC: exact parameter counts from the released layer lists, an independent reference forward
pass, the contract details specific to FlowNet (div_flow, input normalisation, resizing), and overfitting."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxflow import losses
from jaxflow.models import flownet, get_model
from sharding_helpers import check_sharded_step

# ---------------------------------------------------------------------------------------------------------
# Parameter counts by hand, from the FlowNet2-PyTorch layer lists: (kernel, in, out, bias) per layer.


def _count(layer_list) -> int:
  return sum(k * k * cin * cout + (cout if bias else 0) for k, cin, cout, bias in layer_list)


def _flownet_layers(first_in: int, conv3_1_in: int, bn: bool, flow_up_bias: bool, redir: bool):
  nb = not bn  # convolutions of the encoder lose their bias under batch norm
  encoder = [(7, first_in, 64, nb), (5, 64, 128, nb), (5, 128, 256, nb), (3, conv3_1_in, 256, nb),
             (3, 256, 512, nb), (3, 512, 512, nb), (3, 512, 512, nb), (3, 512, 512, nb), (3, 512, 1024, nb),
             (3, 1024, 1024, nb)]
  if redir:
    encoder.append((1, 256, 32, nb))
  deconvs = [(4, 1024, 512, True), (4, 1026, 256, True), (4, 770, 128, True), (4, 386, 64, True)]
  predicts = [(3, c, 2, True) for c in (1024, 1026, 770, 386, 194)]
  flow_ups = [(4, 2, 2, flow_up_bias)] * 4
  bn_params = sum(2 * cout for _, _, cout, _ in encoder) if bn else 0  # scale and offset per channel
  bn_stats = bn_params  # running mean and variance
  return _count(encoder + deconvs + predicts + flow_ups) + bn_params, bn_stats


def _variable_counts(name: str, **config) -> tuple[int, int]:
  model = get_model(name, **config)
  x = jnp.zeros((1, 64, 64, 3), jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x, x)
  count = lambda tree: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))
  return count(shapes["params"]), count(shapes.get("batch_stats", {}))


@pytest.mark.parametrize("batch_norm", [False, True])
def test_flownet_s_parameter_count(batch_norm):
  params, stats = _variable_counts("flownet_s", batch_norm=batch_norm)
  want_params, want_stats = _flownet_layers(6, 256, batch_norm, flow_up_bias=False, redir=False)
  assert (params, stats) == (want_params, want_stats)
  if not batch_norm:
    assert params == 38_676_506  # FlowNetS: 38.68 M


@pytest.mark.parametrize("batch_norm", [False, True])
def test_flownet_c_parameter_count(batch_norm):
  params, stats = _variable_counts("flownet_c", batch_norm=batch_norm)
  want_params, want_stats = _flownet_layers(3, 32 + 441, batch_norm, flow_up_bias=True, redir=True)
  assert (params, stats) == (want_params, want_stats)
  if not batch_norm:
    assert params == 39_175_298  # FlowNetC: 39.18 M


def test_configurable_widths_and_search_range():
  model = get_model("flownet_c", encoder_features=(8, 8, 16, 16, 16, 16, 32, 32, 32, 32),
                    decoder_features=(16, 8, 8, 4), search_range=4, corr_stride=1, redir_features=4)
  x = jnp.zeros((1, 64, 64, 3), jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x, x)["params"]
  assert shapes["conv3_1"]["kernel"].shape == (3, 3, 4 + 81, 16)  # redir + (2*4/1 + 1)^2 correlation channels
  assert shapes["predict_flow2"]["kernel"].shape == (3, 3, 8 + 4 + 2, 2)  # conv2 + deconv2 + upsampled flow
  with pytest.raises(ValueError, match="encoder_features must be 10 positive widths"):
    get_model("flownet_s", encoder_features=(8, 8)).init(jax.random.key(0), x, x)
  with pytest.raises(ValueError, match="search_range"):
    get_model("flownet_c", search_range=5, corr_stride=2).init(jax.random.key(0), x, x)


def _variables(model, image1, image2, seed: int = 0) -> dict:
  """Variables shaped as `model.init` makes them (jax.eval_shape), filled by numpy with the He variance.

  Compiling `init` of these 40M-parameter networks with threefry keys takes minutes on a busy 2-core CPU;
  tracing it is free and the tests only need sensible values: kernels uniform with variance 2 / fan_in,
  biases and running means zero, BN scales and running variances one.
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), image1, image2)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      bound = np.sqrt(6.0 / np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.uniform(-bound, bound, leaf.shape), jnp.float32)
    return jnp.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# ---------------------------------------------------------------------------------------------------------
# An independent forward pass written from the layer list with lax convolutions and a loop correlation.


def _ref_conv(x, p, stride=1):
  k = p["kernel"].shape[0]
  pad = (k - 1) // 2
  y = jax.lax.conv_general_dilated(x, p["kernel"], (stride, stride), ((pad, pad), (pad, pad)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   precision=jax.lax.Precision.HIGHEST)
  return y + p["bias"] if "bias" in p else y


def _ref_deconv(x, p):
  # Stride-2 transposed convolution doubling the size: the input dilated by 2, padded by 2, 4x4 kernel.
  y = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), ((2, 2), (2, 2)), lhs_dilation=(2, 2),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   precision=jax.lax.Precision.HIGHEST)
  return y + p["bias"] if "bias" in p else y


def _lrelu(x):
  return jnp.where(x > 0, x, 0.1 * x)


def _ref_correlation(f1, f2, max_disp, stride):
  h, w = f1.shape[1:3]
  f2p = jnp.pad(f2, ((0, 0), (max_disp, max_disp), (max_disp, max_disp), (0, 0)))
  out = []
  for dy in range(-max_disp, max_disp + 1, stride):  # dy-major
    for dx in range(-max_disp, max_disp + 1, stride):
      shifted = f2p[:, max_disp + dy:max_disp + dy + h, max_disp + dx:max_disp + dx + w]
      out.append(jnp.mean(f1 * shifted, axis=-1))
  return jnp.stack(out, axis=-1)


def _ref_flownet(params, image1, image2, kind):
  mean = jnp.concatenate([image1, image2], axis=1).mean(axis=(1, 2), keepdims=True)
  a, b = image1 - mean, image2 - mean
  enc = lambda x, name, s: _lrelu(_ref_conv(x, params[name], s))
  if kind == "s":
    conv2 = enc(enc(jnp.concatenate([a, b], -1), "conv1", 2), "conv2", 2)
    x = enc(conv2, "conv3", 2)
  else:
    conv2 = enc(enc(a, "conv1", 2), "conv2", 2)
    conv3a = enc(conv2, "conv3", 2)
    conv3b = enc(enc(enc(b, "conv1", 2), "conv2", 2), "conv3", 2)
    corr = _lrelu(_ref_correlation(conv3a, conv3b, 20, 2))
    x = jnp.concatenate([enc(conv3a, "conv_redir", 1), corr], -1)
  conv3 = enc(x, "conv3_1", 1)
  conv4 = enc(enc(conv3, "conv4", 2), "conv4_1", 1)
  conv5 = enc(enc(conv4, "conv5", 2), "conv5_1", 1)
  x = enc(enc(conv5, "conv6", 2), "conv6_1", 1)
  preds = []
  for level, skip in zip((6, 5, 4, 3), (conv5, conv4, conv3, conv2)):
    flow = _ref_conv(x, params[f"predict_flow{level}"])
    preds.append(flow)
    up = _ref_deconv(flow, params[f"upsampled_flow{level}_to_{level - 1}"])
    x = jnp.concatenate([skip, _lrelu(_ref_deconv(x, params[f"deconv{level - 1}"])), up], -1)
  preds.append(_ref_conv(x, params["predict_flow2"]))
  return [20.0 * p for p in preds]


@functools.partial(jax.jit, static_argnums=0)
def _forward(name, variables, image1, image2, div_flow=20.0):
  """Jitted eval-mode forward shared by the tests (div_flow traced: one compilation per model and shape)."""
  return get_model(name, div_flow=div_flow).apply(variables, image1, image2, train=False)


def _textured_pair(size, batch=1, shift=(2, 1), seed=0):
  """A blurred random texture and a copy shifted so that I1(x) = I2(x + shift); float32 in [0, 1]."""
  rng = np.random.default_rng(seed)
  h, w = size
  base = rng.random((batch, h + 10, w + 10, 3)).astype(np.float32)
  base = sum(base[:, i:i + h + 8, j:j + w + 8] for i in range(3) for j in range(3)) / 9.0
  u, v = shift
  image1 = base[:, 4:4 + h, 4:4 + w]
  image2 = base[:, 4 - v:4 - v + h, 4 - u:4 - u + w]
  return jnp.asarray(image1), jnp.asarray(image2)


@pytest.mark.parametrize("name,kind", [("flownet_s", "s"), ("flownet_c", "c")])
def test_matches_reference_forward(name, kind):
  model = get_model(name)
  image1, image2 = _textured_pair((64, 64), batch=2)
  variables = _variables(model, image1, image2, seed=1)
  out = _forward(name, variables, image1, image2)
  want = _ref_flownet(variables["params"], image1, image2, kind)
  assert [f.shape for f in out["flows"]] == [(2, 64 // s, 64 // s, 2) for s in (64, 32, 16, 8, 4)]
  scale = max(float(jnp.abs(w).max()) for w in want)
  for got, ref in zip(out["flows"], want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-3, atol=1e-3 * scale)
  # `flow` is flow2 upsampled 4x bilinearly (half-pixel centres), values unchanged.
  up = jax.image.resize(want[-1], (2, 64, 64, 2), "bilinear")
  np.testing.assert_allclose(np.asarray(out["flow"]), np.asarray(up), rtol=1e-3, atol=1e-3 * scale)


def test_div_flow_normalisation_and_resizing():
  """div_flow scales the outputs; a brightness offset on both frames is removed; odd sizes are resized."""
  model = get_model("flownet_s")
  image1, image2 = _textured_pair((64, 64), batch=2, seed=3)
  variables = _variables(model, image1, image2, seed=1)
  forward = functools.partial(_forward, "flownet_s")
  base = forward(variables, image1, image2, 20.0)
  half = forward(variables, image1, image2, 10.0)
  for a, b in zip(base["flows"], half["flows"]):
    np.testing.assert_allclose(np.asarray(b), 0.5 * np.asarray(a), rtol=1e-5, atol=1e-6)
  # The per-channel mean over both frames is subtracted: adding a colour offset to both changes nothing.
  offset = jnp.asarray([0.1, -0.05, 0.2], jnp.float32)
  shifted = forward(variables, image1 + offset, image2 + offset, 20.0)
  np.testing.assert_allclose(np.asarray(shifted["flow"]), np.asarray(base["flow"]), rtol=1e-4, atol=1e-4)
  # 72x100 input: the network sees both frames resized to 128x128; flows are rescaled to input pixels.
  small1, small2 = _textured_pair((72, 100), batch=2, seed=4)
  big1, big2 = (jax.image.resize(im, (2, 128, 128, 3), "bilinear") for im in (small1, small2))
  small = forward(variables, small1, small2, 20.0)
  big = forward(variables, big1, big2, 20.0)
  factor = np.asarray([100 / 128, 72 / 128], np.float32)
  for a, b in zip(small["flows"], big["flows"]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b) * factor, rtol=1e-4, atol=1e-4)
  assert small["flow"].shape == (2, 72, 100, 2)
  np.testing.assert_allclose(np.asarray(small["flow"]),
                             np.asarray(jax.image.resize(small["flows"][-1], (2, 72, 100, 2), "bilinear")),
                             rtol=1e-5, atol=1e-5)


def test_batch_norm_running_statistics():
  """FlowNetS-BN: bias-free convolutions, and PyTorch's momentum 0.1 on the running mean."""
  model = get_model("flownet_s", batch_norm=True)
  image1, image2 = _textured_pair((64, 64), batch=2, seed=5)
  variables = _variables(model, image1, image2, seed=3)
  assert set(variables["params"]["conv1"]) == {"kernel"}
  assert set(variables["params"]["conv1_bn"]) == {"scale", "bias"}
  assert set(variables["params"]["deconv5"]) == {"kernel", "bias"}  # deconvolutions keep their bias
  assert set(variables["batch_stats"]["conv1_bn"]) == {"mean", "var"}
  train = jax.jit(lambda v: model.apply(v, image1, image2, train=True, mutable=["batch_stats"]))
  out, updates = train(variables)
  assert out["flow"].shape == (2, 64, 64, 2) and np.isfinite(np.asarray(out["flow"])).all()
  # Running mean after one step from 0: 0.1 * the batch mean of conv1's (bias-free) output.
  mean = jnp.concatenate([image1, image2], axis=1).mean(axis=(1, 2), keepdims=True)
  pre = _ref_conv(jnp.concatenate([image1 - mean, image2 - mean], -1), variables["params"]["conv1"], 2)
  np.testing.assert_allclose(np.asarray(updates["batch_stats"]["conv1_bn"]["mean"]),
                             0.1 * np.asarray(pre.mean(axis=(0, 1, 2))), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Overfitting one synthetic pair.


@pytest.mark.parametrize("name", ["flownet_s", "flownet_c"])
def test_overfits_one_pair(name):
  """Adam on one 64x64 pair: the multiscale loss falls at least 5x in 40 steps.

  The layer structure is the released one, at a quarter of the channel widths (2.4M / 2.7M parameters), so
  that 40 steps take seconds on a CPU; the full widths are checked by the count and reference tests.
  """
  model = get_model(name, encoder_features=tuple(c // 4 for c in flownet.ENCODER_FEATURES),
                    decoder_features=tuple(c // 4 for c in flownet.DECODER_FEATURES))
  image1, image2 = _textured_pair((64, 64), batch=1, shift=(3, -2), seed=6)
  batch = {"flow": jnp.broadcast_to(jnp.asarray([3.0, -2.0], jnp.float32), (1, 64, 64, 2)),
           "valid": jnp.ones((1, 64, 64), jnp.float32)}
  params = _variables(model, image1, image2, seed=0)["params"]
  optimizer = optax.adam(1e-4)
  config = losses.default_config()

  def loss_fn(params):
    out = model.apply({"params": params}, image1, image2, train=True)
    return losses.compute_loss(config, out, batch)[0]

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  history = []
  for _ in range(40):
    params, opt_state, loss = step(params, opt_state)
    history.append(float(loss))
  assert np.isfinite(history).all()
  assert history[-1] <= history[0] / 5, f"loss {history[0]:.4f} -> {history[-1]:.4f}"


def test_flownet_c_batch_sharded_step_moves_no_activations_between_devices():
  # The trainer's data parallelism (plain jit, batch sharded on 'data'): the siamese tower takes both frames of
  # each pair on the device holding them (frames interleaved per image, not concatenated along the sharded batch
  # axis), so the compiled step has no all-gather / all-to-all / collective-permute; same values and gradients.
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices (tests/conftest.py simulates them)")
  model = get_model("flownet_c", encoder_features=(8, 8, 16, 16, 16, 16, 32, 32, 32, 32),
                    decoder_features=(16, 8, 8, 4), search_range=4, corr_stride=2, redir_features=4)
  rng = np.random.default_rng(12)
  im1, im2 = (rng.random((4, 64, 64, 3), np.float32) for _ in range(2))
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), im1, im2)
  variables = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.2, x.dtype), shapes)

  def loss(params, a, b):
    flows = model.apply({**variables, "params": params}, a, b, train=False)["flows"]
    return sum(jnp.mean(jnp.square(f - 0.3)) for f in flows)

  check_sharded_step(loss, variables["params"], im1, im2)
