"""The training state pytree and its (sharded, trace-free) creation.

The state holds arrays only (no functions), so orbax can save and restore it as is and jit can donate it:
  step      int32 ()  optimisation steps taken so far (= the data step of the next batch)
  params    float32 model parameters
  batch_stats          batch-norm statistics ({} for models without batch norm)
  opt_state            optax state
  rng       uint32 key data (4,) of an 'rbg' key, the run's base key; per-step keys are fold_in(rng, step)
  bad_step  int32 ()  first step whose loss or gradients were non-finite (no update applied), -1 if none
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax


# The PRNG implementation of the run's keys. 'rbg' (XLA's RngBitGenerator) rather than the default threefry:
# on XLA:CPU every threefry draw compiles for seconds (a jitted jax.random.normal of a 3x3x6x8 kernel takes
# ~8 s to compile on the loaded 2-core machine vs ~1 s with rbg), and model init draws one per parameter.
# Draws are still a pure function of (seed, backend); they differ from threefry's numbers.
PRNG_IMPL = "rbg"


def make_key(seed: int) -> jax.Array:
  return jax.random.key(seed, impl=PRNG_IMPL)


def wrap_key(data: jax.Array) -> jax.Array:
  return jax.random.wrap_key_data(data, impl=PRNG_IMPL)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  bad_step: jax.Array


def init_variables(model: Any, rng: jax.Array, image_shape: tuple[int, int, int, int]) -> dict[str, Any]:
  """Model variables for images of shape (B, H, W, 3) (values do not matter; zeros are used)."""
  images = jnp.zeros(image_shape, jnp.float32)
  return model.init({"params": rng}, images, images, train=False)


def make_init_fn(model: Any, tx: optax.GradientTransformation, image_shape: tuple[int, int, int, int],
                 tx_for_params: Callable[[Any], optax.GradientTransformation] | None = None
                 ) -> Callable[[jax.Array], TrainState]:
  """A function seed-key -> TrainState, to be run under jax.eval_shape and then jitted with out_shardings."""

  def init(key: jax.Array) -> TrainState:
    param_key, run_key = jax.random.split(key)
    variables = init_variables(model, param_key, image_shape)
    params = variables["params"]
    opt = tx_for_params(params) if tx_for_params is not None else tx
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=opt.init(params),
                      rng=jax.random.key_data(run_key), bad_step=jnp.full((), -1, jnp.int32))

  return init

# Side of the dummy image pair that initialises the parameters: their shapes do not depend on the image size, so
# the one-off init program (a traced forward pass) runs on a small pair whatever the training crop.
INIT_SIZE = 64


def create_train_state(init_fn: Callable[[jax.Array], TrainState], seed: int,
                       sharding: jax.sharding.Sharding) -> tuple[TrainState, TrainState]:
  """(state, abstract_state): the abstract state (ShapeDtypeStructs carrying `sharding`) comes from
  jax.eval_shape, the concrete one from a jit of init_fn with out_shardings, so no forward pass is wasted."""
  key = make_key(seed)
  shapes = jax.eval_shape(init_fn, key)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
  out_shardings = jax.tree.map(lambda _: sharding, shapes)
  lowered = jax.jit(init_fn, out_shardings=out_shardings).lower(key)
  state = lowered.compile(compiler_options=init_compiler_options(sharding))(key)
  return state, abstract


def init_compiler_options(sharding: jax.sharding.Sharding) -> dict[str, Any] | None:
  """XLA options for compiling the one-off init program: on CPU, LLVM optimisation level 0.

  The init program runs once, but its per-parameter key derivations and truncated-normal draws make it large
  (PWC-Net: ~34k HLO lines, ~600 fusions): measured on the loaded 2-core machine at 64x64, level 0 cuts its
  XLA:CPU compile from 24 to 15 CPU-s. The draws are the same up to last-bit rounding (LLVM instruction
  selection differs; measured max difference 1 ulp); accelerators keep their defaults.
  """
  platforms = {d.platform for d in sharding.device_set}
  return {"xla_backend_optimization_level": 0} if platforms == {"cpu"} else None


def param_count(params: Any) -> int:
  return int(sum(p.size for p in jax.tree.leaves(params)))
