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
XLA-compiled function. Each chair's coverage (nearest sprite texel has alpha > 127) is tested only in 8 x 8 pixel
tiles inside its bounding box that meet its mapped opaque texels (the sprite's opaque box cut into 8 bands of rows,
each with its own x extent and mapped to a quadrilateral; per 8-row band of the frame, the run of tiles spanning
the quadrilaterals there: about half the bounding box for a rotated chair): the tiles of all chairs are
numbered consecutively and processed 256 at a time in a while loop (trip count = actual chair area, no fixed-size
windows), merged into per-frame layer-value maps (a z-buffer) with a scatter-max. Then one full-frame pass per
frame samples, for every pixel, the image of its layer (photo via its affine map, reflected at the photo border,
or the chair's sprite), bilinearly from an int32 table of packed texels, as one int64 per pixel (three 21-bit
colour lanes: XLA computes coordinates and gathers once per pixel, not once per channel), and one pass computes
flow (one gather of the layer's (2, 3) flow map per pixel) and occlusion. A second small XLA
function decodes the colours (and applies the photometric augmentation). A batch is rendered per call
(`Generator.draw` per example, `Generator.render` per batch: the training pipeline's path): the examples are
the iterations of an XLA while loop writing their rows of the batch outputs in place, so no per-example frames
are copied into a batch (tf.data's batch copy was ~9 % of the CPU time per pair); every row has the bytes of
its example rendered alone. With augmentation
(`make_generator(config, augment, crop_size)`, used by the training pipeline), the augmentation's output->source
maps are composed into every layer's map, so the augmented crop is rendered directly: no full-size intermediate,
no second resampling, flow and occlusion still exact. Pixel centres are at integer coordinates (x = column, y =
row).

Layers are composited with hard (alpha > 1/2) edges, so images, flow and occlusion agree exactly at chair
boundaries (the original dataset blends edges; a cosmetic difference).

Export: `python -m data_pipelines.synthetic_chairs --out DIR --num N [--seed S] [--config.key=value ...]` writes
NNNNN_img1.ppm, NNNNN_img2.ppm, NNNNN_flow.flo and NNNNN_occ.png (255 = occluded), the FlyingChairs layout.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
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
from data_pipelines import assets
from data_pipelines import augment as augment_lib

# Reference width (px) of the motion parameters: pixel displacements are scaled by image width / 512.
REFERENCE_WIDTH = 512
_GENERATORS: dict[str, Callable] = {}  # make_generator memo, keyed by the config's JSON.
_SALT = 0x43484149  # "CHAI": separates this module's random stream from others keyed by (seed, index).


def default_config() -> ml_collections.ConfigDict:
  """Generator settings: `data_pipelines.defaults.synthetic_config` (TensorFlow-free, so configs load without TF)."""
  from data_pipelines import defaults
  return defaults.synthetic_config()


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
  # Depth ranks: a random permutation (higher = in front); the chairs of rank < count are drawn.
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
  size_px = _loguniform(u[:, 2], cfg.chair_size[0] * w, cfg.chair_size[1] * w)  # Log-uniform side.
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

_TILE = 8  # Chair coverage is evaluated in TILE x TILE pixel tiles covering each chair's bounding box.
_CHUNK = 256  # Tiles per iteration of the coverage loop (16384 pixels).


def _invert(a: tf.Tensor, b: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Inverse of x -> a @ x + b for (..., 2, 2), (..., 2)."""
  det = a[..., 0, 0] * a[..., 1, 1] - a[..., 0, 1] * a[..., 1, 0]
  inv = tf.stack([tf.stack([a[..., 1, 1], -a[..., 0, 1]], -1), tf.stack([-a[..., 1, 0], a[..., 0, 0]], -1)], -2)
  inv = inv / det[..., None, None]
  return inv, -tf.linalg.matvec(inv, b)


def _compose(outer: tuple[tf.Tensor, tf.Tensor], inner: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
  """outer o inner for affine maps (a (..., 2, 2), b (..., 2)); batch dimensions broadcast."""
  (a1, b1), (a2, b2) = outer, inner
  return tf.matmul(a1, a2), tf.linalg.matvec(a1, b2) + b1


def _rows(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
  """Affine maps as rows [a00, a01, a10, a11, b0, b1], (..., 6)."""
  return tf.concat([tf.reshape(a, tf.concat([tf.shape(b)[:-1], [4]], 0)), b], -1)


def _gather_columns(table: tf.Tensor, index: tf.Tensor) -> list[tf.Tensor]:
  """[table[index, j] for each column j] as separate scalar gathers (faster than a row gather + slicing)."""
  return [tf.gather(table[:, j], index) for j in range(table.shape[1])]


def _pack_rgb(images: np.ndarray) -> np.ndarray:
  """uint8 (N, H, W, 3) -> int32 (N, H * W) holding r + 256 g + 65536 b (one gather per bilinear tap)."""
  rgb = images.astype(np.int32)
  packed = rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16)
  return packed.reshape(images.shape[0], -1)


_STRIPS = 8  # The opaque box of a sprite is also cut into this many bands of rows, each with its own x extent.


def _sprite_boxes(sprites: np.ndarray, strips: int | None = None) -> np.ndarray:
  """float32 (N, 1 + strips, 4) [xmin, ymin, xmax, ymax] boxes of each sprite's opaque (alpha > 127) texels:
  [:, 0] the whole opaque box ([1, 1, 0, 0] if none), [:, 1:] the opaque texels of `strips` (default _STRIPS)
  equal bands of the box's rows (a band without opaque texels repeats a band that has some, so the union of the
  bands is exactly the opaque texels' extent per band; a sprite without opaque texels repeats [1, 1, 0, 0])."""
  strips = _STRIPS if strips is None else int(strips)
  out = np.tile(np.array([1.0, 1.0, 0.0, 0.0], np.float32), (sprites.shape[0], 1 + strips, 1))
  opaque = sprites[..., 3] > 127
  cols, rows = opaque.any(1), opaque.any(2)
  for i in range(sprites.shape[0]):
    xs, ys = np.nonzero(cols[i])[0], np.nonzero(rows[i])[0]
    if not xs.size:
      continue
    out[i, :] = (xs[0], ys[0], xs[-1], ys[-1])
    cuts = np.linspace(ys[0], ys[-1] + 1, strips + 1).round().astype(int)
    bands = []
    for a, b in zip(cuts[:-1], cuts[1:]):
      bx = np.nonzero(opaque[i, a:b].any(0))[0] if b > a else np.zeros(0, int)
      by = np.nonzero(opaque[i, a:b].any(1))[0] + a if b > a else np.zeros(0, int)
      bands.append((bx[0], by[0], bx[-1], by[-1]) if bx.size else None)
    filled = [band for band in bands if band is not None]
    out[i, 1:] = [band if band is not None else filled[0] for band in bands]
  return out


# Bilinear weights are quantised to 1/64 pixel (6 bits per axis), so the four weights sum to 4096 exactly.
_SUBPIXEL = 64
_LANE = 21  # Bits per colour lane of the int64 accumulators (255 * 4096 < 2 ** 21).
IMAGE_SCALE = 1.0 / (255 * _SUBPIXEL * _SUBPIXEL)  # Packed lane value -> [0, 1].


def _bilinear_packed(flat: tf.Tensor, base: tf.Tensor, height: tf.Tensor, width: tf.Tensor, x: tf.Tensor,
                     y: tf.Tensor) -> tf.Tensor:
  """Bilinear RGB samples from packed int32 colours `flat` (see _pack_rgb) of images whose pixels start at index
  `base` with size (`height`, `width`) (all broadcast with x); coordinates are clamped. The table holds 4 bytes
  per texel (half of an int64 lane table: fewer cache lines per tap), spread into lanes after each gather.

  Returns one int64 per sample holding the three interpolated channels in 21-bit lanes (r + g << 21 + b << 42),
  each = sum of tap value (0..255) x quantised weight (the weights sum to 4096): one output per pixel, so XLA
  computes the coordinates and gathers once (an (N, 3) float output would redo them per channel). Decode with
  `unpack_rgb`.
  """
  x = tf.clip_by_value(x, 0.0, tf.cast(width - 1, tf.float32))
  y = tf.clip_by_value(y, 0.0, tf.cast(height - 1, tf.float32))
  x0f, y0f = tf.floor(x), tf.floor(y)
  wx = tf.cast(tf.floor((x - x0f) * _SUBPIXEL + 0.5), tf.int64)
  wy = tf.cast(tf.floor((y - y0f) * _SUBPIXEL + 0.5), tf.int64)
  x0, y0 = tf.cast(x0f, tf.int32), tf.cast(y0f, tf.int32)
  dx = tf.where(x0 < width - 1, 1, 0)
  dy = tf.where(y0 < height - 1, width, 0)
  i00 = base + y0 * width + x0
  acc = None
  for i, wt in ((i00, (_SUBPIXEL - wx) * (_SUBPIXEL - wy)), (i00 + dx, wx * (_SUBPIXEL - wy)),
                (i00 + dy, (_SUBPIXEL - wx) * wy), (i00 + dx + dy, wx * wy)):
    lanes = _spread_lanes(tf.gather(flat, i))
    acc = lanes * wt if acc is None else acc + lanes * wt
  return acc


def _spread_lanes(texel: tf.Tensor) -> tf.Tensor:
  """int32 texels r + 256 g + 65536 b (see _pack_rgb) -> int64 with each channel at the bottom of its 21-bit lane."""
  v = tf.cast(texel, tf.int64)
  return (tf.bitwise.bitwise_and(v, 0xFF) | tf.bitwise.left_shift(tf.bitwise.bitwise_and(v, 0xFF00), _LANE - 8)
          | tf.bitwise.left_shift(tf.bitwise.bitwise_and(v, 0xFF0000), 2 * _LANE - 16))


def _lanes(packed: tf.Tensor) -> tf.Tensor:
  """int64 (...) packed bilinear samples -> int64 (..., 3) channel sums (0 .. 255 * 4096 each)."""
  shifts = tf.constant([0, _LANE, 2 * _LANE], tf.int64)  # Broadcast, not stacked: XLA vectorises it.
  return tf.bitwise.bitwise_and(tf.bitwise.right_shift(packed[..., None], shifts), (1 << _LANE) - 1)


def unpack_rgb(packed: tf.Tensor) -> tf.Tensor:
  """int64 (...) packed bilinear samples (see _bilinear_packed) -> float32 (..., 3) RGB in [0, 1]."""
  # Through int32 (the lanes fit): int32 -> float32 converts in vector registers, int64 -> float32 does not.
  return tf.cast(tf.cast(_lanes(packed), tf.int32), tf.float32) * IMAGE_SCALE


def _reflect(x: tf.Tensor, size: int) -> tf.Tensor:
  """Mirror-reflects coordinates in [-(size - 1), 2 (size - 1)] into [0, size - 1] (whole-sample symmetric);
  farther ones are clamped."""
  m = float(size - 1)
  return tf.clip_by_value(m - tf.abs(m - tf.abs(x)), 0.0, m)


def _round(x: tf.Tensor) -> tf.Tensor:
  """Nearest integer (ties up) as int32: floor(x + 1/2) vectorises under XLA, unlike round-half-even."""
  return tf.cast(tf.floor(x + 0.5), tf.int32)


def _row_spans(quad: tf.Tensor, box: tf.Tensor, rows: int, tile: int) -> tuple[tf.Tensor, tf.Tensor]:
  """Column ranges of convex quadrilaterals per band of `tile` pixel rows (for the chair coverage tiles).

  quad: float32 (K, 4, 2) corners (x, y) in the order (x0, y0), (x1, y0), (x0, y1), (x1, y1) of the mapped box;
  box: int32 (K, 4) (x0, y0, x1, y1) clip box. Returns int32 (lo, hi), each (K, rows): band r holds the pixel
  centres with y in [r * tile, r * tile + tile - 1]; every centre of band r that lies in quad k has lo <= x <= hi
  (the exact extent widened by one pixel against float rounding, then clipped to the box; lo > hi when empty).
  """
  ring = tf.gather(quad, [0, 1, 3, 2], axis=1)  # Convex polygon order.
  nxt = tf.roll(ring, -1, axis=1)
  ya = tf.range(rows, dtype=tf.float32) * tile - 1.0  # The band of pixel centres, widened by one pixel.
  yb = ya + (tile - 1) + 2.0
  px, py = ring[:, None, :, 0], ring[:, None, :, 1]  # (K, 1, 4)
  qx, qy = nxt[:, None, :, 0], nxt[:, None, :, 1]
  big = 1e9
  # Corners inside the band, and crossings of the band's two border lines with the edges.
  corner_in = (py >= ya[None, :, None]) & (py <= yb[None, :, None])  # (K, R, 4)
  lo = tf.reduce_min(tf.where(corner_in, px, big), -1)
  hi = tf.reduce_max(tf.where(corner_in, px, -big), -1)
  band = tf.stack([ya, yb], -1)[None, :, None, :]  # (1, R, 1, 2)
  px, py, qx, qy = px[..., None], py[..., None], qx[..., None], qy[..., None]  # (K, 1, 4, 1)
  dy = qy - py
  cross = (tf.minimum(py, qy) <= band) & (band <= tf.maximum(py, qy)) & (dy != 0)
  xc = px + (band - py) * (qx - px) / tf.where(dy != 0, dy, 1.0)  # (K, R, 4, 2)
  lo = tf.minimum(lo, tf.reduce_min(tf.where(cross, xc, big), [-2, -1]))
  hi = tf.maximum(hi, tf.reduce_max(tf.where(cross, xc, -big), [-2, -1]))
  lo = tf.maximum(tf.cast(tf.floor(tf.maximum(lo, -1e6)), tf.int32) - 1, box[:, 0:1])
  hi = tf.minimum(tf.cast(tf.math.ceil(tf.minimum(hi, 1e6)), tf.int32) + 1, box[:, 2:3])
  return lo, hi


def _make_renderer(cfg: ml_collections.ConfigDict, bg_shape: tuple, sprite_shape: tuple,
                   out_size: tuple[int, int], photometric: bool = False) -> Callable:
  """The renderer of a batch: run(raw, geo, photo, noise_keys, table, alpha, sprite_box) -> batch dict (see
  Generator.render), two XLA functions: the layers, flow and occlusion of each row in a while loop over the
  rows (packed colours), then the colour stage of the batch (decode and, with `photometric`, FlowNet's
  photometric changes and noise).

  geo: float32 (N, 12) per row: output->source maps of the two frames, [M1 (4, row-major), t1 (2), M2 (4),
  t2 (2)]: output pixel x of frame f shows source-frame pixel M_f x + t_f (identity maps: the plain generator; augmentation
  maps: the augmented crop rendered directly). Output size `out_size` (hc, wc).
  """
  h, w = (int(v) for v in cfg.image_size)
  hc, wc = (int(v) for v in out_size)
  nbg, hb, wb, _ = bg_shape
  _, s, _, _ = sprite_shape
  kmax = int(cfg.num_chairs[1])
  tile, chunk = _TILE, _CHUNK

  rows_n = -(-hc // tile)  # Tile rows of the frame.

  def coverage(q_rows, box, value, alpha_flat, alpha_base, quad):
    """Z-buffer: (hc * wc,) int32 top layer value per pixel (0 = background, else the chair's `value`).

    Chair k covers output pixel x when its sprite texel nearest to Q_k(x) (Q_k = q_rows[k], output -> sprite) has
    alpha > 127. Only pixels in the chair's bounding box `box` (x0, y0, x1, y1 inclusive, clipped to the frame)
    are tested, in TILE x TILE tiles, and only the tiles that meet the chair's opaque strips `quad` (K, S, 4, 2):
    the sprite's opaque box cut into S bands of rows, each mapped to an output quadrilateral; each TILE-row of the
    box contributes the run of tiles spanning the union of the quadrilaterals' extents in that row (a rotated box
    fills about two thirds of its bounding box; the strips follow the chair's outline: 19 % fewer pixels tested
    than one box at the defaults, identical output). The tiles of all chairs are numbered consecutively (chair,
    row, tile) and processed CHUNK at a time in a while loop whose trip count follows the actual chair area,
    each chunk merged into the z-buffer with a scatter-max (the front-most chair has the largest value).
    """
    if kmax == 0:
      return tf.zeros([hc * wc], tf.int32)
    x0, y0, x1, y1 = box[:, 0], box[:, 1], box[:, 2], box[:, 3]
    present = (value > 0) & (x1 >= x0) & (y1 >= y0)
    # Per band of rows: the union of the spans of the chair's strip quadrilaterals (K, S, 4, 2).
    n_strips = quad.shape[1]
    lo, hi = _row_spans(tf.reshape(quad, [-1, 4, 2]), tf.repeat(box, n_strips, axis=0), rows_n, tile)
    lo, hi = tf.reshape(lo, [kmax, n_strips, rows_n]), tf.reshape(hi, [kmax, n_strips, rows_n])
    some = lo <= hi
    big = tf.constant(1 << 30, tf.int32)
    lo = tf.reduce_min(tf.where(some, lo, big), 1)  # (K, R) pixel columns; lo > hi where no strip meets the band
    hi = tf.reduce_max(tf.where(some, hi, -big), 1)
    row_top = tf.range(rows_n, dtype=tf.int32) * tile
    in_rows = (row_top[None, :] + tile - 1 >= y0[:, None]) & (row_top[None, :] <= y1[:, None])
    span_x0 = tf.maximum(lo, x0[:, None])
    count = tf.where(present[:, None] & in_rows & (hi >= span_x0), (hi - span_x0 + tile) // tile, 0)  # (K, R)
    row_ends = tf.cumsum(count, axis=1)  # Within each chair.
    ntiles = row_ends[:, -1]
    ends = tf.cumsum(ntiles)
    starts = ends - ntiles
    total = tf.reduce_sum(ntiles)
    q = [q_rows[:, j] for j in range(6)]
    r = tf.range(tile, dtype=tf.int32)

    def body(i, z):
      g = i * chunk + tf.range(chunk, dtype=tf.int32)
      kid = tf.minimum(tf.reduce_sum(tf.cast(ends[None, :] <= g[:, None], tf.int32), 1), kmax - 1)
      local = g - tf.gather(starts, kid)
      chair_rows = tf.gather(row_ends, kid)  # (chunk, R)
      row = tf.minimum(tf.reduce_sum(tf.cast(chair_rows <= local[:, None], tf.int32), 1), rows_n - 1)
      at = tf.stack([kid, row], 1)
      tx = local - (tf.gather_nd(row_ends, at) - tf.gather_nd(count, at))  # Tile number within the row's run.
      col = lambda t: tf.gather(t, kid)[:, None, None]
      x = (tf.gather_nd(span_x0, at) + tx * tile)[:, None, None] + r[None, None, :]  # (chunk, 1, tile)
      y = (row * tile)[:, None, None] + r[None, :, None]  # (chunk, tile, 1)
      inside = (g < total)[:, None, None] & (x <= col(x1)) & (y >= col(y0)) & (y <= col(y1))
      xf, yf = tf.cast(x, tf.float32), tf.cast(y, tf.float32)
      ix = _round(col(q[0]) * xf + col(q[1]) * yf + col(q[4]))
      iy = _round(col(q[2]) * xf + col(q[3]) * yf + col(q[5]))
      in_sprite = (ix >= 0) & (ix < s) & (iy >= 0) & (iy < s)
      idx = col(alpha_base) + tf.clip_by_value(iy, 0, s - 1) * s + tf.clip_by_value(ix, 0, s - 1)
      alpha = tf.gather(alpha_flat, idx)
      val = tf.where(inside & in_sprite & (alpha > 127), col(value), 0)
      pix = tf.where(inside, y * wc + x, 0)
      z = tf.tensor_scatter_nd_max(z, tf.reshape(pix, [-1, 1]), tf.reshape(val, [-1]))
      return i + 1, z

    n_iter = (total + chunk - 1) // chunk
    _, z = tf.while_loop(lambda i, z: i < n_iter, body, (tf.constant(0), tf.zeros([hc * wc], tf.int32)))
    return z

  def render_one(raw, geo, table, alpha, sprite_box):
    p = parameters_from_draws(cfg, raw)
    maps = [(tf.reshape(geo[0:4], [2, 2]), geo[4:6]), (tf.reshape(geo[6:10], [2, 2]), geo[10:12])]
    # `table`: all photos' pixels, then all sprites' pixels (packed r + 256 g + 65536 b); `alpha`: all sprites'.
    alpha_base = p["sprite"] * (s * s)
    boxes = tf.gather(sprite_box, p["sprite"])  # (K, 1 + S, 4) opaque texel box and its S strips
    box = boxes[:, 0]
    corners = tf.stack([tf.stack([boxes[..., i] + d, boxes[..., j] + d2], -1)
                        for i, j, d, d2 in ((0, 1, -0.5, -0.5), (2, 1, 0.5, -0.5), (0, 3, -0.5, 0.5), (2, 3, 0.5, 0.5))],
                       -2)  # (K, 1 + S, 4, 2) sprite coordinates of the corners of the opaque texels' squares
    # Layer value of chair k: its depth rank + 1 (0 = background; inactive chairs never draw).
    value = tf.where(p["active"], p["rank"] + 1, 0)
    by_value = tf.cast(tf.argsort(p["rank"]), tf.int32)  # Chair index of each value - 1.
    yy, xx = tf.meshgrid(tf.range(hc, dtype=tf.float32), tf.range(wc, dtype=tf.float32), indexing="ij")
    x = tf.reshape(xx, [-1])
    y = tf.reshape(yy, [-1])
    crop = p["bg_crop"]
    bg_inv = _invert(p["bg_a"], p["bg_b"])
    photo_maps = [(maps[0][0], maps[0][1] + crop), _compose(bg_inv, maps[1])]  # output -> photo pixels
    photo_maps[1] = (photo_maps[1][0], photo_maps[1][1] + crop)
    chair_base = tf.concat([[p["background"] * (hb * wb)], nbg * hb * wb + tf.gather(p["sprite"], by_value) * (s * s)], 0)
    frames, layers = [], []
    for f, place in enumerate(((p["c1_a"], p["c1_b"]), (p["c2_a"], p["c2_b"]))):
      to_sprite = _compose(_invert(*place), maps[f])  # output -> sprite of each chair
      to_out_a, to_out_b = _compose(_invert(*maps[f]), place)  # sprite -> output
      pts = tf.linalg.matvec(to_out_a[:, None, None], corners) + to_out_b[:, None, None]  # (K, 1 + S, 4, 2)
      lo = tf.cast(tf.floor(tf.reduce_min(pts[:, 0], 1)), tf.int32)
      hi = tf.cast(tf.math.ceil(tf.reduce_max(pts[:, 0], 1)), tf.int32)
      lim = tf.constant([wc - 1, hc - 1], tf.int32)
      lo = tf.clip_by_value(lo, 0, lim + 1)
      hi = tf.clip_by_value(hi, -1, lim)
      empty = box[:, 0] > box[:, 2]
      bbox = tf.concat([lo, tf.where(empty[:, None], lo - 1, hi)], 1)
      layer = coverage(_rows(*to_sprite), bbox, value, alpha, alpha_base, pts[:, 1:])
      is_fg = layer > 0
      # Per pixel: the output -> image map of its layer (photo for the background, else the chair's sprite).
      rows = tf.concat([_rows(*photo_maps[f])[None], tf.gather(_rows(*to_sprite), by_value)], 0)
      m = _gather_columns(rows, layer)
      qx = m[0] * x + m[1] * y + m[4]
      qy = m[2] * x + m[3] * y + m[5]
      qx = tf.where(is_fg, qx, _reflect(qx, wb))
      qy = tf.where(is_fg, qy, _reflect(qy, hb))
      width = tf.where(is_fg, s, wb)
      height = tf.where(is_fg, s, hb)
      base = tf.gather(chair_base, layer)
      frames.append(tf.reshape(_bilinear_packed(table, base, height, width, qx, qy), [hc, wc]))
      layers.append(layer)
    layer1, layer2 = layers
    # Flow of the layer visible in output frame 1: output-2 position A2^-1 G A1 x, stored as (map - identity).
    a2_inv = _invert(*maps[1])
    g_maps = (tf.concat([p["bg_a"][None], tf.gather(p["g_a"], by_value)], 0),
              tf.concat([p["bg_b"][None], tf.gather(p["g_b"], by_value)], 0))
    fa, fb = _compose(a2_inv, _compose(g_maps, maps[0]))
    # One (2, 3) gather per pixel and a reduction: a single pass writing the flow (separate column gathers are
    # materialised one array each, as the occlusion test below reads them too). Its float roundings are the
    # same in any batch of two or more rows (see Generator.render for a single row).
    flow_maps = tf.concat([fa - tf.eye(2), fb[..., None]], -1)  # (layers, 2, 3): [D | e], flow = D x + e
    flow = tf.reduce_sum(tf.gather(flow_maps, layer1) * tf.stack([x, y, tf.ones_like(x)], -1)[:, None, :], -1)
    u, v = flow[:, 0], flow[:, 1]
    rx, ry = _round(x + u), _round(y + v)
    inside = (rx >= 0) & (rx <= wc - 1) & (ry >= 0) & (ry <= hc - 1)
    target = tf.clip_by_value(ry, 0, hc - 1) * wc + tf.clip_by_value(rx, 0, wc - 1)
    same = tf.gather(layer2, target) == layer1
    occlusion = tf.cast(~(inside & same), tf.float32)
    return frames[0], frames[1], tf.reshape(flow, [hc, wc, 2]), tf.reshape(occlusion, [hc, wc])

  signature = (tf.TensorSpec([hc, wc], tf.int64), tf.TensorSpec([hc, wc], tf.int64),
               tf.TensorSpec([hc, wc, 2], tf.float32), tf.TensorSpec([hc, wc], tf.float32))

  @tf.function(jit_compile=True, autograph=False)
  def render(raw, geo, table, alpha, sprite_box):
    # One example per iteration of an XLA while loop, written into its row of the batch outputs (no per-example
    # outputs copied into a batch afterwards); row i depends only on raw[i] and geo[i].
    return tf.map_fn(lambda args: render_one(args[0], args[1], table, alpha, sprite_box), (raw, geo),
                     fn_output_signature=signature)

  @tf.function(jit_compile=True, autograph=False)
  def colour(im1, im2, photo, keys):
    """Packed frames (N, hc, wc) int64 -> float32 (N, hc, wc, 3) images, decoded and, with `photometric`,
    changed by augment.photometric (photo (N, 2, 7): brightness, contrast, colour (3), gamma, noise
    sigma per frame) plus augment.hash_normal noise (keys (N, 2, 2)). Elementwise per row; the contrast's mean
    grey level (after colour and brightness) comes from every 4th row and column through exact integer sums of
    the channels, so no float reduction's rounding depends on the batch size."""
    out = []
    for f, packed in enumerate((im1, im2)):
      lanes = _lanes(packed)  # (N, hc, wc, 3) int64
      img = tf.cast(tf.cast(lanes, tf.int32), tf.float32) * IMAGE_SCALE
      if not photometric:
        out.append(img)
        continue
      p = photo[:, f, :, None, None]  # (N, 7, 1, 1)
      b = lambda v: v[:, :, :, None]  # (N, 1, 1) -> (N, 1, 1, 1)
      sub = lanes[:, ::4, ::4]
      sums = tf.cast(tf.reduce_sum(sub, [1, 2]), tf.float32)[:, :, None, None]  # (N, 3, 1, 1)
      scale = IMAGE_SCALE / float(sub.shape[1] * sub.shape[2] * 3)
      mean = (sums[:, 0] * p[:, 2] + sums[:, 1] * p[:, 3] + sums[:, 2] * p[:, 4]) * scale + p[:, 0]
      colour_gain = tf.transpose(photo[:, f, 2:5, None, None], [0, 2, 3, 1])  # (N, 1, 1, 3)
      img = augment_lib.photometric(img, b(p[:, 0]), b(p[:, 1]), colour_gain, b(p[:, 5]), 0.0, None, clip=False,
                                    mean=b(mean))
      img = img + augment_lib.hash_normal(keys[:, f], (hc, wc, 3)) * b(p[:, 6])
      out.append(tf.clip_by_value(img, 0.0, 1.0))
    return tuple(out)

  def run(raw, geo, photo, keys, table, alpha, sprite_box):
    im1, im2, flow, occ = render(raw, geo, table, alpha, sprite_box)
    im1, im2 = colour(im1, im2, photo, keys)
    return {"image1": im1, "image2": im2, "flow": flow, "valid": tf.ones_like(occ), "occlusion": occ}

  return run


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


_RAW_KEYS = ("background", "bg_u", "bg_n", "rank", "active", "sprite", "chair_u", "chair_n")  # draw_random's


class Generator:
  """On-the-fly Flying Chairs pairs, one at a time (`gen(seed, index)`) or a batch per call (`gen.draw` per
  example, then `gen.render` on the batched draws, or `gen.batch(seed, indices)`).

  Every output row is a pure function of (seed, example index): row i of a batch has the same bytes as
  `gen(seed, indices[i])` (the renderer is an XLA while loop over the rows with the same body whatever the
  batch size, a single example is rendered as a batch of two, and the colour stage is elementwise per row with
  an exact integer mean). Build with `make_generator`.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, aug: ml_collections.ConfigDict | None,
               out_size: tuple[int, int], assets_: tuple, render: Callable) -> None:
    self.config, self.augment, self.out_size = cfg, aug, out_size
    self._table, self._alpha, self._boxes, bg_shape, sprite_shape = assets_
    self._nb, self._ns = bg_shape[0], sprite_shape[0]
    self._render = render
    self._identity = tf.constant([1.0, 0.0, 0.0, 1.0, 0.0, 0.0] * 2, tf.float32)

  def draw(self, seed: tf.Tensor, index: tf.Tensor) -> dict[str, tf.Tensor]:
    """The random draws of example `index` (small tensors, plain stateless TF ops): `draw_random`'s dict plus
    "geo" float32 (12,) output->source maps of the two frames and, with photometric augmentation, "photo"
    float32 (2, 7) (brightness, contrast, colour (3), gamma, noise sigma per frame) and "noise_keys" int64 (2, 2).
    Batch these (tf.data batch or tf.stack) and pass them to `render`."""
    cfg, aug = self.config, self.augment
    out = dict(draw_random(cfg, self._nb, self._ns, seed, index))
    if aug is None:
      out["geo"] = self._identity
      return out
    h, w = (int(v) for v in cfg.image_size)
    params = augment_lib.sample_params(seed, index, aug)
    m1, t1, m2, t2 = augment_lib.affine_maps(params, (h, w), self.out_size, aug)
    out["geo"] = tf.cast(tf.concat([tf.reshape(m1, [4]), t1, tf.reshape(m2, [4]), t2], 0), tf.float32)
    if aug.photometric:
      out["photo"] = tf.stack([augment_lib._photometric_vector(params, 1),
                               augment_lib._photometric_vector(params, 2)])
      out["noise_keys"] = tf.stack([params["noise_key1"], params["noise_key2"]])
    return out

  def render(self, draws: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Batched draws (each of `draw`'s tensors with a leading batch axis N) -> batch dict: image1, image2
    float32 (N, H, W, 3) in [0, 1], flow float32 (N, H, W, 2) pixels, valid and occlusion float32 (N, H, W)."""
    raw = {k: draws[k] for k in _RAW_KEYS}
    geo = draws["geo"]
    n = tf.shape(geo)[0]
    photo = draws["photo"] if "photo" in draws else tf.zeros([n, 2, 7], tf.float32)
    keys = draws["noise_keys"] if "noise_keys" in draws else tf.zeros([n, 2, 2], tf.int64)
    if geo.shape[0] != 1:
      return self._render(raw, geo, photo, keys, self._table, self._alpha, self._boxes)
    # A single example: XLA would drop the loop over one row and fuse its arithmetic with the surroundings
    # (other float roundings than in a batch). Render it twice as a batch of two (single examples are for
    # evaluation and inspection, not the training stream).
    pad = lambda t: tf.concat([t, t], 0)
    out = self._render(tf.nest.map_structure(pad, raw), pad(geo), pad(photo), pad(keys), self._table,
                       self._alpha, self._boxes)
    return {k: v[:1] for k, v in out.items()}

  def batch(self, seed: tf.Tensor, indices: Any) -> dict[str, tf.Tensor]:
    """The examples `indices` (int64 (N,)) of stream `seed` as one batch (see `render`)."""
    indices = tf.cast(indices, tf.int64)
    n = int(indices.shape[0])
    per = [self.draw(seed, indices[i]) for i in range(n)]
    return self.render({k: tf.stack([d[k] for d in per]) for k in per[0]})

  def __call__(self, seed: tf.Tensor, index: tf.Tensor) -> dict[str, tf.Tensor]:
    """Example `index` of stream `seed` (unbatched: image1, image2 (H, W, 3), flow (H, W, 2), valid,
    occlusion (H, W))."""
    out = self.render({k: v[None] for k, v in self.draw(seed, index).items()})
    return {k: v[0] for k, v in out.items()}


def make_generator(config: ml_collections.ConfigDict, augment: ml_collections.ConfigDict | None = None,
                   crop_size: tuple[int, int] | None = None) -> Generator:
  """Loads (or generates and caches) the assets once and returns a `Generator`: gen(seed, index) -> element dict.

  gen takes int64 scalar tensors (Python ints work too) and returns TF tensors: image1, image2 float32
  (H, W, 3) in [0, 1]; flow float32 (H, W, 2) in pixels (u right, v down, frame 1 -> frame 2); valid float32
  (H, W) of ones; occlusion float32 (H, W), 1 = occluded or out of view in frame 2. Graph-mode safe (use it in
  tf.data.Dataset.map); the output is a pure function of (seed, index). Batches: `gen.render` of batched
  `gen.draw` outputs (what the training pipeline does: draws per example, one render call per batch, no batch
  copy of the images), same bytes per row. Generators are memoised per config within a process (user folders
  are read once).

  With `augment` (an `augment.default_config()`) and `crop_size` (hc, wc), gen returns the FlowNet-augmented
  crop of the pair directly, at (hc, wc): the augmentation's output->source maps (drawn by
  `augment.sample_params` / `augment.affine_maps` from (seed, index), exactly as `augment.augment` would for
  an image_size source) are composed with the layers' affine maps, so each layer is sampled once from its
  photo or sprite, flow and occlusion stay exact for the crop (occlusion = hidden, or out of the frame-2 crop),
  and valid is 1 everywhere (the background photo extends beyond the frame by reflection, so every pixel has
  data). Photometric changes (if enabled; `augment.photometric`'s formula) follow in a second XLA function.
  """
  cfg = config
  _check_config(cfg)
  if (augment is None) != (crop_size is None):
    raise ValueError("synthetic_chairs.make_generator: give both augment and crop_size, or neither")
  key = json.dumps([cfg.to_dict(), None if augment is None else augment.to_dict(),
                    None if crop_size is None else [int(v) for v in crop_size]], sort_keys=True, default=str)
  if key in _GENERATORS:  # Same config in this process: reuse the assets and the compiled renderer.
    return _GENERATORS[key]
  h, w = (int(v) for v in cfg.image_size)
  out_size = (h, w) if crop_size is None else (int(crop_size[0]), int(crop_size[1]))
  if out_size[0] <= 0 or out_size[1] <= 0:
    raise ValueError(f"synthetic_chairs: crop_size must be positive, got {tuple(crop_size)}")
  loaded = _load_assets(cfg)
  cfg = ml_collections.ConfigDict(cfg.to_dict())  # Snapshot: later edits of `config` do not leak in.
  aug = None if augment is None else ml_collections.ConfigDict(augment.to_dict())
  render = _make_renderer(cfg, loaded[3], loaded[4], out_size, aug is not None and bool(aug.photometric))
  gen = Generator(cfg, aug, out_size, loaded, render)
  _GENERATORS[key] = gen
  return gen


_ASSET_ARRAYS: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _asset_arrays(cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """(backgrounds uint8 (N, Hb, Wb, 3), sprites uint8 (M, S, S, 4)) of a generator config, read once per process."""
  key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
  if key not in _ASSET_ARRAYS:
    h, w = (int(v) for v in cfg.image_size)
    bg_size = (int(round(h * cfg.background_scale)), int(round(w * cfg.background_scale)))
    backgrounds = assets.get_backgrounds(cfg.backgrounds_dir, bg_size, num_procedural=cfg.num_procedural_backgrounds,
                                         seed=cfg.asset_seed, max_images=cfg.max_backgrounds)
    sprites = assets.get_chairs(cfg.chairs_dir, cfg.sprite_size, num_models=cfg.num_chair_models,
                                views_per_model=cfg.views_per_model, seed=cfg.asset_seed,
                                max_images=cfg.max_chair_images)
    _ASSET_ARRAYS[key] = (backgrounds, sprites)
  return _ASSET_ARRAYS[key]


def asset_digest(config: ml_collections.ConfigDict) -> str:
  """SHA-256 of the background photos and chair sprites a generator config uses (their shapes and bytes): what
  a cache of the built pipeline must match besides the config (user folders can change between runs)."""
  _check_config(config)
  h = hashlib.sha256()
  for a in _asset_arrays(config):
    h.update(repr((a.shape, a.dtype.str)).encode())
    h.update(np.ascontiguousarray(a).data)
  return h.hexdigest()


def _load_assets(cfg: ml_collections.ConfigDict) -> tuple:
  """TF constants for the renderer: colour table int32 (all photos' pixels, then all sprites', packed by
  _pack_rgb), sprite alpha uint8 (M * S * S,), sprite opaque boxes float32 (M, 4); and the photo and sprite
  array shapes (N, Hb, Wb, 3), (M, S, S, 4)."""
  backgrounds, sprites = _asset_arrays(cfg)
  table = np.concatenate([_pack_rgb(backgrounds).reshape(-1), _pack_rgb(sprites[..., :3]).reshape(-1)])
  return (tf.constant(table), tf.constant(sprites[..., 3].reshape(-1)), tf.constant(_sprite_boxes(sprites)),
          backgrounds.shape, sprites.shape)


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
