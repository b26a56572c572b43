"""launch/colab.ipynb runs, cell by cell, against this checkout: a stale cell fails CI.

The notebook's `parameters` cell is replaced by this checkout's paths; cells marked
`"lbcl_ci": {"skip": reason}` in their metadata (installing from git, the Hugging Face hub) are
replaced by a comment with the reason. Everything else runs as written, in a Jupyter kernel
(nbclient + ipykernel), including the embedded default run (about a minute on 2 cores).
"""

import json
import os
import pathlib
import re
import sys

import pytest

from conftest import REPO_ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = REPO_ROOT / "launch" / "colab.ipynb"
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
                8: "eight"}


def _prepared(runs: pathlib.Path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  skipped, parameters = [], 0
  for cell in nb.cells:
    ci = cell.metadata.get("lbcl_ci", {})
    assert set(ci) <= {"skip"}, f"unknown lbcl_ci keys {sorted(ci)}"
    if "skip" in ci:
      reason = ci["skip"].strip()
      assert reason, "a skipped cell must say why"
      # What CI cannot run must at least name files that exist.
      for config in re.findall(r"--config=(\S+\.py)", cell.source):
        assert (REPO_ROOT / config).is_file(), f"a skipped cell names {config}, which is gone"
      skipped.append((cell.source.splitlines()[0], reason))
      cell.source = f"# skipped in CI: {reason}"
    elif "parameters" in cell.metadata.get("tags", []):
      parameters += 1
      names = set(re.findall(r"^(\w+) =", cell.source, re.M))
      assert names == {"REPO_URL", "REPO_DIR", "RUNS"}, names
      cell.source = "\n".join([f"REPO_URL = {str(REPO_ROOT)!r}", f"REPO_DIR = {str(REPO_ROOT)!r}",
                               f"RUNS = {str(runs)!r}"])
  assert parameters == 1
  return nb, skipped


def test_colab_notebook_runs(tmp_path):
  runs = tmp_path / "runs"
  nb, skipped = _prepared(runs)
  for first_line, reason in skipped:
    print(f"skipped cell {first_line!r}: {reason}")
  env = dict(os.environ)
  # `!python ...` in the notebook must be this interpreter (the kernel's own is, by nbclient).
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute(env=env)  # raises CellExecutionError with the failing cell's traceback
  results = json.loads((runs / "default" / "results.json").read_text())
  text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
  # The notebook's own description of the default run matches what the default ran.
  assert f"{NUMBER_WORDS[len(results['tasks'])]} synthetic tasks" in text, results["tasks"]
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "average accuracy" in outputs
