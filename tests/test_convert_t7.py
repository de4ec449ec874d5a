"""The Torch7 reader against files written by tests/t7_writer.py (no torch needed)."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import t7_writer  # noqa: E402

from jaxflow.converters import t7  # noqa: E402


def test_round_trip_of_values_tables_and_tensors(tmp_path):
  rng = np.random.default_rng(0)
  a = rng.standard_normal((3, 4, 5)).astype(np.float32)
  shared = {"x": 1}
  obj = {1: "one", "pi": 3.25, "flag": True, "none_key": None, "tensor": a,
         "offset": t7_writer.Tensor(a[0], offset=5), "cuda": t7_writer.Tensor(a[1], "torch.CudaTensor"),
         "a": shared, "b": shared, "nested": {"deep": {1: 2.5}}}
  path = str(tmp_path / "obj.t7")
  t7_writer.save(path, obj)
  back = t7.load(path)
  assert back[1] == "one" and back["pi"] == 3.25 and back["flag"] is True
  assert back["none_key"] is None
  np.testing.assert_array_equal(back["tensor"], a)
  assert back["tensor"].dtype == np.float32
  np.testing.assert_array_equal(back["offset"], a[0])  # storage offset honoured
  np.testing.assert_array_equal(back["cuda"], a[1])
  assert back["a"] is back["b"]  # memoised reference, not a copy
  assert back["nested"]["deep"][1] == 2.5


def test_modules_and_find_modules(tmp_path):
  rng = np.random.default_rng(1)
  w1 = rng.standard_normal((4, 8, 3, 3)).astype(np.float32)
  w2 = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
  seq = t7_writer.sequential([
      t7_writer.spatial_convolution(w1, np.arange(4, dtype=np.float32)), t7_writer.relu(),
      t7_writer.spatial_convolution(w2, np.ones(2, np.float32), flat=True, torch_class="cudnn.SpatialConvolution")])
  wrapped = t7_writer.Module("nn.DataParallelTable", modules={1: seq})
  path = str(tmp_path / "m.t7")
  t7_writer.save(path, wrapped)
  obj = t7.load(path)
  assert obj.torch_class == "nn.DataParallelTable"
  convs = t7.find_modules(obj, lambda m: "SpatialConvolution" in m.torch_class)
  assert [c.torch_class for c in convs] == ["nn.SpatialConvolution", "cudnn.SpatialConvolution"]
  np.testing.assert_array_equal(convs[0]["weight"], w1)
  np.testing.assert_array_equal(convs[1]["weight"], w2.reshape(2, -1))
  assert convs[0]["nInputPlane"] == 8 and convs[0]["padW"] == 1


def test_truncated_and_foreign_files_name_the_file(tmp_path):
  path = str(tmp_path / "t.t7")
  t7_writer.save(path, {"w": np.ones((10, 10), np.float32)})
  data = open(path, "rb").read()
  open(path, "wb").write(data[:-17])
  with pytest.raises(t7.T7Error, match="t.t7.*end of file"):
    t7.load(path)
  bad = tmp_path / "b.t7"
  bad.write_bytes(b"\x63\x00\x00\x00garbage")
  with pytest.raises(t7.T7Error, match="b.t7.*unknown object type 99"):
    t7.load(str(bad))
  with pytest.raises(FileNotFoundError, match="nothing.t7"):
    t7.load(str(tmp_path / "nothing.t7"))
