"""The per-process tf.data streams for training and evaluation.

Training (`train_iterator`): source -> augment -> batch -> prefetch, as numpy dicts. Global step s covers global
example indices [s*B, (s+1)*B) (B = config.batch_size); process p of P takes [s*B + p*b, s*B + (p+1)*b) with
b = B // P. Every example is a pure function of (config.seed, global example index): the synthetic generator and
the augmentation draw with stateless ops keyed by it, and real datasets map the index to a file through a
stateless per-epoch permutation. So start_step=k resumes exactly the stream of step k, whatever P is, and the
P per-process batches of a step, concatenated in process order, are the one-process batch.

Evaluation (`eval_iterator`): a finite stream of numpy batches of a named set, without augmentation.
'synthetic_val' is config.data.val_size synthetic pairs, centre-cropped to config.data.crop_size, from
generator indices VAL_INDEX_OFFSET + i (training never reaches them, so the streams are disjoint) under
config.data.val_seed (independent of config.seed, so every run of a sweep evaluates on the same pairs).
Real sets are read at full resolution. Global batch k covers examples [k*B, (k+1)*B) as in training; every
process yields exactly ceil(N / B) batches of b = B // P examples, the missing rows of the last batch padded
with zero images, zero flow and valid = 0 (they do not count in masked metrics).

Dataset names are listed in TRAIN_SETS and EVAL_SETS; unknown names raise errors listing them.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from data_pipelines import augment as augment_lib
from data_pipelines import flying_chairs, kitti, middlebury, readers, sintel, things

try:  # tf.data runs beside JAX: keep TensorFlow off the accelerators.
  tf.config.set_visible_devices([], "GPU")
  tf.config.set_visible_devices([], "TPU")
except (RuntimeError, ValueError):
  pass

VAL_INDEX_OFFSET = 2 ** 62
# tf.data converts map / filter functions with AutoGraph unless told not to. Every function here has static
# Python control flow only (tensor-dependent branches are explicit tf.cond / tf.while_loop), so the conversion
# changes nothing in the graph and only costs time: it was ~1.3 of the 5.7 CPU-s that building the synthetic
# training stream took (batches checked byte-identical).
_plain = tf.autograph.experimental.do_not_convert
_SEED_TAG_FILES = 0x46494C45  # per-epoch file permutations


def default_config() -> ml_collections.ConfigDict:
  """`config.data`: `data_pipelines.defaults.data_config` (TensorFlow-free, so configs load without TF)."""
  from data_pipelines import defaults
  return defaults.data_config()


# ----------------------------------------------------------------------------------------------------------
# Sources.


def dataset_root(config: ml_collections.ConfigDict, key: str) -> str:
  """The folder of real dataset `key`: config.data.roots[key], joined to config.data.root when relative."""
  d = config.data
  if key not in d.roots:
    raise KeyError(f"config.data.roots has no {key!r}; known: {sorted(d.roots)}")
  path = os.path.expanduser(str(d.roots[key]))
  if os.path.isabs(path):
    return path
  if not d.root:
    raise ValueError(f"config.data.root is empty: set it to the folder holding the real datasets (or give an "
                     f"absolute config.data.roots.{key})")
  return os.path.join(os.path.expanduser(d.root), path)


def _file_sets(role: str) -> dict[str, Callable[[ml_collections.ConfigDict], readers.FileDataset]]:
  """Real datasets by name for `role` ('train' or 'eval')."""
  train = role == "train"
  r = dataset_root
  kdir = lambda c: c.data.kitti_flow_dir
  return {
      "flying_chairs": lambda c: flying_chairs.list_examples(r(c, "flying_chairs"), "train" if train else "val"),
      "flying_chairs_val": lambda c: flying_chairs.list_examples(r(c, "flying_chairs"), "val"),
      "flying_chairs_all": lambda c: flying_chairs.list_examples(r(c, "flying_chairs"), "all"),
      "sintel_clean": lambda c: sintel.list_examples(r(c, "sintel"), "clean", masks=c.data.sintel_masks),
      "sintel_final": lambda c: sintel.list_examples(r(c, "sintel"), "final", masks=c.data.sintel_masks),
      "kitti2015": lambda c: kitti.list_examples(r(c, "kitti2015"), 2015, "occ", kdir(c)),
      "kitti2015_noc": lambda c: kitti.list_examples(r(c, "kitti2015"), 2015, "noc", kdir(c)),
      "kitti2012": lambda c: kitti.list_examples(r(c, "kitti2012"), 2012, "occ", kdir(c)),
      "kitti2012_noc": lambda c: kitti.list_examples(r(c, "kitti2012"), 2012, "noc", kdir(c)),
      "middlebury": lambda c: middlebury.list_examples(r(c, "middlebury")),
      "things_clean": lambda c: things.list_examples(r(c, "things"), "clean", "TRAIN" if train else "TEST"),
      "things_final": lambda c: things.list_examples(r(c, "things"), "final", "TRAIN" if train else "TEST"),
  }


TRAIN_SETS = ("synthetic_chairs",) + tuple(_file_sets("train"))
EVAL_SETS = ("synthetic_val",) + tuple(_file_sets("eval"))

# Extra synthetic-style sources by name (tests register fakes here): name -> factory(config) -> gen(seed, index).
_GENERATORS: dict[str, Callable[[ml_collections.ConfigDict], Callable]] = {}


def register_generator(name: str, factory: Callable[[ml_collections.ConfigDict], Callable]) -> None:
  """Registers a generator source usable as config.data.train (factory(config) -> gen(seed, index))."""
  _GENERATORS[name] = factory


def _make_generator(config: ml_collections.ConfigDict, name: str) -> Callable:
  if name in _GENERATORS:
    return _GENERATORS[name](config)
  from data_pipelines import synthetic_chairs
  return synthetic_chairs.make_generator(config.data.synthetic)


def _file_permutation(seed: tf.Tensor, epoch: tf.Tensor, n: int) -> tf.Tensor:
  """A permutation of range(n) that is a pure function of (seed, epoch)."""
  key = augment_lib.example_key(seed, epoch, _SEED_TAG_FILES)
  return tf.argsort(tf.random.stateless_uniform([n], key), stable=True)


def _check_batching(config: ml_collections.ConfigDict, batch_size: int, process_index: int,
                    process_count: int) -> int:
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"batch size {batch_size} must be a positive multiple of process_count {process_count}")
  return batch_size // process_count


def _options(config: ml_collections.ConfigDict) -> tf.data.Options:
  opts = tf.data.Options()
  opts.deterministic = True
  # Each element's ops run on one thread: parallelism comes from the parallel map (no intra-op spinning, which
  # costs CPU time without adding throughput when all cores are busy with elements).
  opts.threading.max_intra_op_parallelism = 1
  if config.data.private_threads > 0:
    opts.threading.private_threadpool_size = int(config.data.private_threads)
  return opts


# ----------------------------------------------------------------------------------------------------------
# Training.


def train_dataset(config: ml_collections.ConfigDict, *, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, graph_cache_dir: str | None = None) -> tf.data.Dataset:
  """The infinite per-process training tf.data.Dataset of batches (dicts, leading axis b = B // P).

  With `graph_cache_dir`, the built-in synthetic stream's graph is kept there (data_pipelines.graph_cache) and a
  repeated configuration is rebuilt from it without tracing (same elements, byte for byte).
  """
  d = config.data
  name = d.train
  if name not in TRAIN_SETS and name not in _GENERATORS:
    raise ValueError(f"unknown training dataset config.data.train={name!r}; known: "
                     f"{sorted(set(TRAIN_SETS) | set(_GENERATORS))}")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  _check_batching(config, int(config.batch_size), process_index, process_count)
  build = lambda: _build_train_dataset(config, start_step, process_index, process_count)
  if name != "synthetic_chairs" or name in _GENERATORS or not graph_cache_dir:
    return build()
  from data_pipelines import graph_cache, synthetic_chairs
  key = {"dataset": "train", "data": d.to_dict(), "batch_size": int(config.batch_size), "seed": int(config.seed),
         "start_step": int(start_step), "process_index": int(process_index), "process_count": int(process_count),
         "assets": synthetic_chairs.asset_digest(d.synthetic)}
  return graph_cache.load_or_build(build, key, graph_cache_dir)


def _build_train_dataset(config: ml_collections.ConfigDict, start_step: int, process_index: int,
                         process_count: int) -> tf.data.Dataset:
  d = config.data
  name = d.train
  big_b = int(config.batch_size)
  b = _check_batching(config, big_b, process_index, process_count)
  seed = tf.constant(int(config.seed), tf.int64)
  crop = tuple(int(v) for v in d.crop_size)
  aug_cfg = d.augment
  parallel = d.num_parallel_calls if d.num_parallel_calls > 0 else tf.data.AUTOTUNE
  p_off = process_index * b

  if name == "synthetic_chairs" or name in _GENERATORS:
    # Local example j of this process -> global index (j // b) * B + p * b + j % b.
    ds = tf.data.Dataset.range(start_step * b, 2 ** 62)
    ds = ds.map(_plain(lambda j: (j // b) * big_b + p_off + j % b))
    if name in _GENERATORS:
      gen = _make_generator(config, name)
      ds = ds.map(_plain(lambda gi: augment_lib.augment(gen(seed, gi), seed, gi, aug_cfg, crop)),
                  num_parallel_calls=parallel, deterministic=True)
      ds = ds.batch(b, drop_remainder=True)
    else:
      # The generator renders the augmented crop directly (same draws as augment.augment): each example's
      # random draws (small) are batched, then one render call writes the whole batch (no copy of the frames
      # into a batch; row i has the bytes of example i rendered alone).
      from data_pipelines import synthetic_chairs
      gen = synthetic_chairs.make_generator(d.synthetic, aug_cfg, crop)
      ds = ds.map(_plain(lambda gi: gen.draw(seed, gi)), num_parallel_calls=parallel, deterministic=True)
      ds = ds.batch(b, drop_remainder=True)
      ds = ds.map(_plain(gen.render), num_parallel_calls=parallel, deterministic=True)
  else:
    files = _file_sets("train")[name](config)
    n = len(files)
    start = start_step * big_b

    def epoch_ids(epoch):  # (global index, file id) of every example of one epoch, in global order
      perm = tf.cast(_file_permutation(seed, epoch, n), tf.int64)
      return tf.data.Dataset.from_tensor_slices((epoch * n + tf.range(n, dtype=tf.int64), perm))

    ds = tf.data.Dataset.range(start // n, 2 ** 62).flat_map(_plain(epoch_ids))
    ds = ds.filter(_plain(lambda gi, _: (gi >= start) & ((gi % big_b) // b == process_index)))
    ds = ds.map(_plain(lambda gi, fid: augment_lib.augment(files.element(fid), seed, gi, aug_cfg, crop)),
                num_parallel_calls=parallel, deterministic=True)
    ds = ds.batch(b, drop_remainder=True)
  ds = ds.prefetch(d.prefetch if d.prefetch > 0 else tf.data.AUTOTUNE)
  return ds.with_options(_options(config))


def train_iterator(config: ml_collections.ConfigDict, *, start_step: int = 0, process_index: int = 0,
                   process_count: int = 1, graph_cache_dir: str | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Per-process numpy batches of steps start_step, start_step + 1, ...: image1/image2 (b, hc, wc, 3) float32
  in [0, 1], flow (b, hc, wc, 2) pixels, valid (b, hc, wc) [, occlusion (b, hc, wc)], b = batch_size // P.
  `graph_cache_dir`: see `train_dataset`."""
  return train_dataset(config, start_step=start_step, process_index=process_index, process_count=process_count,
                       graph_cache_dir=graph_cache_dir).as_numpy_iterator()


# ----------------------------------------------------------------------------------------------------------
# Evaluation.


def _centre_crop(element: dict[str, tf.Tensor], crop: tuple[int, int]) -> dict[str, tf.Tensor]:
  h, w = element["image1"].shape[0], element["image1"].shape[1]
  hc, wc = crop
  if h is not None and (hc > h or wc > w):
    raise ValueError(f"synthetic_val: crop_size {crop} is larger than the generated image size {(h, w)}")
  oy, ox = (h - hc) // 2, (w - wc) // 2
  return {k: v[oy:oy + hc, ox:ox + wc] for k, v in element.items()}


def eval_dataset(config: ml_collections.ConfigDict, name: str, *, process_index: int = 0, process_count: int = 1,
                 batch_size: int = 1) -> tuple[tf.data.Dataset, int]:
  """(unbatched per-process element dataset, number N of examples in the whole set) for eval set `name`."""
  d = config.data
  parallel = d.num_parallel_calls if d.num_parallel_calls > 0 else tf.data.AUTOTUNE
  b = _check_batching(config, batch_size, process_index, process_count)
  if name == "synthetic_val":
    n = int(d.val_size)
    if n <= 0:
      raise ValueError(f"config.data.val_size must be positive, got {n}")
    gen = _make_generator(config, d.train if d.train in _GENERATORS else "synthetic_chairs")
    seed = tf.constant(int(d.val_seed), tf.int64)
    crop = tuple(int(v) for v in d.crop_size)
    load = lambda i: _centre_crop(gen(seed, VAL_INDEX_OFFSET + i), crop)
  elif name in EVAL_SETS:
    files = _file_sets("eval")[name](config)
    n = len(files)
    load = files.element
  else:
    raise ValueError(f"unknown evaluation dataset {name!r}; known: {list(EVAL_SETS)}")
  ds = tf.data.Dataset.range(n).filter(_plain(lambda i: (i % batch_size) // b == process_index))
  ds = ds.map(_plain(load), num_parallel_calls=parallel, deterministic=True).prefetch(max(b, 2))
  return ds.with_options(_options(config)), n


def eval_iterator(config: ml_collections.ConfigDict, name: str, *, batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Finite per-process numpy batches of eval set `name` (see the module docstring for padding and sharding).

  batch_size is global (B); each batch has b = B // P rows. Examples of one batch must share H, W (use
  batch_size = process_count for sets of mixed sizes such as Middlebury or KITTI).
  """
  ds, n = eval_dataset(config, name, process_index=process_index, process_count=process_count,
                       batch_size=batch_size)
  b = batch_size // process_count
  num_batches = math.ceil(n / batch_size)
  it = ds.as_numpy_iterator()
  template = None
  for k in range(num_batches):
    rows_here = min(b, max(0, n - k * batch_size - process_index * b))
    rows = [next(it) for _ in range(rows_here)]
    if rows:
      template = rows[0]
    elif template is None:  # this process has no row in this batch: shape the padding like example 0
      first, _ = eval_dataset(config, name, batch_size=1)
      template = next(first.take(1).as_numpy_iterator())
    shapes = {tuple(r["image1"].shape) for r in rows}
    if len(shapes) > 1:
      raise ValueError(f"eval set {name!r}: batch {k} mixes image sizes {sorted(shapes)}; use batch_size = "
                       f"process_count ({process_count}) for sets of mixed sizes")
    pad = {key: np.zeros_like(v) for key, v in template.items()}
    rows += [pad] * (b - len(rows))
    yield {key: np.stack([r[key] for r in rows]) for key in template}
