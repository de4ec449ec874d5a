"""jaxflow.evaluate: dataset metrics against numpy references on the real sample files, zero-flow and oracle
hooks, the command line, incremental JSON / JSON-lines output and resume, errors naming the file, submission
export layouts, classical baselines and the held-out synthetic set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxflow import evaluate, flow_io, predictor

REAL_SETS = ("flying_chairs_all", "sintel_clean", "sintel_final", "kitti2015", "middlebury")
TINY = {"name": "spynet", "levels": 3, "channels": [8, 8], "kernel_size": 3, "dtype": "float32"}


# ----------------------------------------------------------------------------------------------------------
# Independent numpy references.


def _read_flo(path):
  with open(path, "rb") as f:
    assert f.read(4) == b"PIEH"
    w, h = np.fromfile(f, "<i4", 2)
    return np.fromfile(f, "<f4", h * w * 2).reshape(h, w, 2)


def _png_mask(path):
  return np.asarray(Image.open(path).convert("L")) > 127


def _ground_truth(pair: evaluate.PairFiles):
  """(flow, valid bool, occlusion bool or None) read without jaxflow.evaluate."""
  if pair.flow_format == "kitti":
    flow, valid = flow_io.read_kitti_flow(pair.flow)
    valid = valid > 0
  else:
    flow = _read_flo(pair.flow)
    valid = np.all(np.abs(flow) <= 1e9, axis=-1)
  if "invalid" in pair.masks:
    valid &= ~_png_mask(pair.masks["invalid"])
  occ = _png_mask(pair.masks["occlusion"]) if "occlusion" in pair.masks else None
  return flow.astype(np.float64), valid, occ


def _numpy_metrics(preds, gts, valids, occs):
  """Means over all valid pixels of all pairs (float64)."""
  epe, mag, occ_e, noc_e = [], [], [], []
  for p, g, v, o in zip(preds, gts, valids, occs):
    e = np.sqrt(np.sum((p.astype(np.float64) - g) ** 2, -1))[v]
    epe.append(e)
    mag.append(np.sqrt(np.sum(g ** 2, -1))[v])
    if o is not None:
      occ_e.append(e[o[v]])
      noc_e.append(e[~o[v]])
  epe, mag = np.concatenate(epe), np.concatenate(mag)
  mean = lambda x: float(np.mean(x)) if x.size else float("nan")
  out = {"epe": mean(epe), "outlier_1px": mean(epe > 1), "outlier_3px": mean(epe > 3), "outlier_5px": mean(epe > 5),
         "fl_all": mean((epe > 3) & (epe > 0.05 * mag)), "s0_10": mean(epe[mag < 10]),
         "s10_40": mean(epe[(mag >= 10) & (mag < 40)]), "s40plus": mean(epe[mag >= 40]), "num_pixels": epe.size}
  if occ_e:
    out["epe_occ"], out["epe_noc"] = mean(np.concatenate(occ_e)), mean(np.concatenate(noc_e))
  return out


def _assert_metrics(got, want, rtol=1e-5):
  for k, v in want.items():
    if isinstance(v, float) and np.isnan(v):
      assert got[k] is None or np.isnan(got[k]), k
    else:
      np.testing.assert_allclose(got[k], v, rtol=rtol, atol=1e-6, err_msg=k)


class Perturbed(evaluate.Method):
  """A deterministic imperfect prediction (0.8 * gt + a smooth pattern of up to ~6 px) with a varied error."""
  name = "perturbed"

  @staticmethod
  def flow(gt, valid):
    h, w = gt.shape[:2]
    y, x = np.mgrid[:h, :w].astype(np.float32)
    wave = np.stack([6 * np.sin(x / 13.0) * np.cos(y / 7.0), 4 * np.cos(x / 5.0 + y / 11.0)], -1)
    return (0.8 * np.where(valid[..., None], gt, 0) + wave).astype(np.float32)

  def predict(self, examples):
    return np.stack([self.flow(e["flow"], e["valid"] > 0.5) for e in examples])


# ----------------------------------------------------------------------------------------------------------
# Real samples.


@pytest.mark.parametrize("name", REAL_SETS)
def test_metrics_equal_numpy_on_real_samples(shared_data, name):
  ds = evaluate.make_dataset(name)  # default folder under $JAXFLOW_DATA
  assert len(ds) > 0
  results = evaluate.run([evaluate.ZeroMethod(), evaluate.OracleMethod(), Perturbed()], [ds])
  gts = [_ground_truth(p) for p in ds.pairs]
  flows, valids, occs = zip(*gts)
  zero = _numpy_metrics([np.zeros_like(f) for f in flows], flows, valids, occs)
  _assert_metrics(results["zero"][name], zero)
  assert results["zero"][name]["num_pairs"] == len(ds.pairs)
  assert zero["epe"] > 0.5  # the samples do move: the zero-flow EPE is their mean speed
  oracle = results["oracle"][name]
  assert oracle["epe"] == 0 and oracle["outlier_1px"] == 0 and oracle["num_pixels"] == zero["num_pixels"]
  perturbed = _numpy_metrics([Perturbed.flow(f, v) for f, v, _ in gts], flows, valids, occs)
  _assert_metrics(results["perturbed"][name], perturbed)
  assert 0 < perturbed["outlier_3px"] < 1
  if name.startswith("sintel"):  # one of the two sample pairs has occlusion / invalid masks
    assert results["zero"][name]["num_pairs_with_occlusion"] == 1 and "epe_occ" in zero
  if name == "middlebury":  # Dimetrodon and RubberWhale have unknown-flow pixels, excluded
    assert zero["num_pixels"] < sum(f.shape[0] * f.shape[1] for f in flows)


def test_cli_with_a_checkpoint_matches_numpy(shared_data, tmp_path, capsys):
  import jax
  model = predictor.build_model(TINY)
  x = np.zeros((1, 64, 64, 3), np.float32)
  variables = jax.jit(lambda k: model.init({"params": k}, x, x))(jax.random.key(3))
  predictor.save_for_inference(tmp_path / "run", TINY, variables, step=5)
  out = tmp_path / "res" / "eval.json"
  root = shared_data / "flyingchairs"
  evaluate.main(["--checkpoint", str(tmp_path / "run"), "--baselines", "zero", "--datasets",
                 f"flying_chairs_all:{root}", "--json", str(out), "--quiet"])
  table = capsys.readouterr().out
  assert "flying_chairs_all" in table and "spynet" in table and "zero" in table
  saved = json.loads(out.read_text())
  assert saved["step"] == 5 and saved["model"]["name"] == "spynet"
  ds = evaluate.make_dataset(f"flying_chairs_all:{root}")
  p = jaxflow_load(tmp_path / "run")
  preds = [p(flow_io.read_image(pair.image1), flow_io.read_image(pair.image2)) for pair in ds.pairs]
  flows, valids, occs = zip(*[_ground_truth(pair) for pair in ds.pairs])
  _assert_metrics(saved["results"]["spynet"]["flying_chairs_all"], _numpy_metrics(preds, flows, valids, occs),
                  rtol=1e-4)
  rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
  assert [(r["method"], r["id"]) for r in rows] == [("spynet", "00001"), ("spynet", "00002"), ("zero", "00001"),
                                                    ("zero", "00002")]
  for r, pred, f, v in zip(rows, preds, flows, valids):  # per-pair rows are each pair's own metrics
    np.testing.assert_allclose(r["epe"], _numpy_metrics([pred], [f], [v], [None])["epe"], rtol=1e-4)


def jaxflow_load(path):
  import jaxflow
  return jaxflow.load(path)


def test_chairs_val_split_of_the_samples_is_empty(shared_data):
  # Both sample pairs are marked 1 (train) in the official split file.
  with pytest.raises(FileNotFoundError, match="flying_chairs_val: no val pair"):
    evaluate.make_dataset("chairs")


# ----------------------------------------------------------------------------------------------------------
# Small files written by the tests.


def _write_sintel(root, sizes=((40, 48),) * 3, scene="s1"):
  rng = np.random.default_rng(0)
  for n, (h, w) in enumerate(sizes, 1):
    d = root / "training" / "clean" / scene
    d.mkdir(parents=True, exist_ok=True)
    flow_io.write_image(d / f"frame_{n:04d}.png", rng.random((h, w, 3)).astype(np.float32))
  for n in range(1, len(sizes)):
    d = root / "training" / "flow" / scene
    d.mkdir(parents=True, exist_ok=True)
    h, w = sizes[n - 1]
    flow_io.write_flo(d / f"frame_{n:04d}.flo", rng.normal(size=(h, w, 2)).astype(np.float32) * 3)
  return root


class Counting(evaluate.Method):
  """Zero flow that records the batches it was given; fails on pair `fail_on` (an interruption)."""

  def __init__(self, name="counting", fail_on=None):
    self.name, self.fail_on, self.batches = name, fail_on, []

  def predict(self, examples):
    self.batches.append([e["id"] for e in examples])
    if self.fail_on in self.batches[-1]:
      raise KeyboardInterrupt
    return np.zeros((len(examples),) + examples[0]["flow"].shape, np.float32)


def test_interrupted_run_keeps_results_and_resumes(tmp_path):
  a = evaluate.make_dataset(f"sintel_clean:{_write_sintel(tmp_path / 'a')}")
  b = evaluate.make_dataset(f"sintel_clean:{_write_sintel(tmp_path / 'b', ((40, 48),) * 4, scene='s2')}")
  b.name = "sintel_b"
  out = str(tmp_path / "r.json")
  m = Counting(fail_on="s2/frame_0002")
  with pytest.raises(KeyboardInterrupt):
    evaluate.run([m], [a, b], json_path=out, header={"checkpoint": "x"})
  saved = json.load(open(out))
  assert list(saved["results"]["counting"]) == ["sintel_clean"] and saved["checkpoint"] == "x"
  rows = [json.loads(line) for line in open(str(tmp_path / "r.jsonl"))]
  # Pair 1 of the second set was finished before the interruption; pair 2 was not.
  assert [(r["dataset"], r["id"]) for r in rows] == [("sintel_clean", "s1/frame_0001"),
                                                     ("sintel_clean", "s1/frame_0002"), ("sintel_b", "s2/frame_0001")]
  m2 = Counting()
  results = evaluate.run([m2], [a, b], json_path=out, resume=True, batch_size=2)
  assert m2.batches == [["s2/frame_0001", "s2/frame_0002"], ["s2/frame_0003"]]  # only the unfinished set
  assert set(results["counting"]) == {"sintel_clean", "sintel_b"}
  assert set(json.load(open(out))["results"]["counting"]) == {"sintel_clean", "sintel_b"}


def test_batches_group_same_sized_pairs_only(tmp_path):
  _write_sintel(tmp_path, ((40, 48),) * 3, scene="s1")
  _write_sintel(tmp_path, ((32, 48),) * 4, scene="s2")
  ds = evaluate.make_dataset(f"sintel_clean:{tmp_path}")
  m = Counting()
  evaluate.evaluate_dataset(m, ds, batch_size=2)
  assert m.batches == [["s1/frame_0001", "s1/frame_0002"], ["s2/frame_0001", "s2/frame_0002"], ["s2/frame_0003"]]


def test_errors_name_the_file(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match=r"sintel_clean: dataset folder .*missing.* does not exist"):
    evaluate.make_dataset(f"sintel_clean:{tmp_path / 'missing'}")
  (tmp_path / "missing").mkdir()
  with pytest.raises(FileNotFoundError, match=r"sintel_clean: folder .*missing/training/clean"):
    evaluate.make_dataset(f"sintel_clean:{tmp_path / 'missing'}")
  with pytest.raises(ValueError, match="unknown dataset 'sintel_albedo'"):
    evaluate.make_dataset("sintel_albedo")
  monkeypatch.delenv("JAXFLOW_DATA", raising=False)
  with pytest.raises(ValueError, match="middlebury:PATH or set JAXFLOW_DATA"):
    evaluate.make_dataset("middlebury")
  # Frames of different sizes: the second frame of pair 2 is 32 rows high, the first 40.
  root = _write_sintel(tmp_path / "sizes", ((40, 48), (40, 48), (32, 48)))
  ds = evaluate.make_dataset(f"sintel_clean:{root}")
  with pytest.raises(ValueError, match=r"frame_0003.png: frame is 48x32.*frame_0002.png is 48x40"):
    evaluate.run([evaluate.ZeroMethod()], [ds])
  # An unreadable frame.
  root = _write_sintel(tmp_path / "broken")
  bad = root / "training" / "clean" / "s1" / "frame_0002.png"
  bad.write_bytes(bad.read_bytes()[:40])
  with pytest.raises(flow_io.FlowFileError, match="frame_0002.png"):
    evaluate.run([evaluate.ZeroMethod()], [evaluate.make_dataset(f"sintel_clean:{root}")])
  # A missing second frame of a listed pair.
  root = _write_sintel(tmp_path / "gap")
  os.remove(root / "training" / "clean" / "s1" / "frame_0003.png")
  with pytest.raises(FileNotFoundError, match="frame_0003.png"):
    evaluate.make_dataset(f"sintel_clean:{root}")
  # A flow of the wrong size.
  root = _write_sintel(tmp_path / "flowsize")
  flow_io.write_flo(root / "training" / "flow" / "s1" / "frame_0001.flo", np.zeros((8, 8, 2), np.float32))
  with pytest.raises(ValueError, match=r"frame_0001.flo: flow is 8x8"):
    evaluate.run([evaluate.ZeroMethod()], [evaluate.make_dataset(f"sintel_clean:{root}")])


def test_kitti_flow_folder_discovery(tmp_path):
  train = tmp_path / "training"
  (train / "image_2").mkdir(parents=True)
  for f in ("000000_10.png", "000000_11.png"):
    flow_io.write_image(train / "image_2" / f, np.zeros((16, 20, 3), np.float32))
  with pytest.raises(FileNotFoundError, match="flow_occ"):
    evaluate.make_dataset(f"kitti2015:{tmp_path}")
  (train / "flow_sample").mkdir()
  flow = np.full((16, 20, 2), 1.5, np.float32)
  valid = np.zeros((16, 20), np.float32)
  valid[:8] = 1
  flow_io.write_kitti_flow(train / "flow_sample" / "000000_10.png", flow, valid)
  ds = evaluate.make_dataset(f"kitti2015:{tmp_path}")
  r = evaluate.evaluate_dataset(evaluate.ZeroMethod(), ds)
  assert r["num_pixels"] == 8 * 20 and r["epe"] == pytest.approx(1.5 * np.sqrt(2))
  (train / "flow_other").mkdir()
  with pytest.raises(FileNotFoundError, match="several other flow folders"):
    evaluate.make_dataset(f"kitti2015:{tmp_path}")


def test_export_sintel_and_kitti_layouts(tmp_path):
  rng = np.random.default_rng(1)
  for scene, n in (("ambush_1", 3), ("cave_3", 2)):
    for p in ("clean", "final"):
      d = tmp_path / "sintel" / "test" / p / scene
      d.mkdir(parents=True)
      for i in range(1, n + 1):
        flow_io.write_image(d / f"frame_{i:04d}.png", rng.random((24, 32, 3)).astype(np.float32))
  k = tmp_path / "kitti" / "testing" / "image_2"
  k.mkdir(parents=True)
  for i in range(2):
    for t in (10, 11):
      flow_io.write_image(k / f"{i:06d}_{t}.png", rng.random((20, 30, 3)).astype(np.float32))

  def predict(a, b):  # a flow that depends on the frames, in 1/64 px steps (exact in KITTI PNGs)
    return np.round(np.stack([a[..., 0] - b[..., 1], a[..., 2] * 3], -1) * 64) / 64

  written = evaluate.export_sintel(predict, str(tmp_path / "sintel"), str(tmp_path / "sub"), progress=False)
  rel = sorted(os.path.relpath(p, tmp_path / "sub") for p in written)
  assert rel == sorted(f"{p}/{s}" for p in ("clean", "final") for s in
                       ("ambush_1/frame_0001.flo", "ambush_1/frame_0002.flo", "cave_3/frame_0001.flo"))
  src = tmp_path / "sintel" / "test" / "final" / "ambush_1"
  want = predict(flow_io.read_image(src / "frame_0002.png"), flow_io.read_image(src / "frame_0003.png"))
  np.testing.assert_array_equal(flow_io.read_flo(tmp_path / "sub" / "final" / "ambush_1" / "frame_0002.flo"), want)
  written = evaluate.export_kitti(predict, str(tmp_path / "kitti"), str(tmp_path / "ksub"), progress=False)
  assert sorted(os.listdir(tmp_path / "ksub")) == ["000000_10.png", "000001_10.png"]
  flow, valid = flow_io.read_kitti_flow(tmp_path / "ksub" / "000001_10.png")
  want = predict(flow_io.read_image(k / "000001_10.png"), flow_io.read_image(k / "000001_11.png"))
  np.testing.assert_array_equal(flow, want)
  assert valid.min() == 1
  shutil.rmtree(tmp_path / "sintel" / "test" / "final")
  with pytest.raises(FileNotFoundError, match="test/final"):
    evaluate.export_sintel(predict, str(tmp_path / "sintel"), str(tmp_path / "sub2"), progress=False)


def test_classical_baselines_need_opencv():
  if evaluate.cv2_available():
    pytest.skip("OpenCV is installed: the missing-package error cannot be shown")
  for name in ("farneback", "dis"):
    with pytest.raises(ImportError, match="opencv-python"):
      evaluate.make_baseline(name)
  with pytest.raises(ValueError, match="unknown baseline"):
    evaluate.make_baseline("horn_schunck")


def test_classical_baselines_recover_a_translation():
  if not evaluate.cv2_available():
    pytest.skip("OpenCV (optional) is not installed")
  rng = np.random.default_rng(0)
  base = rng.random((140, 160)).astype(np.float32)
  for _ in range(3):
    base = (base + np.roll(base, 1, 0) + np.roll(base, 1, 1) + np.roll(base, -1, 0) + np.roll(base, -1, 1)) / 5
  im = np.repeat(base[..., None], 3, -1)
  im = (im - im.min()) / (im.max() - im.min())
  ex = {"image1": im[10:106, 10:138], "image2": im[8:104, 7:135], "flow": np.zeros((96, 128, 2), np.float32)}
  for name in ("farneback", "dis"):
    flow = evaluate.make_baseline(name).predict([ex])[0]
    np.testing.assert_allclose(np.median(flow[16:-16, 16:-16].reshape(-1, 2), 0), [3.0, 2.0], atol=0.5)


def test_format_table_shows_the_metrics_of_each_benchmark():
  r = {"epe": 1.23456, "outlier_1px": 0.5, "outlier_3px": 0.25, "outlier_5px": 0.125, "fl_all": 0.2, "s0_10": 1.0,
       "s10_40": float("nan"), "s40plus": None, "num_pairs": 3}
  table = evaluate.format_table({"model": {"kitti2015": r, "sintel_clean": dict(r, epe_occ=4.0, epe_noc=1.0)}})
  lines = table.splitlines()
  assert lines[0].split() == ["dataset", "method", "pairs", "EPE", "1px%", "3px%", "5px%", "Fl-all%", "s0-10",
                              "s10-40", "s40+", "occ", "noc"]
  assert lines[2].split() == ["sintel_clean", "model", "3", "1.235", "50.00", "25.00", "12.50", "-", "1.000", "-",
                              "-", "4.000", "1.000"]
  assert lines[3].split() == ["kitti2015", "model", "3", "1.235", "50.00", "25.00", "12.50", "20.00", "-", "-", "-",
                              "-", "-"]


class Recording(evaluate.Method):
  """Half the ground truth; keeps what it saw for the numpy reference."""
  name = "half"

  def __init__(self):
    self.seen = []

  def predict(self, examples):
    self.seen.extend(examples)
    return np.stack([0.5 * e["flow"] for e in examples])


def test_synthetic_val_is_the_pipelines_held_out_set():
  data = {"crop_size": [64, 64], "synthetic": {"image_size": [64, 80], "num_chairs": [2, 3]}}
  ds = evaluate.make_dataset("synthetic_val:2", data)
  assert len(ds) == 2
  m = Recording()
  r = evaluate.run([m], [ds])["half"]["synthetic_val"]
  assert [e["image1"].shape for e in m.seen] == [(64, 64, 3)] * 2
  want = _numpy_metrics([0.5 * e["flow"] for e in m.seen], [e["flow"].astype(np.float64) for e in m.seen],
                        [e["valid"] > 0.5 for e in m.seen], [e["occlusion"] > 0.5 for e in m.seen])
  _assert_metrics(r, want)
  assert r["epe"] > 0 and r["num_pairs_with_occlusion"] == 2
  with pytest.raises(ValueError, match="number of pairs"):
    evaluate.make_dataset("synthetic_val:/some/dir")


def test_evaluators_from_config_match_numpy():
  """jaxflow.evaluators: a config.evals entry on a fake stream (last batch padded with valid = 0)."""
  import flax.linen as nn
  import jax.numpy as jnp
  import ml_collections
  from jaxflow import evaluators

  class Shift(nn.Module):  # flow = a learned constant: easy to predict exactly in numpy
    @nn.compact
    def __call__(self, image1, image2, train=False):
      c = self.param("c", lambda k: jnp.asarray([1.5, -4.0]))
      return {"flow": jnp.broadcast_to(c, image1.shape[:3] + (2,))}

  rng = np.random.default_rng(0)
  examples = [{"image1": rng.random((16, 20, 3), np.float32), "image2": rng.random((16, 20, 3), np.float32),
               "flow": rng.normal(size=(16, 20, 2)).astype(np.float32) * 6,
               "valid": (rng.random((16, 20)) > 0.3).astype(np.float32)} for _ in range(3)]

  def eval_iter(config, name, *, batch_size, process_index, process_count):
    assert name == "fake_set"
    for s in range(0, 3, batch_size):
      rows = examples[s:s + batch_size]
      rows = rows + [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (batch_size - len(rows))
      yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  config = ml_collections.ConfigDict({"evals": {"val": {"dataset": "fake_set", "batch_size": 2, "num_batches": 0}}})
  evs = evaluators.build_evaluators(config, Shift(), eval_iter)
  params = {"c": np.asarray([1.5, -4.0], np.float32)}
  got = evaluators.run_all(evs, {"params": params})
  want = _numpy_metrics([np.broadcast_to(params["c"], (16, 20, 2)) for _ in examples],
                        [e["flow"].astype(np.float64) for e in examples], [e["valid"] > 0.5 for e in examples],
                        [None] * 3)
  _assert_metrics({k.split("/", 1)[1]: v for k, v in got.items()}, want)
  with pytest.raises(KeyError, match="config.evals.bad needs the key 'num_batches'"):
    evaluators.build_evaluators(ml_collections.ConfigDict({"evals": {"bad": {"dataset": "x", "batch_size": 1}}}),
                                Shift(), eval_iter)


def test_compilation_cache_flag_sets_up_jax_and_tensorflow_caches(tmp_path):
  # In a fresh interpreter: TensorFlow must not be imported yet for its cache flag to take effect.
  code = f"""
import json, os, sys
import jax
from jaxflow import evaluate, infer
out = {{}}
out['none'] = evaluate.configure_caches('none', ['synthetic_val:2'])
out['tf_after_none'] = os.environ.get('TF_XLA_FLAGS', '')
out['files'] = evaluate.configure_caches({str(tmp_path / 'c')!r}, ['middlebury'])
out['tf_after_files'] = os.environ.get('TF_XLA_FLAGS', '')
out['jax_dir'] = jax.config.jax_compilation_cache_dir
out['synthetic'] = evaluate.configure_caches({str(tmp_path / 'c')!r}, ['middlebury', 'synthetic_val:2'])
out['tf_after_synthetic'] = os.environ.get('TF_XLA_FLAGS', '')
out['tf_imported'] = 'tensorflow' in sys.modules
out['infer_flag'] = infer.parse_args(['a.png', 'b.png', '--workdir', 'w', '-o', 'o',
                                      '--compilation_cache', 'none']).compilation_cache
print(json.dumps(out))
"""
  env = {k: v for k, v in os.environ.items() if k not in ("TF_XLA_FLAGS", "JAXFLOW_COMPILATION_CACHE")}
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  want = str(tmp_path / "c")
  assert out["none"] is None and out["tf_after_none"] == ""
  assert out["files"] == want and out["jax_dir"] == want
  assert out["tf_after_files"] == ""  # no synthetic set: TensorFlow is not involved
  assert out["synthetic"] == want
  assert f"={os.path.join(want, 'tf_xla')}" in out["tf_after_synthetic"]
  assert not out["tf_imported"]
  assert out["infer_flag"] == "none"
