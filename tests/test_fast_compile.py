"""config.fast_compile_steps: the first K global steps run on the train step compiled at LLVM -O0, the rest on the
full program compiled in the background; which executable runs a step depends only on the config and the step."""

from __future__ import annotations

import importlib
import os

import jax
import numpy as np
import pytest

import train_helpers as th
from jaxflow import checkpointing, exec_cache, trainer

O0 = "xla_backend_optimization_level"


def _assert_states_equal(a, b):
  la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class _Counting:
  """A compiled executable that counts its calls."""

  def __init__(self, compiled, options):
    self.compiled, self.options, self.calls = compiled, dict(options or {}), 0

  def __call__(self, *args):
    self.calls += 1
    return self.compiled(*args)


def _spy(monkeypatch, wrap: bool) -> list:
  seen: list = []
  real = exec_cache._compile

  def spy(lowered, options, prefix=""):
    compiled = real(lowered, options, prefix)
    c = _Counting(compiled, options)
    seen.append(c)
    return c if wrap else compiled

  monkeypatch.setattr(exec_cache, "_compile", spy)
  return seen


@pytest.fixture
def compiles(monkeypatch):
  """Every executable exec_cache compiles (wrapped to count its calls: not storable), in compile order."""
  return _spy(monkeypatch, wrap=True)


@pytest.fixture
def compile_log(monkeypatch):
  """The options of every executable exec_cache compiles (not wrapped: the cache stores them)."""
  return _spy(monkeypatch, wrap=False)


def test_first_step_runs_the_o0_executable_then_the_full_one(tmp_path, compiles):
  config = th.tiny_config(total_steps=3, fast_compile_steps=1)
  result = th.run(config, str(tmp_path / "run"))
  assert result["tiers"] == [(0, "fast"), (1, "full")]
  assert [c.options.get(O0) for c in compiles] == [0, None]  # the O0 tier first, then the config's options only
  assert [c.calls for c in compiles] == [1, 2]  # step 0 on O0, steps 1 and 2 on the full program
  assert int(result["state"].step) == 3


def test_off_and_resumed_past_k_never_compile_the_o0_tier(tmp_path, compiles):
  th.run(th.tiny_config(total_steps=2, fast_compile_steps=0), str(tmp_path / "off"))
  assert [c.options.get(O0) for c in compiles] == [None]
  compiles.clear()
  workdir = str(tmp_path / "resumed")
  th.run(th.tiny_config(total_steps=3, fast_compile_steps=1), workdir, stop_after_steps=1)
  assert [c.options.get(O0) for c in compiles] == [0, None]
  compiles.clear()
  resumed = th.run(th.tiny_config(total_steps=3, fast_compile_steps=1), workdir)
  assert resumed["tiers"] == [] and [c.options.get(O0) for c in compiles] == [None]
  assert compiles[0].calls == 2


def test_results_depend_on_the_config_and_start_step_only(tmp_path):
  # K=1: two fresh runs are bitwise equal; a resume from step 1 (>= K: full program only) equals the uninterrupted
  # run (not tiered: no tiers recorded). K=2: a resume from step 1 (< K) runs step 1 on O0 as the uninterrupted run did.
  for k in (1, 2):
    config = th.tiny_config(total_steps=3, fast_compile_steps=k, checkpoint_every_steps=1)
    a = th.run(config, str(tmp_path / f"a{k}"))
    b = th.run(config, str(tmp_path / f"b{k}"))
    _assert_states_equal(a["state"], b["state"])
    workdir = str(tmp_path / f"resumed{k}")
    first = th.run(config, workdir, stop_after_steps=1)
    assert first["interrupted"] and checkpointing.Checkpointer(workdir).latest_step() == 1
    second = th.run(config, workdir)
    assert second["tiers"] == ([] if k == 1 else [(1, "fast"), (2, "full")])
    _assert_states_equal(second["state"], a["state"])


def test_warm_start_compiles_neither_tier(tmp_path, monkeypatch, compile_log, capsys):
  from jaxflow import models
  models.list_models()
  monkeypatch.setitem(models._REGISTRY, "tiny_test", th.TinyFlow)  # registered: the trainer's exec cache is on
  old_dir = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
  try:
    config = th.tiny_config(total_steps=2, fast_compile_steps=1)
    kw = dict(train_iter_fn=th.fake_train_iter, eval_iter_fn=th.fake_eval_iter)
    cold = trainer.train_and_evaluate(config, str(tmp_path / "cold"), **kw)
    # init_state (compiled at O0 on CPU itself: train_state.init_compiler_options), the O0 tier, the full one
    assert [c.options.get(O0) for c in compile_log] == [0, 0, None]
    names = sorted(p.split("-")[0] for p in os.listdir(tmp_path / "xla" / "jaxflow_executables")
                   if p.endswith(".jaxexec") and p.startswith("train_step"))
    assert names == ["train_step", "train_step_o0"]
    compile_log.clear()
    capsys.readouterr()
    warm = trainer.train_and_evaluate(config, str(tmp_path / "warm"), **kw)
    out = capsys.readouterr().out
    assert compile_log == []  # neither tier (nor the init program) compiled: all loaded
    assert "train_step_o0: loaded the compiled executable" in out and "train_step: loaded the compiled" in out
    assert warm["tiers"] == [(0, "fast"), (1, "full")]
    _assert_states_equal(warm["state"], cold["state"])
  finally:
    jax.config.update("jax_compilation_cache_dir", old_dir)


@pytest.mark.parametrize("value", [-1, 1.5, "1", True])
def test_bad_value_is_an_error_naming_the_key(tmp_path, value):
  from configs.common import check_config
  import ml_collections
  # A locked config's int field refuses other types itself (ml_collections); a config built from a dict does not.
  fields = importlib.import_module("configs.flownet_s").get_config("local").to_dict()
  config = ml_collections.ConfigDict({**fields, "fast_compile_steps": value})
  with pytest.raises(ValueError, match=r"config\.fast_compile_steps"):
    check_config(config)
  with pytest.raises(ValueError, match=r"config\.fast_compile_steps"):
    th.run(th.tiny_config(total_steps=1, fast_compile_steps=value), str(tmp_path / "x"))


@pytest.mark.parametrize("name", ["flownet_s", "flownet_c", "spynet", "pwcnet"])
@pytest.mark.parametrize("variant", ["local", "chairs"])
def test_model_configs_fast_steps(name, variant):
  # Only PWC-Net's small local variant gains from the O0 first step; every other config keeps it off.
  expected = 1 if (name, variant) == ("pwcnet", "local") else 0
  assert importlib.import_module(f"configs.{name}").get_config(variant).fast_compile_steps == expected



def test_full_compile_and_o0_store_start_after_the_first_step(tmp_path, monkeypatch):
  # The first step runs alone (both cores); the O0 entry is written and the full program compiled after it.
  from jaxflow import models
  models.list_models()
  monkeypatch.setitem(models._REGISTRY, "tiny_test", th.TinyFlow)  # registered: the trainer's exec cache is on
  events: list[str] = []
  real_compile, real_store = exec_cache._compile, exec_cache.store
  tier = lambda options: "o0" if (options or {}).get(O0) == 0 else "full"

  class Step:
    def __init__(self, compiled, options):
      self.compiled, self.tier = compiled, tier(options)

    def __call__(self, *args):
      out = jax.block_until_ready(self.compiled(*args))
      events.append(f"run {self.tier}")
      return out

  def compile_spy(lowered, options, prefix=""):
    compiled = real_compile(lowered, options, prefix)
    events.append(f"compile {tier(options)}")
    return Step(compiled, options)

  def store_spy(path, compiled, executable_bytes=None):
    name = os.path.basename(path).split("-")[0]
    events.append(f"store {name}")
    return real_store(path, compiled.compiled if isinstance(compiled, Step) else compiled, executable_bytes)

  monkeypatch.setattr(exec_cache, "_compile", compile_spy)
  monkeypatch.setattr(exec_cache, "store", store_spy)
  old_dir = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
  try:
    trainer.train_and_evaluate(th.tiny_config(total_steps=2, fast_compile_steps=1), str(tmp_path / "run"),
                               train_iter_fn=th.fake_train_iter, eval_iter_fn=th.fake_eval_iter)
  finally:
    jax.config.update("jax_compilation_cache_dir", old_dir)
  # From the train step's O0 compile on (the init program before it is compiled at O0 too).
  start = len(events) - 1 - events[::-1].index("compile o0")
  assert events[start:] == ["compile o0", "run o0", "store train_step_o0", "compile full", "store train_step",
                            "run full"], events
