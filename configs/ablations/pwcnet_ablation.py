r"""PWC-Net ablation (paper Table 5 style): cost-volume search range, context network, dense connections, and
the cost volume's normalisation (the paper's raw correlation against the cosine one).

  python -m experiments.sweep --config configs/ablations/pwcnet_ablation.py:local --workdir runs/pwc_ablation --run
  python -m experiments.sweep --config configs/ablations/pwcnet_ablation.py:chairs --workdir runs/pwc_ablation --print

The base config is configs/pwcnet.py with the same variant; every run changes one thing from the full model
(search range 4, context network, DenseNet estimator). `local` uses the cosine cost volume and `chairs` the paper's,
so one of the two cost_volume_* runs repeats `full` there.
"""

from configs import pwcnet


def get_config(arg: str | None = None):
  return pwcnet.get_config(arg)


def sweep(add):
  add(name="full")
  add(name="search_range2", **{"model.search_range": 2})
  add(name="search_range6", **{"model.search_range": 6})
  add(name="no_context", **{"model.context": False})
  add(name="no_dense", **{"model.dense": False})
  add(name="cost_volume_raw", **{"model.cost_volume_norm": "none"})
  add(name="cost_volume_cosine", **{"model.cost_volume_norm": "cosine"})
