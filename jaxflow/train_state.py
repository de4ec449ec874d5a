"""The training state pytree and its sharded creation (parameters drawn on the host, no compiled forward pass).

The state holds arrays only (no functions), so orbax can save and restore it as is and jit can donate it:
  step      int32 ()  optimisation steps taken so far (= the data step of the next batch)
  params    float32 model parameters
  batch_stats          batch-norm statistics ({} for models without batch norm)
  opt_state            optax state
  rng       uint32 key data (4,) of an 'rbg' key, the run's base key; per-step keys are fold_in(rng, step)
  bad_step  int32 ()  first step whose loss or gradients were non-finite (no update applied), -1 if none
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax


# The PRNG implementation of the run's keys. 'rbg' (XLA's RngBitGenerator) rather than the default threefry:
# on XLA:CPU every threefry draw compiles for seconds (a jitted jax.random.normal of a 3x3x6x8 kernel takes
# ~8 s to compile on the loaded 2-core machine vs ~1 s with rbg), and model init draws one per parameter.
# Draws are still a pure function of (seed, backend); they differ from threefry's numbers.
PRNG_IMPL = "rbg"


def make_key(seed: int) -> jax.Array:
  """The run's base key of `seed` (an 'rbg' key array, shape ()).

  jax.random.key(seed) runs jax's seeding as a compiled program (its lookup or compile costs the start 0.05-0.2
  s). For an int seed in [0, 2**31) the 'rbg' key data is known on the host: threefry's seed halves (0, seed),
  twice, so the key is wrapped from them (the same key data, tested against jax.random.key); other seeds take
  jax's path."""
  if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and 0 <= int(seed) < 2 ** 31:
    half = [0, int(seed)]
    return jax.random.wrap_key_data(np.asarray(half + half, np.uint32), impl=PRNG_IMPL)
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


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (jax.jit hashes the function it wraps)
class InitFn:
  """What `create_train_state` needs to build a TrainState: the model, the optimiser and the image shape of the
  pair whose forward pass defines the parameter shapes. Calling it (key -> TrainState) is the traced
  `model.init` path (method='traced'); `variables` optionally carries a precomputed
  param_init.abstract_variables(model, image_shape) result so the forward pass is traced only once."""
  model: Any
  tx: optax.GradientTransformation
  image_shape: tuple[int, int, int, int]
  tx_for_params: Callable[[Any], optax.GradientTransformation] | None = None
  variables: tuple[dict[str, Any], dict[str, Any]] | None = None

  def __call__(self, key: jax.Array) -> TrainState:
    param_key, run_key = jax.random.split(key)
    variables = init_variables(self.model, param_key, self.image_shape)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=self.optimizer(params).init(params),
                      rng=jax.random.key_data(run_key), bad_step=jnp.full((), -1, jnp.int32))

  def optimizer(self, params: Any) -> optax.GradientTransformation:
    return self.tx_for_params(params) if self.tx_for_params is not None else self.tx


def make_init_fn(model: Any, tx: optax.GradientTransformation, image_shape: tuple[int, int, int, int],
                 tx_for_params: Callable[[Any], optax.GradientTransformation] | None = None,
                 variables: tuple[dict[str, Any], dict[str, Any]] | None = None) -> InitFn:
  """The InitFn of `model` (parameter shapes from a (B, H, W, 3) pair of `image_shape`) and optimiser `tx`
  (or tx_for_params(params)); `variables`: a precomputed param_init.abstract_variables(model, image_shape)."""
  return InitFn(model, tx, tuple(image_shape), tx_for_params, variables)


# Side of the dummy image pair whose (abstract) forward pass gives the parameter shapes: they do not depend on
# the image size, so it is traced on a small pair whatever the training crop.
INIT_SIZE = 64


def create_train_state(init_fn: Callable[[jax.Array], TrainState], seed: int,
                       sharding: jax.sharding.Sharding, method: str = "host", *,
                       exec_cache_dir: str | None = None, cache_key_parts: Mapping[str, Any] | None = None,
                       host_prefetch: Any = None) -> tuple[TrainState, TrainState]:
  """(state, abstract_state) for a run's `seed`, every leaf placed with `sharding`.

  method 'host' (default; needs an InitFn from make_init_fn): parameter shapes from jax.eval_shape of
  model.init (traced, not compiled) and values drawn on the host with numpy by jaxflow.param_init, keyed by
  (seed, parameter path), so every process builds identical values; each leaf follows its initialiser's
  distribution exactly (He-normal kernels: std sqrt(2 / fan_in); zero biases; ...), but the values are not
  those of model.init with jax's PRNG for the same seed. Only a small program (optimiser-state zeros, the run
  key) is compiled. A model parameter whose initialiser param_init does not know raises a ValueError naming
  it. method 'traced': the previous path, a jit of the traced model.init (jax's draws; compiles an init
  program of the whole forward pass, ~55 s for PWC-Net on the loaded 2-core CPU).
  The run key `rng` is the same under both methods: key_data(split(key(seed, 'rbg'))[1]).
  The abstract state holds ShapeDtypeStructs carrying `sharding` (for orbax restore and jit shardings).
  With `exec_cache_dir` and `cache_key_parts` (what identifies the optimiser, e.g. the run's config), the
  host path's small program goes through jaxflow.exec_cache (a warm start loads it instead of compiling).
  host_prefetch: a param_init.prefetch_host_variables(...) handle started earlier (values drawn in the
  background); used only when its tree, rules and seed are this state's, so the values never differ.
  """
  if method not in ("host", "traced"):
    raise ValueError(f"create_train_state: method must be 'host' or 'traced', got {method!r}")
  key = make_key(seed)
  if method == "host" and isinstance(init_fn, InitFn):
    state = _host_train_state(init_fn, key, seed, sharding, exec_cache_dir, cache_key_parts, host_prefetch)
  else:
    shapes = jax.eval_shape(init_fn, key)
    out_shardings = jax.tree.map(lambda _: sharding, shapes)
    lowered = jax.jit(init_fn, out_shardings=out_shardings).lower(key)
    state = lowered.compile(compiler_options=init_compiler_options(sharding))(key)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state)
  return state, abstract


def _host_train_state(init_fn: InitFn, key: jax.Array, seed: int, sharding: jax.sharding.Sharding,
                      exec_cache_dir: str | None, cache_key_parts: Mapping[str, Any] | None,
                      host_prefetch: Any = None) -> TrainState:
  from jaxflow import exec_cache, param_init
  options = init_compiler_options(sharding)
  use_cache = bool(exec_cache_dir) and cache_key_parts is not None
  # A warm start loads the small program's executable in a thread while the parameters are drawn (both
  # release the GIL).
  pending = exec_cache.prefetch("init_state", cache_key_parts, exec_cache_dir, options) if use_cache else None
  abstract, rules = init_fn.variables or param_init.abstract_variables(init_fn.model, init_fn.image_shape)
  host = host_prefetch.result(abstract, rules, seed) if host_prefetch is not None else None
  if host is None:
    host = param_init.host_variables(abstract, rules, seed)

  def put(x: np.ndarray) -> jax.Array:
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  params = jax.tree.map(put, host["params"])
  batch_stats = jax.tree.map(put, host.get("batch_stats", {}))
  opt = init_fn.optimizer(params)

  def rest(key, params):
    return (jnp.zeros((), jnp.int32), opt.init(params), jax.random.key_data(jax.random.split(key)[1]),
            jnp.full((), -1, jnp.int32))

  # Every output leaf gets `sharding` (a prefix of the output tree), so the outputs need no abstract trace here.
  jitted = jax.jit(rest, out_shardings=sharding)
  if use_cache:
    fn = exec_cache.CachedFunction(jitted, "init_state", cache_key_parts, exec_cache_dir, options,
                                   prefetched=pending)
    step, opt_state, rng, bad_step = fn(key, params)
  else:
    step, opt_state, rng, bad_step = jitted.lower(key, params).compile(compiler_options=options)(key, params)
  return TrainState(step=step, params=params, batch_stats=batch_stats, opt_state=opt_state, rng=rng,
                    bad_step=bad_step)


def init_compiler_options(sharding: jax.sharding.Sharding) -> dict[str, Any] | None:
  """XLA options for compiling the one-off init programs: on CPU, LLVM optimisation level 0.

  The traced init program runs once, but its per-parameter key derivations and draws make it large (PWC-Net:
  ~34k HLO lines, ~600 fusions): measured on the loaded 2-core machine at 64x64, level 0 cut its XLA:CPU compile
  from 24 to 15 CPU-s (draws equal up to 1 ulp). The host path's program (zeros and the run key) is small
  either way. Accelerators keep their defaults.
  """
  platforms = {d.platform for d in sharding.device_set}
  return {"xla_backend_optimization_level": 0} if platforms == {"cpu"} else None


def param_count(params: Any) -> int:
  return int(sum(p.size for p in jax.tree.leaves(params)))
