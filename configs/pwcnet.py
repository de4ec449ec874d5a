r"""PWC-Net (Sun et al., CVPR 2018) on FlyingChairs-style pairs.

  python -m jaxflow.train --config configs/pwcnet.py:local  --workdir runs/pwcnet_local    # minutes on a CPU
  python -m jaxflow.train --config configs/pwcnet.py:local,steps=1500 --workdir runs/pwcnet_local30  # ~30 min
  python -m jaxflow.train --config configs/pwcnet.py:chairs --workdir runs/pwcnet_chairs   # paper: S_long
  python -m jaxflow.train --config configs/pwcnet.py:sintel --workdir runs/pwcnet_sintel \
      --config.init_from=runs/pwcnet_chairs --config.data.root=/path/to/datasets          # S_fine, robust loss
  python -m jaxflow.train --config configs/pwcnet.py:kitti --workdir runs/pwcnet_kitti \
      --config.init_from=runs/pwcnet_chairs --config.data.root=/path/to/datasets

Paper facts used: batch 8, 448 x 384 crops on Chairs, S_long schedule (lr 1e-4 halved at 0.4M, 0.6M, 0.8M,
1M; 1.2M iterations), Adam, weight decay 4e-4, multiscale loss weights 0.32, 0.08, 0.02, 0.01, 0.005 (levels
6..2) on flow / 20, summed over pixels (the paper's L2 training loss); fine-tuning: robust loss
(|.|_1 + 0.01)^0.4, S_fine-like schedule starting at 1e-5.

`local` departs from the paper's network in one training option: a cosine cost volume
(model.cost_volume_norm='cosine', see jaxflow/models/pwcnet.py; no parameter changes). With the paper's raw
correlation the network stays on the zero-flow plateau for the whole of a 30-minute CPU run (measured: 1,074 steps,
validation EPE 3.087 against a zero-flow 3.081); with the cosine it leaves the plateau after ~200 steps. Its Adam
learning rate is 4e-4 (paper: 1e-4 at batch 8; measured here with the cosine cost volume, validation EPE at step
500: 1.90 at 4e-4 against 2.62 at 2e-4, zero flow 3.08). Set
--config.model.cost_volume_norm=none for the paper's cost volume; the other variants use it. `local,steps=N` sets
the number of steps and scales the learning-rate drops (60 % and 80 % of N) and the evaluation interval with it.
"""

from configs import common


def get_config(arg: str | None = None):
  variant, opts = common.parse_arg(arg, options={"steps": 0})  # 0: the variant's own step count
  if opts["steps"] and variant != "local":
    raise ValueError(f"config option steps={opts['steps']} applies to the 'local' variant only, not {variant!r}")
  c = common.base_config("pwcnet")
  # XLA:CPU (jaxlib 0.10.2) hands convolutions, dots, reductions and elementwise products to YNNPACK by default;
  # PWC-Net's step keeps YNNPACK for its convolutions only, the rest become XLA's own kernels: the same steady
  # step at 128x128 and 384x512, a shorter warm start (fewer YNN fusions to find at the load and to build at the
  # first execution). BENCHMARKS.md, "Session 9: per-program compiler options". Ignored off the CPU.
  c.compiler_options.xla_cpu_experimental_ynn_fusion_type = "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
  common.apply_schedule(c, "s_long")
  c.loss.reduction = "sum"  # paper: sum over pixels per image (Eq. 1); the robust loss likewise
  c.loss.div_flow = c.model.div_flow
  common.set_crop(c, (384, 448))
  if variant == "sintel":
    common.apply_schedule(c, "s_fine")
    c.loss.kind = "robust"
    c.data.train = "sintel_final"
    common.set_crop(c, (384, 768))
    c.evals = common.real_evals(("sintel_clean", "sintel_final"))
    c.best_metric = "sintel_final/epe"
  elif variant == "kitti":
    common.apply_schedule(c, "s_fine")
    c.loss.kind = "robust"
    c.data.train = "kitti2015"
    common.set_crop(c, (320, 896))
    c.evals = common.real_evals(("kitti2015",))
    c.best_metric = "kitti2015/epe"
  elif variant == "local":
    # ~65 GFLOP per step (XLA cost analysis of the train step, 128 x 128, batch 4): about a second per step on
    # an idle 2-core CPU, so 300 steps take minutes.
    steps = opts["steps"] or 300
    common.local_variant(c, steps=steps, batch=4, crop=(128, 128), lr=4e-4)
    c.model.cost_volume_norm = "cosine"
    c.eval_every_steps = max(100, steps // 800 * 100)
    # The first step runs on the train step compiled at LLVM -O0 while the full program compiles in the background
    # (config.fast_compile_steps, CPU only): at 128x128 b4 the cold first step 14.0 -> 9.4 s, warm 1.4 -> 1.6 s
    # (quiet, median of 5). Not at the full-size variants: at 384x512 b8 the O0 step takes ~2x a full one, so a
    # cold start gains nothing (30.1 vs 29.8 s) and a warm one loses ~6 s; nor for the other models (short
    # compiles). BENCHMARKS.md, "Session 10: deterministic fast-compile first step".
    c.fast_compile_steps = 1
  return common.finalize(c)


def sweep(add):
  """Search range / context network / dense connections ablation (see configs/ablations/pwcnet_ablation.py)."""
  from configs.ablations import pwcnet_ablation
  pwcnet_ablation.sweep(add)
