"""Registry-wide model tests: every model in `list_models()` honours the model contract.

Contract (jaxflow.models): `apply(variables, image1, image2, train=...)` on float32 RGB (B, H, W, 3) returns
`flow` (B, H, W, 2) float32 and `flows` (coarse to fine, float32, (B, h, w, 2)); any H, W; parameters float32
whatever the compute dtype; bad inputs raise errors saying what was expected.

Sizes are tiny (batch 2, 64x64 and 72x100) and every compiled function is built once per model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxflow import losses
from jaxflow.models import get_model, list_models

MODELS = list_models()
SIZE = (64, 64)
ODD_SIZE = (72, 100)  # not a multiple of 64 (nor of 16 in W)


def _pair(size: tuple[int, int], batch: int = 2, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """A smooth textured frame and a copy shifted right by 2 px and down by 1 px, float32 in [0, 1]."""
  rng = np.random.default_rng(seed)
  h, w = size
  base = rng.random((batch, h + 8, w + 8, 3)).astype(np.float32)
  # 3x3 box blur keeps the texture learnable at coarse levels.
  base = sum(base[:, i:i + h + 6, j:j + w + 6] for i in range(3) for j in range(3)) / 9.0
  image1 = base[:, 3:3 + h, 3:3 + w]
  image2 = base[:, 2:2 + h, 1:1 + w]  # I1(x) = I2(x + (2, 1))
  return jnp.asarray(image1), jnp.asarray(image2)


def fast_variables(model, image1: jax.Array, image2: jax.Array, seed: int = 0) -> dict:
  """Variables shaped exactly as `model.init` makes them (traced with jax.eval_shape), filled by numpy.

  Kernels get the He variance 2 / fan_in (uniform distribution), biases, offsets and running means zero,
  scales and running variances one. Compiling `init` of a 40M-parameter network with threefry keys takes
  minutes on a busy 2-core CPU; tracing it costs nothing, and the values only need to be sensible.
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), image1, image2)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = getattr(path[-1], "key", str(path[-1]))
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      bound = np.sqrt(3.0) * np.sqrt(2.0 / fan_in)
      value = rng.uniform(-bound, bound, leaf.shape)
    elif name in ("scale", "var"):
      value = np.ones(leaf.shape)
    elif name in ("bias", "mean"):
      value = np.zeros(leaf.shape)
    else:
      value = rng.uniform(-0.1, 0.1, leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


class _Built:
  """One model with float32 variables for SIZE inputs and its jitted forward."""

  def __init__(self, name: str):
    self.name = name
    self.model = get_model(name)
    self.variables = fast_variables(self.model, *_pair(SIZE))
    self.forward = jax.jit(functools.partial(self.model.apply, train=False))


@functools.lru_cache(maxsize=None)
def _built(name: str) -> _Built:
  return _Built(name)


def _check_outputs(out: dict, batch: int, size: tuple[int, int]) -> None:
  h, w = size
  assert out["flow"].shape == (batch, h, w, 2)
  assert out["flow"].dtype == jnp.float32
  flows = out["flows"]
  assert isinstance(flows, (list, tuple)) and len(flows) >= 1
  previous = 0
  for level in flows:
    assert level.dtype == jnp.float32
    assert level.ndim == 4 and level.shape[0] == batch and level.shape[-1] == 2
    # Coarse to fine: the number of pixels never decreases.
    assert level.shape[1] * level.shape[2] >= previous
    previous = level.shape[1] * level.shape[2]
    assert level.shape[1] <= 2 * h and level.shape[2] <= 2 * w
  for leaf in [out["flow"], *flows]:
    assert np.isfinite(np.asarray(leaf)).all()


def test_registry_has_the_flownets():
  assert {"flownet_s", "flownet_c"} <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_fields_and_float32_params(name):
  model_cls = type(get_model(name))
  fields = model_cls.__dataclass_fields__
  assert "dtype" in fields
  built = _built(name)
  leaves = jax.tree.leaves(built.variables)
  assert leaves and all(leaf.dtype == jnp.float32 for leaf in leaves)
  # bfloat16 compute (from the config string) still creates float32 parameters.
  image1, image2 = _pair(SIZE)
  shapes = jax.eval_shape(functools.partial(get_model(name, dtype="bfloat16").init, train=False),
                          jax.random.key(0), image1, image2)
  assert jax.tree.structure(shapes) == jax.tree.structure(built.variables)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("size", [SIZE, ODD_SIZE], ids=["64x64", "72x100"])
def test_forward_shapes(name, size):
  built = _built(name)
  image1, image2 = _pair(size, seed=1)
  out = built.forward(built.variables, image1, image2)
  _check_outputs(out, 2, size)
  assert float(jnp.abs(out["flow"]).max()) > 0.0


@pytest.mark.parametrize("name", MODELS)
def test_same_output_under_shard_map(name):
  """The batch split over a 2-device 'data' mesh gives the jitted single-call result, example by example."""
  built = _built(name)
  assert len(jax.devices()) >= 2, "tests/conftest.py should simulate 2 CPU devices"
  mesh = jax.make_mesh((2,), ("data",))
  image1, image2 = _pair(SIZE, seed=2)
  sharded = jax.jit(jax.shard_map(
      lambda variables, a, b: built.model.apply(variables, a, b, train=False), mesh=mesh,
      in_specs=(jax.P(), jax.P("data"), jax.P("data")), out_specs=jax.P("data")))
  expected = built.forward(built.variables, image1, image2)
  split = jax.NamedSharding(mesh, jax.P("data"))
  got = sharded(built.variables, jax.device_put(image1, split), jax.device_put(image2, split))
  # One image per device vs two in one program: XLA fuses some ops (e.g. the warp's four weighted corner gathers)
  # differently, so float32 roundings differ and grow through PWC-Net's five refinement levels of an untrained
  # network (measured: 1.1e-4 at one of 1,024 values). Mixing up examples or devices would be off by O(flow).
  np.testing.assert_allclose(np.asarray(got["flow"]), np.asarray(expected["flow"]), rtol=1e-4, atol=3e-4)
  assert len(got["flows"]) == len(expected["flows"])
  for g, e in zip(got["flows"], expected["flows"]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=3e-4)


@pytest.mark.parametrize("name", MODELS)
def test_grad_finite(name):
  """Gradients of the training loss (train=True) are finite and reach the parameters."""
  built = _built(name)
  image1, image2 = _pair(SIZE, seed=3)
  batch = {"flow": jnp.broadcast_to(jnp.asarray([2.0, 1.0], jnp.float32), (2, *SIZE, 2)),
           "valid": jnp.ones((2, *SIZE), jnp.float32)}
  params = built.variables["params"]
  others = {k: v for k, v in built.variables.items() if k != "params"}

  def loss_fn(params):
    variables = {"params": params, **others}
    if "batch_stats" in others:
      out, _ = built.model.apply(variables, image1, image2, train=True, mutable=["batch_stats"])
    else:
      out = built.model.apply(variables, image1, image2, train=True)
    config = losses.default_config()
    config.weights = [1.0] * len(out["flows"])
    return losses.compute_loss(config, out, batch)[0]

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  assert np.isfinite(float(loss)) and float(loss) > 0
  leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(g).all() for g in leaves)
  nonzero = sum(bool(np.any(g != 0)) for g in leaves)
  assert nonzero >= 0.9 * len(leaves), f"only {nonzero} of {len(leaves)} parameter arrays get a gradient"


@pytest.mark.parametrize("name", MODELS)
def test_bfloat16_compute(name):
  """bfloat16 compute on the float32 parameters returns float32 outputs close to the float32 ones."""
  built = _built(name)
  model = get_model(name, dtype="bfloat16")
  image1, image2 = _pair(SIZE, seed=4)
  out = jax.jit(functools.partial(model.apply, train=False))(built.variables, image1, image2)
  _check_outputs(out, 2, SIZE)
  reference = np.asarray(built.forward(built.variables, image1, image2)["flow"]).ravel()
  got = np.asarray(out["flow"]).ravel()
  assert np.corrcoef(reference, got)[0, 1] > 0.9
  assert np.abs(got - reference).mean() < 0.2 * np.abs(reference).mean() + 1e-3


@pytest.mark.parametrize("name", MODELS)
def test_wrong_inputs_raise(name):
  built = _built(name)
  image1, image2 = _pair(SIZE)
  apply = functools.partial(built.model.apply, built.variables, train=False)
  with pytest.raises(ValueError, match=r"(?i)same shape|shape"):
    apply(image1, image2[:, :32])
  with pytest.raises(ValueError, match=r"3"):
    apply(image1[..., :2], image2[..., :2])
  with pytest.raises(ValueError, match=r"4-D|\(B, H, W, 3\)"):
    apply(image1[0], image2[0])
  with pytest.raises(TypeError, match=r"(?i)float"):
    apply((image1 * 255).astype(jnp.uint8), (image2 * 255).astype(jnp.uint8))
