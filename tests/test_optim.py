"""Schedules against the papers' tables; the optimiser against an independent numpy Adam with coupled L2."""

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


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_adam_with_coupled_weight_decay_matches_numpy(clip):
  rng = np.random.default_rng(0)
  params = {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32), "bias": rng.normal(size=(4,)).astype(np.float32)}
  grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) * 0.1 for k, v in params.items()} for _ in range(4)]
  wd = 0.05  # large so that a missing or decoupled decay would show
  cfg = _cfg(base_lr=0.1, boundaries=(2,), weight_decay=wd, clip_grad_norm=clip)
  tx = optim.make_optimizer(cfg, 4)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for g in grads_seq:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
  ref = _numpy_reference(params, grads_seq, lambda s: 0.1 if s < 2 else 0.05, wd, clip)
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_frozen_leaves_get_zero_updates():
  params = {"G0": {"kernel": jnp.ones((3, 3, 1, 1))}, "G1": {"kernel": jnp.ones((3, 3, 1, 1))}}
  tx = optim.make_optimizer(_cfg(base_lr=0.1), 10, trainable={"G0": {"kernel": False}, "G1": {"kernel": True}})
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  assert np.all(np.asarray(updates["G0"]["kernel"]) == 0)
  assert np.all(np.asarray(updates["G1"]["kernel"]) < 0)
