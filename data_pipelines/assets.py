"""Background photos and chair sprites for the synthetic Flying Chairs generator.

Two sources for each kind of asset:

* user folders: background photos (JPEG/PNG/...; each is resized to cover the background size and centre
  cropped) and chair renders (RGBA PNGs, or RGB on a white background, which is keyed out; each is cropped to
  its silhouette, padded to a square and resized to `sprite_size`);
* built-in procedural defaults, generated once with numpy, deterministic, and cached on disk under
  $JAXFLOW_CACHE (or ~/.cache/jaxflow): dead-leaves backgrounds (textured, coloured occluding shapes with
  power-law sizes plus 1/f noise, so they have natural-image-like multi-scale statistics and edges) and chair
  sprites ray-cast from simple 3D chair models (boxes and cylinders: seat, back or slats, legs, optional arms
  and stretchers) seen from many viewpoints, Lambert-shaded, with anti-aliased alpha.

All arrays are uint8: backgrounds (N, Hb, Wb, 3), sprites (N, S, S, 4) with straight (not premultiplied) alpha;
the colour of transparent sprite pixels is bled outwards from the silhouette so that bilinear sampling near
the edge never mixes in black.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import warnings
from typing import Callable, Sequence

import numpy as np
from PIL import Image

# Bump when the procedural generators change, so stale caches are not reused.
ASSET_VERSION = 2
# Images whose width or height is below this (in pixels) are skipped as "tiny".
MIN_IMAGE_SIDE = 32
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".bmp", ".webp", ".tif", ".tiff", ".gif")

# ------------------------------------------------------------------------------------------------------------
# Disk cache.


def cache_dir() -> pathlib.Path:
  """Root of the on-disk asset cache: $JAXFLOW_CACHE, else ~/.cache/jaxflow."""
  root = os.environ.get("JAXFLOW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxflow")
  return pathlib.Path(root)


def _cached(name: str, params: dict, build: Callable[[], np.ndarray]) -> np.ndarray:
  """Returns build() from the cache file keyed by (name, params, ASSET_VERSION), building and saving it once."""
  key = json.dumps({"name": name, "version": ASSET_VERSION, **params}, sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  path = cache_dir() / f"{name}_{digest}.npy"
  if path.exists():
    try:
      return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:  # A truncated or corrupt cache file: rebuild it.
      logging.warning("jaxflow asset cache %s is unreadable (%s); regenerating", path, e)
  array = build()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
  with open(tmp, "wb") as f:
    np.save(f, array, allow_pickle=False)
  os.replace(tmp, path)  # Atomic: concurrent processes never read a half-written file.
  return array


# ------------------------------------------------------------------------------------------------------------
# Procedural backgrounds: dead leaves with textures and 1/f noise.


def _pink_noise(rng: np.random.Generator, h: int, w: int, exponent: float = 1.0) -> np.ndarray:
  """Zero-mean, unit-std noise (h, w) with a 1/f**exponent amplitude spectrum."""
  fy = np.fft.fftfreq(h)[:, None]
  fx = np.fft.rfftfreq(w)[None, :]
  f = np.sqrt(fx * fx + fy * fy)
  f[0, 0] = 1.0
  spec = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f**exponent
  spec[0, 0] = 0.0
  noise = np.fft.irfft2(spec, s=(h, w))
  return (noise - noise.mean()) / (noise.std() + 1e-12)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur of (H, W, C) with edge replication."""
  radius = max(1, int(math.ceil(3 * sigma)))
  k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  k = (k / k.sum()).astype(np.float32)
  out = np.pad(image, ((radius, radius), (0, 0), (0, 0)), mode="edge")
  out = sum(k[i] * out[i:i + image.shape[0]] for i in range(2 * radius + 1))
  out = np.pad(out, ((0, 0), (radius, radius), (0, 0)), mode="edge")
  return sum(k[i] * out[:, i:i + image.shape[1]] for i in range(2 * radius + 1))


def _random_colour(rng: np.random.Generator) -> np.ndarray:
  """An RGB colour in [0, 1] with varied brightness and saturation (many muted, some vivid)."""
  base = rng.uniform(0.0, 1.0, 3)
  grey = base.mean()
  sat = rng.beta(1.2, 2.0)
  value = rng.beta(2.0, 2.0) * 1.2
  return np.clip((grey + sat * (base - grey) * 2.0) * value, 0.0, 1.0)


def procedural_background(size: tuple[int, int], seed: int) -> np.ndarray:
  """One dead-leaves background, uint8 (H, W, 3), a deterministic function of (size, seed).

  Shapes (disks, ellipses, rotated rectangles) with radii from a power law p(r) ~ r^-3 occlude each other
  front to back; each carries a colour modulated by 1/f noise or a grating; 1/f luminance noise and a
  low-frequency colour cast are added on top.
  """
  h, w = int(size[0]), int(size[1])
  rng = np.random.default_rng([ASSET_VERSION, 7919, int(seed), h, w])
  tex = _pink_noise(rng, h, w, exponent=rng.uniform(0.8, 1.3))
  tex2 = np.tile(tex, (2, 2))  # Slices at random offsets give every shape its own texture patch.
  image = np.zeros((h, w, 3), np.float32)
  covered = np.zeros((h, w), bool)
  r_min, r_max = 3.0, 0.6 * max(h, w)
  max_shapes = 1500
  for i in range(max_shapes):
    if i % 100 == 99 and covered.all():
      break
    u = rng.uniform()
    r = (r_min**-2 - u * (r_min**-2 - r_max**-2)) ** -0.5  # Inverse CDF of p(r) ~ r^-3 on [r_min, r_max].
    cy, cx = rng.uniform(-0.1 * h, 1.1 * h), rng.uniform(-0.1 * w, 1.1 * w)
    kind = rng.integers(3)
    aspect = rng.uniform(0.3, 1.0) if kind else 1.0
    theta = rng.uniform(0, np.pi)
    y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, h)
    x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, w)
    if y0 >= y1 or x0 >= x1:
      continue
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
    a = xx * np.cos(theta) + yy * np.sin(theta)
    b = (-xx * np.sin(theta) + yy * np.cos(theta)) / aspect
    if kind == 2:
      inside = (np.abs(a) <= r * 0.8) & (np.abs(b) <= r * 0.8)
    else:
      inside = a * a + b * b <= r * r
    free = inside & ~covered[y0:y1, x0:x1]
    if not free.any():
      continue
    colour = _random_colour(rng)
    contrast = rng.uniform(0.05, 0.35)
    if rng.uniform() < 0.25:  # Grating texture (stripes, fabric, wood grain).
      freq = rng.uniform(0.05, 0.6)
      phi = rng.uniform(0, np.pi)
      pattern = np.sin(freq * (xx * np.cos(phi) + yy * np.sin(phi)) + rng.uniform(0, 6.3))
    else:
      oy, ox = rng.integers(h), rng.integers(w)
      pattern = tex2[oy + y0:oy + y1, ox + x0:ox + x1]
    shade = 1.0 + contrast * pattern
    image[y0:y1, x0:x1][free] = (colour[None, None, :] * shade[..., None])[free]
    covered[y0:y1, x0:x1] |= free
  if not covered.all():  # Whatever the leaves left uncovered gets a textured base layer.
    base = _random_colour(rng)[None, None, :] * (1.0 + 0.2 * tex[..., None])
    image[~covered] = base[~covered]
  lum = _pink_noise(rng, h, w, exponent=1.0)
  cast = np.stack([_pink_noise(rng, h, w, exponent=2.0) for _ in range(3)], -1)
  image = image * (1.0 + 0.06 * lum[..., None]) + 0.04 * cast
  image = _gaussian_blur(image, 0.7)  # A camera-like point spread: no energy piled up at the Nyquist limit.
  return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def procedural_backgrounds(num: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
  """`num` procedural backgrounds, uint8 (num, H, W, 3), cached on disk (see `cache_dir`)."""
  params = {"num": int(num), "size": [int(size[0]), int(size[1])], "seed": int(seed)}
  return _cached("backgrounds", params, lambda: _build_backgrounds(int(num), size, int(seed)))


def _build_backgrounds(num: int, size: tuple[int, int], seed: int) -> np.ndarray:
  return np.stack(_parallel_map("procedural_background", [([int(size[0]), int(size[1])], seed * 100003 + i)
                                                          for i in range(num)]))


def _parallel_map(fn_name: str, args: list[tuple], max_workers: int = 4) -> list[np.ndarray]:
  """[fn(*a) for a in args] for the module-level function `fn_name` of this module, spread over this process
  and helper processes (one per usable core, at most max_workers).

  Items are independent and seeded, so the result does not depend on the number of workers. Helpers are plain
  `python -c` subprocesses that import only this module (no fork of a process that may hold TensorFlow
  threads, no re-import of the caller's __main__); arguments go as JSON, results come back as .npy files. A
  helper that fails is reported in one warning and its items are built here.
  """
  fn = globals()[fn_name]
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  workers = min(cores, max_workers, len(args))
  if workers <= 1:
    return [fn(*a) for a in args]
  chunks = [args[w::workers] for w in range(workers)]
  package_parent = str(pathlib.Path(__file__).resolve().parent.parent)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
  results: dict[int, list] = {}
  with tempfile.TemporaryDirectory(prefix="jaxflow_assets_") as tmp:
    procs = []
    for w in range(1, workers):
      out = os.path.join(tmp, f"{w}.npy")
      cmd = [sys.executable, "-c", "import sys; from data_pipelines import assets; assets._worker(*sys.argv[1:])",
             fn_name, json.dumps(chunks[w]), out]
      procs.append((w, out, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
    results[0] = [fn(*a) for a in chunks[0]]
    for w, out, proc in procs:
      _, err = proc.communicate()
      if proc.returncode == 0 and os.path.exists(out):
        results[w] = list(np.load(out, allow_pickle=False))
      else:
        logging.warning("jaxflow assets: helper process failed (exit %s: %s); building its items here",
                        proc.returncode, err.decode(errors="replace").strip().splitlines()[-1:] or "")
        results[w] = [fn(*a) for a in chunks[w]]
  ordered = [None] * len(args)
  for w in range(workers):
    ordered[w::workers] = results[w]
  return ordered


def _worker(fn_name: str, args_json: str, out: str) -> None:
  """Helper-process entry point of _parallel_map: builds the items and saves them stacked to `out`."""
  fn = globals()[fn_name]
  items = [fn(*a) for a in json.loads(args_json)]
  np.save(out, np.stack(items), allow_pickle=False)


# ------------------------------------------------------------------------------------------------------------
# Procedural chairs: a tiny orthographic ray caster over boxes and vertical cylinders.


def _chair_model(rng: np.random.Generator) -> tuple[list, list]:
  """Random chair as (boxes, cylinders) in chair coordinates (x right, y up, z front), with colour ids.

  boxes: (lo[3], hi[3], part) ; cylinders: (cx, cz, radius, y0, y1, part); part 0 = seat/back, 1 = frame.
  """
  w = rng.uniform(0.8, 1.3)
  d = rng.uniform(0.7, 1.2)
  t = rng.uniform(0.05, 0.16)
  hs = rng.uniform(0.6, 1.0)
  hb = rng.uniform(0.5, 1.2)
  tb = rng.uniform(0.04, 0.12)
  boxes, cyls = [], []
  boxes.append(([-w / 2, hs - t, -d / 2], [w / 2, hs, d / 2], 0))  # Seat.
  if rng.uniform() < 0.3:  # Slatted back: posts, slats and a top rail.
    n = int(rng.integers(2, 5))
    sw = w / (2 * n + 1)
    for k in range(n):
      x0 = -w / 2 + (2 * k + 1) * sw
      boxes.append(([x0, hs, -d / 2], [x0 + sw, hs + hb, -d / 2 + tb], 0))
    boxes.append(([-w / 2, hs + hb, -d / 2], [w / 2, hs + hb + 0.12, -d / 2 + tb], 0))
    for x0 in (-w / 2, w / 2 - sw * 0.6):
      boxes.append(([x0, hs, -d / 2], [x0 + sw * 0.6, hs + hb, -d / 2 + tb], 1))
  else:  # Solid back, sometimes narrower than the seat.
    bw = w * rng.uniform(0.7, 1.0)
    boxes.append(([-bw / 2, hs, -d / 2], [bw / 2, hs + hb, -d / 2 + tb], 0))
  leg = rng.uniform(0.03, 0.08)
  inset = rng.uniform(0.0, 0.08)
  round_legs = rng.uniform() < 0.5
  for sx in (-1, 1):
    for sz in (-1, 1):
      cx, cz = sx * (w / 2 - inset - leg), sz * (d / 2 - inset - leg)
      if round_legs:
        cyls.append((cx, cz, leg, 0.0, hs - t, 1))
      else:
        boxes.append(([cx - leg, 0.0, cz - leg], [cx + leg, hs - t, cz + leg], 1))
  if rng.uniform() < 0.4:  # Stretchers between the legs.
    y = rng.uniform(0.15, 0.35) * hs
    for sx in (-1, 1):
      cx = sx * (w / 2 - inset - leg)
      boxes.append(([cx - leg * 0.6, y - 0.02, -d / 2 + inset], [cx + leg * 0.6, y + 0.02, d / 2 - inset], 1))
  if rng.uniform() < 0.4:  # Arms with a front support.
    ya = hs + rng.uniform(0.2, 0.35)
    aw = rng.uniform(0.05, 0.12)
    for sx in (-1, 1):
      x0 = sx * w / 2 - (aw if sx > 0 else 0)
      boxes.append(([x0, ya, -d / 2], [x0 + aw, ya + 0.05, d / 2], 0))
      boxes.append(([x0 + aw * 0.2, hs, d / 2 - aw], [x0 + aw * 0.8, ya, d / 2 - aw * 0.2], 1))
  return boxes, cyls


def _render_chair(boxes: list, cyls: list, colours: np.ndarray, pattern: tuple, azimuth: float,
                  elevation: float, size: int, supersample: int = 2) -> np.ndarray:
  """Ray-casts one chair view, float32 RGBA (size, size, 4) in [0, 1], supersample x supersample rays per pixel
  (anti-aliased alpha and colour).

  Orthographic camera; each primitive only tests the rays inside its projected bounding box.
  """
  ss = supersample * size
  prim_corners = [np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
                  for lo, hi, _ in boxes]
  prim_corners += [np.array([[cx + sx * r, y, cz + sz * r] for sx in (-1, 1) for sz in (-1, 1) for y in (y0, y1)])
                   for cx, cz, r, y0, y1, _ in cyls]
  corners = np.concatenate(prim_corners)
  centre = 0.5 * (corners.min(0) + corners.max(0))
  radius = np.linalg.norm(corners - centre, axis=1).max() * 1.02
  ca, sa, ce, se = np.cos(azimuth), np.sin(azimuth), np.cos(elevation), np.sin(elevation)
  fwd = -np.array([sa * ce, se, ca * ce])  # Viewing direction (camera looks along fwd).
  right = np.array([ca, 0.0, -sa])
  up = np.cross(right, fwd)
  g = ((np.arange(ss) + 0.5) / ss * 2.0 - 1.0).astype(np.float32)
  px, py = np.meshgrid(g * radius, -g * radius)
  origin = (centre + px[..., None] * right + py[..., None] * up - 3.0 * radius * fwd).astype(np.float32)
  dvec = np.where(np.abs(fwd) < 1e-9, 1e-9, fwd).astype(np.float32)
  best_t = np.full((ss, ss), np.inf, np.float32)
  best_n = np.zeros((ss, ss, 3), np.float32)
  best_p = np.zeros((ss, ss), np.int32)

  def window(k: int) -> tuple[slice, slice]:
    rel = prim_corners[k] - centre
    j = ((rel @ right) / radius + 1.0) * 0.5 * ss - 0.5
    i = ((-(rel @ up)) / radius + 1.0) * 0.5 * ss - 0.5
    return (slice(max(int(i.min()) - 1, 0), min(int(i.max()) + 3, ss)),
            slice(max(int(j.min()) - 1, 0), min(int(j.max()) + 3, ss)))

  def update(sl, hit, t, normal, part):
    bt = best_t[sl]
    hit = hit & (t < bt)
    best_t[sl] = np.where(hit, t, bt)
    best_n[sl] = np.where(hit[..., None], normal, best_n[sl])
    best_p[sl] = np.where(hit, part, best_p[sl])

  for k, (lo, hi, part) in enumerate(boxes):
    sl = window(k)
    o = origin[sl]
    t0 = (np.asarray(lo) - o) / dvec
    t1 = (np.asarray(hi) - o) / dvec
    tmin3 = np.minimum(t0, t1)
    tnear = tmin3.max(-1)
    tfar = np.maximum(t0, t1).min(-1)
    axis = tmin3.argmax(-1)
    normal = -np.sign(dvec)[None, None, :] * (axis[..., None] == np.arange(3)).astype(np.float32)
    update(sl, (tnear <= tfar) & (tnear > 0), tnear, normal, part)
  for k, (cx, cz, r, y0, y1, part) in enumerate(cyls):
    sl = window(len(boxes) + k)
    o = origin[sl]
    ox, oz = o[..., 0] - cx, o[..., 2] - cz
    a = fwd[0] ** 2 + fwd[2] ** 2
    if a > 1e-9:
      b = 2 * (ox * fwd[0] + oz * fwd[2])
      c = ox * ox + oz * oz - r * r
      disc = b * b - 4 * a * c
      ts = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
      ys = o[..., 1] + ts * fwd[1]
      normal = np.stack([ox + ts * fwd[0], np.zeros_like(ox), oz + ts * fwd[2]], -1) / r
      update(sl, (disc >= 0) & (ys >= y0) & (ys <= y1) & (ts > 0), ts, normal, part)
    if abs(fwd[1]) > 1e-9:  # The cap facing the camera.
      yc = y1 if fwd[1] < 0 else y0
      tc = (yc - o[..., 1]) / fwd[1]
      qx, qz = ox + tc * fwd[0], oz + tc * fwd[2]
      normal = np.broadcast_to(np.array([0.0, 1.0 if fwd[1] < 0 else -1.0, 0.0]), o.shape)
      update(sl, (qx * qx + qz * qz <= r * r) & (tc > 0), tc, normal, part)
  mask = np.isfinite(best_t)
  light = np.array([0.4, 0.8, 0.45], np.float32)
  light /= np.linalg.norm(light)
  lambert = np.clip(best_n @ light, 0.0, 1.0)
  # View-independent surface pattern (stripes or checks) on the upholstery, from the 3D hit point.
  point = origin + np.where(mask, best_t, 0.0)[..., None] * fwd.astype(np.float32)
  kind, freq = pattern
  if kind == 1:
    tex = 0.5 + 0.5 * np.sign(np.sin(freq * point[..., 0]))
  elif kind == 2:
    tex = 0.5 + 0.5 * np.sign(np.sin(freq * point[..., 0]) * np.sin(freq * point[..., 2])
                              * np.sin(freq * point[..., 1]))
  else:
    tex = np.ones((ss, ss))
  base = colours.astype(np.float32)[best_p]
  upholstery = (best_p == 0)[..., None]
  base = np.where(upholstery, base * (0.75 + 0.25 * tex[..., None]), base)
  rgb = base * (0.3 + 0.7 * lambert[..., None])
  rgba = np.concatenate([rgb * mask[..., None], mask[..., None].astype(np.float32)], -1)
  rgba = rgba.reshape(size, supersample, size, supersample, 4).mean((1, 3))  # Premultiplied box filter.
  alpha = rgba[..., 3:]
  rgb = np.where(alpha > 0, rgba[..., :3] / np.maximum(alpha, 1e-6), 0.0)
  return np.concatenate([rgb, alpha], -1).astype(np.float32)


def _bleed_colour(rgba: np.ndarray, iterations: int = 4) -> np.ndarray:
  """Spreads the colour of opaque pixels into transparent neighbours (float RGBA (S, S, 4), alpha kept)."""
  rgb = rgba[..., :3] * (rgba[..., 3:] > 0)
  weight = (rgba[..., 3] > 0).astype(np.float32)
  for _ in range(iterations):
    pw = np.pad(weight, 1)
    pc = np.pad(rgb * weight[..., None], ((1, 1), (1, 1), (0, 0)))
    s, ws = 0.0, 0.0
    for dy in range(3):
      for dx in range(3):
        s = s + pc[dy:dy + rgb.shape[0], dx:dx + rgb.shape[1]]
        ws = ws + pw[dy:dy + rgb.shape[0], dx:dx + rgb.shape[1]]
    fill = (weight == 0) & (ws > 0)
    rgb = np.where(fill[..., None], s / np.maximum(ws, 1e-6)[..., None], rgb)
    weight = np.maximum(weight, fill.astype(np.float32))
  return np.concatenate([rgb, rgba[..., 3:]], -1)


def procedural_chairs(num_models: int, views_per_model: int, sprite_size: int, seed: int = 0) -> np.ndarray:
  """Chair sprites uint8 (num_models * views_per_model, S, S, 4), cached on disk (see `cache_dir`).

  Each model has random proportions, parts, colours and an upholstery pattern, and is seen from
  `views_per_model` azimuths (stratified over 360 degrees) and random elevations in [-15, 65] degrees.
  """
  params = {"models": int(num_models), "views": int(views_per_model), "size": int(sprite_size),
            "seed": int(seed)}
  return _cached("chairs", params,
                 lambda: _build_chairs(int(num_models), int(views_per_model), int(sprite_size), int(seed)))


def _build_chairs(num_models: int, views: int, size: int, seed: int) -> np.ndarray:
  models = _parallel_map("_build_chair_model", [(m, views, size, seed) for m in range(num_models)])
  return np.concatenate(models) if models else np.zeros((0, size, size, 4), np.uint8)


def _build_chair_model(m: int, views: int, size: int, seed: int) -> np.ndarray:
  """The `views` sprites uint8 (views, S, S, 4) of procedural chair model m."""
  out = np.zeros((views, size, size, 4), np.uint8)
  rng = np.random.default_rng([ASSET_VERSION, 4241, seed, m])
  boxes, cyls = _chair_model(rng)
  colours = np.stack([_random_colour(rng), _random_colour(rng)])
  colours = np.clip(colours * 0.8 + 0.15, 0.0, 1.0)
  pattern = (int(rng.integers(3)), float(rng.uniform(8.0, 30.0)))
  for v in range(views):
    az = 2 * np.pi * (v + rng.uniform()) / views
    el = np.deg2rad(rng.uniform(-15.0, 65.0))
    rgba = _bleed_colour(_render_chair(boxes, cyls, colours, pattern, az, el, size))
    out[v] = np.clip(np.round(rgba * 255.0), 0, 255).astype(np.uint8)
  return out


# ------------------------------------------------------------------------------------------------------------
# User folders.


def _list_images(directory: str | os.PathLike, what: str) -> list[pathlib.Path]:
  folder = pathlib.Path(directory).expanduser()
  if not folder.is_dir():
    raise FileNotFoundError(f"{what} folder {str(folder)!r} does not exist or is not a directory")
  return sorted(p for p in folder.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def _warn_skipped(skipped: Sequence[tuple[pathlib.Path, str]], folder: str | os.PathLike, what: str) -> None:
  if skipped:
    listing = "; ".join(f"{p} ({why})" for p, why in skipped)
    warnings.warn(f"{len(skipped)} {what} file(s) in {str(folder)!r} skipped: {listing}", stacklevel=3)


def _cover_resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
  """Resizes (keeping the aspect ratio) to cover (H, W) and centre-crops to exactly (H, W)."""
  h, w = size
  scale = max(h / image.height, w / image.width)
  nw, nh = max(w, round(image.width * scale)), max(h, round(image.height * scale))
  image = image.resize((nw, nh), Image.Resampling.BICUBIC)
  x0, y0 = (nw - w) // 2, (nh - h) // 2
  return image.crop((x0, y0, x0 + w, y0 + h))


def load_backgrounds(directory: str | os.PathLike, size: tuple[int, int], max_images: int = 512) -> np.ndarray:
  """Background photos from a folder (searched recursively), uint8 (N, H, W, 3), N <= max_images.

  Each photo is resized to cover `size` = (H, W) and centre cropped. Unreadable images and images smaller than
  MIN_IMAGE_SIDE pixels are skipped with one warning naming them; a folder without a usable image is an error.
  """
  out, skipped = [], []
  for path in _list_images(directory, "background"):
    if len(out) >= max_images:
      break
    try:
      with Image.open(path) as im:
        im.load()
        if min(im.size) < MIN_IMAGE_SIDE:
          skipped.append((path, f"tiny: {im.size[0]}x{im.size[1]} < {MIN_IMAGE_SIDE} px"))
          continue
        out.append(np.asarray(_cover_resize(im.convert("RGB"), size), np.uint8))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      skipped.append((path, f"unreadable: {type(e).__name__}"))
  _warn_skipped(skipped, directory, "background")
  if not out:
    raise ValueError(f"background folder {str(directory)!r} contains no usable image "
                     f"(extensions {', '.join(IMAGE_EXTENSIONS)}, at least {MIN_IMAGE_SIDE} px)")
  return np.stack(out)


def chair_sprite_from_image(image: Image.Image, sprite_size: int, white_threshold: int = 240) -> np.ndarray | None:
  """Turns one chair render into a uint8 RGBA sprite (S, S, 4), or None when it has no usable silhouette.

  RGBA images use their alpha; images without alpha are keyed on white (pixels with all channels >=
  `white_threshold` become transparent). The silhouette's bounding box is padded to a square (centred) and
  resized to S x S with premultiplied-alpha filtering; transparent pixels get the bled edge colour.
  """
  has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
  rgba = np.asarray(image.convert("RGBA"), np.uint8).copy()
  if not has_alpha:
    keyed = (rgba[..., :3] >= white_threshold).all(-1)
    rgba[..., 3] = np.where(keyed, 0, 255)
  alpha = rgba[..., 3]
  ys, xs = np.nonzero(alpha > 0)
  if ys.size == 0 or (alpha == 255).all():
    return None
  y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
  crop = rgba[y0:y1, x0:x1]
  side = max(y1 - y0, x1 - x0) + 2
  square = np.zeros((side, side, 4), np.uint8)
  oy, ox = (side - (y1 - y0)) // 2, (side - (x1 - x0)) // 2
  square[oy:oy + y1 - y0, ox:ox + x1 - x0] = crop
  sq = square.astype(np.float32) / 255.0
  sq[..., :3] *= sq[..., 3:]  # Premultiply, resize, un-premultiply: no dark fringes.
  chans = [np.asarray(Image.fromarray(sq[..., c]).resize((sprite_size, sprite_size), Image.Resampling.BILINEAR
                                                         if side < sprite_size else Image.Resampling.BOX))
           for c in range(4)]
  res = np.clip(np.stack(chans, -1), 0.0, 1.0)
  a = res[..., 3:]
  res[..., :3] = np.where(a > 1e-4, res[..., :3] / np.maximum(a, 1e-4), 0.0)
  res = _bleed_colour(np.clip(res, 0.0, 1.0))
  return np.clip(np.round(res * 255.0), 0, 255).astype(np.uint8)


def load_chairs(directory: str | os.PathLike, sprite_size: int, max_images: int = 4096) -> np.ndarray:
  """Chair renders from a folder (searched recursively), uint8 sprites (N, S, S, 4), N <= max_images.

  RGBA PNGs keep their alpha; RGB images are keyed out on white. Unreadable images, images smaller than
  MIN_IMAGE_SIDE pixels and images without a silhouette (all transparent / all opaque) are skipped with one
  warning naming them; a folder without a usable image is an error naming the folder.
  """
  out, skipped = [], []
  for path in _list_images(directory, "chair"):
    if len(out) >= max_images:
      break
    try:
      with Image.open(path) as im:
        im.load()
        if min(im.size) < MIN_IMAGE_SIDE:
          skipped.append((path, f"tiny: {im.size[0]}x{im.size[1]} < {MIN_IMAGE_SIDE} px"))
          continue
        sprite = chair_sprite_from_image(im, sprite_size)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      skipped.append((path, f"unreadable: {type(e).__name__}"))
      continue
    if sprite is None:
      skipped.append((path, "no silhouette: fully transparent or fully opaque"))
      continue
    out.append(sprite)
  _warn_skipped(skipped, directory, "chair")
  if not out:
    raise ValueError(f"chair folder {str(directory)!r} contains no usable chair image (RGBA, or RGB on white, "
                     f"at least {MIN_IMAGE_SIDE} px)")
  return np.stack(out)


def get_backgrounds(directory: str, size: tuple[int, int], *, num_procedural: int = 12, seed: int = 0,
                    max_images: int = 512) -> np.ndarray:
  """Backgrounds uint8 (N, H, W, 3): from `directory` if non-empty, else the cached procedural set."""
  if directory:
    return load_backgrounds(directory, size, max_images)
  return procedural_backgrounds(num_procedural, size, seed)


def get_chairs(directory: str, sprite_size: int, *, num_models: int = 20, views_per_model: int = 12,
               seed: int = 0, max_images: int = 4096) -> np.ndarray:
  """Chair sprites uint8 (N, S, S, 4): from `directory` if non-empty, else the cached procedural set."""
  if directory:
    return load_chairs(directory, sprite_size, max_images)
  return procedural_chairs(num_models, views_per_model, sprite_size, seed)
