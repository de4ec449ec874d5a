"""Shared by the data-parallel tests (warp, PWC-Net, FlowNetC): what a batch-sharded program moves between devices,
and a model's value and gradients under the trainer's sharding checked against the single-device ones."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

MOVING_OPS = ("all-gather", "all-to-all", "collective-permute")


def collectives(hlo: str) -> list[str]:
  """The compiled HLO's instructions that move activations between devices (an all-reduce of gradients aside)."""
  return [line for line in hlo.splitlines()
          if any(f" {op}(" in line or f" {op}-start(" in line for op in MOVING_OPS)]


def check_sharded_step(loss: Callable[..., Any], params: Any, im1: np.ndarray, im2: np.ndarray) -> str:
  """Jits value_and_grad(loss)(params, im1, im2) as the trainer does (parameters replicated, the batch sharded on
  'data' over 2 devices), asserts that the compiled program moves no activations between devices and that value
  and gradients equal the single-device ones; returns the compiled HLO text."""
  from jaxflow import parallel
  mesh = parallel.make_mesh(2)
  data, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)
  step = jax.jit(jax.value_and_grad(loss), in_shardings=(rep, data, data), out_shardings=(rep, rep))
  s1, s2 = jax.device_put(im1, data), jax.device_put(im2, data)
  hlo = step.lower(params, s1, s2).compile().as_text()
  moved = collectives(hlo)
  assert not moved, moved[:3]
  value, grads = step(params, s1, s2)
  ref_value, ref_grads = jax.jit(jax.value_and_grad(loss))(params, im1, im2)
  np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
  for a, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    scale = float(np.max(np.abs(np.asarray(r)))) + 1e-12
    np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(r) / scale, atol=1e-5)
  return hlo
