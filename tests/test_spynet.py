"""SpyNet: exact parameter counts, pyramid/upsampling behaviour, sequential-training helpers, overfitting."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxflow import losses
from jaxflow.models import get_model, spynet
from jaxflow.ops import resize_flow, warp

KEY = jax.random.key(0)
STEPS = 40  # Adam steps allowed for the 5x loss drop


def _pair(h: int, w: int, batch: int = 1, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.uniform(size=(batch, h, w, 3)), jnp.float32),
          jnp.asarray(rng.uniform(size=(batch, h, w, 3)), jnp.float32))


@functools.lru_cache(maxsize=None)
def _variables(levels: int, seed: int = 0):
  """He-normal kernels and small random biases (numpy, no compile) for a `levels`-level SpyNet."""
  model = get_model("spynet", levels=levels)
  x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  rng = np.random.default_rng(seed)

  def draw(a):
    if len(a.shape) == 1:
      return jnp.asarray(rng.normal(scale=0.01, size=a.shape), jnp.float32)
    return jnp.asarray(rng.normal(scale=np.sqrt(2.0 / np.prod(a.shape[:-1])), size=a.shape), jnp.float32)

  return jax.tree.map(draw, jax.eval_shape(model.init, KEY, x, x))


@functools.lru_cache(maxsize=None)
def _apply(levels: int):
  """Jitted `apply` of a `levels`-level SpyNet (one compile per input shape, shared across tests)."""
  return jax.jit(get_model("spynet", levels=levels).apply)


def _zero_variables(levels: int):
  model = get_model("spynet", levels=levels)
  x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(model.init, KEY, x, x))


def _hand_count_level(channels=(32, 64, 32, 16), k: int = 7) -> int:
  """k*k*cin*cout + cout for each conv of G_k: 8 -> 32 -> 64 -> 32 -> 16 -> 2."""
  widths = [8, *channels, 2]
  return sum(k * k * cin * cout + cout for cin, cout in zip(widths[:-1], widths[1:]))


@pytest.mark.parametrize("levels", [5, 3])
def test_parameter_count_matches_layer_list(levels):
  model = get_model("spynet", levels=levels)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, KEY, x, x)
  params = shapes["params"]
  assert sorted(params) == [f"G{k}" for k in range(levels)]
  per_level = _hand_count_level()
  assert per_level == 240_050
  for k in range(levels):
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params[f"G{k}"])) == per_level
  total = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  assert total == levels * per_level
  if levels == 5:
    assert total == 1_200_250
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))


def test_kernel_shapes_follow_the_paper():
  x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  params = jax.eval_shape(get_model("spynet").init, KEY, x, x)["params"]
  expected = [(7, 7, 8, 32), (7, 7, 32, 64), (7, 7, 64, 32), (7, 7, 32, 16), (7, 7, 16, 2)]
  assert [params["G2"][f"conv{i}"]["kernel"].shape for i in range(5)] == expected


def test_zero_weights_give_zero_flow():
  size = (40, 52)  # not a multiple of 16: the network runs at 48x64
  out = _apply(5)(_zero_variables(5), *_pair(*size))
  assert out["flow"].shape == (1, *size, 2)
  np.testing.assert_array_equal(np.asarray(out["flow"]), 0.0)
  for f in out["flows"]:
    np.testing.assert_array_equal(np.asarray(f), 0.0)


def _constant_coarsest(levels, c):
  """All weights zero except G0's last bias = c: G0 outputs the constant flow c (coarsest-level pixels)."""
  params = dict(_zero_variables(levels)["params"])
  g0 = dict(params["G0"])
  g0["conv4"] = {"kernel": g0["conv4"]["kernel"], "bias": jnp.asarray(c, jnp.float32)}
  params["G0"] = g0
  return {"params": params}


@pytest.mark.parametrize("size", [(48, 64), (40, 52)], ids=["48x64", "40x52"])
def test_constant_coarsest_flow_is_upscaled_to_input_pixels(size):
  # G0 says (1.5, -0.75) px at 1/16 resolution, G1..G4 add nothing: each 2x upsampling doubles the values,
  # so the finest level holds 16 x (1.5, -0.75) network pixels; for 40x52 the network runs at 48x64 and
  # the flow is then rescaled by (52/64, 40/48) into input pixels.
  h, w = size
  c = (1.5, -0.75)
  variables = _constant_coarsest(5, c)
  out = _apply(5)(variables, *_pair(h, w, seed=3))
  nh, nw = -(-h // 16) * 16, -(-w // 16) * 16
  expected = np.array([c[0] * 16 * w / nw, c[1] * 16 * h / nh], np.float32)
  np.testing.assert_allclose(np.asarray(out["flow"]), np.broadcast_to(expected, (1, h, w, 2)), rtol=1e-5)
  assert [f.shape[1:3] for f in out["flows"]] == [(nh // 2 ** (4 - k), nw // 2 ** (4 - k)) for k in range(5)]
  for f in out["flows"]:  # every level in input pixels: the same constant
    np.testing.assert_allclose(np.asarray(f), np.broadcast_to(expected, f.shape), rtol=1e-5)


def test_residual_levels_see_warped_second_image():
  # With G0 outputting the constant (0.5, 0.25) at 16x16, G1 (32x32) must receive exactly
  # [norm(image1), warp(norm(image2), up), up] with up = (1.0, 0.5): the constant upsampled, values doubled.
  model = get_model("spynet", levels=2)
  variables = _constant_coarsest(2, (0.5, 0.25))
  image1, image2 = _pair(32, 32, seed=5)
  mean = np.array(spynet.IMAGENET_MEAN, np.float32)
  std = np.array(spynet.IMAGENET_STD, np.float32)
  n1 = (np.asarray(image1) - mean) / std
  n2 = (np.asarray(image2) - mean) / std
  up = np.broadcast_to(np.array([1.0, 0.5], np.float32), (1, 32, 32, 2))
  expected = np.concatenate([n1, np.asarray(warp(jnp.asarray(n2), jnp.asarray(up))), up], -1)

  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    if context.module.name == "G1" and context.method_name == "__call__":
      seen["x"] = np.asarray(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, image1, image2)
  np.testing.assert_allclose(seen["x"], expected, rtol=1e-5, atol=1e-5)


def test_trainable_mask_selects_levels_and_freezes_with_optax():
  variables = _variables(3)
  params = variables["params"]
  mask = spynet.trainable_mask(params, [2])
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  for k in range(3):
    assert all(m is (k == 2) for m in jax.tree.leaves(mask[f"G{k}"]))
  # Same on the variables dict, and with an int argument.
  wrapped = spynet.trainable_mask(variables, 1)
  assert all(jax.tree.leaves(wrapped["params"]["G1"]))
  assert not any(jax.tree.leaves(wrapped["params"]["G0"]))

  # Sequential training: only G2 moves under multi_transform with the mask as labels.
  labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
  tx = optax.multi_transform({"train": optax.adam(1e-2), "freeze": optax.set_to_zero()}, labels)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  for k in range(3):
    same = [bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(new[f"G{k}"]), jax.tree.leaves(params[f"G{k}"]))]
    assert all(same) if k < 2 else not any(same)

  with pytest.raises(ValueError, match=r"level\(s\) \[3\]"):
    spynet.trainable_mask(params, [3])
  with pytest.raises(ValueError, match="G0, G1"):
    spynet.trainable_mask({"conv": {}}, [0])


def test_init_from_coarser_copies_levels_and_reproduces_coarser_model():
  old, new = _variables(2, seed=1), _variables(3, seed=2)
  merged = spynet.init_from_coarser(new, old)
  for k in range(2):
    for a, b in zip(jax.tree.leaves(merged["params"][f"G{k}"]), jax.tree.leaves(old["params"][f"G{k}"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(merged["params"]["G2"]), jax.tree.leaves(new["params"]["G2"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Unwrapped params work too.
  merged_p = spynet.init_from_coarser(new["params"], old["params"])
  assert sorted(merged_p) == ["G0", "G1", "G2"]

  # With the new finest level zeroed, the 3-level model on a 32x32 image equals the 2-level model on its
  # 2x2-average-pooled 16x16 version, upsampled 2x (corner-aligned, as the released code) with values doubled.
  params = dict(merged["params"])
  params["G2"] = jax.tree.map(jnp.zeros_like, params["G2"])
  image1, image2 = _pair(32, 32, seed=7)
  pool = lambda im: im.reshape(1, 16, 2, 16, 2, 3).mean(axis=(2, 4))
  out_big = _apply(3)({"params": params}, image1, image2)
  out_small = _apply(2)(old, pool(image1), pool(image2))
  np.testing.assert_allclose(np.asarray(out_big["flow"]), np.asarray(resize_flow(out_small["flow"], (32, 32), align_corners=True)),
                             rtol=1e-4, atol=1e-4)
  for fb, fs in zip(out_big["flows"][:2], out_small["flows"]):
    np.testing.assert_allclose(np.asarray(fb), 2 * np.asarray(fs), rtol=1e-4, atol=1e-4)

  with pytest.raises(ValueError, match=r"level\(s\) \[2\]"):
    spynet.init_from_coarser(old, new)


def test_forward_sizes_and_bfloat16():
  variables = _variables(3)
  for h, w in [(32, 32), (36, 50)]:  # 36x50 runs at 36x52 and is brought back to 36x50
    out = _apply(3)(variables, *_pair(h, w))
    assert out["flow"].shape == (1, h, w, 2) and out["flow"].dtype == jnp.float32
    assert len(out["flows"]) == 3 and all(bool(jnp.all(jnp.isfinite(f))) for f in out["flows"])

  image1, image2 = _pair(32, 32, seed=2)
  ref = _apply(3)(variables, image1, image2)

  bf16 = get_model("spynet", levels=3, dtype="bfloat16")
  params16 = jax.eval_shape(bf16.init, KEY, image1, image2)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params16))
  out16 = jax.jit(bf16.apply)(variables, image1, image2)
  assert out16["flow"].dtype == jnp.float32 and all(f.dtype == jnp.float32 for f in out16["flows"])
  scale = float(jnp.max(jnp.abs(ref["flow"])))
  assert float(jnp.max(jnp.abs(out16["flow"] - ref["flow"]))) < 0.05 * scale + 1e-3


def test_bad_inputs_and_config_raise():
  model = get_model("spynet", levels=2)
  variables = _zero_variables(2)
  good = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
    model.apply(variables, jnp.zeros((1, 32, 32, 4)), jnp.zeros((1, 32, 32, 4)))
  with pytest.raises(ValueError, match="same shape"):
    model.apply(variables, good, jnp.zeros((1, 32, 48, 3)))
  with pytest.raises(ValueError, match="4-D"):
    model.apply(variables, good[0], good[0])
  with pytest.raises(TypeError, match="floating point"):
    model.apply(variables, good.astype(jnp.uint8), good.astype(jnp.uint8))
  with pytest.raises(ValueError, match="levels"):
    get_model("spynet", levels=0).init(KEY, good, good)
  with pytest.raises(ValueError, match="no field"):
    get_model("spynet", level=3)


def test_overfits_a_shifted_pair():
  # A smooth random texture and its copy moved by a constant flow: image1(x) = image2(x + f), f = (1.5, -1).
  size = 48
  rng = np.random.default_rng(0)
  coarse = rng.uniform(size=(1, size // 4, size // 4, 3)).astype(np.float32)
  image2 = jax.image.resize(jnp.asarray(coarse), (1, size, size, 3), "bicubic").clip(0, 1)
  gt = jnp.broadcast_to(jnp.asarray([1.5, -1.0], jnp.float32), (1, size, size, 2))
  image1 = warp(image2, gt)
  valid = jnp.zeros((1, size, size)).at[:, 4:-4, 4:-4].set(1.0)
  model = get_model("spynet", levels=3)
  params = _variables(3)["params"]
  tx = optax.adam(1e-3)

  def loss_fn(p):
    flows = model.apply({"params": p}, image1, image2)["flows"]
    total, _ = losses.multiscale_loss(flows, gt, valid, [1.0] * len(flows))
    return total

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss, g

  state = tx.init(params)
  losses_seen = []
  for i in range(STEPS):
    params, state, loss, grads = step(params, state)
    losses_seen.append(float(loss))
    if i == 0:  # gradients of the untrained model: finite and not all zero, at every level
      for k in range(3):
        leaves = jax.tree.leaves(grads[f"G{k}"])
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
        assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0
  # 5x below the start, and at most half the loss of predicting zero flow (so motion was learned, not just
  # the random initial output suppressed).
  zero_loss = float(loss_fn(jax.tree.map(jnp.zeros_like, params)))
  final = float(loss_fn(params))
  assert final < losses_seen[0] / 5, (losses_seen[::5], final)
  assert final < zero_loss / 2, (zero_loss, final)
