r"""FlowNetC (Dosovitskiy et al., ICCV 2015; schedules of FlowNet 2.0).

  python -m jaxflow.train --config configs/flownet_c.py:local  --workdir runs/flownet_c_local
  python -m jaxflow.train --config configs/flownet_c.py:chairs --workdir runs/flownet_c_chairs   # S_long + warm-up
  python -m jaxflow.train --config configs/flownet_c.py:sintel --workdir runs/flownet_c_sintel \
      --config.init_from=runs/flownet_c_chairs --config.data.root=/path/to/datasets
  python -m jaxflow.train --config configs/flownet_c.py:kitti --workdir runs/flownet_c_kitti \
      --config.init_from=runs/flownet_c_chairs --config.data.root=/path/to/datasets

As FlowNetS, plus the FlowNet paper's warm-up for FlowNetC ("we started at 1e-6 and slowly increased to 1e-4
after 10k iterations"; linear here), correlation with max displacement 20 and stride 2 (model defaults).
"""

from configs import common


def get_config(arg: str | None = None):
  return common.flownet_config("flownet_c", arg, warmup_steps=10_000)


def sweep(add):
  """With and without the FlowNetC warm-up (short local runs)."""
  add(name="warmup", **{"optim.warmup_steps": 100})
  add(name="no_warmup", **{"optim.warmup_steps": 0})
