"""jaxflow: deep optical flow networks in JAX/Flax.

Conventions (see DESIGN.md): images float32 in [0, 1], RGB, NHWC; flow float32 (..., H, W, 2) in pixels,
channel 0 = u (right), 1 = v (down), mapping frame 1 to frame 2: I1(x) ~ I2(x + flow(x)).
"""

__version__ = "0.1.0"
