"""Shared by the tests of CPU convolution paths: a small PWC-Net's loss and parameter gradients under the current
convolution settings, and the same under XLA's own convolutions as the reference."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxflow.ops import conv as conv_ops


def small_pwcnet_value_and_grad(**model_fields: Any) -> tuple[Callable[[], Any], Any]:
  """A PWC-Net of 2 levels (search range 2, context dilations 1, 2, plus `model_fields`) on two fixed random
  64x64 pairs, loss = sum over levels of mean((flow - 0.3)^2).

  Returns (run, reference): run() jits and evaluates ((loss, flows), parameter gradients) under the convolution
  settings in force when it is called (new trace each call); reference is that result computed now with XLA's
  convolutions (conv impl 'lax')."""
  from jaxflow.models import get_model
  model = get_model("pwcnet", search_range=2, context_dilations=(1, 2), **model_fields)
  rng = np.random.default_rng(7)
  im1, im2 = (jnp.asarray(rng.random((2, 64, 64, 3), np.float32)) for _ in range(2))
  variables = model.init(jax.random.key(0), im1, im2)

  def loss(params):
    flows = model.apply({**variables, "params": params}, im1, im2)["flows"]
    return sum(jnp.mean(jnp.square(f - 0.3)) for f in flows), flows

  def run():
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

  conv_ops.set_default_impl("lax")
  try:
    reference = run()
  finally:
    conv_ops.set_default_impl("auto")
  return run, reference
