"""jaxflow: deep optical flow networks in JAX/Flax.

Conventions (see DESIGN.md): images float32 in [0, 1], RGB, NHWC; flow float32 (..., H, W, 2) in pixels,
channel 0 = u (right), 1 = v (down), mapping frame 1 to frame 2: I1(x) ~ I2(x + flow(x)).

`jaxflow.load(path)` returns a predictor `predict(image1, image2) -> flow` for a training workdir or a
checkpoint folder (see jaxflow.predictor); it is imported lazily, so `import jaxflow` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "__version__"]


def load(path: Any, step: int | None = None, *, dtype: str | None = None) -> Any:
  """Loads a checkpoint for inference: see :func:`jaxflow.predictor.load` (returns a Predictor)."""
  from jaxflow import predictor  # pylint: disable=import-outside-toplevel
  return predictor.load(path, step, dtype=dtype)
