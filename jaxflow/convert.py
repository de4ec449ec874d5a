r"""`python -m jaxflow.convert`: official pretrained weights -> a jaxflow checkpoint folder.

  python -m jaxflow.convert --model spynet    --source spynet/models --variant F --out pretrained/spynet_sintel_final
  python -m jaxflow.convert --model pwcnet    --source pwc_net.pth.tar         --out pretrained/pwcnet
  python -m jaxflow.convert --model flownet_s --source FlowNet2-S_checkpoint.pth.tar --out pretrained/flownet_s
  python -m jaxflow.convert --model flownet_c --source FlowNet2-C_checkpoint.pth.tar --out pretrained/flownet_c

The output folder has the layout of a training run (see jaxflow/predictor.py):
  OUT/config.json            configs/<model>.py's config (variant --config_arg) with `model` set to the fields
                             that match the converted weights (read from their shapes)
  OUT/checkpoints/0/         orbax checkpoint of {'step': 0, 'params'[, 'batch_stats']}
so `python -m jaxflow.evaluate --workdir OUT`, `python -m jaxflow.infer ... --workdir OUT`, `jaxflow.load(OUT)`
and `python -m jaxflow.train ... --config.init_from=OUT` accept it. The converted parameters are checked
against the shapes of the jaxflow model built from that config before anything is written.

SpyNet reads the Lua Torch7 files with jaxflow's own reader; PWC-Net and FlowNet need PyTorch (the optional
extra `jaxflow[convert]`), imported only here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxflow.converters.common import ConversionError, check_tree

MODELS = ("spynet", "pwcnet", "flownet_s", "flownet_c")


def convert_weights(model: str, source: str, *, variant: str | None = None, levels: int | None = None,
                    bgr: bool = False, trust_pickle: bool = False
                    ) -> tuple[dict[str, Any], dict[str, Any], list[str], dict[str, str]]:
  """Reads the released weights of `model` from `source` -> (model fields incl. 'name', variables, notes,
  origins: jaxflow module path -> released layer name).

  variables is {'params': ...} (+ 'batch_stats' for FlowNet BN variants) as float32 numpy arrays in the jaxflow
  module tree. `variant` / `levels` are SpyNet options, `bgr` a FlowNet option, `trust_pickle` for PyTorch files.
  """
  if model not in MODELS:
    raise ValueError(f"unknown model {model!r}; convertible models: {', '.join(MODELS)}")
  if model != "spynet" and (variant is not None or levels is not None):
    raise ValueError("--variant and --levels apply to spynet only")
  if bgr and not model.startswith("flownet"):
    raise ValueError("--bgr applies to flownet_s / flownet_c only (PWC-Net handles its BGR input itself)")
  if model == "spynet":
    from jaxflow.converters import spynet  # pylint: disable=import-outside-toplevel
    return spynet.convert(source, levels=levels, variant=variant)
  if model == "pwcnet":
    from jaxflow.converters import pwcnet  # pylint: disable=import-outside-toplevel
    return pwcnet.convert(source, trust_pickle=trust_pickle)
  from jaxflow.converters import flownet  # pylint: disable=import-outside-toplevel
  return flownet.convert(source, model, bgr=bgr, trust_pickle=trust_pickle)


def _probe_size(fields: Mapping[str, Any]) -> int:
  """An input size the model runs at without resizing (only shapes are traced)."""
  name = fields["name"]
  if name == "spynet":
    return 2 ** (int(fields["levels"]) - 1) * 2
  if name == "pwcnet":
    return 2 ** len(fields["pyramid_channels"])
  return 64


def expected_variables(fields: Mapping[str, Any]) -> dict[str, Any]:
  """Shapes of the jaxflow model's variables for these fields (jax.eval_shape: nothing is computed)."""
  from jaxflow.models import get_model  # pylint: disable=import-outside-toplevel
  model = get_model(fields["name"], **{k: (tuple(v) if isinstance(v, list) else v)
                                       for k, v in fields.items() if k != "name"})
  n = _probe_size(fields)
  spec = jax.ShapeDtypeStruct((1, n, n, 3), jnp.float32)
  shapes = jax.eval_shape(lambda k, a, b: model.init({"params": k}, a, b, train=False), jax.random.key(0),
                          spec, spec)
  return shapes  # ShapeDtypeStructs


def build_config(fields: Mapping[str, Any], config_arg: str | None = None) -> Any:
  """configs/<model>.py get_config(config_arg) with `model` replaced by the converted model's fields."""
  module = importlib.import_module(f"configs.{fields['name']}")
  c = module.get_config(config_arg) if config_arg else module.get_config()
  with c.unlocked():
    for key, value in fields.items():
      if key == "name":
        continue
      if key not in c.model:
        raise ConversionError(f"configs/{fields['name']}.py: its model config has no field {key!r}")
      c.model[key] = tuple(value) if isinstance(value, list) else value
    if fields["name"] == "spynet":
      # One loss weight per level; as in the config, only the finest level's flow counts.
      n = int(fields["levels"])
      c.loss.weights = (0.0,) * (n - 1) + (1.0,)
      c.trainable_levels = ()
    c.init_from = ""
  return c


def write_checkpoint(out: str, config: Any, variables: Mapping[str, Any], *, force: bool = False) -> str:
  """Writes OUT/config.json and OUT/checkpoints/0 ({'step', 'params'[, 'batch_stats']}); returns the folder."""
  from jaxflow import checkpointing  # pylint: disable=import-outside-toplevel
  out = os.path.abspath(out)
  ckpt_dir = checkpointing.checkpoint_dir(out)
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    if not force:
      raise FileExistsError(f"{ckpt_dir} already holds checkpoints; choose an empty --out or pass --force")
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.rmtree(ckpt_dir)
  os.makedirs(out, exist_ok=True)
  tree = {"step": np.zeros((), np.int32)}
  tree.update({k: jax.tree.map(lambda x: np.asarray(x, np.float32), dict(v)) for k, v in variables.items()})
  ckpt = checkpointing.Checkpointer(out, max_to_keep=1, async_save=False)
  try:
    ckpt.save(0, tree)
    ckpt.wait()
  finally:
    ckpt.close()
  checkpointing.save_config(config, out)
  return os.path.join(ckpt_dir, "0")


def convert(model: str, source: str, out: str, *, variant: str | None = None, levels: int | None = None,
            bgr: bool = False, trust_pickle: bool = False, config_arg: str | None = None,
            force: bool = False) -> dict[str, Any]:
  """Converts and writes; returns {'checkpoint', 'model' (fields), 'params' (count), 'notes'}.

  Raises ConversionError naming the source file and layer when the weights do not fit.
  """
  fields, variables, notes, origins = convert_weights(model, source, variant=variant, levels=levels, bgr=bgr,
                                             trust_pickle=trust_pickle)
  expected = expected_variables(fields)
  for collection in ("params", "batch_stats"):
    want = expected.get(collection, {})
    have = variables.get(collection, {})
    if want or have:
      check_tree(have, want, collection, source, origins)
  config = build_config(fields, config_arg)
  path = write_checkpoint(out, config, variables, force=force)
  count = int(sum(np.size(x) for x in jax.tree.leaves(variables["params"])))
  return {"checkpoint": path, "model": dict(fields), "params": count, "notes": notes}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m jaxflow.convert", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, choices=MODELS)
  p.add_argument("--source", required=True,
                 help="spynet: folder of modelL<k>_<variant>.t7 files, a glob or a prefix; others: the .pth/.tar file")
  p.add_argument("--out", required=True, help="output folder (a jaxflow workdir)")
  p.add_argument("--variant", default=None, help="spynet: released variant suffix, e.g. F, C, 3, 4")
  p.add_argument("--levels", type=int, default=None, help="spynet: keep only the N coarsest levels")
  p.add_argument("--bgr", action="store_true", help="flownet: the checkpoint expects BGR input")
  p.add_argument("--trust_pickle", action="store_true",
                 help="allow arbitrary pickled objects in a PyTorch file (only for files you trust)")
  p.add_argument("--config_arg", default=None,
                 help="variant of configs/<model>.py for config.json, e.g. sintel (default: its default)")
  p.add_argument("--force", action="store_true", help="replace existing checkpoints in --out")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    result = convert(args.model, args.source, args.out, variant=args.variant, levels=args.levels, bgr=args.bgr,
                     trust_pickle=args.trust_pickle, config_arg=args.config_arg, force=args.force)
  except (ConversionError, FileNotFoundError, FileExistsError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  fields = ", ".join(f"{k}={v}" for k, v in result["model"].items() if k != "name")
  print(f"{args.model}: {result['params']:,} parameters -> {result['checkpoint']}")
  print(f"model fields: {fields}")
  for note in result["notes"]:
    print(f"note: {note}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
