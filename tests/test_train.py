"""End-to-end training behaviour: real steps of every model, 1 vs 2 devices, exact resume (stop / SIGKILL),
the non-finite guard, logs, SpyNet's level-by-level stages."""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_helpers as th
from jaxflow import checkpointing, losses, optim, parallel, steps, trainer
from jaxflow.models import get_model, list_models
from jaxflow.train_state import create_train_state, make_init_fn, make_key

HERE = os.path.dirname(os.path.abspath(__file__))


def _assert_params_equal(a, b, exact=True):
  assert a.keys() == b.keys()
  for k in a:
    if exact:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    else:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=2e-6, err_msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 6-step run on 2 devices, with TensorBoard and flow images on."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  config = th.tiny_config(log_tensorboard=True, log_images=True)
  result = th.run(config, workdir)
  return workdir, th.params_npz(result["state"]), result


@pytest.mark.parametrize("name", list_models())
def test_one_real_step_of_every_model(name):
  model = get_model(name)
  shape = (2, 64, 64, 3)
  rng = np.random.default_rng(0)
  batch = {"image1": rng.random(shape, dtype=np.float32), "image2": rng.random(shape, dtype=np.float32),
           "flow": rng.normal(size=shape[:3] + (2,)).astype(np.float32), "valid": np.ones(shape[:3], np.float32)}
  outputs = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), batch["image1"], batch["image2"])[0])
  n_levels = len(outputs["flows"])
  loss_config = losses.default_config()
  loss_config.weights = losses.FLOWNET_WEIGHTS if n_levels == 5 else (1.0,) * n_levels
  cfg = optim.default_config()
  cfg.base_lr = 1e-3
  tx = optim.make_optimizer(cfg, 10)
  mesh = parallel.make_mesh(1)
  state, _ = create_train_state(make_init_fn(model, tx, shape), 0, parallel.replicated(mesh))
  before = jax.device_get(state.params)
  step = jax.jit(steps.make_train_step(model, tx, functools.partial(losses.compute_loss, loss_config)),
                 donate_argnums=0)
  state, metrics = step(state, parallel.to_global(batch, mesh))
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
  assert float(metrics["finite"]) == 1.0 and int(state.step) == 1 and int(state.bad_step) == -1
  after = jax.device_get(state.params)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
  assert all(changed), f"{name}: {changed.count(False)} of {len(changed)} parameter arrays did not change"


def test_two_devices_equal_one_device(tmp_path, reference):
  _, ref_params, _ = reference  # 2 devices
  config = th.tiny_config()
  one = th.params_npz(th.run(config, str(tmp_path / "one"), num_devices=1)["state"])
  _assert_params_equal(one, ref_params, exact=False)


def test_logs_config_and_checkpoints(reference):
  workdir, _, result = reference
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [2, 4, 6]
  assert all(np.isfinite(r["train/loss"]) and r["train/pairs_per_s"] > 0 for r in train_rows)
  assert train_rows[1]["train/lr"] == pytest.approx(5e-3)  # base 1e-2 halved at step 3
  final = rows[-1]
  assert final["final"] is True and final["step"] == 6
  assert 0 < final["synthetic_val/epe"] and final["best"]["value"] == final["synthetic_val/epe"]
  # Zero-flow baseline of the fixed held-out set, computed independently.
  gt = np.stack([th.example(10_000, i)["flow"] for i in range(6)])
  assert final["synthetic_val/zero_epe"] == pytest.approx(np.linalg.norm(gt, axis=-1).mean(), rel=1e-5)
  assert result["final"]["synthetic_val/epe"] == pytest.approx(final["synthetic_val/epe"])
  # The full metric set of jaxflow.metrics: pixel count (padding rows excluded), speed bands (every true flow here
  # is under 10 px), and the occlusion split of the set's masks, which must recompose the overall EPE.
  assert final["synthetic_val/num_pixels"] == gt.shape[0] * gt.shape[1] * gt.shape[2]
  assert final["synthetic_val/s0_10"] == pytest.approx(final["synthetic_val/epe"])
  assert math.isnan(final["synthetic_val/s10_40"]) and math.isnan(final["synthetic_val/s40plus"])
  n_occ = sum(e["occlusion"].sum() for e in th.fake_eval_iter(th.tiny_config(), "synthetic_val", batch_size=6,
                                                               process_index=0, process_count=1))
  assert 0 < n_occ < final["synthetic_val/num_pixels"]
  recomposed = (final["synthetic_val/epe_occ"] * n_occ
                + final["synthetic_val/epe_noc"] * (final["synthetic_val/num_pixels"] - n_occ))
  assert recomposed / final["synthetic_val/num_pixels"] == pytest.approx(final["synthetic_val/epe"], rel=1e-5)
  cfg = json.load(open(os.path.join(workdir, "config.json")))
  assert cfg["model"]["name"] == "tiny_test" and cfg["batch_size"] == 4
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(e.startswith("events.out.tfevents") for e in events)
  import tensorflow as tf
  tags = set()
  for e in events:
    for ev in tf.compat.v1.train.summary_iterator(os.path.join(workdir, "tensorboard", e)):
      tags.update(v.tag for v in ev.summary.value)
  assert {"train/loss", "synthetic_val/epe", "synthetic_val/image1_gt_pred"} <= tags


def test_resume_after_stop_matches_uninterrupted(tmp_path, reference):
  _, ref_params, _ = reference
  config = th.tiny_config()
  workdir = str(tmp_path / "resumed")
  first = th.run(config, workdir, stop_after_steps=3)
  assert first["interrupted"] and first["step"] == 3
  assert checkpointing.Checkpointer(workdir).all_steps() == [2, 3]
  second = th.run(config, workdir)
  assert second["step"] == 6 and not second["interrupted"]
  _assert_params_equal(th.params_npz(second["state"]), ref_params, exact=True)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "train/loss" in r] == [2, 3, 4, 6]


def test_resume_after_sigkill_matches_uninterrupted(tmp_path, reference):
  _, ref_params, _ = reference
  workdir = str(tmp_path / "killed")
  proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train_helpers.py"), workdir, "--steps", "6",
                           "--slow", "0.7"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  ckdir = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 120
  try:
    while not (os.path.isdir(os.path.join(ckdir, "2")) and os.path.exists(os.path.join(ckdir, "2", "_CHECKPOINT_METADATA"))):
      assert proc.poll() is None, f"trainer exited early:\n{proc.stdout.read()}"
      assert time.time() < deadline, "no checkpoint within 120 s"
      time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait(timeout=30)
  assert proc.returncode == -signal.SIGKILL
  latest = checkpointing.Checkpointer(workdir).latest_step()
  assert latest is not None and 2 <= latest < 6
  resumed = th.run(th.tiny_config(), workdir)
  assert resumed["step"] == 6
  _assert_params_equal(th.params_npz(resumed["state"]), ref_params, exact=True)


def test_non_finite_loss_stops_without_bad_checkpoint(tmp_path):
  def poisoned(config, **kw):
    for i, batch in enumerate(th.fake_train_iter(config, **kw), start=kw["start_step"]):
      if i == 3:
        batch = dict(batch, flow=np.full_like(batch["flow"], np.nan))
      yield batch

  workdir = str(tmp_path / "nan")
  with pytest.raises(trainer.NonFiniteLossError, match="at step 3"):
    th.run(th.tiny_config(), workdir, train_iter_fn=poisoned)
  ckpt = checkpointing.Checkpointer(workdir)
  assert ckpt.all_steps() == [2]


def test_spynet_level_by_level_stages(tmp_path):
  # Stage 1: a 2-level SpyNet; stage 2: 3 levels initialised from stage 1, only the new finest level trains.
  def cfg(levels, **kw):
    c = th.tiny_config(total_steps=2, batch_size=2, evals={}, **kw)
    # Narrow 3x3 level networks keep the compile short; the staging logic does not depend on the widths.
    c.model = {"name": "spynet", "levels": levels, "channels": (4, 4, 4, 4), "kernel_size": 3, "dtype": "float32"}
    c.loss.weights = (0.0,) * (levels - 1) + (1.0,)
    c.loss.div_flow = 1.0
    c.optim.base_lr = 1e-3
    return c

  s1 = th.run(cfg(2), str(tmp_path / "s1"))
  p1 = jax.device_get(s1["state"].params)
  s2 = th.run(cfg(3, init_from=str(tmp_path / "s1"), trainable_levels=(2,)), str(tmp_path / "s2"))
  p2 = jax.device_get(s2["state"].params)
  for level in ("G0", "G1"):
    for a, b in zip(jax.tree.leaves(p1[level]), jax.tree.leaves(p2[level])):
      np.testing.assert_array_equal(a, b)
  fresh = jax.device_get(jax.jit(lambda k: get_model("spynet", levels=3, channels=(4, 4, 4, 4), kernel_size=3).init(
      k, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32, 3)))["params"])(jax.random.split(make_key(0))[0]))
  assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fresh["G2"]), jax.tree.leaves(p2["G2"])))


def test_trainable_levels_rejected_for_other_models(tmp_path):
  with pytest.raises(ValueError, match="trainable_levels"):
    th.run(th.tiny_config(trainable_levels=(1,)), str(tmp_path / "x"))


def test_init_from_missing_checkpoint_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="init_from"):
    th.run(th.tiny_config(init_from=str(tmp_path / "nothing")), str(tmp_path / "x"))


YNN = "xla_cpu_experimental_ynn_fusion_type"


def test_compiler_options_reach_the_step_and_a_warm_start_loads_it(tmp_path, monkeypatch, capsys):
  """config.compiler_options go to the train step's compile (and its executable-cache key); a second start of the
  same config loads that executable instead of compiling, and trains to the same parameters."""
  from jaxflow import exec_cache, models
  models.list_models()
  monkeypatch.setitem(models._REGISTRY, "tiny_test", th.TinyFlow)  # registered: the trainer's exec cache is on
  old_dir = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))  # a fresh executable cache
  compiled_with = []
  real_compile = exec_cache._compile
  monkeypatch.setattr(exec_cache, "_compile",
                      lambda lowered, options, prefix="": compiled_with.append(options) or
                      real_compile(lowered, options, prefix))
  try:
    config = th.tiny_config(total_steps=2, compiler_options={YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"})
    kw = dict(train_iter_fn=th.fake_train_iter, eval_iter_fn=th.fake_eval_iter)
    cold = trainer.train_and_evaluate(config, str(tmp_path / "cold"), **kw)
    assert {YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"} in compiled_with
    entries = [p for p in os.listdir(tmp_path / "xla" / "jaxflow_executables") if p.startswith("train_step-")
               and p.endswith(".jaxexec")]
    assert len(entries) == 1
    # The stored program is the one compiled with the option: the loss's reductions are not YNNPACK fusions.
    stored = exec_cache.load(str(tmp_path / "xla" / "jaxflow_executables" / entries[0]))
    assert "%ynn_fusion" not in stored.as_text()
    capsys.readouterr()
    compiled_with.clear()
    warm = trainer.train_and_evaluate(config, str(tmp_path / "warm"), **kw)
    out = capsys.readouterr().out
    assert "train_step: loaded the compiled executable" in out and entries[0] in out
    assert not any(o and YNN in o for o in compiled_with)  # the train step was not compiled again
    _assert_params_equal(th.params_npz(warm["state"]), th.params_npz(cold["state"]))
    # Without the option the key differs: a miss, and the default program hands the reductions to YNNPACK.
    config.compiler_options = {}
    trainer.train_and_evaluate(config, str(tmp_path / "default"), **kw)
    entries_now = [p for p in os.listdir(tmp_path / "xla" / "jaxflow_executables") if p.startswith("train_step-")
                   and p.endswith(".jaxexec")]
    (other,) = set(entries_now) - set(entries)
    assert "%ynn_fusion" in exec_cache.load(str(tmp_path / "xla" / "jaxflow_executables" / other)).as_text()
  finally:
    jax.config.update("jax_compilation_cache_dir", old_dir)


@pytest.mark.parametrize("options, match", [
    ({"xla_bogus_option": "1"}, r"config\.compiler_options\.xla_bogus_option='1': XLA rejected .*No such compile"),
    ({YNN: "individual_convolution"}, r"config\.compiler_options\.xla_cpu_experimental_ynn_fusion_type="
                                      r"'individual_convolution': XLA rejected .*not a valid enum value"),
])
def test_an_option_xla_rejects_is_an_error_naming_the_key(tmp_path, options, match):
  config = th.tiny_config(total_steps=1, compiler_options=options)
  with pytest.raises(ValueError, match=match):
    th.run(config, str(tmp_path))
