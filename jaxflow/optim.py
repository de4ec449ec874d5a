"""Optimisers and learning-rate schedules of the FlowNet family, as optax objects.

Schedules (learning rate as a function of the optimisation step, counted from 0):
  - S_long  (FlowNet 2.0): 1e-4 until 400k, then halved at 400k, 600k, 800k and 1M; 1.2M iterations.
  - S_short (FlowNet 2.0, = the original FlowNet schedule): 1e-4, halved at 300k, 400k, 500k; 600k iterations.
  - S_fine  (FlowNet 2.0, fine-tuning): 1e-5, halved at 200k, 300k, 400k; 500k iterations.
  - FlowNetC warm-up (FlowNet paper, Sec. 5.1): "we started at 1e-6 and slowly increased to 1e-4 after 10k
    iterations"; the paper does not say how, we ramp linearly from `warmup_init_lr` to `base_lr`.

Optimiser: Adam(beta1=0.9, beta2=0.999, eps=1e-8) with Caffe-style weight decay 4e-4. Caffe's `weight_decay`
adds `wd * w` to the gradient *before* the solver update (coupled L2, not AdamW's decoupled decay), which is
what the released FlowNet / FlowNet 2.0 / PWC-Net solvers do; the released prototxts give biases
`decay_mult: 0`, so by default only kernels (parameters with ndim > 1) are decayed. Optional global-norm
gradient clipping acts on the raw gradients, before the decay term is added.

Two forms of the same optimiser (`config.optim.fused_update`):
  - the optax chain [clip] -> add_decayed_weights -> scale_by_adam -> scale_by_learning_rate, one optimiser
    state leaf per parameter leaf and moment;
  - `fused_adam` (default_config's choice): the same arithmetic with Adam's two moments kept as one (2, N) array
    over all trained parameters, applied by `guarded_update`, which writes the moments first (one kernel) and then
    each parameter from them, and applies the training step's skip of non-finite steps itself. For the chain,
    XLA:CPU emits three kernels per parameter leaf (parameter, mu, nu: it does not fuse outputs into one kernel),
    each recomputing the moments, and first copies every donated parameter and moment, because they are read
    again after being overwritten in place. Measured on the 128x128 b4 train step (BENCHMARKS.md, session 6):
    PWC-Net 6,896 fewer HLO instructions, compile 52.0 -> 46.0 CPU-s and step 1.68 -> 1.40 CPU-s; FlowNetS
    compile unchanged, step -3 %. Its parameters, moments and counter equal the chain's up to the last bits of
    a rounding (tests/test_optim.py); the optimiser state's layout differs, so a checkpoint written with one
    form does not restore into the other (the error names the entries). A config without the field (one
    written before it existed) keeps the chain.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

# name -> (base_lr, boundaries, total_steps) of the FlowNet 2.0 schedules; each boundary halves the rate.
PRESETS: dict[str, tuple[float, tuple[int, ...], int]] = {
  "s_long": (1e-4, (400_000, 600_000, 800_000, 1_000_000), 1_200_000),
  "s_short": (1e-4, (300_000, 400_000, 500_000), 600_000),
  "s_fine": (1e-5, (200_000, 300_000, 400_000), 500_000),
}

_SCHEDULES = ("piecewise", "constant", "cosine")


def default_config() -> ml_collections.ConfigDict:
  """The `config.optim` block: Adam + coupled weight decay on the S_short schedule, no clipping, no warm-up."""
  base_lr, boundaries, _ = PRESETS["s_short"]
  return ml_collections.ConfigDict({
    "schedule": "piecewise",      # one of piecewise | constant | cosine
    "base_lr": base_lr,
    "boundaries": boundaries,     # piecewise: steps at which the rate is multiplied by decay_factor
    "decay_factor": 0.5,
    "warmup_steps": 0,            # linear ramp from warmup_init_lr to the schedule's value over these steps
    "warmup_init_lr": 1e-6,
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
    "weight_decay": 4e-4,         # coupled L2 (Caffe weight_decay), added to the gradient before Adam
    "decay_biases": False,        # released prototxts: decay_mult 0 on biases
    "clip_grad_norm": 0.0,        # > 0: clip the global gradient norm to this value
    "fused_update": True,         # fused_adam (flat moments) instead of the per-leaf optax chain; same numbers
  })


def preset(name: str, scale: float = 1.0) -> dict[str, Any]:
  """Fields of `config.optim` (and the total step count) for a paper schedule, with all steps multiplied by scale.

  Returns a dict {base_lr, boundaries, total_steps}; `scale` < 1 compresses a schedule for short runs.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown schedule preset {name!r}; expected one of {sorted(PRESETS)}")
  base_lr, boundaries, total = PRESETS[name]
  return {"base_lr": base_lr, "boundaries": tuple(max(1, int(round(b * scale))) for b in boundaries),
          "total_steps": max(1, int(round(total * scale)))}


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Learning rate (float32 scalar) as a function of the step, from `config.optim`."""
  kind = optim.schedule
  if kind == "piecewise":
    boundaries = [int(b) for b in optim.boundaries]
    if any(b <= 0 for b in boundaries) or boundaries != sorted(boundaries):
      raise ValueError(f"config.optim.boundaries must be positive and increasing, got {tuple(optim.boundaries)}")
    main = optax.piecewise_constant_schedule(
        optim.base_lr, {b: float(optim.decay_factor) for b in boundaries})
  elif kind == "constant":
    main = optax.constant_schedule(optim.base_lr)
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(optim.base_lr, max(1, total_steps - optim.warmup_steps))
  else:
    raise ValueError(f"config.optim.schedule={kind!r} is not one of {_SCHEDULES}")
  warm = int(optim.warmup_steps)
  if warm < 0:
    raise ValueError(f"config.optim.warmup_steps must be >= 0, got {warm}")
  if warm == 0:
    return main
  ramp = optax.linear_schedule(optim.warmup_init_lr, optim.base_lr, warm)
  if kind == "cosine":
    return optax.join_schedules([ramp, main], [warm])

  # Warm-up on top of a piecewise/constant schedule keeps that schedule's absolute boundaries.
  def schedule(step):
    return jnp.where(step < warm, ramp(step), main(step))

  return schedule


def _decay_mask(decay_biases: bool) -> Callable[[Any], Any]:
  return lambda params: jax.tree.map(lambda p: decay_biases or p.ndim > 1, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int,
                   trainable: Any | None = None) -> optax.GradientTransformation:
  """Gradient transformation for `config.optim`: [clip] -> + wd * w -> Adam -> * -lr(step).

  `trainable`, if given, is a pytree of bools with the structure of the params: False leaves are frozen
  (their updates are exactly zero and they get no optimizer state beyond an empty placeholder).
  With `optim.fused_update` (default_config: True; absent: False) the result is a `FusedAdam` (see `fused_adam`),
  else the optax chain; both give the same parameters up to the last bits. Apply either with `guarded_update`.
  """
  clip = float(optim.clip_grad_norm) if optim.clip_grad_norm and optim.clip_grad_norm > 0 else 0.0
  schedule = make_schedule(optim, total_steps)
  if optim.get("fused_update", False):
    return fused_adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=float(optim.weight_decay),
                      decay_mask=_decay_mask(optim.decay_biases), clip_grad_norm=clip, trainable=trainable)
  parts = []
  if clip:
    parts.append(optax.clip_by_global_norm(clip))
  if optim.weight_decay:
    parts.append(optax.add_decayed_weights(optim.weight_decay, mask=_decay_mask(optim.decay_biases)))
  parts.append(optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps))
  parts.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*parts)
  if trainable is not None:
    labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  return tx


class FusedAdamState(NamedTuple):
  """State of `fused_adam`.

  count: int32 (), updates applied so far (the chain's scale_by_adam / scale_by_schedule count);
  moments: (2, N) Adam's first (row 0, the chain's mu) and second (row 1, nu) moments of every trained parameter,
  each leaf raveled (C order) and concatenated in the tree order of the parameters; N is their total size.
  """
  count: jax.Array
  moments: jax.Array

  @property
  def mu(self) -> jax.Array:
    return self.moments[0]

  @property
  def nu(self) -> jax.Array:
    return self.moments[1]


class FusedAdam(NamedTuple):
  """An optax GradientTransformation (init, update) with a `guarded_update` (see `guarded_update`)."""
  init: Callable[[Any], FusedAdamState]
  update: Callable[..., tuple[Any, FusedAdamState]]
  guarded_update: Callable[..., tuple[Any, FusedAdamState]]


def fused_adam(learning_rate: optax.Schedule, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 0.0, decay_mask: Callable[[Any], Any] | None = None,
               clip_grad_norm: float = 0.0, trainable: Any | None = None) -> FusedAdam:
  """Adam with coupled weight decay and optional global-norm clipping, moments as two flat vectors.

  The arithmetic is the optax chain's, operation by operation: clip_by_global_norm (on the trained leaves' raw
  gradients) -> g + weight_decay * w on the leaves `decay_mask(params)` marks -> optax's moment updates and bias
  corrections -> mu_hat / (sqrt(nu_hat + 0) + eps) -> times -learning_rate(count) -> added to the parameter.
  `trainable` (a pytree of bools like the params, None = all) freezes the False leaves: their updates are zero
  and they have no moments. Every trained leaf must have one floating dtype (the moments' dtype).

  `update(grads, state, params)` is the optax interface (updates to add; the frozen leaves' are zeros).
  `guarded_update(grads, state, params, finite)` -> (new params, new state): the moments are written first
  (where `finite` is False the old ones are kept, and the count does not advance) and each parameter is then
  updated from the written moments; where `finite` is False every parameter is returned unchanged.
  """
  if not isinstance(weight_decay, (int, float)):
    raise ValueError(f"fused_adam: weight_decay must be a number, got {weight_decay!r}")

  def layout(params: Any) -> tuple[list, list[bool], list[bool], Any]:
    leaves, treedef = jax.tree.flatten(params)
    flags = [True] * len(leaves) if trainable is None else [bool(t) for t in treedef.flatten_up_to(trainable)]
    decay = [False] * len(leaves)
    if weight_decay:
      mask = decay_mask(params) if decay_mask is not None else jax.tree.map(lambda _: True, params)
      decay = [bool(m) for m in treedef.flatten_up_to(mask)]
    dtypes = {jnp.dtype(p.dtype) for p, t in zip(leaves, flags) if t}
    if len(dtypes) > 1:
      names = [(jax.tree_util.keystr(k), str(jnp.dtype(v.dtype)))
               for k, v in jax.tree_util.tree_flatten_with_path(params)[0]]
      raise ValueError(f"fused_adam: every trained parameter needs one dtype for the flat moments, got {names}; "
                       "set config.optim.fused_update=False for mixed dtypes")
    return leaves, flags, decay, treedef

  def init(params: Any) -> FusedAdamState:
    leaves, flags, _, _ = layout(params)
    trained = [p for p, t in zip(leaves, flags) if t]
    dtype = trained[0].dtype if trained else jnp.float32
    n = sum(int(np.prod(p.shape)) for p in trained)
    return FusedAdamState(count=jnp.zeros([], jnp.int32), moments=jnp.zeros((2, n), dtype))

  def moments(grads: Any, state: FusedAdamState, params: Any):
    if params is None:
      raise ValueError("fused_adam: update needs the params (for the weight decay)")
    leaves, flags, decay, treedef = layout(params)
    g_leaves = treedef.flatten_up_to(grads)
    idx = [i for i, t in enumerate(flags) if t]
    g = [g_leaves[i] for i in idx]
    if clip_grad_norm:
      g = optax.clip_by_global_norm(clip_grad_norm).update(g, optax.EmptyState())[0]
    g = [gi + weight_decay * leaves[i] if decay[i] else gi for gi, i in zip(g, idx)]
    flat = jnp.concatenate([jnp.reshape(gi, (-1,)) for gi in g]) if g else jnp.zeros((0,), state.moments.dtype)
    # Both moments as one elementwise expression over the (2, N) array, so that XLA:CPU computes them in one
    # kernel that overwrites the donated moments in place. Row 0 is the chain's update_moment(g, mu, b1, 1):
    # (1 - b1) * g + b1 * mu; row 1 its update_moment_per_elem_norm(g, nu, b2, 2): (1 - b2) * g**2 + b2 * nu (the
    # coefficients rounded to float32 from the Python values, as there).
    m = state.moments
    first = jax.lax.broadcasted_iota(jnp.int32, m.shape, 0) == 0
    coef = lambda a, b: jnp.where(first, jnp.asarray(a, m.dtype), jnp.asarray(b, m.dtype))
    g2 = jnp.broadcast_to(flat, m.shape)
    moments = coef(1 - b1, 1 - b2) * jnp.where(first, g2, g2 * g2) + coef(b1, b2) * m
    return leaves, idx, treedef, moments, optax.safe_increment(state.count)

  def leaf_updates(leaves, idx, moments, count, count_inc) -> list:
    """Per trained leaf, the update to add (the chain's scale_by_adam then scale_by_learning_rate)."""
    step_size = -1 * learning_rate(count)
    out, offset = [], 0
    for i in idx:
      shape = leaves[i].shape
      n = int(np.prod(shape))
      m = jnp.reshape(moments[0, offset:offset + n], shape)
      v = jnp.reshape(moments[1, offset:offset + n], shape)
      offset += n
      m_hat = optax.tree.bias_correction(m, b1, count_inc)
      v_hat = optax.tree.bias_correction(v, b2, count_inc)
      u = m_hat / (jnp.sqrt(v_hat + 0.0) + eps)
      out.append(jnp.array(step_size, dtype=u.dtype) * u)
    return out

  def update(grads: Any, state: FusedAdamState, params: Any = None) -> tuple[Any, FusedAdamState]:
    leaves, idx, treedef, new_moments, count_inc = moments(grads, state, params)
    new = [jnp.zeros_like(p) for p in leaves]
    for i, u in zip(idx, leaf_updates(leaves, idx, new_moments, state.count, count_inc)):
      new[i] = u
    return jax.tree.unflatten(treedef, new), FusedAdamState(count=count_inc, moments=new_moments)

  def guarded(grads: Any, state: FusedAdamState, params: Any, finite: jax.Array) -> tuple[Any, FusedAdamState]:
    leaves, idx, treedef, new_moments, count_inc = moments(grads, state, params)
    new_moments = jnp.where(finite, new_moments, state.moments)
    # The barrier keeps XLA from fusing the moment updates into each parameter's kernel again (it would then
    # read the old moments after they were overwritten in place, and copy them first).
    new_moments = jax.lax.optimization_barrier(new_moments)
    new = list(leaves)
    for i, u in zip(idx, leaf_updates(leaves, idx, new_moments, state.count, count_inc)):
      p = leaves[i]
      new[i] = jnp.where(finite, jnp.asarray(p + u).astype(p.dtype), p)
    count = jnp.where(finite, count_inc, state.count)
    return jax.tree.unflatten(treedef, new), FusedAdamState(count=count, moments=new_moments)

  return FusedAdam(init, update, guarded)


def guarded_update(tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any,
                   finite: jax.Array) -> tuple[Any, Any]:
  """One optimiser step that is skipped when `finite` (bool scalar) is False: (new params, new opt_state).

  With a FusedAdam, its own guarded update; with any other transformation, tx.update + optax.apply_updates and
  a select of the old params / state where `finite` is False.
  """
  fused = getattr(tx, "guarded_update", None)
  if fused is not None:
    return fused(grads, opt_state, params, finite)
  updates, new_opt = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  return keep_if(finite, new_params, params), keep_if(finite, new_opt, opt_state)


def keep_if(finite: jax.Array, new: Any, old: Any) -> Any:
  """`new` where `finite` (bool scalar) is True, else `old`, leaf by leaf (the skip of a non-finite step)."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def learning_rate(optim: ml_collections.ConfigDict, total_steps: int, step: int) -> float:
  """The learning rate at `step` (host float), for logging."""
  return float(make_schedule(optim, total_steps)(step))
