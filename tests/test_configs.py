"""Config files: every variant builds and is locked; errors name the bad key / type / model / variant; the
command line and the sweep launcher apply and check overrides."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import common
from experiments import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("flownet_s", "flownet_c", "spynet", "pwcnet")
YNN = "xla_cpu_experimental_ynn_fusion_type"
CONV_ONLY = "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("variant", common.VARIANTS)
def test_every_variant_builds_locked_and_complete(model, variant):
  module = importlib.import_module(f"configs.{model}")
  assert "python -m jaxflow.train --config configs/" in module.__doc__
  c = module.get_config(variant)
  assert c.is_locked
  assert c.model.name == model and c.batch_size > 0 and c.total_steps > 0
  for key in ("seed", "loss", "optim", "data", "evals", "log_every_steps", "checkpoint_every_steps", "init_from"):
    assert key in c, key
  common.check_config(c)
  from jaxflow.models import get_model
  get_model(c.model.name, **{k: v for k, v in c.model.items() if k != "name"})  # every field is a model field
  with pytest.raises(AttributeError, match="bogus"):
    c.bogus = 1
  with pytest.raises(AttributeError, match="bogus"):
    c.model.bogus = 1
  with pytest.raises(TypeError, match="batch_size"):
    c.batch_size = "eight"


def test_paper_facts_in_chairs_configs():
  from configs import flownet_c, flownet_s, pwcnet
  s = flownet_s.get_config("chairs")
  assert (s.optim.base_lr, tuple(s.optim.boundaries), s.total_steps) == (1e-4, (400_000, 600_000, 800_000, 1_000_000), 1_200_000)
  assert s.batch_size == 8 and tuple(s.data.crop_size) == (320, 448) and s.optim.weight_decay == 4e-4
  assert tuple(s.loss.weights) == (0.32, 0.08, 0.02, 0.01, 0.005) and s.loss.div_flow == 20.0
  assert tuple(flownet_s.get_config("chairs,schedule=s_short").optim.boundaries) == (300_000, 400_000, 500_000)
  c = flownet_c.get_config("chairs")
  assert (c.optim.warmup_steps, c.optim.warmup_init_lr) == (10_000, 1e-6)
  p = pwcnet.get_config("chairs")
  assert tuple(p.data.crop_size) == (384, 448) and p.loss.reduction == "sum" and p.model.search_range == 4
  fine = pwcnet.get_config("sintel")
  assert fine.loss.kind == "robust" and fine.optim.base_lr == 1e-5 and tuple(fine.optim.boundaries) == (200_000, 300_000, 400_000)


def test_pwcnet_local_steps_option_and_cost_volume():
  from configs import pwcnet
  local = pwcnet.get_config("local")
  assert local.total_steps == 300 and tuple(local.optim.boundaries) == (180, 240)
  assert local.model.cost_volume_norm == "cosine" and pwcnet.get_config("chairs").model.cost_volume_norm == "none"
  long = pwcnet.get_config("local,steps=1600")
  assert long.total_steps == 1600 and tuple(long.optim.boundaries) == (960, 1280) and long.eval_every_steps == 200
  for arg in ("chairs,steps=5", "kitti,steps=300"):  # never silently ignored, even at local's default
    with pytest.raises(ValueError, match=r"steps=\d+ applies to the 'local' variant only"):
      pwcnet.get_config(arg)


def test_spynet_stages():
  from configs import spynet
  c = spynet.get_config("chairs,stage=3")
  assert tuple(c.trainable_levels) == (2,) and tuple(c.loss.weights) == (0, 0, 1, 0, 0) and c.model.levels == 5
  with pytest.raises(ValueError, match="stage=6"):
    spynet.get_config("chairs,stage=6")
  with pytest.raises(ValueError, match="stage='x'.*expected int"):
    spynet.get_config("chairs,stage=x")


def test_bad_variant_and_option_and_model_are_named():
  from configs import pwcnet
  with pytest.raises(ValueError, match="unknown config variant 'chair'"):
    pwcnet.get_config("chair")
  with pytest.raises(ValueError, match="unknown config option 'stage'"):
    pwcnet.get_config("chairs,stage=2")
  with pytest.raises(ValueError, match="unknown model 'pwcnet2'"):
    common.base_config("pwcnet2")
  with pytest.raises(ValueError, match="no field 'search_rang'"):
    common.model_config("pwcnet", search_rang=3)


def test_check_config_names_keys():
  from configs import pwcnet
  c = pwcnet.get_config("local")
  c.log_every_steps = 0
  with pytest.raises(ValueError, match="config.log_every_steps"):
    common.check_config(c)
  c = pwcnet.get_config("local")
  c.best_metric = "sintel/epe"
  with pytest.raises(ValueError, match="best_metric"):
    common.check_config(c)


def _train_cli(*args):
  return subprocess.run([sys.executable, "-m", "jaxflow.train", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)


def test_command_line_rejects_unknown_key_and_wrong_type(tmp_path):
  wd = f"--workdir={tmp_path}"
  r = _train_cli("--config=configs/pwcnet.py:local", wd, "--config.bogus_key=3")
  assert r.returncode != 0 and "bogus_key" in r.stderr
  r = _train_cli("--config=configs/pwcnet.py:local", wd, "--config.batch_size=abc")
  assert r.returncode != 0 and "batch_size" in r.stderr
  assert not os.path.exists(os.path.join(str(tmp_path), "checkpoints"))


def test_overridden_model_name_or_field_is_checked():
  from configs import pwcnet
  c = pwcnet.get_config("local")
  c.model.name = "pwcnet9"
  with pytest.raises(ValueError, match="unknown model 'pwcnet9'"):
    common.check_config(c)
  c = pwcnet.get_config("local")
  c.model.name = "spynet"  # pwcnet's fields are not spynet's
  with pytest.raises(ValueError, match="search_range"):
    common.check_config(c)


def test_sweep_expands_checks_and_prints(tmp_path, capsys):
  path, arg, base, runs = sweep.expand("configs/ablations/pwcnet_ablation.py:local")
  names = [n for n, _ in runs]
  assert names == ["full", "search_range2", "search_range6", "no_context", "no_dense", "cost_volume_raw",
                   "cost_volume_cosine"]
  assert dict(runs)["no_context"] == {"model.context": False}
  assert sweep.main(["--config", "configs/ablations/pwcnet_ablation.py:local", "--workdir", str(tmp_path),
                     "--print", "--config.total_steps=5"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 7
  assert f"--workdir={tmp_path}/search_range2" in lines[1] and "--config.model.search_range=2" in lines[1]
  assert all(line.endswith("--config.total_steps=5") for line in lines)
  with pytest.raises(ValueError, match="'model.search_rang'"):
    sweep.check_overrides(base, "x", {"model.search_rang": 2})
  with pytest.raises(ValueError, match="'batch_size'"):
    sweep.check_overrides(base, "x", {"batch_size": "big"})


def test_spynet_sweep_chains_stages(tmp_path):
  path, arg, base, runs = sweep.expand("configs/spynet.py:chairs")
  assert [n for n, _ in runs] == [f"stage{k}" for k in range(1, 6)]
  cmd = sweep.command(path, arg, str(tmp_path), *runs[2], [])
  assert f"--config.init_from={tmp_path}/stage2" in cmd and "--config.trainable_levels=(2,)" in cmd
  for name, overrides in runs:
    sweep.check_overrides(base, name, {k: sweep._substitute(v, str(tmp_path)) for k, v in overrides.items()})


def test_sweep_collects_final_rows(tmp_path):
  for name, epe in (("a", 1.5), ("b", 0.5)):
    os.makedirs(tmp_path / name)
    with open(tmp_path / name / "metrics.jsonl", "w") as f:
      f.write('{"step": 2, "train/loss": 1.0}\n')
      f.write('{"step": 4, "synthetic_val/epe": %f, "final": true, "best": {"value": %f}}\n' % (epe, epe))
  assert sweep.final_metrics(str(tmp_path / "a"))["synthetic_val/epe"] == 1.5
  assert sweep.final_metrics(str(tmp_path / "missing")) is None
  text = sweep.table([{"name": "a", "status": "done", "metrics": {"synthetic_val/epe": 1.5}},
                      {"name": "b", "status": "done", "metrics": {"synthetic_val/epe": 0.5}}])
  assert "1.5000" in text and "0.5000" in text and text.splitlines()[0].split() == ["run", "status", "synthetic_val/epe"]


def test_configs_load_without_tensorflow():
  # The trainer imports TensorFlow in its input-pipeline thread so that its ~5 s import overlaps the JAX side;
  # that only works if building and checking a config never imports it. A fresh interpreter is needed: this
  # test process has TensorFlow loaded already.
  code = ("import importlib, sys\n"
          "from configs import common\n"
          "for m in ('flownet_s', 'flownet_c', 'spynet', 'pwcnet', 'ablations.pwcnet_ablation'):\n"
          "  mod = importlib.import_module('configs.' + m)\n"
          "  for v in (('local',) if 'ablation' in m else common.VARIANTS):\n"
          "    c = mod.get_config(v)\n"
          "    if 'ablation' not in m: common.check_config(c)\n"
          "print('tensorflow' in sys.modules, sorted(k for k in sys.modules if k.startswith('data_pipelines')))\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert r.stdout.split()[0] == "False", r.stdout


def test_tensorflow_free_defaults_are_the_pipelines_defaults():
  from data_pipelines import augment, defaults, pipeline, synthetic_chairs
  assert pipeline.default_config().to_json() == defaults.data_config().to_json()
  assert synthetic_chairs.default_config().to_json() == defaults.synthetic_config().to_json()
  assert augment.default_config().to_json() == defaults.augment_config().to_json()
  # The configs' data block starts from them: a chairs config's generator settings are the defaults'.
  from configs import flownet_s
  c = flownet_s.get_config("chairs")
  assert c.data.synthetic.motion.to_json() == defaults.synthetic_config().motion.to_json()
  assert c.data.augment.to_json() == defaults.augment_config().to_json()


_PARSE_FLAGS = r"""
import json, sys
from absl import flags
import jaxflow.train  # defines --config and the trainer's other flags
flags.FLAGS(["train"] + sys.argv[1:])
from configs.common import check_config
check_config(flags.FLAGS.config)
print(json.dumps(flags.FLAGS.config.compiler_options.to_dict(), sort_keys=True))
"""


def _parsed_options(*args):
  r = subprocess.run([sys.executable, "-c", _PARSE_FLAGS, *args], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_compiler_options_per_model_and_from_the_command_line():
  from configs import flownet_c, flownet_s, pwcnet, spynet
  from jaxflow import trainer
  for module in (flownet_s, flownet_c, spynet):  # XLA's defaults (FlowNetC's step is slower without YNNPACK's dots)
    for variant in common.VARIANTS:
      assert trainer.compiler_options(module.get_config(variant)) is None
  for variant in common.VARIANTS:  # PWC-Net: YNNPACK on its convolutions only (BENCHMARKS.md, session 9)
    assert trainer.compiler_options(pwcnet.get_config(variant)) == {YNN: CONV_ONLY}
  # A given option's value; the whole set replaced (new names), or emptied; a bad value type named at check time.
  assert _parsed_options("--config=configs/pwcnet.py:local", f"--config.compiler_options.{YNN}=") == {YNN: ""}
  assert _parsed_options("--config=configs/flownet_s.py:local",
                         "--config.compiler_options={'xla_cpu_enable_fast_math': 'False'}") == \
      {"xla_cpu_enable_fast_math": "False"}
  assert _parsed_options("--config=configs/pwcnet.py:local", "--config.compiler_options={}") == {}
  c = pwcnet.get_config("local")
  c.compiler_options = {"xla_x": [1, 2]}
  with pytest.raises(ValueError, match=r"config\.compiler_options\.xla_x=\[1, 2\]"):
    common.check_config(c)
