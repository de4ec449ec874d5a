r"""SpyNet (Ranjan & Black, CVPR 2017): a 5-level spatial pyramid trained level by level.

Stage k (1..5) trains only G_{k-1}, with the coarser levels frozen and initialised from stage k-1's workdir:
  python -m jaxflow.train --config configs/spynet.py:chairs,stage=1 --workdir runs/spynet_s1
  python -m jaxflow.train --config configs/spynet.py:chairs,stage=2 --workdir runs/spynet_s2 \
      --config.init_from=runs/spynet_s1
  ... up to stage=5; or all five stages one after another:
  python -m experiments.sweep --config configs/spynet.py:chairs --workdir runs/spynet --run
Other variants:
  python -m jaxflow.train --config configs/spynet.py:local --workdir runs/spynet_local   # all levels at once
  python -m jaxflow.train --config configs/spynet.py:sintel --workdir runs/spynet_sintel \
      --config.init_from=runs/spynet/stage5 --config.data.root=/path/to/datasets

How a stage is trained here: the model always has all 5 levels (so every G_k sees exactly the images of its
pyramid level, as in the paper, where G_k is trained on level-k images), the loss is the EPE of level k's flow
only (a one-hot `loss.weights`), and `trainable_levels` freezes every other level. With
`spynet_copy_previous_level` (stage option `copy=1`), G_k starts from a copy of the trained G_{k-1} instead of a
fresh initialisation. SpyNet works in pixels, so `loss.div_flow` is 1. Paper facts: Adam (0.9, 0.999), batch 32
per stage, Chairs at 384 x 512 with augmentation; the per-stage learning rate and length are our choices
(1e-4 and 60k steps, then the S_fine-like halving), stated here rather than taken from the paper.
"""

import ml_collections

from configs import common

LEVELS = 5


def get_config(arg: str | None = None):
  variant, opts = common.parse_arg(arg, options={"stage": 0, "copy": False})
  c = common.base_config("spynet", levels=LEVELS)
  c.batch_size = 32
  c.optim.schedule = "piecewise"
  c.optim.base_lr = 1e-4
  c.optim.boundaries = (40_000, 50_000)
  c.total_steps = 60_000
  c.loss.div_flow = 1.0
  c.loss.weights = (0.0,) * (LEVELS - 1) + (1.0,)
  c.spynet_copy_previous_level = bool(opts["copy"])
  common.set_crop(c, (384, 512))
  stage = int(opts["stage"])
  if stage:
    if not 1 <= stage <= LEVELS:
      raise ValueError(f"spynet stage={stage} must be in 1..{LEVELS}")
    c.trainable_levels = (stage - 1,)
    c.loss.weights = tuple(1.0 if k == stage - 1 else 0.0 for k in range(LEVELS))
  if variant == "sintel":
    common.apply_schedule(c, "s_fine")
    c.batch_size = 8
    c.data.train = "sintel_final"
    common.set_crop(c, (384, 768))
    c.evals = common.real_evals(("sintel_clean", "sintel_final"))
    c.best_metric = "sintel_final/epe"
  elif variant == "kitti":
    common.apply_schedule(c, "s_fine")
    c.batch_size = 8
    c.data.train = "kitti2015"
    common.set_crop(c, (320, 896))
    c.evals = common.real_evals(("kitti2015",))
    c.best_metric = "kitti2015/epe"
  elif variant == "local":
    common.local_variant(c, steps=300, batch=4, crop=(128, 128), lr=3e-4)
    if not stage:  # all levels jointly (a quick local run, not the paper's procedure): equal weights
      c.loss.weights = (1.0,) * LEVELS
  return common.finalize(c)


def sweep(add):
  """The paper's five stages in order; stage k initialises from stage k-1 (`{root}` = the sweep directory)."""
  for stage in range(1, LEVELS + 1):
    overrides = {"trainable_levels": (stage - 1,),
                 "loss.weights": tuple(1.0 if k == stage - 1 else 0.0 for k in range(LEVELS))}
    if stage > 1:
      overrides["init_from"] = "{root}/stage%d" % (stage - 1)
    add(name=f"stage{stage}", **overrides)
