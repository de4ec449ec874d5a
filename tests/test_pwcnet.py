"""PWC-Net: exact parameter counts, pyramid + cost volume + warp recover known shifts, flow units, overfitting.

PWC-Net compiles slowly on CPU, so every full-model computation here goes through a few cached jitted
functions with shared shapes, and random weights are drawn with numpy from `jax.eval_shape` shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxflow import losses
from jaxflow.models import get_model
from jaxflow.ops import warp
from sharding_helpers import check_sharded_step

KEY = jax.random.key(0)
MODEL = get_model("pwcnet")
ODD = (40, 72)  # not a multiple of 64: the network runs at 64x128
STEPS = 25  # Adam steps allowed for the 5x loss drop


def _conv(k: int, cin: int, cout: int) -> int:
  return k * k * cin * cout + cout


def _hand_count(convs_per_level: int = 2, dense: bool = True, context: bool = True) -> int:
  """Parameter count from the layer list of the released model (all convs and deconvs with biases)."""
  pyramid, est = [16, 32, 64, 96, 128, 196], [128, 128, 96, 64, 32]
  n, cin = 0, 3
  for c in pyramid:  # a 3x3/2 conv, then convs_per_level - 1 3x3 convs
    n += _conv(3, cin, c) + (convs_per_level - 1) * _conv(3, c, c)
    cin = c
  corr = 81
  for level in [6, 5, 4, 3, 2]:
    c = corr if level == 6 else corr + pyramid[level - 1] + 2 + 2  # cost volume, f1, upflow, upfeat
    for e in est:
      n += _conv(3, c, e)
      c = c + e if dense else e
    n += _conv(3, c, 2)  # predict_flow
    if level > 2:  # upflow (2 -> 2) and upfeat (estimator features -> 2), 4x4 deconvs with bias
      n += _conv(4, 2, 2) + _conv(4, c, 2)
  if context:
    for e in [128, 128, 128, 96, 64, 32]:
      n += _conv(3, c, e)
      c = e
    n += _conv(3, 32, 2)
  return n


def _count(model) -> int:
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(jax.eval_shape(model.init, KEY, x, x)))


@pytest.mark.parametrize("convs,expected", [(2, 8_749_214), (3, 9_374_274)], ids=["paper", "released"])
def test_parameter_count_matches_paper_and_released_model(convs, expected):
  assert _hand_count(convs) == expected
  assert _count(get_model("pwcnet", convs_per_level=convs)) == expected


def test_parameter_count_of_ablations_and_layout():
  assert _count(get_model("pwcnet", dense=False)) == _hand_count(dense=False)
  assert _count(get_model("pwcnet", context=False)) == _hand_count(context=False)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  params = jax.eval_shape(MODEL.init, KEY, x, x)["params"]
  assert sorted(params) == sorted(["pyramid", "context"] + [f"estimator{l}" for l in range(2, 7)] +
                                  [f"upflow{l}" for l in range(3, 7)] + [f"upfeat{l}" for l in range(3, 7)])
  assert params["estimator2"]["conv0"]["kernel"].shape == (3, 3, 81 + 32 + 4, 128)
  assert params["estimator6"]["conv0"]["kernel"].shape == (3, 3, 81, 128)
  assert params["context"]["conv0"]["kernel"].shape == (3, 3, 81 + 32 + 4 + 448, 128)
  assert params["upfeat5"]["kernel"].shape == (4, 4, 81 + 128 + 4 + 448, 2)  # level 5: 128 features
  assert params["pyramid"]["level6_conv1"]["kernel"].shape == (3, 3, 196, 196)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))


def _random_like(shapes, seed: int = 0):
  """He-normal kernels and small random biases drawn with numpy for every leaf of an eval_shape tree."""
  rng = np.random.default_rng(seed)

  def draw(a):
    if len(a.shape) == 1:
      return jnp.asarray(rng.normal(scale=0.01, size=a.shape), jnp.float32)
    fan_in = int(np.prod(a.shape[:-1]))
    return jnp.asarray(rng.normal(scale=np.sqrt(2.0 / fan_in), size=a.shape), jnp.float32)

  return jax.tree.map(draw, shapes)


@functools.lru_cache(maxsize=None)
def _full_variables(seed: int = 0):
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return _random_like(jax.eval_shape(MODEL.init, KEY, x, x), seed)


@functools.lru_cache(maxsize=None)
def _forward(dtype: str = "float32"):
  model = get_model("pwcnet", dtype=dtype)
  return jax.jit(model.apply)


def _pyramid_variables():
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return _random_like(jax.eval_shape(functools.partial(MODEL.init, method=MODEL.features), KEY, x), seed=3)


@jax.jit
def _features(variables, image):
  return MODEL.apply(variables, image, method=MODEL.features)


def _unit(f):
  """Unit-length features (so the cost volume is a cosine similarity and the true match is its maximum)."""
  return f / (jnp.linalg.norm(f, axis=-1, keepdims=True) + 1e-12)


def _shifted_crops(h: int, w: int, dx: int, dy: int, seed: int = 0):
  """image1(x) = image2(x + (dx, dy)): two crops of one random image."""
  big = np.random.default_rng(seed).uniform(size=(1, h + 64, w + 64, 3)).astype(np.float32)
  image1 = big[:, 32:32 + h, 32:32 + w]
  image2 = big[:, 32 - dy:32 - dy + h, 32 - dx:32 - dx + w]
  return jnp.asarray(image1), jnp.asarray(image2)


def test_argmax_of_cost_volume_recovers_integer_shift_and_warp_cancels_it():
  # A shift of (8, -16) input pixels is (2, -4) pixels at level 2 and (1, -2) at level 3. The model's own
  # feature pyramid (random weights) and cost volume, with the estimator replaced by an argmax over the 81
  # displacement channels, must find it wherever both receptive fields lie inside the frames; after warping
  # the second features by the upsampled flow in network units (flow / 20, scaled by 20 / 2**l inside), the
  # argmax must be the zero displacement. The features are normalised to unit length first so that the
  # maximum of the dot product is the exact match (random features are not equal-norm).
  dx, dy = 8, -16
  size = 128
  image1, image2 = _shifted_crops(size, size, dx, dy)
  variables = _pyramid_variables()
  f1, f2 = _features(variables, image1), _features(variables, image2)
  assert [f.shape for f in f1] == [(1, size // 2 ** l, size // 2 ** l, c)
                                   for l, c in zip(range(1, 7), (16, 32, 64, 96, 128, 196))]
  r = MODEL.search_range
  flow_units = jnp.broadcast_to(jnp.asarray([dx, dy], jnp.float32) / MODEL.div_flow, (1, size, size, 2))
  for level, margin in [(2, 5), (3, 3)]:
    a, b = _unit(f1[level - 1]), _unit(f2[level - 1])
    cv = MODEL.apply(variables, a, b, method=MODEL.cost_volume)
    assert cv.shape == a.shape[:3] + ((2 * r + 1) ** 2,) and cv.dtype == jnp.float32
    index = np.asarray(jnp.argmax(cv, axis=-1))[0]
    found_dy, found_dx = index // (2 * r + 1) - r, index % (2 * r + 1) - r  # dy-major channel order
    s = 2 ** level
    n = a.shape[1]
    # Interior: the level pixel and its match both at least `margin` level pixels from every border.
    ys, xs = np.mgrid[0:n, 0:n]
    inside = ((np.minimum(ys, n - 1 - ys) >= margin) & (np.minimum(xs, n - 1 - xs) >= margin) &
              (np.minimum(ys + dy // s, n - 1 - ys - dy // s) >= margin) &
              (np.minimum(xs + dx // s, n - 1 - xs - dx // s) >= margin))
    assert inside.sum() >= 4, level
    np.testing.assert_array_equal(found_dx[inside], dx // s)
    np.testing.assert_array_equal(found_dy[inside], dy // s)

    up = flow_units[:, :n, :n]
    warped = MODEL.apply(variables, f2[level - 1], up, level, method=MODEL.warp_features)
    np.testing.assert_allclose(np.asarray(warped), np.asarray(warp(f2[level - 1], up * MODEL.div_flow / s)),
                               rtol=1e-6, atol=1e-6)
    cv0 = MODEL.apply(variables, a, _unit(warped), method=MODEL.cost_volume)
    index0 = np.asarray(jnp.argmax(cv0, axis=-1))[0]
    np.testing.assert_array_equal(index0[inside], (2 * r + 1) ** 2 // 2)  # displacement (0, 0)


def test_input_is_bgr_like_the_released_model():
  image = jnp.asarray(np.random.default_rng(1).uniform(size=(1, 4, 4, 3)), jnp.float32)
  out = MODEL.apply({}, image, method=MODEL.preprocess)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(image)[..., ::-1])


def _biases_only(b: dict[int, tuple[float, float]], context_bias: tuple[float, float]):
  """Zero weights; the flow predictors of level l output the constant b[l] (network units)."""
  params = jax.tree.map(jnp.zeros_like, dict(_full_variables()["params"]))
  for level, value in b.items():
    est = dict(params[f"estimator{level}"])
    est["predict_flow"] = dict(est["predict_flow"], bias=jnp.asarray(value, jnp.float32))
    params[f"estimator{level}"] = est
  ctx = dict(params["context"])
  ctx["predict_flow"] = dict(ctx["predict_flow"], bias=jnp.asarray(context_bias, jnp.float32))
  params["context"] = ctx
  return {"params": params}


def test_flow_units_levels_and_context_on_odd_size():
  # Zero weights, constant predictor biases: level l's flow is 20 * b_l network-input pixels (div_flow), the
  # output level adds the context network's constant, and the 64x128 network flow is rescaled by
  # (72/128, 40/64) into input pixels. Same jitted function and shapes as the random-weight forward below.
  h, w = ODD
  b = {6: (0.1, -0.2), 5: (0.3, 0.05), 4: (-0.4, 0.2), 3: (0.25, 0.5), 2: (0.15, -0.1)}
  ctx = (0.05, 0.2)
  image1, image2 = _shifted_crops(h, w, 4, 4)
  out = _forward()(_biases_only(b, ctx), image1, image2)
  scale = np.array([w / 128, h / 64], np.float32)
  assert [f.shape[1:3] for f in out["flows"]] == [(64 // 2 ** l, 128 // 2 ** l) for l in range(6, 1, -1)]
  for f, level in zip(out["flows"], range(6, 1, -1)):
    value = np.array(b[level]) + (np.array(ctx) if level == 2 else 0.0)
    np.testing.assert_allclose(np.asarray(f), np.broadcast_to(20 * value * scale, f.shape), rtol=1e-5, atol=1e-6)
  expected = 20 * (np.array(b[2]) + np.array(ctx)) * scale
  assert out["flow"].shape == (1, h, w, 2) and out["flow"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out["flow"]), np.broadcast_to(expected, (1, h, w, 2)), rtol=1e-5)

  # Random weights, same shapes: finite, float32; bfloat16 compute keeps float32 params and outputs and
  # stays close to float32.
  variables = _full_variables()
  ref = _forward()(variables, image1, image2)
  assert all(f.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(f))) for f in ref["flows"])
  x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  bf16 = get_model("pwcnet", dtype="bfloat16")
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(jax.eval_shape(bf16.init, KEY, x, x)))
  out16 = _forward("bfloat16")(variables, image1, image2)
  assert out16["flow"].dtype == jnp.float32 and all(f.dtype == jnp.float32 for f in out16["flows"])
  err = float(jnp.max(jnp.abs(out16["flow"] - ref["flow"])))
  assert err < 0.05 * float(jnp.max(jnp.abs(ref["flow"]))) + 1e-3, err


def test_bad_inputs_and_config_raise():
  variables = _full_variables()
  good = jnp.zeros((1, 64, 64, 3))
  with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
    MODEL.apply(variables, jnp.zeros((1, 64, 64, 1)), jnp.zeros((1, 64, 64, 1)))
  with pytest.raises(ValueError, match="same shape"):
    MODEL.apply(variables, good, jnp.zeros((1, 64, 32, 3)))
  with pytest.raises(TypeError, match="floating point"):
    MODEL.apply(variables, good.astype(jnp.int32), good.astype(jnp.int32))
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  with pytest.raises(ValueError, match="output_level"):
    jax.eval_shape(get_model("pwcnet", output_level=7).init, KEY, x, x)
  with pytest.raises(ValueError, match="context_dilations"):
    jax.eval_shape(get_model("pwcnet", context_dilations=(1, 2)).init, KEY, x, x)
  with pytest.raises(ValueError, match="no field"):
    get_model("pwcnet", search=4)


def test_overfits_a_shifted_pair():
  # A smooth random texture and its copy moved by a constant flow f = (2, -1.5): image1(x) = image2(x + f).
  size = 64
  rng = np.random.default_rng(0)
  coarse = rng.uniform(size=(1, size // 4, size // 4, 3)).astype(np.float32)
  image2 = jax.image.resize(jnp.asarray(coarse), (1, size, size, 3), "bicubic").clip(0, 1)
  gt = jnp.broadcast_to(jnp.asarray([2.0, -1.5], jnp.float32), (1, size, size, 2))
  image1 = warp(image2, gt)
  valid = jnp.zeros((1, size, size)).at[:, 4:-4, 4:-4].set(1.0)
  params = _full_variables()["params"]
  tx = optax.adam(1e-4)

  def loss_fn(p):
    flows = MODEL.apply({"params": p}, image1, image2)["flows"]
    total, _ = losses.multiscale_loss(flows, gt, valid, [1.0] * len(flows))
    return total

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss, g

  state = tx.init(params)
  seen = []
  for i in range(STEPS):
    params, state, loss, grads = step(params, state)
    seen.append(float(loss))
    if i == 0:  # gradients of the untrained model: finite, and every module receives some
      for name, sub in grads.items():
        leaves = jax.tree.leaves(sub)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves), name
        assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0, name
  # The loss of the final parameters (one more step's loss), against the start and against predicting zero.
  final = float(step(params, state)[2])
  zero = float(step(jax.tree.map(jnp.zeros_like, params), state)[2])
  assert final < seen[0] / 5, (seen[::5], final)
  assert final < zero / 2, (zero, final)


def test_batch_sharded_step_moves_no_activations_between_devices():
  # The trainer's data parallelism (plain jit, batch sharded on 'data', parameters replicated): both frames go
  # through the pyramid on the device holding them, and the warp's backward loops over each device's images, so
  # the compiled step has no all-gather / all-to-all / collective-permute; values and gradients are the
  # single-device ones.
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices (tests/conftest.py simulates them)")
  model = get_model("pwcnet", search_range=2, pyramid_channels=(8, 16), estimator_channels=(8, 8),
                    context_channels=(8,), context_dilations=(1,), convs_per_level=1, output_level=1)
  rng = np.random.default_rng(9)
  im1, im2 = (rng.random((4, 64, 64, 3), np.float32) for _ in range(2))
  # Parameters drawn from their abstract shapes (compiling model.init's initialisers costs more than the steps).
  shapes = jax.eval_shape(model.init, KEY, im1, im2)
  variables = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.2, x.dtype), shapes)

  def loss(params, a, b):
    flows = model.apply({**variables, "params": params}, a, b)["flows"]
    return sum(jnp.mean(jnp.square(f - 0.3)) for f in flows)

  hlo = check_sharded_step(loss, variables["params"], im1, im2)
  assert "all-reduce" in hlo  # the parameter gradients are summed over the devices


@pytest.mark.parametrize("interleave", [True, False])
def test_frames_merged_either_way_give_the_same_flows(monkeypatch, interleave):
  # layers.merge_frames interleaves the pairs on several devices and concatenates them on one; the split returns
  # each frame's own images and the network's flows do not depend on the layout.
  from jaxflow.models import layers
  rng = np.random.default_rng(5)
  a, b = (jnp.asarray(rng.random((3, 4, 5, 2), np.float32)) for _ in range(2))
  monkeypatch.setattr(layers, "_INTERLEAVE_FRAMES", interleave)
  merged = layers.merge_frames(a, b)
  assert merged.shape == (6, 4, 5, 2)
  np.testing.assert_array_equal(np.asarray(merged[1 if interleave else 3]), np.asarray(b[0]))
  first, second = layers.split_frames(merged * 2, 3)
  np.testing.assert_array_equal(np.asarray(first), np.asarray(a * 2))
  np.testing.assert_array_equal(np.asarray(second), np.asarray(b * 2))
  model = get_model("pwcnet", search_range=2, pyramid_channels=(8, 16), estimator_channels=(8, 8),
                    context_channels=(8,), context_dilations=(1,), convs_per_level=1, output_level=1)
  im1, im2 = (rng.random((2, 64, 64, 3), np.float32) for _ in range(2))
  variables = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.2, x.dtype),
                           jax.eval_shape(model.init, KEY, im1, im2))
  flows = jax.jit(model.apply)(variables, im1, im2)["flows"]
  monkeypatch.setattr(layers, "_INTERLEAVE_FRAMES", not interleave)
  other = jax.jit(model.apply)(variables, im1, im2)["flows"]
  for f, o in zip(flows, other):
    np.testing.assert_allclose(np.asarray(f), np.asarray(o), rtol=1e-5, atol=1e-6)
