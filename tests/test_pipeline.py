"""Tests of data_pipelines.pipeline: shapes, exact determinism and resume, per-process sharding, eval padding."""

import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import augment, pipeline

SIZE = (40, 56)
CROP = (32, 48)


def fake_generator(config):
  """A tiny stateless source: random frames keyed by (seed, index); the flow encodes the index exactly
  (u = index mod 4096, v = index // 2**62), so tests can read back which example landed where."""
  h, w = SIZE

  def gen(seed, index):
    index = tf.cast(index, tf.int64)
    key = tf.stack([tf.cast(seed, tf.int64), index])
    im1 = tf.random.stateless_uniform((h, w, 3), key)
    im2 = tf.random.stateless_uniform((h, w, 3), key + 1)
    u = tf.cast(index % 4096, tf.float32)
    v = tf.cast(index // (2 ** 62), tf.float32)
    flow = tf.ones((h, w, 2)) * tf.stack([u, v])
    ones = tf.ones((h, w))
    return {"image1": im1, "image2": im2, "flow": flow, "valid": ones, "occlusion": 0 * ones}

  return gen


pipeline.register_generator("fake", fake_generator)


def make_config(batch_size=4, train="fake", crop=CROP, identity=False):
  c = ml_collections.ConfigDict()
  c.seed = 3
  c.batch_size = batch_size
  c.data = pipeline.default_config()
  c.data.train = train
  c.data.crop_size = crop
  c.data.val_size = 5
  if identity:
    a = c.data.augment
    a.translate, a.rotate, a.zoom = 0.0, 0.0, (1.0, 1.0)
    a.relative_translate, a.relative_rotate, a.relative_zoom = 0.0, 0.0, (1.0, 1.0)
    a.photometric = False
  return c


def take(it, n):
  return [next(it) for _ in range(n)]


def test_train_batches_have_contract_shapes_and_dtypes():
  (batch,) = take(pipeline.train_iterator(make_config()), 1)
  h, w = CROP
  expect = {"image1": (4, h, w, 3), "image2": (4, h, w, 3), "flow": (4, h, w, 2), "valid": (4, h, w),
            "occlusion": (4, h, w)}
  assert {k: v.shape for k, v in batch.items()} == expect
  assert all(v.dtype == np.float32 for v in batch.values())
  assert 0 <= batch["image1"].min() and batch["image1"].max() <= 1
  assert set(np.unique(batch["valid"])) <= {0.0, 1.0}


def test_batch_of_step_s_covers_its_global_example_indices():
  c = make_config(identity=True, crop=SIZE)
  batches = take(pipeline.train_iterator(c), 3)
  for s, b in enumerate(batches):
    np.testing.assert_array_equal(b["flow"][:, 0, 0, 0], np.arange(s * 4, (s + 1) * 4))


def test_resume_is_exact_and_process_batches_concatenate_to_the_single_process_batch():
  c = make_config()
  full = take(pipeline.train_iterator(c), 3)
  resumed = take(pipeline.train_iterator(c, start_step=2), 1)
  for k in full[0]:
    assert resumed[0][k].tobytes() == full[2][k].tobytes()
  assert full[0]["image1"].tobytes() != full[1]["image1"].tobytes()
  parts = [take(pipeline.train_iterator(c, start_step=1, process_index=p, process_count=2), 2) for p in range(2)]
  for step in range(2):
    for k in full[0]:
      np.testing.assert_array_equal(np.concatenate([parts[0][step][k], parts[1][step][k]]), full[step + 1][k])
  # Same config, fresh iterators: the same bytes (parts of step 1 are the rows of the full batch of step 1).
  assert parts[0][0]["flow"].tobytes() == full[1]["flow"][:2].tobytes()


def test_synthetic_stream_rows_resume_and_process_split_exactly(monkeypatch, tmp_path):
  # The synthetic source renders a whole batch per call: the stream must still be a function of the global
  # example index alone (same rows for any per-process batch size, exact resume) and of the generator's pairs.
  from data_pipelines import synthetic_chairs
  monkeypatch.setenv("JAXFLOW_CACHE", str(tmp_path))
  c = make_config(batch_size=2, train="synthetic_chairs", crop=(32, 48))
  s = c.data.synthetic
  s.image_size, s.num_chairs, s.sprite_size = (64, 80), (2, 3), 32
  s.num_procedural_backgrounds, s.num_chair_models, s.views_per_model = 2, 2, 2
  full = take(pipeline.train_iterator(c), 2)
  assert full[1]["image1"].shape == (2, 32, 48, 3) and full[1]["valid"].shape == (2, 32, 48)
  parts = [take(pipeline.train_iterator(c, start_step=1, process_index=p, process_count=2), 1)[0]
           for p in range(2)]
  gen = synthetic_chairs.make_generator(c.data.synthetic, c.data.augment, c.data.crop_size)
  alone = gen(tf.constant(c.seed, tf.int64), tf.constant(3, tf.int64))  # global example 3 = step 1, row 1
  for k in full[1]:
    assert np.concatenate([parts[0][k], parts[1][k]]).tobytes() == full[1][k].tobytes(), k
    assert alone[k].numpy().tobytes() == full[1][k][1].tobytes(), k
  assert not np.array_equal(full[0]["image1"], full[1]["image1"])


def write_chairs(root, n, size=SIZE):
  """n FlyingChairs-layout pairs (PPM + .flo); the flow of pair i is the constant (i, -i)."""
  data = os.path.join(root, "data")
  os.makedirs(data, exist_ok=True)
  rng = np.random.default_rng(0)
  h, w = size
  for i in range(1, n + 1):
    for s in ("img1", "img2"):
      with open(os.path.join(data, f"{i:05d}_{s}.ppm"), "wb") as f:
        f.write(f"P6\n{w} {h}\n255\n".encode() + rng.integers(0, 256, (h, w, 3), dtype=np.uint8).tobytes())
    flow = np.broadcast_to(np.array([i, -i], np.float32), (h, w, 2))
    with open(os.path.join(data, f"{i:05d}_flow.flo"), "wb") as f:
      f.write(np.float32(202021.25).tobytes() + np.array([w, h], np.int32).tobytes() + flow.tobytes())
  with open(os.path.join(root, "FlyingChairs_train_val.txt"), "w") as f:
    f.write("".join("2\n" if i % 4 == 0 else "1\n" for i in range(1, n + 1)))


def test_file_dataset_epochs_are_stateless_permutations(tmp_path):
  write_chairs(str(tmp_path), 8)  # pairs 4 and 8 are val: 6 training pairs
  c = make_config(batch_size=2, train="flying_chairs", identity=True, crop=SIZE)
  c.data.root = str(tmp_path)
  c.data.roots.flying_chairs = "."
  batches = take(pipeline.train_iterator(c), 6)
  ids = np.concatenate([b["flow"][:, 0, 0, 0] for b in batches]).astype(int)
  assert sorted(ids[:6]) == [1, 2, 3, 5, 6, 7] and sorted(ids[6:]) == [1, 2, 3, 5, 6, 7]
  assert list(ids[:6]) != list(ids[6:])  # a new permutation each epoch
  resumed = take(pipeline.train_iterator(c, start_step=4), 1)[0]
  np.testing.assert_array_equal(resumed["image1"], batches[4]["image1"])
  parts = [take(pipeline.train_iterator(c, start_step=2, process_index=p, process_count=2), 1)[0]
           for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([p["flow"] for p in parts]), batches[2]["flow"])


def test_synthetic_val_is_padded_sharded_and_disjoint_from_training():
  c = make_config()
  one = list(pipeline.eval_iterator(c, "synthetic_val", batch_size=2))
  assert len(one) == 3 and all(b["image1"].shape == (2,) + CROP + (3,) for b in one)
  # v = index // 2**62 = 1 for validation examples; the padded row has valid 0 and zero images.
  np.testing.assert_array_equal(np.concatenate([b["flow"][:, 0, 0, 0] for b in one]), [0, 1, 2, 3, 4, 0])
  np.testing.assert_array_equal(np.concatenate([b["flow"][:, 0, 0, 1] for b in one]), [1, 1, 1, 1, 1, 0])
  assert one[2]["valid"][1].max() == 0 and one[2]["image1"][1].max() == 0 and one[2]["valid"][0].min() == 1
  parts = [list(pipeline.eval_iterator(c, "synthetic_val", batch_size=2, process_index=p, process_count=2))
           for p in range(2)]
  assert [len(p) for p in parts] == [3, 3]
  for k in range(3):
    np.testing.assert_array_equal(np.concatenate([parts[0][k]["flow"], parts[1][k]["flow"]]), one[k]["flow"])
  # Centre crop of the generated pair, no augmentation.
  gen = fake_generator(None)
  ref = gen(0, pipeline.VAL_INDEX_OFFSET + 1)["image1"].numpy()
  oy, ox = (SIZE[0] - CROP[0]) // 2, (SIZE[1] - CROP[1]) // 2
  np.testing.assert_array_equal(one[0]["image1"][1], ref[oy:oy + CROP[0], ox:ox + CROP[1]])


def test_bad_names_and_batch_sizes_raise_clear_errors():
  with pytest.raises(ValueError, match="unknown training dataset.*synthetic_chairs"):
    pipeline.train_iterator(make_config(train="chairz"))
  with pytest.raises(ValueError, match="unknown evaluation dataset 'nope'.*sintel_clean"):
    next(pipeline.eval_iterator(make_config(), "nope", batch_size=2))
  with pytest.raises(ValueError, match="multiple of process_count"):
    pipeline.train_iterator(make_config(batch_size=3), process_index=0, process_count=2)
  c = make_config(train="sintel_clean")
  with pytest.raises(ValueError, match="config.data.root is empty"):
    pipeline.train_iterator(c)
  c.data.root = "/nonexistent/jaxflow"
  with pytest.raises(FileNotFoundError, match="/nonexistent/jaxflow/sintel/training/clean"):
    pipeline.train_iterator(c)


def test_eval_iterator_reads_real_sets(shared_data):
  c = make_config()
  c.data.root = str(shared_data)
  c.data.kitti_flow_dir = "flow_gt_occ_or_noc"
  batches = list(pipeline.eval_iterator(c, "middlebury", batch_size=1))
  assert [b["image1"].shape for b in batches] == [(1, 388, 584, 3), (1, 388, 584, 3), (1, 380, 420, 3)]
  assert batches[0]["valid"].mean() < 1  # Dimetrodon has unknown flow
  (kitti,) = list(pipeline.eval_iterator(c, "kitti2015", batch_size=1))
  assert kitti["flow"].shape == (1, 375, 1242, 2) and 0 < kitti["valid"].mean() < 1
  with pytest.raises(ValueError, match="mixes image sizes"):
    list(pipeline.eval_iterator(c, "middlebury", batch_size=3))
