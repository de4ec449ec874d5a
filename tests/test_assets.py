"""Tests of the chair / background assets: procedural defaults (statistics, alpha, cache) and user folders."""

import warnings

import numpy as np
import pytest
from PIL import Image

from data_pipelines import assets


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXFLOW_CACHE", str(tmp_path / "cache"))


def _block_std(gray, block):
  h, w = (gray.shape[0] // block) * block, (gray.shape[1] // block) * block
  return gray[:h, :w].reshape(h // block, block, w // block, block).mean((1, 3)).std()


def test_procedural_backgrounds_are_not_flat():
  bgs = assets.procedural_backgrounds(2, (96, 128), seed=0)
  assert bgs.shape == (2, 96, 128, 3) and bgs.dtype == np.uint8
  for bg in bgs.astype(np.float64) / 255.0:
    gray = bg.mean(-1)
    # Edges and fine texture.
    assert np.abs(np.diff(gray, axis=1)).mean() > 0.01
    assert np.abs(np.diff(gray, axis=0)).mean() > 0.01
    # Variance at several scales (multi-scale structure, not just pixel noise).
    for block in (2, 8, 32):
      assert _block_std(gray, block) > 0.02, block
    # Colour: the channels differ.
    assert np.abs(bg - bg.mean(-1, keepdims=True)).mean() > 0.02
  assert not np.array_equal(bgs[0], bgs[1])


def test_procedural_chairs_have_alpha():
  chairs = assets.procedural_chairs(2, 3, 40, seed=0)
  assert chairs.shape == (6, 40, 40, 4) and chairs.dtype == np.uint8
  for sprite in chairs:
    alpha = sprite[..., 3]
    assert (alpha == 255).mean() > 0.03, "opaque chair pixels"
    assert (alpha == 0).mean() > 0.2, "transparent surround"
    assert ((alpha > 0) & (alpha < 255)).any(), "anti-aliased edges"
    opaque = sprite[alpha == 255][:, :3].astype(float)
    assert opaque.std() > 3, "shaded, not flat"
  # Views of the same model differ.
  assert not np.array_equal(chairs[0], chairs[1])


def test_cache_is_reused_and_deterministic(monkeypatch, tmp_path):
  first = assets.procedural_chairs(1, 2, 32, seed=3)
  files = list((tmp_path / "cache").iterdir())
  assert len(files) == 1

  def fail(*args):
    raise AssertionError("the cached sprites were regenerated")

  monkeypatch.setattr(assets, "_build_chairs", fail)
  np.testing.assert_array_equal(assets.procedural_chairs(1, 2, 32, seed=3), first)
  monkeypatch.undo()
  monkeypatch.setenv("JAXFLOW_CACHE", str(tmp_path / "other_cache"))
  np.testing.assert_array_equal(assets.procedural_chairs(1, 2, 32, seed=3), first)  # Fresh build, same bytes.
  assert not np.array_equal(assets.procedural_chairs(1, 2, 32, seed=4), first)


def test_user_chairs_rgba_and_white_keyed(tmp_path):
  folder = tmp_path / "chairs"
  folder.mkdir()
  rgba = np.zeros((64, 64, 4), np.uint8)
  rgba[16:48, 20:44] = (200, 30, 30, 255)
  Image.fromarray(rgba, "RGBA").save(folder / "a_rgba.png")
  rgb = np.full((80, 60, 3), 255, np.uint8)
  rgb[10:70, 15:45] = (20, 120, 40)
  Image.fromarray(rgb, "RGB").save(folder / "b_white.png")
  sprites = assets.load_chairs(folder, 32)
  assert sprites.shape == (2, 32, 32, 4)
  for sprite, colour in zip(sprites, ((200, 30, 30), (20, 120, 40))):
    alpha = sprite[..., 3]
    assert (alpha == 0).any() and (alpha == 255).any()
    inside = sprite[alpha == 255][:, :3].astype(int)
    np.testing.assert_allclose(inside.mean(0), colour, atol=2)
    # Transparent pixels next to the silhouette carry the bled edge colour, not black or white.
    near = np.zeros_like(alpha, bool)
    for dy in (-2, -1, 0, 1, 2):
      for dx in (-2, -1, 0, 1, 2):
        near |= np.roll(alpha > 0, (dy, dx), (0, 1))
    edge = sprite[near & (alpha == 0)][:, :3].astype(int)
    assert len(edge) > 0
    assert np.abs(edge - np.array(colour)).max() <= 3
  # The white surround of the RGB render is transparent: the sprite's corners are keyed out.
  assert sprites[1][0, 0, 3] == 0 and sprites[1][-1, -1, 3] == 0


def test_user_folders_skip_bad_files_with_one_warning(tmp_path):
  folder = tmp_path / "chairs"
  folder.mkdir()
  (folder / "broken.png").write_bytes(b"not a png")
  Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA").save(folder / "tiny.png")
  good = np.zeros((40, 40, 4), np.uint8)
  good[5:35, 10:30] = 255
  Image.fromarray(good, "RGBA").save(folder / "good.png")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    sprites = assets.load_chairs(folder, 24)
  assert sprites.shape == (1, 24, 24, 4)
  assert len(caught) == 1
  message = str(caught[0].message)
  assert "broken.png" in message and "tiny.png" in message and message.startswith("2 ")


def test_empty_or_missing_folder_is_an_error(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="empty"):
    assets.load_chairs(empty, 32)
  with pytest.raises(ValueError, match="empty"):
    assets.load_backgrounds(empty, (64, 64))
  (empty / "junk.jpg").write_bytes(b"\xff\xd8garbage")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with pytest.raises(ValueError, match="no usable image"):
      assets.load_backgrounds(empty, (64, 64))
  with pytest.raises(FileNotFoundError, match="missing"):
    assets.load_backgrounds(tmp_path / "missing", (64, 64))


def test_user_backgrounds_cover_resize(tmp_path):
  folder = tmp_path / "bgs"
  folder.mkdir()
  img = np.zeros((100, 300, 3), np.uint8)
  img[:, :150] = (255, 0, 0)
  img[:, 150:] = (0, 0, 255)
  Image.fromarray(img).save(folder / "photo.png")
  out = assets.get_backgrounds(str(folder), (64, 96))
  assert out.shape == (1, 64, 96, 3)
  # Cover-resize keeps the aspect ratio and centre crops: the red/blue boundary stays in the middle.
  assert out[0, 32, 10, 0] > 200 and out[0, 32, 85, 2] > 200


def test_parallel_build_matches_in_process_build(monkeypatch):
  # Helper processes build interleaved items; the result must equal building every item here, in order.
  seq = np.concatenate([assets._build_chair_model(m, 2, 32, 5) for m in range(3)])
  np.testing.assert_array_equal(assets._build_chairs(3, 2, 32, 5), seq)
  bgs = assets._build_backgrounds(3, (40, 48), 1)
  for i in range(3):
    np.testing.assert_array_equal(bgs[i], assets.procedural_background((40, 48), 100003 + i))
  # A helper that cannot start: its items are built in this process (with a warning), same result.
  monkeypatch.setattr(assets.sys, "executable", "/bin/false")
  np.testing.assert_array_equal(assets._build_chairs(3, 2, 32, 5), seq)
