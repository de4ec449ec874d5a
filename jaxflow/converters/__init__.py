"""Readers of the official pretrained weights, one module per source format; used by `jaxflow.convert`.

  t7.py           a minimal Torch7 (.t7) reader (no Lua, no torchfile needed)
  torch_state.py  PyTorch state dicts (imports torch, an optional extra)
  spynet.py       SpyNet Lua Torch7 level files
  pwcnet.py       PWC-Net PyTorch (NVlabs) state dict
  flownet.py      FlowNet2-PyTorch FlowNetS / FlowNetC state dicts
Each `convert(...)` returns (model fields incl. 'name', variables {'params'[, 'batch_stats']}, notes).
"""

from jaxflow.converters.common import ConversionError

__all__ = ["ConversionError"]
