"""Tests for jaxflow.viz: the Middlebury colour code against a scalar reference and the official renderings."""

import math

import numpy as np
import pytest
from PIL import Image

from jaxflow import flow_io, viz


def _reference_wheel():
  """Scalar re-statement of Middlebury's makecolorwheel (integer division 255 * i / n)."""
  wheel = []
  for i in range(15):
    wheel.append((255, 255 * i // 15, 0))
  for i in range(6):
    wheel.append((255 - 255 * i // 6, 255, 0))
  for i in range(4):
    wheel.append((0, 255, 255 * i // 4))
  for i in range(11):
    wheel.append((0, 255 - 255 * i // 11, 255))
  for i in range(13):
    wheel.append((255 * i // 13, 0, 255))
  for i in range(6):
    wheel.append((255, 0, 255 - 255 * i // 6))
  return wheel


def _reference_color(fx: float, fy: float):
  """Scalar computeColor for one normalised flow vector: returns (r, g, b) ints."""
  wheel = _reference_wheel()
  ncols = len(wheel)
  rad = math.sqrt(fx * fx + fy * fy)
  a = math.atan2(-fy, -fx) / math.pi
  fk = (a + 1.0) / 2.0 * (ncols - 1)
  k0 = int(fk)
  k1 = (k0 + 1) % ncols
  f = fk - k0
  rgb = []
  for b in range(3):
    col0 = wheel[k0][b] / 255.0
    col1 = wheel[k1][b] / 255.0
    col = (1 - f) * col0 + f * col1
    col = 1 - rad * (1 - col) if rad <= 1 else col * 0.75
    rgb.append(int(255.0 * col))
  return tuple(rgb)


def test_colorwheel_matches_definition():
  wheel = viz.make_colorwheel()
  assert wheel.shape == (55, 3)
  np.testing.assert_array_equal(wheel, np.array(_reference_wheel(), np.float64))
  # Segment starts: red, yellow, green, cyan, blue, magenta.
  for index, rgb in ((0, (255, 0, 0)), (15, (255, 255, 0)), (21, (0, 255, 0)), (25, (0, 255, 255)),
                     (36, (0, 0, 255)), (49, (255, 0, 255))):
    np.testing.assert_array_equal(wheel[index], rgb)


def test_flow_to_color_matches_scalar_reference_on_random_flow():
  rng = np.random.default_rng(0)
  flow = rng.normal(scale=3.0, size=(24, 20, 2)).astype(np.float32)
  max_radius = 5.0
  image = viz.flow_to_color(flow, max_radius=max_radius)
  assert image.dtype == np.uint8 and image.shape == (24, 20, 3)
  ref = np.array([[_reference_color(float(u) / max_radius, float(v) / max_radius) for u, v in row] for row in
                  flow.astype(np.float64)], np.uint8)
  diff = np.abs(image.astype(int) - ref.astype(int))
  assert diff.max() <= 1 and (diff == 0).mean() > 0.99
  # Some vectors fall outside the unit circle (darkened branch) and some inside.
  radii = np.hypot(flow[..., 0], flow[..., 1]) / max_radius
  assert (radii > 1).any() and (radii < 1).any()


def test_flow_to_color_exact_cases():
  flow = np.array([[[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1], [2, 0], [0.5, 0]]], np.float32)
  image = viz.flow_to_color(flow, max_radius=1.0)
  np.testing.assert_array_equal(image[0, 0], [255, 255, 255])  # zero flow: white
  np.testing.assert_array_equal(image[0, 1], [255, 0, 0])  # right: red (wheel entry 0)
  np.testing.assert_array_equal(image[0, 2], [0, 255 - 255 * 2 // 11, 255])  # left: fk = 27, cyan-blue ramp
  # down: atan2(-1, 0) / pi = -0.5 -> fk = 13.5, between entries 13 and 14 of the red-yellow ramp.
  g = 0.5 * (255 * 13 // 15) + 0.5 * (255 * 14 // 15)
  np.testing.assert_array_equal(image[0, 3], [255, int(g), 0])
  # up: fk = 40.5, halfway between entries 4 and 5 of the blue-magenta ramp.
  np.testing.assert_array_equal(image[0, 4], [int(0.5 * (255 * 4 // 13) + 0.5 * (255 * 5 // 13)), 0, 255])
  np.testing.assert_array_equal(image[0, 5], [int(255 * 0.75), 0, 0])  # outside the unit circle: 75 %
  np.testing.assert_array_equal(image[0, 6], [255, 127, 127])  # half radius: halfway to white


def test_flow_to_color_normalises_by_max_known_radius_and_blacks_unknown():
  rng = np.random.default_rng(1)
  flow = rng.normal(scale=4.0, size=(16, 16, 2)).astype(np.float32)
  radius = float(np.hypot(flow[..., 0], flow[..., 1]).max())
  with_unknown = flow.copy()
  with_unknown[0, 0] = [1e10, 0]
  with_unknown[1, 1] = [np.nan, 0]
  with_unknown[2, 2] = [0, -np.inf]
  image = viz.flow_to_color(with_unknown)
  np.testing.assert_array_equal(image[0, 0], 0)
  np.testing.assert_array_equal(image[1, 1], 0)
  np.testing.assert_array_equal(image[2, 2], 0)
  keep = np.ones((16, 16), bool)
  keep[0, 0] = keep[1, 1] = keep[2, 2] = False
  radius_known = float(np.hypot(flow[keep][:, 0], flow[keep][:, 1]).max())
  np.testing.assert_array_equal(image[keep], viz.flow_to_color(flow, max_radius=radius_known)[keep])
  assert viz.max_flow_radius(with_unknown) == pytest.approx(radius_known, rel=1e-6)
  # Scaling the flow leaves the auto-normalised image unchanged (up to float rounding).
  diff = np.abs(viz.flow_to_color(flow * 7.0).astype(int) - viz.flow_to_color(flow).astype(int))
  assert diff.max() <= 1
  assert viz.max_flow_radius(flow) == pytest.approx(radius, rel=1e-6)
  with pytest.raises(ValueError, match=r"\(H, W, 2\)"):
    viz.flow_to_color(np.zeros((4, 4)))
  with pytest.raises(ValueError, match="max_radius"):
    viz.flow_to_color(flow, max_radius=0.0)


def _colortest_flow(size: int = 151, truerange: float = 10.0) -> np.ndarray:
  """The flow field of Middlebury's ``colortest <range> `` key image, as reconstructed here.

  With c = size // 2 (75) and range = 1.04 * truerange, pixel (x, y) holds the flow
  ((x - c) / c * range, (y - c) / c * range), so the unit circle (|flow| = truerange) sits at 75 / 1.04
  = 72.1 px and the corners show the darkened region. The row and column through the centre are unknown
  (black axes), and so are tick marks at 1 and 2 px on both sides of each axis at every integer flow
  value k = 1 .. truerange: at the last pixel, going outwards, whose |flow component| is still below k.
  The image is then rendered with flow_to_color(flow, max_radius=truerange).
  """
  c = size // 2
  rng_ = 1.04 * truerange
  coords = (np.arange(size) - c) / c * rng_
  u, v = np.meshgrid(coords, coords)
  flow = np.stack([u, v], -1)
  unknown = np.zeros((size, size), bool)
  unknown[c, :] = unknown[:, c] = True
  mag = np.abs(coords)
  for k in range(1, int(truerange) + 1):
    for side in (-1, 1):
      idx = np.arange(size)[(np.sign(np.arange(size) - c) == side) & (mag < k)]
      tick = idx.max() if side > 0 else idx.min()  # outermost pixel still below k
      for off in (-2, -1, 1, 2):
        unknown[tick, c + off] = True
        unknown[c + off, tick] = True
  flow[unknown] = 1e10
  return flow


def test_matches_official_colortest_key(shared_data):
  ref = np.asarray(Image.open(shared_data / "colorcode/middlebury_colortest_range10_size151.png"))
  assert ref.shape == (151, 151, 3)
  image = viz.flow_to_color(_colortest_flow(151, 10.0), max_radius=10.0)
  diff = np.abs(image.astype(int) - ref.astype(int)).max(-1)
  assert (diff <= 1).mean() >= 0.999, (diff <= 1).mean()
  assert diff.max() <= 1
  # The library key image agrees everywhere except the tick marks.
  wheel = viz.color_wheel(151, axes=True)
  wheel_diff = np.abs(wheel.astype(int) - ref.astype(int)).max(-1)
  ticks = np.all(ref == 0, -1) & (wheel.max(-1) > 0)
  assert ticks.sum() == 160  # 10 ticks x 2 sides x 2 axes x 4 pixels
  assert wheel_diff[~ticks].max() <= 1


@pytest.mark.parametrize("frame", [1, 2])
def test_matches_sintel_renderings(shared_data, frame):
  flow = flow_io.read_flo(shared_data / f"sintel/training/flow/alley_1/frame_{frame:04d}.flo")
  ref = np.asarray(Image.open(shared_data / f"colorcode/sintel_alley_1_frame_{frame:04d}_flowiz.png"))
  image = viz.flow_to_color(flow)
  diff = np.abs(image.astype(int) - ref.astype(int)).max(-1)
  assert (diff <= 1).mean() >= 0.999
  assert (diff == 0).mean() >= 0.99


def test_accepts_jax_arrays():
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  flow = np.random.default_rng(2).normal(size=(8, 8, 2)).astype(np.float32)
  np.testing.assert_array_equal(viz.flow_to_color(jnp.asarray(flow)), viz.flow_to_color(flow))


def test_flow_to_arrows_draws_arrows_along_the_flow():
  flow = np.zeros((64, 64, 2), np.float32)
  flow[..., 0] = 4.0  # everything moves 4 px right
  red = (255, 0, 0)
  image = viz.flow_to_arrows(flow, step=16, color=red)
  assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
  is_red = np.all(image == red, -1)
  # Grid centres at 8, 24, 40, 56; default scale makes the longest arrow `step` = 16 px: shaft 8..24.
  for y in (8, 24, 40, 56):
    for x in (8, 24, 40, 56):
      assert is_red[y, x:min(x + 16, 63)].all(), (y, x)
    assert not is_red[y, 8 - 2]  # nothing behind the first arrow's start
  # Heads: two 30-degree barbs of length 0.3 * 16 = 4.8 px ending above and below the shaft.
  assert is_red[8 - 2, 24 - 3] and is_red[8 + 2, 24 - 3]
  # Rows far from every arrow stay white.
  assert np.all(image[16] == 255) and np.all(image[48] == 255)


def test_flow_to_arrows_background_unknown_and_scale():
  rng = np.random.default_rng(3)
  background = rng.random((32, 48, 3)).astype(np.float32)
  flow = np.full((32, 48, 2), 1e10, np.float32)  # all unknown: no arrows at all
  image = viz.flow_to_arrows(flow, image=background, step=8)
  np.testing.assert_array_equal(image, np.round(background * 255).astype(np.uint8))
  flow = np.zeros((32, 48, 2), np.float32)
  flow[..., 1] = 1.0  # down by 1 px, drawn with scale 5 -> 5 px arrows
  image = viz.flow_to_arrows(flow, step=16, scale=5.0, color=(0, 0, 0))
  black = np.all(image == 0, -1)
  assert black[8:14, 8].all() and not black[15, 8] and not black[7, 8]
  with pytest.raises(ValueError, match="image has shape"):
    viz.flow_to_arrows(flow, image=np.zeros((10, 10, 3)))


def test_flow_to_arrows_default_colours_follow_colour_code():
  flow = np.zeros((32, 32, 2), np.float32)
  flow[..., 0] = 3.0  # right: red in the colour code, darkened to 75 % for the arrows
  image = viz.flow_to_arrows(flow, step=16)
  np.testing.assert_array_equal(image[8, 10], [int(255 * 0.75), 0, 0])


def test_error_map_bins_and_mask():
  gt = np.zeros((1, 6, 2), np.float32)
  gt[0, :, 0] = [0, 0, 100, 100, 10, 0]
  pred = gt.copy()
  pred[0, :, 0] += [0.1, 3.5, 4.0, 6.0, 30.0, 1.0]
  valid = np.array([[1, 1, 1, 1, 1, 0]], np.float32)
  image = viz.error_map(pred, gt, valid)
  # n = min(epe / 3, epe / (0.05 |gt|)); bins (blue ... red) from the KITTI devkit.
  np.testing.assert_array_equal(image[0, 0], [49, 54, 149])  # n = 0.1 / 3 = 0.033 (|gt| = 0): [0, 1/16)
  np.testing.assert_array_equal(image[0, 1], [254, 224, 144])  # n = 3.5 / 3 = 1.17: first outlier bin
  np.testing.assert_array_equal(image[0, 2], [224, 243, 248])  # min(1.33, 4 / 5 = 0.8) = 0.8
  np.testing.assert_array_equal(image[0, 3], [254, 224, 144])  # min(2, 1.2) = 1.2
  np.testing.assert_array_equal(image[0, 4], [215, 48, 39])  # min(10, 30 / 0.5 = 60) = 10 -> [8, 16)
  np.testing.assert_array_equal(image[0, 5], [0, 0, 0])  # invalid
