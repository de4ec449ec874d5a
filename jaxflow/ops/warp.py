"""Backward bilinear warping with pixel centres at integer coordinates and zero padding.

`warp(image, flow)(b, y, x) = image(b, y + v, x + u)` sampled bilinearly, where (u, v) = flow(b, y, x) in
pixels (u to the right, v down). Each of the four bilinear corners that lies outside the image contributes
zero, exactly like sampling a zero-padded image; there is no normalised-coordinate / align_corners step.

Two implementations with the same maths:
- `warp_reference`: plain jnp (one gather per corner), differentiated by JAX autodiff. Kept as the
  reference the fast version is tested against.
- `warp`: a `jax.custom_vjp`. Forward: four row gathers that XLA fuses with the weighted sum, so no
  (B, H*W, 4, C) array of corner values is stored; the image itself is the residual. Backward, image by
  image (`lax.map`, so the scattered-into gradient and the gathered image stay in cache): the image
  gradient as one scatter-add of all four corners (autodiff emits four scatters and extra intermediates)
  and the flow gradient from g . image(corner), the corners gathered again in one gather. On XLA:CPU this
  is 2.8x faster than one stored gather plus a batch-wide scatter (experiments/benchmarks/cost_volume.py
  --warp; BENCHMARKS.md, session 7). Under a jit with the batch sharded over devices each device loops over
  its own images (a custom_partitioning around the loop; one device compiles to the same program).

Precision: sampling coordinates and bilinear weights are float32 whatever the image dtype (float64 only
for a float64 flow in x64 mode); the weighted sum is accumulated in float32 (or float64 for float64
inputs) and returned in the image dtype. Gradients come back in the dtype of each input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32

# PWC-Net's released code keeps a warped pixel when the bilinear weights of its in-image corners sum to
# more than 0.9999 (it warps an all-ones image); we use the same threshold.
MASK_THRESHOLD = 0.9999


def _check(image: jax.Array, flow: jax.Array, name: str) -> None:
  ishape, fshape = getattr(image, "shape", None), getattr(flow, "shape", None)
  if ishape is None or len(ishape) != 4:
    raise ValueError(f"{name}: image must be a 4-D (B, H, W, C) array, got shape {ishape}")
  if fshape is None or len(fshape) != 4 or fshape[-1] != 2:
    raise ValueError(f"{name}: flow must be a (B, H, W, 2) array (u, v in pixels), got shape {fshape}")
  if tuple(ishape[:3]) != tuple(fshape[:3]):
    raise ValueError(f"{name}: image {ishape} and flow {fshape} must share (B, H, W)")
  for label, x in (("image", image), ("flow", flow)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name}: {label} must be floating point, got dtype {x.dtype}")


def _corners(flow: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
  """Bilinear sampling geometry of a (B, H, W, 2) flow.

  Returns (index, weight, inside, fx, fy): index int32 (B, H*W, 4) into the flattened H*W grid (clipped
  into range), weight float32 (B, H*W, 4) with outside corners zeroed, inside float32 (B, H*W, 4) 1 for
  in-image corners, and the fractional offsets fx, fy float32 (B, H*W). Corner order: (y0, x0), (y0, x1),
  (y1, x0), (y1, x1).
  """
  b, h, w, _ = flow.shape
  cdt = jnp.result_type(_F32, flow.dtype)  # float32, or float64 for a float64 flow (x64 mode)
  flow = flow.astype(cdt)
  gy, gx = jnp.meshgrid(jnp.arange(h, dtype=cdt), jnp.arange(w, dtype=cdt), indexing="ij")
  px = (gx + flow[..., 0]).reshape(b, h * w)
  py = (gy + flow[..., 1]).reshape(b, h * w)
  x0f, y0f = jnp.floor(px), jnp.floor(py)
  fx, fy = px - x0f, py - y0f
  # Clip before the integer cast so huge flows cannot overflow; anything clipped is outside anyway.
  x0 = jnp.clip(x0f, -2, w).astype(jnp.int32)
  y0 = jnp.clip(y0f, -2, h).astype(jnp.int32)
  xs = jnp.stack([x0, x0 + 1, x0, x0 + 1], axis=-1)
  ys = jnp.stack([y0, y0, y0 + 1, y0 + 1], axis=-1)
  inside = ((xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)).astype(cdt)
  wx = jnp.stack([1 - fx, fx, 1 - fx, fx], axis=-1)
  wy = jnp.stack([1 - fy, 1 - fy, fy, fy], axis=-1)
  index = jnp.clip(ys, 0, h - 1) * w + jnp.clip(xs, 0, w - 1)
  return index, wx * wy * inside, inside, fx, fy


def _gather(image_flat: jax.Array, index: jax.Array) -> jax.Array:
  """(B, N, C) image, (B, M) indices -> (B, M, C)."""
  return jax.vmap(lambda im, i: jnp.take(im, i, axis=0, mode="clip"))(image_flat, index)


def _mask_from_weights(weight: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
  return (jnp.sum(weight, axis=-1) >= MASK_THRESHOLD).astype(_F32).reshape(shape)


@jax.jit
def _warp_reference_jit(image: jax.Array, flow: jax.Array) -> jax.Array:
  b, h, w, c = image.shape
  index, weight, _, _, _ = _corners(flow)
  flat = image.reshape(b, h * w, c)
  acc = jnp.result_type(weight.dtype, image.dtype)
  out = sum(weight[..., k, None] * _gather(flat, index[..., k]).astype(acc) for k in range(4))
  return out.reshape(b, h, w, c).astype(image.dtype)


def warp_reference(image: jax.Array, flow: jax.Array) -> jax.Array:
  """Same result as `warp`, in plain jnp with one gather per corner and autodiff gradients (for tests)."""
  _check(image, flow, "warp_reference")
  return _warp_reference_jit(image, flow)


def _weighted_corners(flat: jax.Array, index: jax.Array, weight: jax.Array, acc) -> jax.Array:
  """sum_k weight[..., k] * flat[b, index[..., k]] over the four corners: (B, N, C) image, (B, M, 4) index and
  weight -> (B, M, C) in `acc`. Four row gathers that XLA fuses with the weighted sum into one loop; the
  (B, M, 4, C) corner values are never stored (on XLA:CPU one stored (B, 4M, C) gather took ~12x as long)."""
  out = weight[..., 0, None] * _gather(flat, index[..., 0]).astype(acc)
  for k in range(1, 4):
    out = out + weight[..., k, None] * _gather(flat, index[..., k]).astype(acc)
  return out


def _warp_fwd_core(image: jax.Array, flow: jax.Array):
  b, h, w, c = image.shape
  index, weight, inside, fx, fy = _corners(flow)
  acc = jnp.result_type(weight.dtype, image.dtype)
  out = _weighted_corners(image.reshape(b, h * w, c), index, weight, acc)
  return out.reshape(b, h, w, c).astype(image.dtype), (index, weight, inside, fx, fy)


@jax.custom_vjp
def _warp(image: jax.Array, flow: jax.Array) -> jax.Array:
  return _warp_fwd_core(image, flow)[0]


def _warp_fwd(image, flow):
  out, (index, weight, inside, fx, fy) = _warp_fwd_core(image, flow)
  # A zero-size array carries the flow dtype (residuals must be arrays). The image itself is kept (it is
  # alive anyway as the caller's input) instead of its (B, H*W, 4, C) corner values.
  return out, (image, index, weight, inside, fx, fy, jnp.zeros((0,), flow.dtype))


def _per_image_bwd(image: jax.Array, index: jax.Array, weight: jax.Array, g: jax.Array):
  """Image gradient and corner products of the backward pass, image by image.

  (B, N, C) flattened image (any float dtype), (B, N, 4) int32 corner index and float weight, (B, N, C) cotangent
  in the accumulation dtype -> grad_image (B, N, C) and gv (B, N, 4) = g . image(corner_k), both in the cotangent
  dtype. Per image (lax.map) the scattered-into gradient and the gathered image stay in cache: on XLA:CPU the
  whole batch at once took 2.5-2.8x as long for both."""
  n, c = image.shape[1], image.shape[2]
  acc = g.dtype

  def one_image(xs):
    im, idx, wt, gi = xs
    # Image gradient: every output pixel sends weight_k * g to its four source pixels, in one scatter-add.
    updates = (wt[..., None] * gi[:, None, :]).reshape(n * 4, c)
    grad_im = jnp.zeros((n, c), acc).at[idx.reshape(n * 4)].add(updates, mode="drop")
    # g . image(corner_k) for the flow gradient, the corner values gathered again inside the fused products.
    vals = jnp.take(im, idx.reshape(n * 4), axis=0, mode="clip").reshape(n, 4, c).astype(acc)
    gv = jnp.einsum("nc,nkc->nk", gi, vals, precision=jax.lax.Precision.HIGHEST)
    return grad_im, gv

  return jax.lax.map(one_image, (image, index, weight, g))


# Under jit with the batch sharded over devices (the trainer: no shard_map), a loop over the sharded axis makes
# XLA's partitioner all-gather the loop's operands and run every image on every device. So the loop is wrapped by
# `parallel.per_image` (a custom_partitioning: each device loops over its own images; a one-device program inlines
# the plain loop, the same HLO as without the wrapper). Under vmap it gets more leading axes, merged locally.
_partitioned_bwd = None
_PARTITION_BWD = True  # False: the plain loop (benchmark A/B: experiments/benchmarks/step_ab.py 'matmul-gather9')
_BWD_RULE = "... n c, ... n k, ... n k, ... n c -> ... n c, ... n k"


def _per_image_bwd_any_lead(image: jax.Array, index: jax.Array, weight: jax.Array, g: jax.Array):
  """`_per_image_bwd` on (..., N, C) / (..., N, 4) operands: the leading axes merged into one image axis."""
  lead = image.shape[:-2]
  flat = lambda a: a.reshape((-1,) + a.shape[-2:])
  grad_im, gv = _per_image_bwd(flat(image), flat(index), flat(weight), flat(g))
  return grad_im.reshape(lead + grad_im.shape[1:]), gv.reshape(lead + gv.shape[1:])


def _per_image_bwd_partitioned(*args: jax.Array):
  global _partitioned_bwd
  if not _PARTITION_BWD:
    return _per_image_bwd(*args)
  if _partitioned_bwd is None:
    from jaxflow import parallel
    _partitioned_bwd = parallel.per_image(_per_image_bwd_any_lead, _BWD_RULE)
  return _partitioned_bwd(*args)


def _warp_bwd(residuals, g):
  image, index, weight, inside, fx, fy, flow_tag = residuals
  shape, image_dtype, flow_dtype = image.shape, image.dtype, flow_tag.dtype
  b, h, w, c = shape
  acc = jnp.result_type(weight.dtype, image_dtype)
  g = g.astype(acc).reshape(b, h * w, c)
  grad_image, gv = _per_image_bwd_partitioned(image.reshape(b, h * w, c), index, weight, g)  # (B, HW, C), (B, HW, 4)
  # Flow gradient: d weight / d px and d weight / d py of each corner (outside corners are constant 0).
  dwx = jnp.stack([-(1 - fy), 1 - fy, -fy, fy], axis=-1) * inside
  dwy = jnp.stack([-(1 - fx), -fx, 1 - fx, fx], axis=-1) * inside
  grad_flow = jnp.stack([jnp.sum(gv * dwx, -1), jnp.sum(gv * dwy, -1)], axis=-1)
  return grad_image.reshape(shape).astype(image_dtype), grad_flow.reshape(b, h, w, 2).astype(flow_dtype)


_warp.defvjp(_warp_fwd, _warp_bwd)


@jax.jit
def _warp_jit(image: jax.Array, flow: jax.Array) -> jax.Array:
  # Jitted so eager calls compile once instead of dispatching ~50 primitives one by one; inlined under jit.
  return _warp(image, flow)


@jax.jit
def _warp_with_mask_jit(image: jax.Array, flow: jax.Array) -> tuple[jax.Array, jax.Array]:
  b, h, w, _ = image.shape
  _, weight, _, _, _ = _corners(jax.lax.stop_gradient(flow))
  return _warp(image, flow), _mask_from_weights(weight, (b, h, w))


def warp(image: jax.Array, flow: jax.Array) -> jax.Array:
  """Backward bilinear warp: out(b, y, x) = image(b, y + flow_v, x + flow_u), zero outside the image.

  Args:
    image: (B, H, W, C), any float dtype (features or RGB).
    flow: (B, H, W, 2) in pixels, channel 0 = u (right), 1 = v (down); pixel centres at integer
      coordinates. Sampling coordinates are computed in float32.

  Returns:
    (B, H, W, C) in the image dtype. A sample partly outside takes the in-image corners' bilinear weights
    only (zero padding). Differentiable in both arguments (custom VJP, tested against `warp_reference`).
  """
  _check(image, flow, "warp")
  return _warp_jit(image, flow)


def warp_with_mask(image: jax.Array, flow: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`warp` plus a float32 (B, H, W) validity mask.

  mask = 1 where the bilinear weights of the in-image corners sum to >= 0.9999 (PWC-Net's rule, from its
  released code), i.e. the sampling position (x + u, y + v) lies inside [0, W-1] x [0, H-1] up to 1e-4 px;
  0 otherwise. The mask carries no gradient. The warped image is returned unmasked (identical to `warp`);
  PWC-Net multiplies it by the mask, which callers do explicitly.
  """
  _check(image, flow, "warp_with_mask")
  return _warp_with_mask_jit(image, flow)


__all__ = ["MASK_THRESHOLD", "warp", "warp_reference", "warp_with_mask"]
