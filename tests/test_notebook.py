"""Executes experiments/notebooks/evaluate.ipynb end to end with nbclient on a tiny PWC-Net trained for 2 steps,
so the notebook cannot rot. Needs nbformat, nbclient and ipykernel (the dev extra) and the sample data."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOK_DIR = os.path.join(os.path.dirname(HERE), "experiments", "notebooks")

# A 3-level PWC-Net with 8-channel layers, trained 2 steps on 64 x 64 synthetic crops.
TINY_OVERRIDES = {
    "model.pyramid_channels": [8, 8, 8], "model.estimator_channels": [8, 8], "model.context": False,
    "model.search_range": 2, "model.output_level": 2, "loss.weights": [0.5, 1.0], "total_steps": 2,
    "batch_size": 2, "data.crop_size": [64, 64], "data.synthetic.image_size": [80, 96],
    "data.synthetic.num_chairs": [2, 3], "data.val_size": 2, "evals.synthetic_val.batch_size": 2,
    "log_every_steps": 1, "checkpoint_every_steps": 2, "optim.boundaries": [1, 2],
}


def test_evaluate_notebook_runs_end_to_end(shared_data, tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat", reason="the dev extra (nbformat, nbclient, ipykernel) is needed")
  nbclient = pytest.importorskip("nbclient", reason="the dev extra (nbformat, nbclient, ipykernel) is needed")
  spec = importlib.util.spec_from_file_location("make_evaluate_notebook",
                                                os.path.join(NOTEBOOK_DIR, "make_evaluate_notebook.py"))
  make_notebook_module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make_notebook_module)
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, "evaluate.ipynb"), as_version=4)
  assert [c.source for c in nb.cells] == [c.source for c in make_notebook_module.build().cells], \
      "evaluate.ipynb is stale: rerun experiments/notebooks/make_evaluate_notebook.py"
  monkeypatch.setenv("JAXFLOW_DATA", str(shared_data))
  monkeypatch.delenv("JAXFLOW_CHECKPOINT", raising=False)
  monkeypatch.setenv("JAXFLOW_NB_MODEL", "pwcnet")
  monkeypatch.setenv("JAXFLOW_NB_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("JAXFLOW_NB_DATASETS", "sintel_clean")
  monkeypatch.setenv("JAXFLOW_NB_OVERRIDES", json.dumps(TINY_OVERRIDES))
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": NOTEBOOK_DIR}})
  client.execute()  # raises CellExecutionError naming the failing cell
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "trained 2 steps" in text and "checkpoints/2" in text
  assert "sintel_clean  pwcnet      2" in text and "sintel_clean  zero        2" in text
  assert "cost-volume peak at" in text
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
  assert len(images) == 2  # the Sintel panels and the correlation figure
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "2")
