"""FlowNet-style data augmentation as TF ops, a pure function of (seed, example index).

Geometric (Dosovitskiy et al., FlowNet, ICCV 2015, sec. 4.? "Data augmentation"): one transform shared by both
frames (translation, rotation, zoom and an optional x/y squeeze) plus a small relative transform applied to the
second frame only, then a crop of `crop_size`. Both are expressed as output->source affine maps of pixel
coordinates (pixel centres at integer coordinates, x right, y down):

  A1(x) = M1 x + t1   (frame 1, and every per-pixel field of frame 1: flow, valid, occlusion)
  A2(x) = M2 x + t2   (frame 2) = A1(Rel(x)), Rel a small transform about the crop centre.

The new flow is exact: new_flow(x) = A2^-1(A1 x + f(A1 x)) - x, with f sampled bilinearly; it is evaluated as
M2^-1 f(A1 x) + (M2^-1 M1 - I) x + M2^-1 (t1 - t2), so identity parameters return the flow bit for bit.
Pixels whose flow leaves the crop keep their (correct) flow. `valid` is sampled bilinearly and kept only where
all bilinear corners with non-zero weight are valid and inside the source (fill value 0), so pixels without
source data become invalid. `occlusion`, when present, is sampled the same way (> 0.5) and set to 1 where the
pixel's target x + new_flow(x) falls outside the output crop (out of view in the new frame 2).

Speed: all per-pixel fields of frame 1 (image, flow, valid, occlusion) are stacked and resampled with one set of
bilinear coordinates and gathers, frame 2 in the same XLA-compiled function; a second XLA function applies the
photometric changes; only the Gaussian noise is drawn outside XLA (TF's CPU RNG kernel is much faster than XLA's).

Ranges (defaults from the FlowNet paper, sec. 4.? "Data augmentation" of the journal text):
  - translation: uniform in [-20 %, 20 %] of the image *width*, for x and for y (the paper's wording);
  - rotation: uniform in [-17, 17] degrees;
  - scaling (zoom): uniform in [0.9, 2.0]; > 1 magnifies (the crop covers a smaller source region);
  - squeeze (x zoom * q, y zoom / q): not in the paper; off by default (range [1, 1]);
  - relative transform of frame 2: not given in the paper; small defaults chosen here (translation +-3 % of
    the width, rotation +-1.7 degrees, zoom [0.97, 1.03]);
  - photometric, on each frame (same draw for both frames unless `asymmetric`): additive brightness
    N(0, 0.2); contrast c in [-0.8, 0.4] applied as mean + (1 + c) (I - mean) around the image's mean grey
    level; multiplicative colour per RGB channel in [0.5, 2]; gamma in [0.7, 1.5] (I^gamma); additive Gaussian
    noise with sigma uniform in [0, 0.04] (the noise itself is drawn independently per frame).
    Order: colour, brightness, contrast, clip to [0, 1], gamma, noise, clip to [0, 1].
  - asymmetric=True perturbs frame 2's photometric parameters by `relative_photometric` (brightness + N(0, r),
    contrast + U(-r, r), colour and gamma * U(1 - r, 1 + r)).

Zoom and the crop: the paper samples parameters so that the crop has source data. Here (fit_crop=True) the
zoom is raised, if needed, to the smallest value at which the rotated crop fits inside the source frame, then
the crop centre is clamped so that frame 1's crop lies inside the source; frame 2's centre is clamped the same
way (which may shorten the relative translation). So frame 1 and its flow always have source data; only
rotated/zoomed-out frame 2 corners can sample outside (filled with 0) in the rare case its footprint is
larger than the source. With fit_crop=False, parameters are used as drawn and out-of-source pixels are invalid.

Randomness: every draw uses tf.random.stateless_* ops keyed by
stateless_fold_in([seed, index], AUGMENT_TAG), so the result is a pure function of (seed, index).
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
import numpy as np
import tensorflow as tf

AUGMENT_TAG = 0x41554731  # separates augmentation keys from other consumers of (seed, index)
_FIT_MARGIN = 0.01  # pixels kept between a fitted crop's footprint and the source border


def default_config() -> ml_collections.ConfigDict:
  """Augmentation ranges: `data_pipelines.defaults.augment_config` (TensorFlow-free, so configs load without TF)."""
  from data_pipelines import defaults
  return defaults.augment_config()


def example_key(seed: Any, index: Any, tag: int = AUGMENT_TAG) -> tf.Tensor:
  """A stateless RNG key (int64 [2]) for example `index` under `seed`, separated from other users by `tag`."""
  base = tf.stack([tf.cast(seed, tf.int64), tf.cast(index, tf.int64)])
  return tf.random.experimental.stateless_fold_in(base, tag)


def _uniform(key: tf.Tensor, lo: float, hi: float, shape=()) -> tf.Tensor:
  return tf.random.stateless_uniform(shape, key, minval=lo, maxval=hi, dtype=tf.float64) if lo != hi else \
      tf.fill(shape, tf.constant(lo, tf.float64))


def sample_params(seed: Any, index: Any, config: ml_collections.ConfigDict) -> dict[str, tf.Tensor]:
  """Draws the raw augmentation parameters of one example (float64 scalars, colour (3,)); pure in (seed, index)."""
  keys = tf.random.experimental.stateless_split(example_key(seed, index), 20)
  c = config
  p = {}
  p["tx"] = _uniform(keys[0], -c.translate, c.translate)
  p["ty"] = _uniform(keys[1], -c.translate, c.translate)
  p["rot"] = _uniform(keys[2], -c.rotate, c.rotate) * (math.pi / 180)
  p["zoom"] = _uniform(keys[3], *c.zoom)
  p["squeeze"] = tf.exp(_uniform(keys[4], math.log(c.squeeze[0]), math.log(c.squeeze[1])))
  p["rtx"] = _uniform(keys[5], -c.relative_translate, c.relative_translate)
  p["rty"] = _uniform(keys[6], -c.relative_translate, c.relative_translate)
  p["rrot"] = _uniform(keys[7], -c.relative_rotate, c.relative_rotate) * (math.pi / 180)
  p["rzoom"] = _uniform(keys[8], *c.relative_zoom)
  b = tf.random.stateless_normal((), keys[9], dtype=tf.float64) * c.brightness_sigma
  con = _uniform(keys[10], *c.contrast)
  col = _uniform(keys[11], *c.color, shape=(3,))
  gam = _uniform(keys[12], *c.gamma)
  p["noise_sigma"] = _uniform(keys[13], *c.noise_sigma)
  p["brightness1"], p["contrast1"], p["color1"], p["gamma1"] = b, con, col, gam
  if c.asymmetric:
    r = c.relative_photometric
    p["brightness2"] = b + tf.random.stateless_normal((), keys[14], dtype=tf.float64) * r
    p["contrast2"] = con + _uniform(keys[15], -r, r)
    p["color2"] = col * _uniform(keys[16], 1 - r, 1 + r, shape=(3,))
    p["gamma2"] = gam * _uniform(keys[17], 1 - r, 1 + r)
  else:
    p["brightness2"], p["contrast2"], p["color2"], p["gamma2"] = b, con, col, gam
  p["noise_key1"], p["noise_key2"] = keys[18], keys[19]
  return p


def _rot_scale(angle: tf.Tensor, zx: tf.Tensor, zy: tf.Tensor) -> tf.Tensor:
  """2x2 output->source matrix R(angle) diag(1/zx, 1/zy) (float64)."""
  c, s = tf.cos(angle), tf.sin(angle)
  return tf.stack([tf.stack([c / zx, -s / zy]), tf.stack([s / zx, c / zy])])


def _half_extent(m: tf.Tensor, half_out: tf.Tensor) -> tf.Tensor:
  """Half extents (x, y) of the source footprint of a crop with half size half_out = ((wc-1)/2, (hc-1)/2)."""
  return tf.abs(m) @ half_out[:, None]


def affine_maps(params: dict[str, tf.Tensor], source_size: tuple[Any, Any], crop_size: tuple[int, int],
                config: ml_collections.ConfigDict) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
  """Output->source maps (M1, t1, M2, t2) (float64, 2x2 and 2) for a source (H, W) and crop (hc, wc)."""
  h, w = tf.cast(source_size[0], tf.float64), tf.cast(source_size[1], tf.float64)
  hc, wc = float(crop_size[0]), float(crop_size[1])
  half_out = tf.constant([(wc - 1) / 2, (hc - 1) / 2], tf.float64)
  half_src = tf.stack([(w - 1) / 2, (h - 1) / 2])
  if not config.geometric:
    eye = tf.eye(2, dtype=tf.float64)
    t = half_src - half_out
    return eye, t, eye, t
  zx, zy = params["zoom"] * params["squeeze"], params["zoom"] / params["squeeze"]
  m1 = _rot_scale(params["rot"], zx, zy)
  centre = half_src + tf.stack([params["tx"], params["ty"]]) * w
  if config.fit_crop:
    ext = _half_extent(m1, half_out)[:, 0]
    room = tf.maximum(half_src - _FIT_MARGIN, 1e-9)  # keep float32 rounding off the source border
    # Extra zoom so the crop fits (none when it already fits, e.g. identity maps).
    k = tf.where(tf.reduce_max(ext / tf.maximum(half_src, 1e-9)) > 1.0, tf.reduce_max(ext / room), 1.0)
    m1 = m1 / k
    ext = ext / k + _FIT_MARGIN
    centre = tf.clip_by_value(centre, tf.minimum(ext, half_src), tf.maximum(half_src * 2 - ext, half_src))
  t1 = centre - tf.linalg.matvec(m1, half_out)
  # Relative transform about the crop centre, in output pixels: Rel(x) = ctr + Mr (x - ctr) + tr.
  mr = _rot_scale(params["rrot"], params["rzoom"], params["rzoom"])
  tr = tf.stack([params["rtx"], params["rty"]]) * wc
  m2 = m1 @ mr
  centre2 = centre + tf.linalg.matvec(m1, tr)
  if config.fit_crop:
    ext2 = _half_extent(m2, half_out)[:, 0] + _FIT_MARGIN
    centre2 = tf.clip_by_value(centre2, tf.minimum(ext2, half_src), tf.maximum(half_src * 2 - ext2, half_src))
  t2 = centre2 - tf.linalg.matvec(m2, half_out)
  return m1, t1, m2, t2


def _sample(flat: tf.Tensor, h: tf.Tensor, w: tf.Tensor, px: tf.Tensor, py: tf.Tensor,
            valid_channel: int | None = None) -> tuple[tf.Tensor, tf.Tensor]:
  """Bilinear samples of flat (H*W, C) at float pixel coords px, py (N,) -> (values (N, C), ok (N,) bool).

  Pixel centres are at integer coordinates; corners outside the image contribute 0. ok is True where every
  corner with non-zero weight is inside the image (and, with valid_channel, has that channel > 0).
  """
  x0, y0 = tf.floor(px), tf.floor(py)
  ax, ay = px - x0, py - y0
  x0i, y0i = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
  total = None
  ok = tf.ones_like(px, dtype=tf.bool)
  for dy, wy in ((0, 1.0 - ay), (1, ay)):
    for dx, wx in ((0, 1.0 - ax), (1, ax)):
      xi, yi = x0i + dx, y0i + dy
      inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
      idx = tf.clip_by_value(yi, 0, h - 1) * w + tf.clip_by_value(xi, 0, w - 1)
      weight = wx * wy
      vals = tf.gather(flat, idx) * tf.cast(inside, flat.dtype)[:, None]
      good = inside if valid_channel is None else inside & (vals[:, valid_channel] > 0)
      ok = ok & (good | (weight == 0))
      term = vals * weight[:, None]
      total = term if total is None else total + term
  return total, ok


def resample(image: tf.Tensor, m: tf.Tensor, t: tf.Tensor, crop_size: tuple[int, int]) -> tf.Tensor:
  """out(x) = image(M x + t), bilinear at integer pixel centres, 0 outside. image (H, W, C) -> (hc, wc, C)."""
  hc, wc = int(crop_size[0]), int(crop_size[1])
  m, t = tf.cast(m, tf.float32), tf.cast(t, tf.float32)
  ys, xs = tf.meshgrid(tf.range(hc, dtype=tf.float32), tf.range(wc, dtype=tf.float32), indexing="ij")
  xs, ys = tf.reshape(xs, [-1]), tf.reshape(ys, [-1])
  shape = tf.shape(image)
  flat = tf.reshape(image, [-1, shape[2]])
  vals, _ = _sample(flat, shape[0], shape[1], m[0, 0] * xs + m[0, 1] * ys + t[0], m[1, 0] * xs + m[1, 1] * ys + t[1])
  return tf.reshape(vals, [hc, wc, -1])


# Polynomial fits (least squares on Chebyshev nodes of [0, 1], constant terms fixed so that 1 ** gamma = 1):
# log2(1 + t), degree 5, max error 1.7e-5, and 2^t, degree 4, max relative error 4e-6; coefficients of t^0, t^1,
# ... (x ** gamma to a relative error < 3e-5 for gamma <= 2: far below the 1/255 steps of 8-bit images, at
# three fewer multiply-adds per value than degree 6 and 6).
_LOG2_POLY = (0.0, 1.4418799, -0.708865218, 0.41524556, -0.193516525, 0.0452682926)
_EXP2_POLY = (1.0, 0.693017513, 0.24144866, 0.0519479527, 0.0135816641)


def _horner(coefficients: tuple[float, ...], t: tf.Tensor) -> tf.Tensor:
  acc = tf.fill(tf.shape(t), coefficients[-1])
  for c in coefficients[-2::-1]:
    acc = acc * t + c
  return acc


def pow_unit(x: tf.Tensor, gamma: tf.Tensor) -> tf.Tensor:
  """x ** gamma for float32 x in [0, 1] and gamma in (0, 2], relative error < 3e-5 (0 maps to < 1e-30).

  Elementwise integer/float arithmetic only (exponent from the float bits, polynomials for log2 of the
  mantissa and 2^fraction), so XLA vectorises it on CPU; its exp/log path is several times slower.
  """
  bits = tf.bitcast(tf.maximum(x, 1e-30), tf.int32)
  exponent = tf.cast(tf.bitwise.right_shift(bits, 23) - 127, tf.float32)
  mantissa = tf.bitcast(tf.bitwise.bitwise_or(tf.bitwise.bitwise_and(bits, 0x7FFFFF), 0x3F800000), tf.float32)
  y = tf.maximum(gamma * (exponent + _horner(_LOG2_POLY, mantissa - 1.0)), -126.0)
  n = tf.floor(y)
  scale = tf.bitcast(tf.bitwise.left_shift(tf.cast(n, tf.int32) + 127, 23), tf.float32)
  return scale * _horner(_EXP2_POLY, y - n)


def photometric(image: tf.Tensor, brightness: Any, contrast: Any, color: Any, gamma: Any,
                noise_sigma: Any, noise_key: Any | None, clip: bool = True, mean_stride: int = 1,
                mean: Any | None = None) -> tf.Tensor:
  """FlowNet photometric changes on one float32 (H, W, 3) image in [0, 1] (order in the module docstring).

  The mean grey level for contrast is the mean of the channel-mean over the image after colour and brightness.
  Noise is N(0, noise_sigma) per pixel and channel from `noise_key` (None: no noise). clip=False skips the
  final clip to [0, 1] (for callers adding their own noise). mean_stride > 1 estimates the mean grey level from
  every mean_stride-th row and column (much cheaper under XLA, which otherwise splits the pass in two). `mean`,
  if given, is that mean grey level computed by the caller (e.g. exactly, from integer colours); with it the
  image may be a batch (N, H, W, 3) and every parameter broadcastable to it (e.g. brightness (N, 1, 1, 1)).
  """
  image = image * tf.cast(color, tf.float32) + tf.cast(brightness, tf.float32)
  if mean is not None:
    mean = tf.cast(mean, tf.float32)
  elif mean_stride == 1:
    mean = tf.reduce_mean(image)
  else:
    mean = tf.reduce_mean(image[::mean_stride, ::mean_stride])
  image = mean + (1.0 + tf.cast(contrast, tf.float32)) * (image - mean)
  image = pow_unit(tf.clip_by_value(image, 0.0, 1.0), tf.cast(gamma, tf.float32))
  if noise_key is not None:
    image = image + tf.random.stateless_normal(tf.shape(image), noise_key) * tf.cast(noise_sigma, tf.float32)
  return tf.clip_by_value(image, 0.0, 1.0) if clip else image


def _lowbias32(x: tf.Tensor) -> tf.Tensor:
  """An integer mixing function on uint32 (xor-shift / multiply rounds; a bijection with good avalanche)."""
  x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16)) * tf.constant(0x7FEB352D, tf.uint32)
  x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15)) * tf.constant(0x846CA68B, tf.uint32)
  return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def hash_normal(key: tf.Tensor, shape: tuple[int, ...]) -> tf.Tensor:
  """Approximately standard-normal float32 noise of a static `shape`, a pure function of `key` (int64 [2]).

  Each value hashes (a 32-bit digest of key, element index) to 32 bits (one lowbias32 round) and sums its four
  bytes (Irwin-Hall with 4 terms of the discrete uniform on 0..255), standardised to mean 0 and variance 1
  exactly (range +-3.45). Elementwise integer arithmetic only, so it vectorises under XLA on CPU (several times
  cheaper than the Philox normal kernel). A batch of keys (..., 2) gives (..., *shape), each row equal to the
  noise of its own key.
  """
  key = tf.cast(key, tf.int64)
  lead = key.shape[:-1].as_list()
  words = tf.reshape(tf.bitcast(key, tf.uint32), lead + [4])
  n = int(np.prod(shape))
  i = tf.range(n, dtype=tf.int32)
  k0 = _lowbias32(tf.bitwise.bitwise_xor(words[..., 0], _lowbias32(tf.bitwise.bitwise_xor(words[..., 1],
                                                                                         words[..., 2])
                                                                   + words[..., 3])))
  h = _lowbias32(tf.bitwise.bitwise_xor(tf.cast(i, tf.uint32) * tf.constant(0x9E3779B9, tf.uint32),
                                        k0[..., None]))
  # Sum of the four bytes: pairwise in 16-bit fields (bytes 0 + 1 and 2 + 3, each sum < 2^16), then the fields.
  pairs = tf.bitwise.bitwise_and(h, 0x00FF00FF) + tf.bitwise.bitwise_and(tf.bitwise.right_shift(h, 8), 0x00FF00FF)
  total = tf.cast(tf.bitwise.bitwise_and(pairs, 0xFFFF) + tf.bitwise.right_shift(pairs, 16), tf.int32)
  # Sum of 4 discrete uniforms on 0..255: mean 510, variance 4 * (256^2 - 1) / 12.
  z = (tf.cast(total, tf.float32) - 510.0) * (1.0 / math.sqrt(4 * (256 ** 2 - 1) / 12))
  return tf.reshape(z, lead + list(shape))


def _photometric_vector(params: dict[str, tf.Tensor], frame: int) -> tf.Tensor:
  """float32 (7,): brightness, contrast, colour (3), gamma, noise sigma of frame 1 or 2."""
  return tf.cast(tf.concat([tf.stack([params[f"brightness{frame}"], params[f"contrast{frame}"]]),
                            params[f"color{frame}"], tf.stack([params[f"gamma{frame}"], params["noise_sigma"]])],
                           0), tf.float32)


@tf.function(jit_compile=True, autograph=False)
def _photometric_pair_xla(im1, im2, p1, p2, keys):
  out = []
  for im, p, k in ((im1, p1, keys[0]), (im2, p2, keys[1])):
    noisy = photometric(im, p[0], p[1], p[2:5], p[5], 0.0, None, clip=False)
    noisy = noisy + hash_normal(k, tuple(im.shape)) * p[6]
    out.append(tf.clip_by_value(noisy, 0.0, 1.0))
  return tuple(out)


def photometric_pair(image1: tf.Tensor, image2: tf.Tensor, params: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
  """FlowNet photometric changes (`photometric`, parameters from `sample_params`) on both frames of a pair,
  float32 (H, W, 3) each, with `hash_normal` noise keyed by params' noise keys; one XLA function."""
  return _photometric_pair_xla(image1, image2, _photometric_vector(params, 1), _photometric_vector(params, 2),
                               tf.stack([params["noise_key1"], params["noise_key2"]]))


def augment_example(element: dict[str, tf.Tensor], seed: Any, index: Any, config: ml_collections.ConfigDict,
                    crop_size: tuple[int, int]) -> dict[str, tf.Tensor]:
  """Augments one unbatched element (image1/image2 (H, W, 3), flow (H, W, 2), valid (H, W), [occlusion])."""
  for k in ("image1", "image2", "flow", "valid"):
    if k not in element:
      raise KeyError(f"augment: element has no {k!r}; keys are {sorted(element)}")
  unknown = sorted(set(element) - {"image1", "image2", "flow", "valid", "occlusion"})
  if unknown:
    raise KeyError(f"augment: unknown keys {unknown}; expected image1, image2, flow, valid and optionally "
                   "occlusion")
  im1, im2, flow, valid = element["image1"], element["image2"], element["flow"], element["valid"]
  if im1.shape.rank != 3 or flow.shape.rank != 3 or valid.shape.rank != 2:
    raise ValueError(f"augment: expected image1 (H, W, 3), flow (H, W, 2), valid (H, W); got "
                     f"{im1.shape}, {flow.shape}, {valid.shape}")
  hc, wc = int(crop_size[0]), int(crop_size[1])
  params = sample_params(seed, index, config)
  shape = tf.shape(im1)
  m1, t1, m2, t2 = affine_maps(params, (shape[0], shape[1]), (hc, wc), config)
  p1 = tf.concat([tf.stack([params["brightness1"], params["contrast1"]]), params["color1"],
                  tf.stack([params["gamma1"], params["noise_sigma"]])], 0)
  p2 = tf.concat([tf.stack([params["brightness2"], params["contrast2"]]), params["color2"],
                  tf.stack([params["gamma2"], params["noise_sigma"]])], 0)
  kernel = _kernel(hc, wc, "occlusion" in element, bool(config.photometric))
  return kernel(_stack_frame1(element), tf.cast(im2, tf.float32), _geometry_vector(m1, t1, m2, t2),
                tf.cast(p1, tf.float32), tf.cast(p2, tf.float32),
                tf.stack([params["noise_key1"], params["noise_key2"]]))


def _geometry_vector(m1: tf.Tensor, t1: tf.Tensor, m2: tf.Tensor, t2: tf.Tensor) -> tf.Tensor:
  """float32 (18,): m1 (4), t1 (2), m2 (4), t2 (2), M2^-1 (4)... packed for the fused kernel, with
  D = M2^-1 M1 - I and e = M2^-1 (t1 - t2) computed in float64 (so identity maps give exact zeros)."""
  m2_inv = tf.linalg.inv(m2)
  d = m2_inv @ m1 - tf.eye(2, dtype=tf.float64)
  e = tf.linalg.matvec(m2_inv, t1 - t2)
  parts = [tf.reshape(m1, [-1]), t1, tf.reshape(m2, [-1]), t2, tf.reshape(m2_inv, [-1]), tf.reshape(d, [-1]), e]
  return tf.cast(tf.concat(parts, 0), tf.float32)


_KERNELS: dict[tuple, Any] = {}


def _kernel(hc: int, wc: int, has_occ: bool, photo: bool):
  """The fused per-example resampling (+ photometric) function for one crop size, XLA-compiled."""
  key = (hc, wc, has_occ, photo)
  if key in _KERNELS:
    return _KERNELS[key]

  def run(f1, im2, geo):
    h1, w1 = tf.shape(f1)[0], tf.shape(f1)[1]
    h2, w2 = tf.shape(im2)[0], tf.shape(im2)[1]
    ys, xs = tf.meshgrid(tf.range(hc, dtype=tf.float32), tf.range(wc, dtype=tf.float32), indexing="ij")
    xs, ys = tf.reshape(xs, [-1]), tf.reshape(ys, [-1])
    m1, t1, m2, t2, mi, d, e = geo[0:4], geo[4:6], geo[6:10], geo[10:12], geo[12:16], geo[16:20], geo[20:22]
    vals, ok = _sample(tf.reshape(f1, [h1 * w1, -1]), h1, w1, m1[0] * xs + m1[1] * ys + t1[0],
                       m1[2] * xs + m1[3] * ys + t1[1], valid_channel=5)
    im2_vals, _ = _sample(tf.reshape(im2, [h2 * w2, 3]), h2, w2, m2[0] * xs + m2[1] * ys + t2[0],
                          m2[2] * xs + m2[3] * ys + t2[1])
    fu, fv = vals[:, 3], vals[:, 4]
    # new_flow = M2^-1 f + (M2^-1 M1 - I) x + M2^-1 (t1 - t2)
    u = mi[0] * fu + mi[1] * fv + (d[0] * xs + d[1] * ys + e[0])
    v = mi[2] * fu + mi[3] * fv + (d[2] * xs + d[3] * ys + e[1])
    valid = tf.cast(ok, tf.float32)
    out = {"image1": tf.reshape(vals[:, :3], [hc, wc, 3]), "image2": tf.reshape(im2_vals, [hc, wc, 3]),
           "flow": tf.reshape(tf.stack([u, v], -1) * valid[:, None], [hc, wc, 2]),
           "valid": tf.reshape(valid, [hc, wc])}
    if has_occ:
      tx, ty = xs + u, ys + v
      out_of_view = (tx < 0) | (tx > wc - 1) | (ty < 0) | (ty > hc - 1)
      out["occlusion"] = tf.reshape(tf.cast((vals[:, 6] > 0.5) | out_of_view, tf.float32), [hc, wc])
    return out

  def colour(im1, im2, p1, p2):
    return (photometric(im1, p1[0], p1[1], p1[2:5], p1[5], 0.0, None),
            photometric(im2, p2[0], p2[1], p2[2:5], p2[5], 0.0, None))

  # Two XLA functions, not one: fused together, XLA recomputes the gathers inside the photometric mean
  # reduction. Noise is added outside XLA: TF's multi-threaded RNG kernel is much faster on CPU.
  xla = tf.function(run, jit_compile=True, autograph=False)
  xla_colour = tf.function(colour, jit_compile=True, autograph=False)

  def fn(f1, im2, geo, p1, p2, keys):
    out = xla(f1, im2, geo)
    if photo:
      out["image1"], out["image2"] = xla_colour(out["image1"], out["image2"], p1, p2)
      for i, k in enumerate(("image1", "image2")):
        noise = tf.random.stateless_normal([hc, wc, 3], keys[i]) * (p1, p2)[i][6]
        out[k] = tf.clip_by_value(out[k] + noise, 0.0, 1.0)
    return out

  _KERNELS[key] = fn
  return fn


def _stack_frame1(element: dict[str, tf.Tensor]) -> tf.Tensor:
  valid = tf.cast(element["valid"] > 0, tf.float32)
  flow = tf.where(valid[..., None] > 0, element["flow"], 0.0)  # no garbage (NaN, 1e10) from invalid pixels
  fields = [tf.cast(element["image1"], tf.float32), flow, valid[..., None]]
  if "occlusion" in element:
    fields.append(tf.cast(element["occlusion"], tf.float32)[..., None])
  return tf.concat(fields, axis=-1)


def apply_geometric(element: dict[str, tf.Tensor], m1: tf.Tensor, t1: tf.Tensor, m2: tf.Tensor, t2: tf.Tensor,
                    crop_size: tuple[int, int]) -> dict[str, tf.Tensor]:
  """Resamples an element with output->source maps A1 = (m1, t1) (frame 1 fields) and A2 = (m2, t2) (frame 2).

  m1, m2: float64 (2, 2); t1, t2: float64 (2,), in pixels (x, y). Returns the element at crop_size (hc, wc)
  with the exact new flow, valid and occlusion (see the module docstring). No photometric changes.
  """
  hc, wc = int(crop_size[0]), int(crop_size[1])
  kernel = _kernel(hc, wc, "occlusion" in element, False)
  zeros = tf.zeros([7], tf.float32)
  return kernel(_stack_frame1(element), tf.cast(element["image2"], tf.float32),
                _geometry_vector(m1, t1, m2, t2), zeros, zeros, tf.zeros([2, 2], tf.int64))


@tf.autograph.experimental.do_not_convert  # static Python control flow only: plain tracing is faster
def augment(element_or_batch: dict[str, tf.Tensor], seed: Any, index: Any, config: ml_collections.ConfigDict,
            crop_size: tuple[int, int]) -> dict[str, tf.Tensor]:
  """Augments an element (H, W, ...) or a batch (N, H, W, ...) -> same keys at crop_size (hc, wc).

  For a batch, `index` is either the example index of the first row (row b uses index + b) or an int vector
  of N example indices. Every draw is keyed by (seed, example index).
  """
  rank = element_or_batch["image1"].shape.rank
  if rank == 3:
    return augment_example(element_or_batch, seed, index, config, crop_size)
  if rank != 4:
    raise ValueError(f"augment: image1 must be (H, W, 3) or (N, H, W, 3), got {element_or_batch['image1'].shape}")
  n = tf.shape(element_or_batch["image1"])[0]
  index = tf.cast(index, tf.int64)
  indices = index if index.shape.rank == 1 else index + tf.range(tf.cast(n, tf.int64), dtype=tf.int64)
  keys = sorted(element_or_batch)

  def one(args):
    el = dict(zip(keys, args[:-1]))
    out = augment_example(el, seed, args[-1], config, crop_size)
    return tuple(out[k] for k in keys)

  sig = tuple(tf.TensorSpec(None, element_or_batch[k].dtype) for k in keys)
  outs = tf.map_fn(one, tuple(element_or_batch[k] for k in keys) + (indices,), fn_output_signature=sig)
  hc, wc = crop_size
  result = dict(zip(keys, outs))
  for k in ("image1", "image2", "flow", "valid", "occlusion"):
    if k in result:
      result[k] = tf.ensure_shape(result[k], [None, hc, wc] + ([3] if k.startswith("image") else [2] if k == "flow" else []))
  return result
