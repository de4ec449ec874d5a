"""Orbax checkpoint wrapper: round trip into sharded abstract targets, keep-last-K, mismatch errors, config.json."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import train_helpers as th
from jaxflow import checkpointing, optim, parallel
from jaxflow.train_state import create_train_state, make_init_fn


def _state(features=8, seed=0):
  mesh = parallel.make_mesh()
  model = th.TinyFlow(features=features)
  tx = optim.make_optimizer(optim.default_config(), 10)
  return create_train_state(make_init_fn(model, tx, (1, 16, 16, 3)), seed, parallel.replicated(mesh))


def test_round_trip_keep_last_and_shardings(tmp_path):
  state, abstract = _state()
  ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=2)
  for step in (1, 2, 3):
    bumped = state.replace(step=jnp.asarray(step, jnp.int32),
                           params=jax.tree.map(lambda p: p + step, state.params))
    assert ckpt.save(step, bumped)
  assert not ckpt.save(3, state)  # an existing step is not overwritten
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
  assert sorted(os.listdir(checkpointing.checkpoint_dir(str(tmp_path)))) == ["2", "3"]
  restored = ckpt.restore(abstract)
  ckpt.close()
  assert int(restored.step) == 3
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b) + 3)
  for a, b in zip(jax.tree.leaves(restored.opt_state), jax.tree.leaves(state.opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(restored.rng), np.asarray(state.rng))
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == jax.device_count()


def test_restore_into_a_different_model_names_the_checkpoint(tmp_path):
  state, _ = _state(features=8)
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(5, state)
  _, other = _state(features=4)
  # Named from the checkpoint's metadata before any array is read: the parameter path and both shapes.
  with pytest.raises(ValueError, match=r"checkpoints/5 does not match.*params/Conv_0/bias has shape \(8,\) in the "
                     r"checkpoint, \(4,\) in the state"):
    ckpt.restore(other)
  ckpt.close()


def test_restore_with_another_optimizer_names_the_missing_entries(tmp_path):
  state, _ = _state()
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(2, state)
  mesh = parallel.make_mesh()
  chain = optim.default_config()
  chain.fused_update = False  # the per-leaf optax chain instead of the fused optimiser's flat moments
  _, other = create_train_state(make_init_fn(th.TinyFlow(features=8), optim.make_optimizer(chain, 10),
                                             (1, 16, 16, 3)), 0, parallel.replicated(mesh))
  with pytest.raises(ValueError, match=r"checkpoints/2 does not match.*entries of the state are not in the "
                     r"checkpoint \(first: opt_state/1/count\).*checkpoint entries are not in the state "
                     r"\(first: opt_state/count\) \(the checkpoint's optimizer state is fused: resume with "
                     r"--config.optim.fused_update=True\)"):
    ckpt.restore(other)
  ckpt.close()


def test_restore_without_checkpoint_is_an_error(tmp_path):
  _, abstract = _state()
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    ckpt.restore(abstract)
  ckpt.close()


def test_config_json(tmp_path):
  config = ml_collections.ConfigDict({"seed": 3, "model": {"name": "pwcnet", "pyramid_channels": (16, 32)}})
  path = checkpointing.save_config(config, str(tmp_path))
  assert path == os.path.join(str(tmp_path), "config.json")
  data = checkpointing.load_config_json(str(tmp_path))
  assert data == {"seed": 3, "model": {"name": "pwcnet", "pyramid_channels": [16, 32]}}
  assert json.load(open(path)) == data
