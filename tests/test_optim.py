"""Schedules against the papers' tables; the optimiser against an independent numpy Adam with coupled L2; the fused
optimiser (jaxflow.optim.fused_adam) against optax's chain, step by step from the same state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxflow import optim


def _cfg(**kw):
  c = optim.default_config()
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.mark.parametrize("name,table", [
  ("s_long", [(0, 1e-4), (399_999, 1e-4), (400_000, 5e-5), (599_999, 5e-5), (600_000, 2.5e-5),
              (800_000, 1.25e-5), (999_999, 1.25e-5), (1_000_000, 6.25e-6), (1_199_999, 6.25e-6)]),
  ("s_short", [(0, 1e-4), (299_999, 1e-4), (300_000, 5e-5), (400_000, 2.5e-5), (500_000, 1.25e-5),
               (599_999, 1.25e-5)]),
  ("s_fine", [(0, 1e-5), (199_999, 1e-5), (200_000, 5e-6), (300_000, 2.5e-6), (400_000, 1.25e-6)]),
])
def test_paper_schedules(name, table):
  p = optim.preset(name)
  assert p["total_steps"] == {"s_long": 1_200_000, "s_short": 600_000, "s_fine": 500_000}[name]
  sched = optim.make_schedule(_cfg(base_lr=p["base_lr"], boundaries=p["boundaries"]), p["total_steps"])
  for step, lr in table:
    assert float(sched(step)) == pytest.approx(lr, rel=1e-6), (name, step)


def test_flownet_c_warmup_then_schedule():
  p = optim.preset("s_short")
  sched = optim.make_schedule(_cfg(base_lr=1e-4, boundaries=p["boundaries"], warmup_steps=10_000,
                                   warmup_init_lr=1e-6), p["total_steps"])
  assert float(sched(0)) == pytest.approx(1e-6)
  assert float(sched(5_000)) == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6), rel=1e-5)
  assert float(sched(10_000)) == pytest.approx(1e-4)
  assert float(sched(300_000)) == pytest.approx(5e-5)


def test_preset_scaling_and_errors():
  p = optim.preset("s_long", scale=1e-3)
  assert p["boundaries"] == (400, 600, 800, 1000) and p["total_steps"] == 1200
  with pytest.raises(ValueError, match="s_medium"):
    optim.preset("s_medium")
  with pytest.raises(ValueError, match="config.optim.schedule='step'"):
    optim.make_schedule(_cfg(schedule="step"), 10)
  with pytest.raises(ValueError, match="boundaries"):
    optim.make_schedule(_cfg(boundaries=(5, 3)), 10)


def _numpy_reference(params, grads_seq, lr_fn, wd, clip=0.0, b1=0.9, b2=0.999, eps=1e-8):
  """Caffe-style solver: [clip raw grads] -> g + wd * w on kernels (ndim > 1) -> Adam -> w -= lr * step."""
  params = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v2 = {k: np.zeros_like(v) for k, v in params.items()}
  for t, grads in enumerate(grads_seq, start=1):
    grads = {k: g.astype(np.float64) for k, g in grads.items()}
    if clip:
      norm = np.sqrt(sum(np.sum(g ** 2) for g in grads.values()))
      grads = {k: g * min(1.0, clip / norm) for k, g in grads.items()}
    for k in params:
      g = grads[k] + (wd * params[k] if params[k].ndim > 1 else 0.0)
      m[k] = b1 * m[k] + (1 - b1) * g
      v2[k] = b2 * v2[k] + (1 - b2) * g * g
      mhat, vhat = m[k] / (1 - b1 ** t), v2[k] / (1 - b2 ** t)
      params[k] = params[k] - lr_fn(t - 1) * mhat / (np.sqrt(vhat) + eps)
  return params


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_adam_with_coupled_weight_decay_matches_numpy(clip, fused):
  rng = np.random.default_rng(0)
  params = {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32), "bias": rng.normal(size=(4,)).astype(np.float32)}
  grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) * 0.1 for k, v in params.items()} for _ in range(4)]
  wd = 0.05  # large so that a missing or decoupled decay would show
  cfg = _cfg(base_lr=0.1, boundaries=(2,), weight_decay=wd, clip_grad_norm=clip, fused_update=fused)
  tx = optim.make_optimizer(cfg, 4)
  assert isinstance(tx, optim.FusedAdam) == fused
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for g in grads_seq:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
  ref = _numpy_reference(params, grads_seq, lambda s: 0.1 if s < 2 else 0.05, wd, clip)
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("fused", [False, True])
def test_frozen_leaves_get_zero_updates(fused):
  params = {"G0": {"kernel": jnp.ones((3, 3, 1, 1))}, "G1": {"kernel": jnp.ones((3, 3, 1, 1))}}
  tx = optim.make_optimizer(_cfg(base_lr=0.1, fused_update=fused), 10,
                            trainable={"G0": {"kernel": False}, "G1": {"kernel": True}})
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  assert np.all(np.asarray(updates["G0"]["kernel"]) == 0)
  assert np.all(np.asarray(updates["G1"]["kernel"]) < 0)


# --- fused_adam against the optax chain ---------------------------------------------------------------------------

_SHAPES = {"conv1": {"kernel": (5, 5, 6, 16), "bias": (16,)}, "conv2": {"kernel": (3, 3, 16, 32), "bias": (32,)},
           "deconv": {"kernel": (4, 4, 32, 8)}, "predict": {"kernel": (3, 3, 8, 2), "bias": (2,)}}


def _tree(rng, scale):
  return jax.tree.map(lambda s: jnp.asarray((rng.normal(size=s) * scale).astype(np.float32)), _SHAPES,
                      is_leaf=lambda x: isinstance(x, tuple))


def _adam_state(chain_state):
  """The chain's ScaleByAdamState (count, mu, nu trees) inside its (possibly multi_transform) state."""
  found = [s for s in jax.tree.leaves(chain_state, is_leaf=lambda x: hasattr(x, "nu")) if hasattr(s, "nu")]
  assert len(found) == 1
  return found[0]


def _flat(tree, trainable=None):
  leaves = jax.tree.leaves(tree)
  keep = [True] * len(leaves) if trainable is None else jax.tree.leaves(trainable)
  return np.concatenate([np.ravel(np.asarray(x)) for x, t in zip(leaves, keep) if t])


def _ulp(x):
  """float32 spacing of |x| (float64 array)."""
  return np.spacing(np.abs(np.asarray(x, np.float64)).astype(np.float32)).astype(np.float64)


def _check_step(p0, g, adam0, p_ref, adam_ref, p_fused, state_fused, cfg, trainable=None):
  """fused vs chain after one step from the same state: the count exactly; each moment within k float32 ulps of
  the largest term of its update (b * old, (1 - b) * g_eff, the result); each parameter within 1 ulp of the
  parameter plus 2k ulps of the chain's update (p' - p); k = 2, or 4 with clipping (the global norm is a sum whose
  order XLA chooses per program, and it scales every gradient). XLA fuses the two programs differently, so the
  last bits of a contracted multiply-add or of the bias correction may differ; the chain itself differs by up to
  9 ulps of the parameter between its jitted and eager forms. An error of the formula (decay, bias correction,
  rate, leaf order) is far larger."""
  k = 4 if cfg.clip_grad_norm else 2
  assert int(state_fused.count) == int(adam_ref.count)
  g_eff = np.abs(_flat(g, trainable).astype(np.float64))  # clipping only shrinks it
  decayed = _flat(jax.tree.map(lambda p: p * (p.ndim > 1) * cfg.weight_decay, p0), trainable)
  g_eff = g_eff + np.abs(decayed)
  for row, name, b, gterm in ((0, "mu", cfg.b1, g_eff), (1, "nu", cfg.b2, g_eff ** 2)):
    old = _flat(getattr(adam0, name))  # the chain keeps moments of the trained leaves only
    ref = _flat(getattr(adam_ref, name))
    got = np.asarray(state_fused.moments[row], np.float64)
    bound = k * _ulp(np.maximum.reduce([b * np.abs(old), (1 - b) * gterm, np.abs(ref)]))
    err = np.abs(got - ref)
    assert np.all(err <= bound), (name, float(np.max(err / bound)))
  p0f, ref, got = (_flat(t, trainable).astype(np.float64) for t in (p0, p_ref, p_fused))
  bound = _ulp(np.maximum(np.abs(p0f), np.abs(ref))) + 2 * k * _ulp(ref - p0f)
  err = np.abs(got - ref)
  assert np.all(err <= bound), float(np.max(err / bound))
  assert np.mean(got == ref) > 0.9  # the same numbers, not merely close ones


@pytest.mark.parametrize("clip,decay_biases", [(0.0, False), (0.0, True), (0.05, False)])
def test_fused_guarded_update_matches_optax_chain(clip, decay_biases):
  rng = np.random.default_rng(1)
  cfg = _cfg(base_lr=1e-3, weight_decay=4e-4, decay_biases=decay_biases, clip_grad_norm=clip)
  chain = optim.make_optimizer(_cfg(**{**cfg, "fused_update": False}), 100)
  fused = optim.make_optimizer(_cfg(**{**cfg, "fused_update": True}), 100)
  step_chain = jax.jit(lambda g, s, p: optim.guarded_update(chain, g, s, p, jnp.asarray(True)))
  step_fused = jax.jit(lambda g, s, p: optim.guarded_update(fused, g, s, p, jnp.asarray(True)))
  p = _tree(rng, 0.1)
  state = chain.init(p)
  for _ in range(3):  # each step from the chain's state, converted to the fused layout
    g = _tree(rng, 0.01)
    adam = _adam_state(state)
    fstate = optim.FusedAdamState(adam.count, jnp.stack([jnp.asarray(_flat(adam.mu)), jnp.asarray(_flat(adam.nu))]))
    p_ref, state_ref = step_chain(g, state, p)
    p_fused, state_fused = step_fused(g, fstate, p)
    assert jax.tree.structure(p_fused) == jax.tree.structure(p)
    _check_step(p, g, adam, p_ref, _adam_state(state_ref), p_fused, state_fused, cfg)
    p, state = p_ref, state_ref


def test_fused_frozen_leaves_match_chain_and_have_no_moments():
  rng = np.random.default_rng(2)
  trainable = jax.tree.map(lambda _: False, _SHAPES, is_leaf=lambda x: isinstance(x, tuple))
  trainable["conv2"] = {"kernel": True, "bias": True}
  trainable["predict"]["kernel"] = True
  cfg = _cfg(base_lr=1e-3, weight_decay=4e-4)
  chain = optim.make_optimizer(_cfg(**{**cfg, "fused_update": False}), 100, trainable)
  fused = optim.make_optimizer(_cfg(**{**cfg, "fused_update": True}), 100, trainable)
  p, g = _tree(rng, 0.1), _tree(rng, 0.01)
  fstate = fused.init(p)
  n_trained = sum(int(np.prod(np.shape(x))) for x, t in zip(jax.tree.leaves(p), jax.tree.leaves(trainable)) if t)
  assert fstate.moments.shape == (2, n_trained)
  state = chain.init(p)
  p_ref, state_ref = jax.jit(lambda g, s, p: optim.guarded_update(chain, g, s, p, jnp.asarray(True)))(g, state, p)
  p_fused, state_fused = jax.jit(lambda g, s, p: optim.guarded_update(fused, g, s, p, jnp.asarray(True)))(g, fstate, p)
  for a, b, t in zip(jax.tree.leaves(p), jax.tree.leaves(p_fused), jax.tree.leaves(trainable)):
    if not t:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _check_step(p, g, _adam_state(state), p_ref, _adam_state(state_ref), p_fused, state_fused, cfg, trainable)


def test_fused_guarded_update_skips_non_finite_steps():
  rng = np.random.default_rng(3)
  fused = optim.make_optimizer(_cfg(base_lr=1e-3, weight_decay=4e-4), 100)
  step = jax.jit(lambda g, s, p, f: optim.guarded_update(fused, g, s, p, f))
  p = _tree(rng, 0.1)
  p1, s1 = step(_tree(rng, 0.01), fused.init(p), p, jnp.asarray(True))
  bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), _tree(rng, 0.01))
  p2, s2 = step(bad, s1, p1, jnp.asarray(False))
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(s2.count) == 1
  g = _tree(rng, 0.01)  # the next good step is the one that would have followed step 1 directly
  p3, s3 = step(g, s2, p2, jnp.asarray(True))
  p3_direct, s3_direct = step(g, s1, p1, jnp.asarray(True))
  for a, b in zip(jax.tree.leaves((p3, s3)), jax.tree.leaves((p3_direct, s3_direct))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fused_update_and_guarded_update_agree():
  """The optax interface (updates to add) and the guarded one give the same step."""
  rng = np.random.default_rng(4)
  fused = optim.make_optimizer(_cfg(base_lr=1e-3, weight_decay=4e-4), 100)
  p, g = _tree(rng, 0.1), _tree(rng, 0.01)
  state = fused.init(p)
  updates, s_plain = jax.jit(fused.update)(g, state, p)
  p_guarded, s_guarded = jax.jit(lambda g, s, p: fused.guarded_update(g, s, p, jnp.asarray(True)))(g, state, p)
  assert int(s_plain.count) == int(s_guarded.count) == 1
  np.testing.assert_allclose(np.asarray(s_plain.moments), np.asarray(s_guarded.moments), rtol=1e-6, atol=0)
  for a, u, b in zip(jax.tree.leaves(p), jax.tree.leaves(updates), jax.tree.leaves(p_guarded)):
    np.testing.assert_allclose(np.asarray(a + u), np.asarray(b), rtol=1e-6, atol=1e-9)


def test_fused_rejects_mixed_dtypes_naming_the_leaves():
  fused = optim.make_optimizer(_cfg(), 10)
  params = {"a": jnp.zeros((2, 2), jnp.float32), "b": jnp.zeros((3,), jnp.bfloat16)}
  with pytest.raises(ValueError, match=r"\['b'\].*bfloat16"):
    fused.init(params)
