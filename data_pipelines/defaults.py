"""Default settings of the input pipeline, without importing TensorFlow.

The configs (configs/*.py) build `config.data` from these functions, so that loading a config, parsing
command-line overrides and starting the JAX side of a run never wait for TensorFlow's import (~4.7 s): the
trainer imports TensorFlow in its input-pipeline thread, beside the train step's load or compile. The modules
that use the settings re-export them as `pipeline.default_config()`, `synthetic_chairs.default_config()` and
`augment.default_config()`; their docstrings describe the fields' meaning.
"""

from __future__ import annotations

import ml_collections


def augment_config() -> ml_collections.ConfigDict:
  """Augmentation ranges (data_pipelines/augment.py's module docstring gives units and sources)."""
  c = ml_collections.ConfigDict()
  c.geometric = True
  c.translate = 0.2          # fraction of the image width, x and y: uniform in [-translate, translate]
  c.rotate = 17.0            # degrees: uniform in [-rotate, rotate]
  c.zoom = (0.9, 2.0)        # uniform; > 1 magnifies
  c.squeeze = (1.0, 1.0)     # x/y aspect factor q, log-uniform in the range: zoom_x = zoom * q, zoom_y = zoom / q
  c.relative_translate = 0.03   # frame 2 only, fraction of the width
  c.relative_rotate = 1.7       # degrees
  c.relative_zoom = (0.97, 1.03)
  c.fit_crop = True
  c.photometric = True
  c.brightness_sigma = 0.2
  c.contrast = (-0.8, 0.4)
  c.color = (0.5, 2.0)
  c.gamma = (0.7, 1.5)
  c.noise_sigma = (0.0, 0.04)
  c.asymmetric = False
  c.relative_photometric = 0.02
  return c


def synthetic_config() -> ml_collections.ConfigDict:
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


def data_config() -> ml_collections.ConfigDict:
  """`config.data`: training source, real-data roots, crop, generator, augmentation, validation, tf.data."""
  c = ml_collections.ConfigDict()
  c.train = "synthetic_chairs"  # see TRAIN_SETS
  c.root = ""  # folder holding the real datasets (e.g. the shared sample data); relative `roots` join it
  c.roots = ml_collections.ConfigDict({
      "flying_chairs": "flyingchairs", "sintel": "sintel", "kitti2015": "kitti/kitti2015",
      "kitti2012": "kitti/kitti2012", "middlebury": "middlebury", "things": "flyingthings3d"})
  c.kitti_flow_dir = ""  # override of the KITTI flow folder name ('' = flow_occ / flow_noc)
  c.sintel_masks = True  # read Sintel invalid/occlusion masks (pairs without them are skipped)
  c.crop_size = (320, 448)  # (H, W) of training crops and synthetic_val (FlowNet's 448 x 320 crops)
  c.synthetic = synthetic_config()
  c.augment = augment_config()
  c.val_size = 640
  c.val_seed = 0
  c.num_parallel_calls = -1  # -1 = tf.data.AUTOTUNE
  c.prefetch = 2  # batches prefetched by tf.data (-1 = AUTOTUNE)
  c.private_threads = 0  # > 0: a private tf.data thread pool of this size
  return c
