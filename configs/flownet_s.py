r"""FlowNetS (Dosovitskiy et al., ICCV 2015; schedules of FlowNet 2.0, Ilg et al., CVPR 2017).

  python -m jaxflow.train --config configs/flownet_s.py:local  --workdir runs/flownet_s_local
  python -m jaxflow.train --config configs/flownet_s.py:chairs --workdir runs/flownet_s_chairs   # S_long
  python -m jaxflow.train --config configs/flownet_s.py:sintel --workdir runs/flownet_s_sintel \
      --config.init_from=runs/flownet_s_chairs --config.data.root=/path/to/datasets             # S_fine
  python -m jaxflow.train --config configs/flownet_s.py:kitti --workdir runs/flownet_s_kitti \
      --config.init_from=runs/flownet_s_chairs --config.data.root=/path/to/datasets

Facts used: batch 8; FlowNet 2.0's crops 448 x 320 and S_long schedule on Chairs (the original FlowNet paper
used 1e-4 halved every 100k after 300k, i.e. S_short: select it with `--config.optim.boundaries` or the
`chairs,schedule=s_short` variant option); Adam (0.9, 0.999); weight decay 4e-4 (Caffe solver); multiscale
EPE on flow / 20 with weights 0.32, 0.08, 0.02, 0.01, 0.005 (released prototxt, flow6 .. flow2).
"""

from configs import common


def get_config(arg: str | None = None):
  return common.flownet_config("flownet_s", arg)


def sweep(add):
  """Schedules compared in FlowNet 2.0 (S_short vs S_long), shortened 1000x for a quick comparison."""
  for schedule in ("s_short", "s_long"):
    add(name=schedule, **{"optim.boundaries": common.scaled_boundaries(schedule, 1e-3),
                          "total_steps": common.scaled_total(schedule, 1e-3)})
