"""Differentiable optical-flow operators in plain JAX: cost volume, backward warp, flow-aware resizing."""

from jaxflow.ops.correlation import correlation
from jaxflow.ops.resize import image_pyramid, resize_flow
from jaxflow.ops.warp import warp, warp_with_mask

__all__ = ["correlation", "image_pyramid", "resize_flow", "warp", "warp_with_mask"]
