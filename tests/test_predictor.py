"""jaxflow.load / jaxflow.predictor: checkpoint discovery, generic restore, the model-fit check, the input rule,
one compilation per shape, and loading a checkpoint written by the real trainer."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxflow
from jaxflow import predictor
from jaxflow.models import get_model

TINY = {"name": "spynet", "levels": 3, "channels": [8, 8], "kernel_size": 3, "dtype": "float32"}


def _init(model_config, size=(64, 64), seed=0):
  model = predictor.build_model(model_config)
  x = np.zeros((1,) + size + (3,), np.float32)
  return model, jax.jit(lambda k: model.init({"params": k}, x, x, train=False))(jax.random.key(seed))


def _reference(model, variables, a, b):
  """The model applied directly (jit) to uint8 frames / 255, with a batch axis."""
  f = jax.jit(lambda v, x, y: model.apply(v, x, y, train=False)["flow"])
  return np.asarray(f(variables, a[None].astype(np.float32) / 255, b[None].astype(np.float32) / 255))[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny SpyNet (3 levels, 8 channels) saved at step 7: (workdir, model, variables)."""
  workdir = str(tmp_path_factory.mktemp("tiny"))
  model, variables = _init(TINY, seed=1)
  predictor.save_for_inference(workdir, TINY, variables, step=7)
  return workdir, model, variables


@pytest.fixture(scope="module")
def loaded(tiny):
  return jaxflow.load(tiny[0])


def _frames(shape, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 256, size=shape, dtype=np.uint8)
  b = np.roll(a, 2, axis=-2)
  return a, b


def test_load_matches_model_apply_for_every_path_form(tiny, loaded):
  workdir, model, variables = tiny
  a, b = _frames((70, 90, 3))  # not a multiple of 4: the model resizes internally, returns full size
  ref = _reference(model, variables, a, b)
  flow = loaded(a, b)
  assert flow.shape == (70, 90, 2) and flow.dtype == np.float32
  np.testing.assert_allclose(flow, ref, rtol=1e-5, atol=1e-5)
  assert np.abs(ref).max() > 0  # a random network predicts some motion: the comparison is not vacuous
  for path in (workdir, os.path.join(workdir, "checkpoints"), os.path.join(workdir, "checkpoints", "7")):
    p = predictor.load(path)
    assert p.step == 7 and p.checkpoint == os.path.join(workdir, "checkpoints", "7")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(p.variables), jax.device_get(variables))


def test_input_rule_and_batching(loaded):
  p = loaded
  a, b = _frames((2, 70, 90, 3), seed=3)
  batched = p.predict(a, b)
  assert batched.shape == (2, 70, 90, 2)
  # uint8 is divided by 255; float frames are taken as [0, 1]; uint16 by 65535.
  np.testing.assert_allclose(p(a[1], b[1]), batched[1], atol=1e-5)
  np.testing.assert_allclose(p(a.astype(np.float32) / 255, b.astype(np.float32) / 255), batched, atol=1e-5)
  np.testing.assert_allclose(p(a.astype(np.uint16) * 257, b.astype(np.uint16) * 257), batched, atol=1e-5)
  with pytest.raises(ValueError, match=r"\[0, 1\].*divide by 255"):
    p(a.astype(np.float32), b.astype(np.float32))
  with pytest.raises(TypeError, match="int32"):
    p(a.astype(np.int32), b.astype(np.int32))
  with pytest.raises(ValueError, match="same shape"):
    p(a[0], b[0, :40])
  with pytest.raises(ValueError, match=r"image1.*\(H, W, 3\)"):
    p(a[0, ..., :2], b[0, ..., :2])


def test_one_compilation_per_shape(loaded):
  p = loaded
  a, b = _frames((70, 90, 3))
  p(a, b)
  n = p.num_compilations
  p(a, b)
  p(a.astype(np.float32) / 255, b.astype(np.float32) / 255)  # same shape after conversion
  p(a[None], b[None])  # a single frame is a batch of one
  assert p.num_compilations == n
  p(a[:40], b[:40])
  assert p.num_compilations == n + 1


def test_checkpoint_of_another_model_names_the_parameter(tiny, tmp_path):
  workdir, _, variables = tiny
  other = str(tmp_path / "other")
  predictor.save_for_inference(other, TINY, variables, step=3)
  # Same model name, other widths: the first mismatched parameter is named with both shapes.
  with open(os.path.join(other, "config.json"), "w") as f:
    json.dump({"model": dict(TINY, channels=[8, 16])}, f)
  with pytest.raises(predictor.CheckpointError, match=r"checkpoints/3.*G0/conv1/bias.*\(8,\).*\(16,\)"):
    predictor.load(other)
  # Another model altogether: a parameter of the configured model is missing from the checkpoint.
  with open(os.path.join(other, "config.json"), "w") as f:
    json.dump({"model": {"name": "pwcnet", "pyramid_channels": [8, 8], "estimator_channels": [8],
                         "context": False, "output_level": 1, "search_range": 1}}, f)
  with pytest.raises(predictor.CheckpointError, match=r"checkpoints/3.*'pwcnet'.*missing"):
    predictor.load(other)
  # An extra level in the checkpoint (more SpyNet levels than configured) is also an error.
  with open(os.path.join(other, "config.json"), "w") as f:
    json.dump({"model": dict(TINY, levels=2)}, f)
  with pytest.raises(predictor.CheckpointError, match="G2"):
    predictor.load(other)


def test_missing_pieces_are_named(tiny, tmp_path):
  workdir, _, variables = tiny
  with pytest.raises(FileNotFoundError, match="does not exist"):
    predictor.load(tmp_path / "nowhere")
  empty = tmp_path / "empty"
  (empty / "checkpoints").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    predictor.load(empty)
  with pytest.raises(FileNotFoundError, match="not a workdir"):
    predictor.load(tmp_path)
  with pytest.raises(FileNotFoundError, match="step 5.*available steps: \\[7\\]"):
    predictor.load(workdir, step=5)
  noconf = str(tmp_path / "noconf")
  predictor.save_for_inference(noconf, TINY, variables)
  os.remove(os.path.join(noconf, "config.json"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    predictor.load(noconf)
  with open(os.path.join(noconf, "config.json"), "w") as f:
    json.dump({"model": {"name": "no_such_model"}}, f)
  with pytest.raises(predictor.CheckpointError, match="config.json.*no_such_model"):
    predictor.load(noconf)


class _TinyBN(nn.Module):
  """A conv + batch norm 'flow model' (not registered), to check the Predictor applies batch statistics."""

  @nn.compact
  def __call__(self, image1, image2, train: bool = False):
    x = nn.Conv(2, (3, 3))(jnp.concatenate([image1, image2], axis=-1))
    return {"flow": nn.BatchNorm(use_running_average=not train)(x)}


def test_batch_norm_statistics_are_restored_and_used(tmp_path):
  cfg = {"name": "flownet_s", "batch_norm": True, "encoder_features": [4, 4, 4, 4, 4, 4, 4, 4, 4, 4],
         "decoder_features": [4, 4, 4, 4]}
  model = predictor.build_model(cfg)
  shapes = predictor.abstract_variables(model)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  assert jax.tree.leaves(variables["batch_stats"])
  predictor.save_for_inference(tmp_path, cfg, variables, step=1)
  p = predictor.load(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(p.variables), variables)
  # The predictor applies the running statistics it holds (not fresh ones).
  bn = _TinyBN()
  a, b = _frames((16, 16, 3), seed=5)
  v = jax.tree.map(np.asarray, bn.init(jax.random.key(0), a[None] / 255.0, b[None] / 255.0))
  v["batch_stats"] = jax.tree.map(lambda x: x + 0.7, v["batch_stats"])
  flow = predictor.Predictor(bn, v)(a, b)
  x1, x2 = a[None] / np.float32(255), b[None] / np.float32(255)
  np.testing.assert_allclose(flow, np.asarray(bn.apply(v, x1, x2)["flow"])[0], rtol=1e-5, atol=1e-5)
  fresh = dict(v, batch_stats=jax.tree.map(np.zeros_like, v["batch_stats"]))
  assert np.abs(np.asarray(bn.apply(fresh, x1, x2)["flow"])[0] - flow).max() > 1e-3


def test_loads_a_checkpoint_written_by_the_trainer(tmp_path):
  import train_helpers as th  # the training tests' fake data and tiny config
  config = th.tiny_config(total_steps=2, checkpoint_every_steps=2, batch_size=2)
  config.model = dict(TINY)
  config.loss.weights = (0.25, 0.5, 1.0)
  result = th.run(config, str(tmp_path))
  p = jaxflow.load(tmp_path)
  assert p.step == 2
  a, b = _frames((32, 32, 3), seed=7)
  model = get_model("spynet", **{k: v for k, v in TINY.items() if k != "name"})
  ref = _reference(model, {"params": jax.device_get(result["state"].params)}, a, b)
  np.testing.assert_allclose(p(a, b), ref, rtol=1e-5, atol=1e-5)
