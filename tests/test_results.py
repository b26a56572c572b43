"""The one results writer: results.json, the CSV, report.md and the plots, atomically."""

import csv
import json
import os

import numpy as np
from PIL import Image
import pytest

from lbcl_jax import results

R = [[0.9, None, None],
     [0.7, 0.8, None],
     [0.6, 0.5, 0.95]]


def test_document_has_the_matrix_and_its_metrics():
  doc = results.results_document(method="lbcl", tasks=["a", "b", "c"], stages=["a", "b", "c"],
                                 matrix=R, nan=float("nan"), n=np.int64(3))
  assert doc["accuracy_matrix"] == [[0.9, None, None], [0.7, 0.8, None], [0.6, 0.5, 0.95]]
  assert doc["average_accuracy"] == pytest.approx((0.6 + 0.5 + 0.95) / 3)
  assert doc["bwt"] == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2) and doc["fwt"] is None
  assert doc["nan"] is None and doc["n"] == 3 and isinstance(doc["n"], int)
  joint = results.results_document(method="mtl", tasks=["a", "b"], stages=["a, b"],
                                   matrix=[[0.5, 0.7]], joint=True)
  assert joint["average_accuracy"] == pytest.approx(0.6) and joint["bwt"] is None
  with pytest.raises(ValueError, match="stage names"):
    results.results_document(method="x", tasks=["a"], stages=["a", "b"], matrix=[[0.1]])


def test_write_results_writes_every_file_atomically(tmp_path):
  out = tmp_path / "sub"
  doc = results.results_document(method="mtl", tasks=["a", "b", "c"],
                                 stages=["a, b", "c", "c2"], matrix=R,
                                 losses={"a, b": [[1, 0.5], [2, 0.25]]}, sensitivity={},
                                 config={"model": {"path": "m"}, "seed": 3})
  written = results.write_results(out, doc, plots=True, late_fields=lambda: {"timings": {"x": 1.0}})
  loaded = json.loads((out / "results.json").read_text())
  assert loaded == written and loaded["timings"] == {"x": 1.0}
  rows = list(csv.reader((out / "accuracy_matrix.csv").open()))
  assert rows[0] == ["after", "a", "b", "c"]
  assert rows[1] == ["a, b", "0.900000", "", ""]  # a stage name with a comma stays one cell
  assert rows[3] == ["c2", "0.600000", "0.500000", "0.950000"]
  report = (out / "report.md").read_text()
  assert "| c2 | 60.0 | 50.0 | 95.0 |" in report and "Model: `m`" in report and "seed 3" in report
  for png in ("accuracy_matrix.png", "sensitivity.png", "loss_curves.png"):
    with Image.open(out / png) as im:
      assert im.format == "PNG"
  assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temporary files left
