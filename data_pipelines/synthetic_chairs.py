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

# Reference width (px) of the motion parameters: pixel displacements are scaled by image width / 512.
REFERENCE_WIDTH = 512
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
  m.bg_translation_sigma = (0.3, 10.0)
  m.bg_rotation_sigma = (0.1, 2.0)
  m.bg_zoom_sigma = 0.03
  m.bg_squeeze_sigma = 0.02
  m.chair_translation_sigma = (0.5, 35.0)
  m.chair_rotation_sigma = (0.2, 8.0)
  m.chair_zoom_sigma = 0.05
  m.chair_squeeze_sigma = 0.03
  m.chair_initial_rotation = 180.0  # Initial in-plane rotation ~ U(-a, a) degrees.
  m.chair_flip_probability = 0.5  # Probability of mirroring a sprite horizontally.
  return c


# ------------------------------------------------------------------------------------------------------------
# Random parameters (plain TF ops, stateless, Philox).


def _loguniform(u: tf.Tensor, lo: float, hi: float) -> tf.Tensor:
  if lo <= 0 or hi < lo:
    raise ValueError(f"a sigma range must satisfy 0 < lo <= hi, got ({lo}, {hi})")
  return tf.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


def _similarity(scale_x: tf.Tensor, scale_y: tf.Tensor, angle: tf.Tensor) -> tf.Tensor:
  """2x2 matrices R(angle) @ diag(scale_x, scale_y), shape (..., 2, 2)."""
  c, s = tf.cos(angle), tf.sin(angle)
  return tf.stack([tf.stack([c * scale_x, -s * scale_y], -1), tf.stack([s * scale_x, c * scale_y], -1)], -2)


def _linear_stretch_bound(m: ml_collections.ConfigDict) -> float:
  """Upper bound of the largest singular value of the background and chair motion matrices combined."""
  t = m.truncation
  return math.exp(t * (m.bg_zoom_sigma + m.bg_squeeze_sigma + m.chair_zoom_sigma + m.chair_squeeze_sigma))


def _window_size(cfg: ml_collections.ConfigDict) -> int:
  """Side (px) of the square window that surely contains a chair's footprint in frame 1 and frame 2."""
  w = cfg.image_size[1]
  side = cfg.chair_size[1] * w * _linear_stretch_bound(cfg.motion)
  return int(math.ceil(side * math.sqrt(2.0))) + 4


def draw_parameters(cfg: ml_collections.ConfigDict, num_backgrounds: int, num_sprites: int, seed: tf.Tensor,
                    index: tf.Tensor) -> dict[str, tf.Tensor]:
  """All random numbers of example `index`: a pure function of (seed, index) via stateless Philox draws.

  Returns affine maps as (A, t) with x' = A @ x + t on (x, y) pixel coordinates: `bg_crop` (2,) offset of
  the frame-1 crop in the background photo, `bg` (T_bg), chair placements `c1` (sprite -> frame 1), `c2`
  (sprite -> frame 2), chair motions `g` (frame 1 -> frame 2, = T_bg o M_k), `active` (Kmax,) bool,
  `background` and `sprite` indices.
  """
  h, w = cfg.image_size
  m = cfg.motion
  kmin, kmax = int(cfg.num_chairs[0]), int(cfg.num_chairs[1])
  px = w / REFERENCE_WIDTH  # Pixel magnitudes scale with the image width.
  seed = tf.cast(seed, tf.int64)
  index = tf.cast(index, tf.int64)
  key = tf.random.experimental.stateless_fold_in(tf.stack([seed, tf.constant(_SALT, tf.int64)]), index,
                                                 alg="philox")

  def sub(i: int) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(key, tf.constant(i, tf.int64), alg="philox")

  def uniform(i, shape):
    return tf.random.stateless_uniform(shape, sub(i), alg="philox")

  def tnormal(i, shape):
    return tf.clip_by_value(tf.random.stateless_normal(shape, sub(i), alg="philox"), -m.truncation, m.truncation)

  hb = int(round(h * cfg.background_scale))
  wb = int(round(w * cfg.background_scale))
  # Background: photo, crop offset and motion about the image centre.
  background = tf.random.stateless_uniform([], sub(0), 0, num_backgrounds, dtype=tf.int32, alg="philox")
  u = uniform(1, [4])
  crop = tf.stack([u[0] * (wb - w), u[1] * (hb - h)])
  n = tnormal(2, [5])
  bg_t = n[0:2] * _loguniform(u[2], *m.bg_translation_sigma) * px
  bg_rot = n[2] * _loguniform(u[3], *m.bg_rotation_sigma) * (math.pi / 180.0)
  bg_a = _similarity(tf.exp(n[3] * m.bg_zoom_sigma + n[4] * m.bg_squeeze_sigma),
                     tf.exp(n[3] * m.bg_zoom_sigma - n[4] * m.bg_squeeze_sigma), bg_rot)
  centre = tf.constant([(w - 1) / 2.0, (h - 1) / 2.0])
  bg_b = centre + bg_t - tf.linalg.matvec(bg_a, centre)
  # Chairs.
  count = tf.random.stateless_uniform([], sub(3), kmin, kmax + 1, dtype=tf.int32, alg="philox")
  active = tf.range(kmax) < count
  sprite = tf.random.stateless_uniform([kmax], sub(4), 0, num_sprites, dtype=tf.int32, alg="philox")
  u = uniform(5, [kmax, 7])
  pos = tf.stack([u[:, 0] * w, u[:, 1] * h], -1) - 0.5
  size_px = _loguniform(u[:, 2], cfg.chair_size[0] * w, cfg.chair_size[1] * w)
  scale = size_px / cfg.sprite_size
  angle = (2.0 * u[:, 3] - 1.0) * m.chair_initial_rotation * (math.pi / 180.0)
  flip = tf.where(u[:, 4] < m.chair_flip_probability, -1.0, 1.0)
  c1_a = _similarity(scale * flip, scale, angle)
  sc = (cfg.sprite_size - 1) / 2.0
  c1_b = pos - tf.linalg.matvec(c1_a, tf.fill([kmax, 2], sc))
  n = tnormal(6, [kmax, 5])
  ch_t = n[:, 0:2] * _loguniform(u[:, 5], *m.chair_translation_sigma)[:, None] * px
  ch_rot = n[:, 2] * _loguniform(u[:, 6], *m.chair_rotation_sigma) * (math.pi / 180.0)
  ch_a = _similarity(tf.exp(n[:, 3] * m.chair_zoom_sigma + n[:, 4] * m.chair_squeeze_sigma),
                     tf.exp(n[:, 3] * m.chair_zoom_sigma - n[:, 4] * m.chair_squeeze_sigma), ch_rot)
  ch_b = pos + ch_t - tf.linalg.matvec(ch_a, pos)  # M_k: about the chair's frame-1 centre.
  g_a = tf.matmul(bg_a[None], ch_a)  # G_k = T_bg o M_k.
  g_b = tf.linalg.matvec(bg_a[None], ch_b) + bg_b
  c2_a = tf.matmul(g_a, c1_a)
  c2_b = tf.linalg.matvec(g_a, c1_b) + g_b
  return {"background": background, "bg_crop": crop, "bg_a": bg_a, "bg_b": bg_b, "active": active,
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


def _bilinear(flat: tf.Tensor, base: tf.Tensor, height: int, width: int, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
  """Bilinear samples of images stored as rows of `flat` (N*height*width, C) at (x, y) (clamped to the image).

  `base` is the row offset of each sample's image (int32, broadcast with x); returns float32 (..., C).
  """
  x = tf.clip_by_value(x, 0.0, width - 1.0)
  y = tf.clip_by_value(y, 0.0, height - 1.0)
  x0f, y0f = tf.floor(x), tf.floor(y)
  fx, fy = (x - x0f)[..., None], (y - y0f)[..., None]
  x0, y0 = tf.cast(x0f, tf.int32), tf.cast(y0f, tf.int32)
  x1, y1 = tf.minimum(x0 + 1, width - 1), tf.minimum(y0 + 1, height - 1)

  def at(yy, xx):
    return tf.cast(tf.gather(flat, base + yy * width + xx), tf.float32)

  top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx
  bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx
  return top * (1.0 - fy) + bottom * fy


def _reflect(x: tf.Tensor, size: int) -> tf.Tensor:
  """Mirror-reflects coordinates into [0, size - 1] (whole-sample symmetric)."""
  period = 2.0 * (size - 1)
  r = tf.math.floormod(x, period)
  return (size - 1) - tf.abs(r - (size - 1))


def _make_renderer(cfg: ml_collections.ConfigDict, bg_shape: tuple, sprite_shape: tuple) -> Callable:
  h, w = (int(v) for v in cfg.image_size)
  _, hb, wb, _ = bg_shape
  _, s, _, _ = sprite_shape
  kmax = int(cfg.num_chairs[1])
  win = _window_size(cfg)
  npix = h * w

  def layer_map(a_inv, b_inv, centre, alpha_sel, active):
    """Z-buffer: (H*W,) int32 index of the top layer per pixel (0 = background, k + 1 = chair k)."""
    origin = tf.cast(tf.round(centre), tf.int32) - win // 2  # (K, 2)
    r = tf.range(win, dtype=tf.int32)
    gx = origin[:, 0, None, None] + r[None, None, :]  # (K, 1, win)
    gy = origin[:, 1, None, None] + r[None, :, None]  # (K, win, 1)
    fx, fy = tf.cast(gx, tf.float32), tf.cast(gy, tf.float32)
    a = a_inv[:, None, None]
    b = b_inv[:, None, None]
    ux, uy = _apply(a, b, fx, fy)  # Sprite coordinates, (K, win, win).
    ix, iy = tf.cast(tf.round(ux), tf.int32), tf.cast(tf.round(uy), tf.int32)
    in_sprite = (ix >= 0) & (ix < s) & (iy >= 0) & (iy < s)
    k = tf.range(kmax, dtype=tf.int32)[:, None, None]
    flat_alpha = tf.reshape(alpha_sel, [-1])
    alpha = tf.gather(flat_alpha, k * s * s + tf.clip_by_value(iy, 0, s - 1) * s + tf.clip_by_value(ix, 0, s - 1))
    on = in_sprite & (alpha > 127) & active[:, None, None]
    in_frame = (gx >= 0) & (gx < w) & (gy >= 0) & (gy < h)
    ids = tf.where(in_frame & on, gy * w + gx, npix)  # Misses go to a spare segment.
    vals = tf.where(on, k + 1, 0)
    top = tf.math.unsorted_segment_max(tf.reshape(vals, [-1]), tf.reshape(ids, [-1]), npix + 1)
    return tf.maximum(top[:npix], 0)

  @tf.function(jit_compile=True)
  def render(p, backgrounds, sprites):
    sprite_sel = tf.gather(sprites, p["sprite"])  # (K, S, S, 4)
    alpha_sel = sprite_sel[..., 3]
    rgb_sel = tf.reshape(sprite_sel[..., :3], [-1, 3])
    photo = tf.reshape(tf.gather(backgrounds, p["background"]), [-1, 3])
    sc = tf.fill([kmax, 2], (s - 1) / 2.0)
    yy, xx = tf.meshgrid(tf.range(h, dtype=tf.float32), tf.range(w, dtype=tf.float32), indexing="ij")
    x = tf.reshape(xx, [-1])
    y = tf.reshape(yy, [-1])
    zero = tf.zeros([], tf.int32)
    frames, layers = [], []
    for c_a, c_b, bg_a, bg_b in ((p["c1_a"], p["c1_b"], tf.eye(2), tf.zeros([2])),
                                 (p["c2_a"], p["c2_b"], p["bg_a"], p["bg_b"])):
      a_inv, b_inv = _invert(c_a, c_b)
      centre = tf.linalg.matvec(c_a, sc) + c_b
      layer = layer_map(a_inv, b_inv, centre, alpha_sel, p["active"])
      chair = tf.maximum(layer - 1, 0)
      ga, gb = tf.gather(a_inv, chair), tf.gather(b_inv, chair)
      ux, uy = _apply(ga, gb, x, y)
      fg = _bilinear(rgb_sel, chair * (s * s), s, s, ux, uy)
      bia, bib = _invert(bg_a, bg_b)
      qx, qy = _apply(bia, bib, x, y)
      qx = _reflect(qx + p["bg_crop"][0], wb)
      qy = _reflect(qy + p["bg_crop"][1], hb)
      bg = _bilinear(photo, zero, hb, wb, qx, qy)
      rgb = tf.where((layer > 0)[:, None], fg, bg) * (1.0 / 255.0)
      frames.append(tf.reshape(rgb, [h, w, 3]))
      layers.append(layer)
    layer1, layer2 = layers
    chair = tf.maximum(layer1 - 1, 0)
    ma = tf.where((layer1 > 0)[:, None, None], tf.gather(p["g_a"], chair), p["bg_a"][None])
    mb = tf.where((layer1 > 0)[:, None], tf.gather(p["g_b"], chair), p["bg_b"][None])
    x2, y2 = _apply(ma, mb, x, y)
    flow = tf.stack([x2 - x, y2 - y], -1)
    rx, ry = tf.round(x2), tf.round(y2)
    inside = (rx >= 0) & (rx <= w - 1) & (ry >= 0) & (ry <= h - 1)
    target = tf.clip_by_value(tf.cast(ry, tf.int32), 0, h - 1) * w + tf.clip_by_value(tf.cast(rx, tf.int32), 0, w - 1)
    same = tf.gather(layer2, target) == layer1
    occlusion = tf.cast(~(inside & same), tf.float32)
    return {"image1": frames[0], "image2": frames[1], "flow": tf.reshape(flow, [h, w, 2]),
            "valid": tf.ones([h, w], tf.float32), "occlusion": tf.reshape(occlusion, [h, w])}

  return render


def _check_config(cfg: ml_collections.ConfigDict) -> None:
  h, w = cfg.image_size
  if h < 64 or w < 64:
    raise ValueError(f"synthetic_chairs: image_size must be at least (64, 64), got {tuple(cfg.image_size)}")
  lo, hi = cfg.num_chairs
  if not 0 <= lo <= hi:
    raise ValueError(f"synthetic_chairs: num_chairs must be (lo, hi) with 0 <= lo <= hi, got {tuple(cfg.num_chairs)}")
  if not 0 < cfg.chair_size[0] <= cfg.chair_size[1]:
    raise ValueError(f"synthetic_chairs: chair_size must be (lo, hi) with 0 < lo <= hi, got {tuple(cfg.chair_size)}")
  if cfg.background_scale < 1.0:
    raise ValueError(f"synthetic_chairs: background_scale must be >= 1, got {cfg.background_scale}")


def make_generator(config: ml_collections.ConfigDict) -> Callable[[tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]:
  """Loads (or generates and caches) the assets once and returns gen(seed, index) -> element dict.

  gen takes int64 scalar tensors (Python ints work too) and returns TF tensors: image1, image2 float32
  (H, W, 3) in [0, 1]; flow float32 (H, W, 2) in pixels (u right, v down, frame 1 -> frame 2); valid float32
  (H, W) of ones; occlusion float32 (H, W), 1 = occluded or out of view in frame 2. Graph-mode safe (use it in
  tf.data.Dataset.map); the output is a pure function of (seed, index).
  """
  cfg = config
  _check_config(cfg)
  h, w = (int(v) for v in cfg.image_size)
  bg_size = (int(round(h * cfg.background_scale)), int(round(w * cfg.background_scale)))
  backgrounds = assets.get_backgrounds(cfg.backgrounds_dir, bg_size, num_procedural=cfg.num_procedural_backgrounds,
                                       seed=cfg.asset_seed, max_images=cfg.max_backgrounds)
  sprites = assets.get_chairs(cfg.chairs_dir, cfg.sprite_size, num_models=cfg.num_chair_models,
                              views_per_model=cfg.views_per_model, seed=cfg.asset_seed,
                              max_images=cfg.max_chair_images)
  bg_t = tf.constant(backgrounds)
  sp_t = tf.constant(sprites)
  render = _make_renderer(cfg, backgrounds.shape, sprites.shape)
  nb, ns = backgrounds.shape[0], sprites.shape[0]
  cfg = ml_collections.ConfigDict(cfg.to_dict())  # Snapshot: later edits of `config` do not leak in.

  def gen(seed: tf.Tensor, index: tf.Tensor) -> dict[str, tf.Tensor]:
    params = draw_parameters(cfg, nb, ns, seed, index)
    return render(params, bg_t, sp_t)

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


def benchmark(config: ml_collections.ConfigDict, num: int = 200, seed: int = 0) -> float:
  """Pairs per second of generation on one core (TF inter/intra-op threads = 1), after a warm-up."""
  gen = make_generator(config)
  ds = tf.data.Dataset.range(num + 20).map(lambda i: gen(tf.constant(seed, tf.int64), i))
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  ds = ds.with_options(options)
  it = iter(ds)
  for _ in range(20):
    next(it)
  t0 = time.perf_counter()
  for _ in range(num):
    next(it)
  return num / (time.perf_counter() - t0)


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
    rate = benchmark(config, args.num)
    h, w = config.image_size
    print(f"synthetic_chairs: {rate:.1f} pairs/s on one core at {w}x{h}")
    return
  if not args.out:
    parser.error("--out is required (or --benchmark)")
  export(args.out, args.num, args.seed, config, args.start)
  print(f"wrote {args.num} pairs to {args.out}")


if __name__ == "__main__":
  main()
