"""Flying Chairs (Dosovitskiy et al., ICCV 2015) generated on the fly with TensorFlow graph ops.

Recipe. A background photo is cropped (frame 1) and moved by a random 2D affine transform T_bg (translation,
rotation, zoom, squeeze about the image centre). A random number of chair sprites (RGBA) is placed at random
positions, scales, in-plane rotations and mirrorings; each chair gets its own random affine motion M_k (about
its centre) composed with the background's, so its frame-2 placement is T_bg o M_k o C1_k. Frame 2 is rendered
from the moved layers in the same depth order (chair k above chairs < k above the background).

Exact outputs: the flow of a pixel x of frame 1 is G(x) - x, where G is the frame-1 -> frame-2 map of the layer
visible at x (T_bg for the background, T_bg o M_k for chair k); `occlusion` is 1 where x + flow(x) falls out of
view or where frame 2 shows another layer at the (rounded) target pixel; `valid` is 1 everywhere.

Speed. Random parameters are drawn with a few stateless TF ops keyed by (seed, example index); rendering is one
XLA-compiled function: each chair's coverage (alpha > 1/2) is evaluated only in a fixed-size window around it
and reduced into per-frame layer-index maps (a z-buffer) with one segment-max; then a single full-frame pass
samples the background (inverse affine + bilinear) and the visible chair's sprite (bilinear) per pixel, and
computes flow and occlusion. Pixel centres are at integer coordinates (x = column, y = row).

Layers are composited with hard (alpha > 1/2) edges, so images, flow and occlusion agree exactly at chair
boundaries (the original dataset blends edges; a cosmetic difference).

Export: `python -m data_pipelines.synthetic_chairs --out DIR --num N [--seed S] [--config.key=value ...]` writes
NNNNN_img1.ppm, NNNNN_img2.ppm, NNNNN_flow.flo and NNNNN_occ.png (255 = occluded), the FlyingChairs layout.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable

import ml_collections
import numpy as np
import tensorflow as tf
# XLA dynamic (update-)slice: the z-buffer merges per-chair windows in place instead of scattering.
from tensorflow.compiler.tf2xla.python import xla as _xla

from data_pipelines import assets

# Reference width (px) of the motion parameters: pixel displacements are scaled by image width / 512.
REFERENCE_WIDTH = 512
_GENERATORS: dict[str, Callable] = {}  # make_generator memo, keyed by the config's JSON.
_SALT = 0x43484149  # "CHAI": separates this module's random stream from others keyed by (seed, index).


def default_config() -> ml_collections.ConfigDict:
  """Generator settings. Sizes in pixels unless stated; motion magnitudes in pixels at 512 px width.

  Motion draws are Gaussian scale mixtures (heavy-tailed): for each example (background) or chair, a sigma is
  drawn log-uniformly from the (lo, hi) range, then the value ~ N(0, sigma^2), truncated at `truncation`
  sigmas. Rotations in degrees; zoom and squeeze as log-factors (x scale = zoom*exp(squeeze), y scale =
  zoom*exp(-squeeze)).
  """
  c = ml_collections.ConfigDict()
  c.image_size = (384, 512)  # (H, W) of the generated pairs; anything down to 64 x 64.
  c.num_chairs = (16, 24)  # Inclusive range of the number of chairs per pair.
  c.chair_size = (0.1, 0.32)  # Side of a chair sprite as a fraction of the image width (log-uniform).
  c.background_scale = 1.25  # Background photos are stored at this multiple of image_size; frames are crops.
  c.backgrounds_dir = ""  # Folder of background photos; '' = built-in procedural (dead-leaves) backgrounds.
  c.chairs_dir = ""  # Folder of chair renders (RGBA PNG or RGB on white); '' = built-in procedural chairs.
  c.sprite_size = 128  # Chair sprites are S x S RGBA.
  c.max_backgrounds = 512  # At most this many user background photos are loaded (sorted by path).
  c.max_chair_images = 4096  # At most this many user chair renders are loaded.
  c.num_procedural_backgrounds = 12
  c.num_chair_models = 20  # Procedural chairs: models x views sprites.
  c.views_per_model = 12
  c.asset_seed = 0  # Seed of the procedural assets (independent of the example seed).
  c.motion = ml_collections.ConfigDict()
  m = c.motion
  m.truncation = 3.0
  m.bg_translation_sigma = (0.3, 15.0)
  m.bg_rotation_sigma = (0.1, 2.0)
  m.bg_zoom_sigma = 0.03
  m.bg_squeeze_sigma = 0.02
  m.chair_translation_sigma = (0.5, 60.0)
  m.chair_rotation_sigma = (0.2, 8.0)
  m.chair_zoom_sigma = 0.05
  m.chair_squeeze_sigma = 0.03
  m.chair_initial_rotation = 180.0  # Initial in-plane rotation ~ U(-a, a) degrees.
  m.chair_flip_probability = 0.5  # Probability of mirroring a sprite horizontally.
  return c


# ------------------------------------------------------------------------------------------------------------
# Random parameters (plain TF ops, stateless, Philox).


def _loguniform(u: tf.Tensor, lo: float, hi: float) -> tf.Tensor:
  """exp(log lo + u (log hi - log lo)) for u in [0, 1); the range (0, 0) gives zeros (motion switched off)."""
  if lo == hi == 0:
    return tf.zeros_like(u)
  if lo <= 0 or hi < lo:
    raise ValueError(f"a sigma range must satisfy 0 < lo <= hi (or be (0, 0)), got ({lo}, {hi})")
  return tf.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


def _similarity(scale_x: tf.Tensor, scale_y: tf.Tensor, angle: tf.Tensor) -> tf.Tensor:
  """2x2 matrices R(angle) @ diag(scale_x, scale_y), shape (..., 2, 2)."""
  c, s = tf.cos(angle), tf.sin(angle)
  return tf.stack([tf.stack([c * scale_x, -s * scale_y], -1), tf.stack([s * scale_x, c * scale_y], -1)], -2)


def _linear_stretch_bound(m: ml_collections.ConfigDict) -> float:
  """Upper bound of the largest singular value of the background and chair motion matrices combined."""
  t = m.truncation
  return math.exp(t * (m.bg_zoom_sigma + m.bg_squeeze_sigma + m.chair_zoom_sigma + m.chair_squeeze_sigma))


def _size_classes(kmax: int) -> int:
  """Number of chair size classes (each with its own static window size in the renderer)."""
  return max(1, min(3, kmax))


def _window_sizes(cfg: ml_collections.ConfigDict, content_radius: float, stretch: float) -> list[int]:
  """Per size class, the side (px) of a square window that surely holds a chair's footprint.

  content_radius: largest distance (sprite px) of an opaque sprite pixel from the sprite centre; stretch: bound
  of the linear maps' largest singular value relative to the placement scale (1 for frame 1).
  """
  w = cfg.image_size[1]
  classes = _size_classes(int(cfg.num_chairs[1]))
  lo, hi = math.log(cfg.chair_size[0] * w), math.log(cfg.chair_size[1] * w)
  out = []
  for c in range(classes):
    scale = math.exp(lo + (c + 1) / classes * (hi - lo)) / cfg.sprite_size
    out.append(int(math.ceil(2.0 * content_radius * scale * stretch)) + 4)
  return out


def draw_random(cfg: ml_collections.ConfigDict, num_backgrounds: int, num_sprites: int, seed: tf.Tensor,
                index: tf.Tensor) -> dict[str, tf.Tensor]:
  """The raw random draws of example `index`: stateless Philox, a pure function of (seed, index).

  Only integer seed derivation and the random kernels run here (bit-exact in eager, graph or tf.data); all
  float arithmetic on the draws happens in `parameters_from_draws`, inside the XLA-compiled renderer, so the
  output bytes do not depend on how TensorFlow optimises the surrounding graph.
  """
  kmin, kmax = int(cfg.num_chairs[0]), int(cfg.num_chairs[1])
  seed = tf.cast(seed, tf.int64)
  index = tf.cast(index, tf.int64)
  key = tf.random.experimental.stateless_fold_in(tf.stack([seed, tf.constant(_SALT, tf.int64)]), index,
                                                 alg="philox")

  def sub(i: int) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(key, tf.constant(i, tf.int64), alg="philox")

  def uniform(i, shape):
    return tf.random.stateless_uniform(shape, sub(i), alg="philox")

  def normal(i, shape):
    return tf.random.stateless_normal(shape, sub(i), alg="philox")

  count = tf.random.stateless_uniform([], sub(3), kmin, kmax + 1, dtype=tf.int32, alg="philox")
  # Depth ranks: a random permutation (higher = in front); the chairs of rank < count are drawn. Slot k belongs
  # to size class k * classes // kmax (see _size_classes); ranks are independent of the class.
  rank = tf.cast(tf.argsort(tf.argsort(uniform(7, [kmax]))), tf.int32)
  return {
      "background": tf.random.stateless_uniform([], sub(0), 0, num_backgrounds, dtype=tf.int32, alg="philox"),
      "bg_u": uniform(1, [4]), "bg_n": normal(2, [5]), "rank": rank, "active": rank < count,
      "sprite": tf.random.stateless_uniform([kmax], sub(4), 0, num_sprites, dtype=tf.int32, alg="philox"),
      "chair_u": uniform(5, [kmax, 7]), "chair_n": normal(6, [kmax, 5])}


def draw_parameters(cfg: ml_collections.ConfigDict, num_backgrounds: int, num_sprites: int, seed: tf.Tensor,
                    index: tf.Tensor) -> dict[str, tf.Tensor]:
  """The scene parameters of example `index` (see `parameters_from_draws`), outside XLA (for inspection)."""
  return parameters_from_draws(cfg, draw_random(cfg, num_backgrounds, num_sprites, seed, index))


def parameters_from_draws(cfg: ml_collections.ConfigDict, raw: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """Scene parameters from the raw draws of `draw_random`.

  Returns affine maps as (A, t) with x' = A @ x + t on (x, y) pixel coordinates: `bg_crop` (2,) offset of
  the frame-1 crop in the background photo, `bg` (T_bg), chair placements `c1` (sprite -> frame 1), `c2`
  (sprite -> frame 2), chair motions `g` (frame 1 -> frame 2, = T_bg o M_k), `active` (Kmax,) bool, depth
  `rank` (Kmax,) int32 (a permutation; higher is in front), `background` and `sprite` indices.
  """
  h, w = cfg.image_size
  m = cfg.motion
  kmax = int(cfg.num_chairs[1])
  px = w / REFERENCE_WIDTH  # Pixel magnitudes scale with the image width.
  hb = int(round(h * cfg.background_scale))
  wb = int(round(w * cfg.background_scale))
  rank, active, background, sprite = raw["rank"], raw["active"], raw["background"], raw["sprite"]
  t = m.truncation
  # Background: photo, crop offset and motion about the image centre.
  u = raw["bg_u"]
  crop = tf.stack([u[0] * (wb - w), u[1] * (hb - h)])
  n = tf.clip_by_value(raw["bg_n"], -t, t)
  bg_t = n[0:2] * _loguniform(u[2], *m.bg_translation_sigma) * px
  bg_rot = n[2] * _loguniform(u[3], *m.bg_rotation_sigma) * (math.pi / 180.0)
  bg_a = _similarity(tf.exp(n[3] * m.bg_zoom_sigma + n[4] * m.bg_squeeze_sigma),
                     tf.exp(n[3] * m.bg_zoom_sigma - n[4] * m.bg_squeeze_sigma), bg_rot)
  centre = tf.constant([(w - 1) / 2.0, (h - 1) / 2.0])
  bg_b = centre + bg_t - tf.linalg.matvec(bg_a, centre)
  # Chairs.
  u = raw["chair_u"]
  pos = tf.stack([u[:, 0] * w, u[:, 1] * h], -1) - 0.5
  # Log-uniform size, stratified by slot class so the renderer can use smaller windows for smaller classes;
  # with equal class counts the marginal is exactly log-uniform over chair_size.
  classes = _size_classes(kmax)
  cls = tf.constant([k * classes // kmax for k in range(kmax)], tf.float32)
  size_px = _loguniform((cls + u[:, 2]) / classes, cfg.chair_size[0] * w, cfg.chair_size[1] * w)
  scale = size_px / cfg.sprite_size
  angle = (2.0 * u[:, 3] - 1.0) * m.chair_initial_rotation * (math.pi / 180.0)
  flip = tf.where(u[:, 4] < m.chair_flip_probability, -1.0, 1.0)
  c1_a = _similarity(scale * flip, scale, angle)
  sc = (cfg.sprite_size - 1) / 2.0
  c1_b = pos - tf.linalg.matvec(c1_a, tf.fill([kmax, 2], sc))
  n = tf.clip_by_value(raw["chair_n"], -t, t)
  ch_t = n[:, 0:2] * _loguniform(u[:, 5], *m.chair_translation_sigma)[:, None] * px
  ch_rot = n[:, 2] * _loguniform(u[:, 6], *m.chair_rotation_sigma) * (math.pi / 180.0)
  ch_a = _similarity(tf.exp(n[:, 3] * m.chair_zoom_sigma + n[:, 4] * m.chair_squeeze_sigma),
                     tf.exp(n[:, 3] * m.chair_zoom_sigma - n[:, 4] * m.chair_squeeze_sigma), ch_rot)
  ch_b = pos + ch_t - tf.linalg.matvec(ch_a, pos)  # M_k: about the chair's frame-1 centre.
  g_a = tf.matmul(bg_a[None], ch_a)  # G_k = T_bg o M_k.
  g_b = tf.linalg.matvec(bg_a[None], ch_b) + bg_b
  c2_a = tf.matmul(g_a, c1_a)
  c2_b = tf.linalg.matvec(g_a, c1_b) + g_b
  return {"background": background, "bg_crop": crop, "bg_a": bg_a, "bg_b": bg_b, "active": active, "rank": rank,
          "sprite": sprite, "c1_a": c1_a, "c1_b": c1_b, "c2_a": c2_a, "c2_b": c2_b, "g_a": g_a, "g_b": g_b}


# ------------------------------------------------------------------------------------------------------------
# Rendering (one XLA cluster).


def _invert(a: tf.Tensor, b: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Inverse of x -> a @ x + b for (..., 2, 2), (..., 2)."""
  det = a[..., 0, 0] * a[..., 1, 1] - a[..., 0, 1] * a[..., 1, 0]
  inv = tf.stack([tf.stack([a[..., 1, 1], -a[..., 0, 1]], -1), tf.stack([-a[..., 1, 0], a[..., 0, 0]], -1)], -2)
  inv = inv / det[..., None, None]
  return inv, -tf.linalg.matvec(inv, b)


def _apply(a: tf.Tensor, b: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Per-element affine map of coordinates; a (..., 2, 2) and b (..., 2) broadcast against x, y."""
  return (a[..., 0, 0] * x + a[..., 0, 1] * y + b[..., 0], a[..., 1, 0] * x + a[..., 1, 1] * y + b[..., 1])


def _gather_columns(table: tf.Tensor, index: tf.Tensor) -> list[tf.Tensor]:
  """[table[index, j] for each column j] as separate scalar gathers (faster than a row gather + slicing)."""
  return [tf.gather(table[:, j], index) for j in range(table.shape[1])]


def _pack_rgb(images: np.ndarray) -> np.ndarray:
  """uint8 (N, H, W, 3) -> int32 (N, H * W) holding r + 256 g + 65536 b (one gather per bilinear tap)."""
  rgb = images.astype(np.int32)
  packed = rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16)
  return packed.reshape(images.shape[0], -1)


def _bilinear_packed(flat: tf.Tensor, base: tf.Tensor, height: tf.Tensor, width: tf.Tensor, x: tf.Tensor,
                     y: tf.Tensor) -> tf.Tensor:
  """Bilinear RGB samples in [0, 1], (..., 3), from packed colours `flat` (see _pack_rgb) of images whose
  pixels start at row `base` with size (`height`, `width`) (all broadcast with x); coordinates are clamped."""
  x = tf.clip_by_value(x, 0.0, tf.cast(width - 1, tf.float32))
  y = tf.clip_by_value(y, 0.0, tf.cast(height - 1, tf.float32))
  x0f, y0f = tf.floor(x), tf.floor(y)
  fx, fy = x - x0f, y - y0f
  x0, y0 = tf.cast(x0f, tf.int32), tf.cast(y0f, tf.int32)
  x1, y1 = tf.minimum(x0 + 1, width - 1), tf.minimum(y0 + 1, height - 1)
  taps = [(tf.gather(flat, base + yy * width + xx), wt) for yy, xx, wt in (
      (y0, x0, (1 - fx) * (1 - fy)), (y0, x1, fx * (1 - fy)), (y1, x0, (1 - fx) * fy), (y1, x1, fx * fy))]
  chans = []
  for shift in (0, 8, 16):
    acc = 0.0
    for v, wt in taps:
      acc += tf.cast(tf.bitwise.bitwise_and(tf.bitwise.right_shift(v, shift), 255), tf.float32) * wt
    chans.append(acc)
  return tf.clip_by_value(tf.stack(chans, -1) * (1.0 / 255.0), 0.0, 1.0)  # Rounding could leave 1 + 1e-7.


def _reflect(x: tf.Tensor, size: int) -> tf.Tensor:
  """Mirror-reflects coordinates into [0, size - 1] (whole-sample symmetric)."""
  period = 2.0 * (size - 1)
  r = tf.math.floormod(x, period)
  return (size - 1) - tf.abs(r - (size - 1))


def _make_renderer(cfg: ml_collections.ConfigDict, bg_shape: tuple, sprite_shape: tuple,
                   content_radius: float) -> Callable:
  h, w = (int(v) for v in cfg.image_size)
  _, hb, wb, _ = bg_shape
  _, s, _, _ = sprite_shape
  kmax = int(cfg.num_chairs[1])
  classes = _size_classes(kmax)
  groups = [[k for k in range(kmax) if k * classes // kmax == c] for c in range(classes)]
  wins = [_window_sizes(cfg, content_radius, 1.0), _window_sizes(cfg, content_radius, _linear_stretch_bound(cfg.motion))]
  npix = h * w

  def layer_map(a_inv, b_inv, centre, alpha_sel, value, wins):
    """Z-buffer: (H*W,) int32 top-layer value per pixel (0 = background, else the chair's `value`).

    Chair k's coverage (nearest alpha > 127) is evaluated in a window of its size class around its centre and
    merged with a max through dynamic slice / update (memory traffic only inside the windows, no scatter) on a
    uint8 canvas. A window is shifted (clipped) to stay inside the canvas; this never loses in-frame pixels of
    its chair: a chair whose centre c is less than win/2 from the canvas edge only covers pixels within
    c + win/2 < win of that edge, all inside the clipped window. The canvas is the frame itself, padded only
    when a window is larger than the frame.
    """
    pad = max(0, -(-(max(wins) - min(h, w)) // 2))
    canvas = tf.zeros([h + 2 * pad, w + 2 * pad], tf.uint8)
    for slots, win in zip(groups, wins):
      if not slots:
        continue
      sl = slice(slots[0], slots[-1] + 1)
      hi = tf.constant([w + 2 * pad - win, h + 2 * pad - win], tf.int32)
      origin = tf.clip_by_value(tf.cast(tf.round(centre[sl]), tf.int32) - win // 2 + pad, 0, hi)
      r = tf.range(win, dtype=tf.int32)
      gx = tf.cast(origin[:, 0, None, None] - pad + r[None, None, :], tf.float32)  # (k, 1, win) frame coords.
      gy = tf.cast(origin[:, 1, None, None] - pad + r[None, :, None], tf.float32)  # (k, win, 1)
      ux, uy = _apply(a_inv[sl, None, None], b_inv[sl, None, None], gx, gy)  # Sprite coords, (k, win, win).
      ix, iy = tf.cast(tf.round(ux), tf.int32), tf.cast(tf.round(uy), tf.int32)
      in_sprite = (ix >= 0) & (ix < s) & (iy >= 0) & (iy < s)
      k = tf.range(slots[0], slots[-1] + 1, dtype=tf.int32)[:, None, None]
      idx = k * s * s + tf.clip_by_value(iy, 0, s - 1) * s + tf.clip_by_value(ix, 0, s - 1)
      alpha = tf.gather(tf.reshape(alpha_sel, [-1]), idx)
      vals = tf.where(in_sprite & (alpha > 127), tf.cast(value[sl, None, None], tf.uint8), tf.zeros([], tf.uint8))
      for i in range(len(slots)):
        start = tf.stack([origin[i, 1], origin[i, 0]])
        old = _xla.dynamic_slice(canvas, start, [win, win])
        canvas = _xla.dynamic_update_slice(canvas, tf.maximum(old, vals[i]), start)
    return tf.cast(tf.reshape(canvas[pad:pad + h, pad:pad + w], [-1]), tf.int32)

  @tf.function(jit_compile=True)
  def render(raw, backgrounds, sprite_rgb, sprite_alpha):
    p = parameters_from_draws(cfg, raw)
    # Assets arrive packed: colours as int32 r + 256 g + 65536 b, sprite alpha separately.
    alpha_sel = tf.gather(sprite_alpha, p["sprite"])  # (K, S, S) uint8
    # One colour table: the photo's pixels, then the selected sprites' pixels.
    table = tf.concat([tf.gather(backgrounds, p["background"]), tf.reshape(tf.gather(sprite_rgb, p["sprite"]), [-1])], 0)
    # Layer value of chair k: its depth rank + 1 (0 = background; inactive chairs never draw).
    value = tf.where(p["active"], p["rank"] + 1, 0)
    by_value = tf.cast(tf.argsort(p["rank"]), tf.int32)  # Chair index of each value - 1.

    def layer_table(bg_a, bg_b, a, b):
      """(K + 1, 6) rows [a00, a01, a10, a11, b0, b1] per layer value: row 0 background, row v chair of value v."""
      bg = tf.concat([tf.reshape(bg_a, [4]), bg_b], 0)[None]
      ch = tf.concat([tf.reshape(a, [kmax, 4]), b], 1)
      return tf.concat([bg, tf.gather(ch, by_value)], 0)

    sc = tf.fill([kmax, 2], (s - 1) / 2.0)
    yy, xx = tf.meshgrid(tf.range(h, dtype=tf.float32), tf.range(w, dtype=tf.float32), indexing="ij")
    x = tf.reshape(xx, [-1])
    y = tf.reshape(yy, [-1])
    chair_base = tf.concat([[0], hb * wb + by_value * (s * s)], 0)
    frames, layers = [], []
    for f, (c_a, c_b, bg_a, bg_b) in enumerate(((p["c1_a"], p["c1_b"], tf.eye(2), tf.zeros([2])),
                                                (p["c2_a"], p["c2_b"], p["bg_a"], p["bg_b"]))):
      a_inv, b_inv = _invert(c_a, c_b)
      centre = tf.linalg.matvec(c_a, sc) + c_b
      layer = layer_map(a_inv, b_inv, centre, alpha_sel, value, wins[f])
      is_fg = layer > 0
      # Per pixel: the inverse map of its layer into that layer's image (sprite, or photo via the crop).
      bia, bib = _invert(bg_a, bg_b)
      m = _gather_columns(layer_table(bia, bib + p["bg_crop"], a_inv, b_inv), layer)
      qx = m[0] * x + m[1] * y + m[4]
      qy = m[2] * x + m[3] * y + m[5]
      qx = tf.where(is_fg, qx, _reflect(qx, wb))
      qy = tf.where(is_fg, qy, _reflect(qy, hb))
      width = tf.where(is_fg, s, wb)
      height = tf.where(is_fg, s, hb)
      base = tf.gather(chair_base, layer)
      rgb = _bilinear_packed(table, base, height, width, qx, qy)
      frames.append(tf.reshape(rgb, [h, w, 3]))
      layers.append(layer)
    layer1, layer2 = layers
    m = _gather_columns(layer_table(p["bg_a"], p["bg_b"], p["g_a"], p["g_b"]), layer1)
    x2 = m[0] * x + m[1] * y + m[4]
    y2 = m[2] * x + m[3] * y + m[5]
    flow = tf.stack([x2 - x, y2 - y], -1)
    rx, ry = tf.round(x2), tf.round(y2)
    inside = (rx >= 0) & (rx <= w - 1) & (ry >= 0) & (ry <= h - 1)
    target = tf.clip_by_value(tf.cast(ry, tf.int32), 0, h - 1) * w + tf.clip_by_value(tf.cast(rx, tf.int32), 0, w - 1)
    same = tf.gather(layer2, target) == layer1
    occlusion = tf.cast(~(inside & same), tf.float32)
    return {"image1": frames[0], "image2": frames[1], "flow": tf.reshape(flow, [h, w, 2]),
            "valid": tf.ones([h, w], tf.float32), "occlusion": tf.reshape(occlusion, [h, w])}

  return render


def content_radius(sprites: np.ndarray) -> float:
  """Largest distance (px) from the sprite centre to the far corner of any pixel with alpha > 127."""
  s = sprites.shape[1]
  ys, xs = np.nonzero((sprites[..., 3] > 127).any(0))
  if ys.size == 0:
    return s / 2.0
  c = (s - 1) / 2.0
  return float(np.sqrt((np.abs(xs - c) + 0.5) ** 2 + (np.abs(ys - c) + 0.5) ** 2).max())


def _check_config(cfg: ml_collections.ConfigDict) -> None:
  h, w = cfg.image_size
  if h < 64 or w < 64:
    raise ValueError(f"synthetic_chairs: image_size must be at least (64, 64), got {tuple(cfg.image_size)}")
  lo, hi = cfg.num_chairs
  if not 0 <= lo <= hi <= 250:
    raise ValueError(f"synthetic_chairs: num_chairs must be (lo, hi) with 0 <= lo <= hi <= 250, got {tuple(cfg.num_chairs)}")
  if not 0 < cfg.chair_size[0] <= cfg.chair_size[1]:
    raise ValueError(f"synthetic_chairs: chair_size must be (lo, hi) with 0 < lo <= hi, got {tuple(cfg.chair_size)}")
  if cfg.background_scale < 1.0:
    raise ValueError(f"synthetic_chairs: background_scale must be >= 1, got {cfg.background_scale}")


def make_generator(config: ml_collections.ConfigDict) -> Callable[[tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]:
  """Loads (or generates and caches) the assets once and returns gen(seed, index) -> element dict.

  gen takes int64 scalar tensors (Python ints work too) and returns TF tensors: image1, image2 float32
  (H, W, 3) in [0, 1]; flow float32 (H, W, 2) in pixels (u right, v down, frame 1 -> frame 2); valid float32
  (H, W) of ones; occlusion float32 (H, W), 1 = occluded or out of view in frame 2. Graph-mode safe (use it in
  tf.data.Dataset.map); the output is a pure function of (seed, index). Generators are memoised per config
  within a process (user folders are read once).
  """
  cfg = config
  _check_config(cfg)
  key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
  if key in _GENERATORS:  # Same config in this process: reuse the assets and the compiled renderer.
    return _GENERATORS[key]
  h, w = (int(v) for v in cfg.image_size)
  bg_size = (int(round(h * cfg.background_scale)), int(round(w * cfg.background_scale)))
  backgrounds = assets.get_backgrounds(cfg.backgrounds_dir, bg_size, num_procedural=cfg.num_procedural_backgrounds,
                                       seed=cfg.asset_seed, max_images=cfg.max_backgrounds)
  sprites = assets.get_chairs(cfg.chairs_dir, cfg.sprite_size, num_models=cfg.num_chair_models,
                              views_per_model=cfg.views_per_model, seed=cfg.asset_seed,
                              max_images=cfg.max_chair_images)
  bg_t = tf.constant(_pack_rgb(backgrounds))  # (N, Hb * Wb) int32
  sp_rgb = tf.constant(_pack_rgb(sprites[..., :3]))  # (N, S * S) int32
  sp_alpha = tf.constant(sprites[..., 3])  # (N, S, S) uint8
  render = _make_renderer(cfg, backgrounds.shape, sprites.shape, content_radius(sprites))
  nb, ns = backgrounds.shape[0], sprites.shape[0]
  cfg = ml_collections.ConfigDict(cfg.to_dict())  # Snapshot: later edits of `config` do not leak in.

  def gen(seed: tf.Tensor, index: tf.Tensor) -> dict[str, tf.Tensor]:
    params = draw_random(cfg, nb, ns, seed, index)
    return render(params, bg_t, sp_rgb, sp_alpha)

  _GENERATORS[key] = gen
  return gen


# ------------------------------------------------------------------------------------------------------------
# Export CLI.


def _write_flo(path: pathlib.Path, flow: np.ndarray) -> None:
  """Middlebury .flo: 'PIEH' tag, int32 width, int32 height, then (u, v) float32 little-endian row-major."""
  try:
    from jaxflow import flow_io  # Prefer the shared writer when it exists.
    if hasattr(flow_io, "write_flo"):
      flow_io.write_flo(str(path), flow)
      return
  except ImportError:
    pass
  h, w = flow.shape[:2]
  with open(path, "wb") as f:
    f.write(b"PIEH")
    f.write(np.asarray([w, h], "<i4").tobytes())
    f.write(np.ascontiguousarray(flow, "<f4").tobytes())


def _parse_value(text: str, current: Any, key: str) -> Any:
  if isinstance(current, bool):
    if text.lower() in ("1", "true", "yes"):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"--config.{key}: expected a boolean, got {text!r}")
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if isinstance(current, (tuple, list)):
      value = tuple(ast.literal_eval(v) for v in text.split(","))
    else:
      raise ValueError(f"--config.{key}: cannot parse {text!r} as {type(current).__name__}") from None
  if isinstance(current, (tuple, list)):
    if not isinstance(value, (tuple, list)) or len(value) != len(current):
      raise ValueError(f"--config.{key}: expected {len(current)} comma-separated values, got {text!r}")
    return tuple(value)
  if isinstance(current, float) and isinstance(value, int):
    return float(value)
  if type(value) is not type(current):
    raise ValueError(f"--config.{key}: expected {type(current).__name__}, got {text!r}")
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
  """Applies `--config.a.b=value` strings to `config` (in place, also returned); unknown keys are errors."""
  for item in overrides:
    if not item.startswith("--config.") or "=" not in item:
      raise ValueError(f"unrecognised argument {item!r}: expected --config.key=value")
    key, text = item[len("--config."):].split("=", 1)
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise KeyError(f"unknown config key {key!r} (no section {part!r}; known: {', '.join(sorted(node.keys()))})")
      node = node[part]
    if parts[-1] not in node:
      raise KeyError(f"unknown config key {key!r} (known: {', '.join(sorted(node.keys()))})")
    node[parts[-1]] = _parse_value(text, node[parts[-1]], key)
  return config


def export(out_dir: str | os.PathLike, num: int, seed: int, config: ml_collections.ConfigDict,
           start: int = 0) -> None:
  """Writes examples [start, start + num) of stream `seed` in the FlyingChairs layout (1-based file numbers)."""
  from PIL import Image

  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  gen = make_generator(config)
  ds = tf.data.Dataset.range(start, start + num).map(lambda i: gen(tf.constant(seed, tf.int64), i),
                                                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  for n, ex in enumerate(ds.as_numpy_iterator()):
    stem = out / f"{start + n + 1:05d}"
    for key in ("image1", "image2"):
      img = np.clip(np.round(ex[key] * 255.0), 0, 255).astype(np.uint8)
      Image.fromarray(img).save(f"{stem}_img{key[-1]}.ppm")
    _write_flo(pathlib.Path(f"{stem}_flow.flo"), ex["flow"])
    Image.fromarray((ex["occlusion"] > 0.5).astype(np.uint8) * 255).save(f"{stem}_occ.png")


def benchmark(config: ml_collections.ConfigDict, num: int = 200, seed: int = 0) -> tuple[float, float]:
  """Pairs per second on one core (TF threads = 1) after a warm-up: (per wall second, per CPU second).

  The CPU-time figure is the per-core throughput even when other processes share the machine.
  """
  gen = make_generator(config)
  ds = tf.data.Dataset.range(num + 20).map(lambda i: gen(tf.constant(seed, tf.int64), i))
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  ds = ds.with_options(options)
  it = iter(ds)
  for _ in range(20):
    next(it)
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(num):
    next(it)
  return num / (time.perf_counter() - t0), num / (time.process_time() - c0)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   epilog="Config overrides: --config.key=value (e.g. --config.image_size=96,128).")
  parser.add_argument("--out", help="output folder (FlyingChairs layout)")
  parser.add_argument("--num", type=int, default=16, help="number of pairs")
  parser.add_argument("--seed", type=int, default=0, help="stream seed")
  parser.add_argument("--start", type=int, default=0, help="first example index")
  parser.add_argument("--benchmark", action="store_true", help="print pairs/s on one core instead of exporting")
  args, rest = parser.parse_known_args(argv)
  config = default_config()
  try:
    apply_overrides(config, rest)
  except (KeyError, ValueError) as e:
    parser.error(str(e.args[0]) if e.args else str(e))
  if args.benchmark:
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    wall, cpu = benchmark(config, args.num)
    h, w = config.image_size
    print(f"synthetic_chairs at {w}x{h}: {wall:.1f} pairs per wall second, {cpu:.1f} pairs per CPU second "
          "(one core: TF inter/intra-op threads = 1)")
    return
  if not args.out:
    parser.error("--out is required (or --benchmark)")
  export(args.out, args.num, args.seed, config, args.start)
  print(f"wrote {args.num} pairs to {args.out}")


if __name__ == "__main__":
  main()
