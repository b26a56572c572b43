"""A run's results, written by one writer for the driver, the tests and the benchmarks.

`results_document` builds the `results.json` document (the accuracy matrix, its metrics from
`lbcl_jax.metrics`, and whatever else the caller records); `write_results` writes it with its
companions into a directory:

| file | what |
| --- | --- |
| `accuracy_matrix.csv` | "after,<tasks>", then one row per stage (empty: not evaluated) |
| `report.md` | the matrix and the metrics as Markdown tables, and the run's warnings |
| `accuracy_matrix.png`, `sensitivity.png`, `loss_curves.png` | the plots (when asked) |
| `results.json` | the document; written last, so its presence means the rest is there |

Every file is written atomically (`lbcl_jax.files`); NaN becomes null (strict JSON).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from lbcl_jax import files
from lbcl_jax import metrics


def _json_safe(x: Any) -> Any:
  """NaN/inf -> None and numpy -> Python, recursively (strict JSON has no NaN)."""
  if isinstance(x, Mapping):
    return {str(k): _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, np.ndarray):
    return _json_safe(x.tolist())
  if isinstance(x, (np.floating, float)):
    x = float(x)
    return x if math.isfinite(x) else None
  if isinstance(x, np.integer):
    return int(x)
  return x


def results_document(*, method: str, tasks: Sequence[str], stages: Sequence[str],
                     matrix: Any, joint: bool = False,
                     reference: Sequence[float | None] | None = None,
                     **extra: Any) -> dict[str, Any]:
  """{"method", "tasks", "stages", "accuracy_matrix", metrics..., **extra}, JSON-safe.

  Args:
    method: the method's name.
    tasks: the column names.
    stages: the row names (one per training stage).
    matrix: the accuracy matrix (rows: after each stage; columns: tasks; None: not evaluated).
    joint: a multi-task run (see `metrics.summarize`: only the average is defined).
    reference: per-task reference accuracies for FWT.
    **extra: more fields (steps, losses, the config, timings, the run's "warnings", which
      report.md lists, ...).
  """
  r = metrics.as_matrix(matrix)
  if r.shape[1] != len(tasks):
    raise ValueError(f"{len(tasks)} task names for {r.shape[1]} matrix columns")
  if len(stages) != r.shape[0]:
    raise ValueError(f"{len(stages)} stage names for {r.shape[0]} matrix rows")
  doc = {"method": method, "tasks": list(tasks), "stages": list(stages), "accuracy_matrix": r,
         **metrics.summarize(r, reference, joint=joint), **extra}
  return _json_safe(doc)


def label_space_summaries(matrices: Mapping[str, Any], *, joint: bool = False
                          ) -> dict[str, dict[str, Any]]:
  """{space: {"accuracy_matrix", metrics...}} for the further label spaces a run measured."""
  return {space: _json_safe({"accuracy_matrix": metrics.as_matrix(m),
                             **metrics.summarize(metrics.as_matrix(m), None, joint=joint)})
          for space, m in matrices.items()}


def _csv(doc: Mapping[str, Any]) -> str:
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(["after", *doc["tasks"]])
  for stage, row in zip(doc["stages"], doc["accuracy_matrix"]):
    writer.writerow([stage, *("" if v is None else f"{v:.6f}" for v in row)])
  return buf.getvalue()


def _percent(v):
  return "" if v is None else f"{100 * v:.1f}"


def report_markdown(doc: Mapping[str, Any]) -> str:
  """report.md: the model, the matrix in percent and the metrics."""
  tasks = doc["tasks"]
  config = doc.get("config") or {}
  model = config.get("model", {})
  out = [f"# {doc['method']} on {', '.join(tasks)}", "",
         f"Model: `{model.get('path') or model.get('family', '?')}`; method `{doc['method']}`; "
         f"seed {config.get('seed', '?')}.", "",
         "Accuracy (%) on each task (columns) after each training stage (rows):", "",
         "| after | " + " | ".join(tasks) + " |",
         "|---|" + "---|" * len(tasks)]
  for stage, row in zip(doc["stages"], doc["accuracy_matrix"]):
    out.append(f"| {stage} | " + " | ".join(_percent(v) for v in row) + " |")
  sparse = doc.get("eval_matrix", "full") != "full"
  if sparse:
    out += ["", f"Measured entries (`eval.matrix={doc['eval_matrix']}`): each task right after "
            "its own stage, and every task after the last."]
  out += ["", "| metric | value |", "|---|---|"]
  for k in ("average_accuracy", "bwt", "fwt", "forgetting"):
    v = doc.get(k)
    why = " (needs `--config.eval.matrix=full`)" if v is None and sparse and k == "forgetting" else ""
    out.append(f"| {k} | {'n/a' + why if v is None else f'{100 * v:.2f}'} |")
  if doc.get("skipped_rows"):
    # `data.invalid_rows="skip"`: rows of the task files that no answer could be scored on.
    out += ["", "Invalid rows skipped (`data.invalid_rows=skip`): " + "; ".join(
        f"{task} {', '.join(f'{split} {n}' for split, n in counts.items())}"
        for task, counts in doc["skipped_rows"].items()) + "."]
  if doc.get("warnings"):
    # What the run found wrong but did not stop for (e.g. a task whose training collapsed).
    out += ["", "## Warnings", "", *(f"- {w}" for w in doc["warnings"])]
  out.append("")
  return "\n".join(out)


def write_results(directory: str | os.PathLike, doc: Mapping[str, Any], *,
                  plots: bool = True,
                  late_fields: Callable[[], Mapping[str, Any]] | None = None) -> dict[str, Any]:
  """Writes `doc` (a `results_document`) and its companions into `directory`.

  `late_fields()`, when given, adds fields to results.json just before it is written (e.g.
  timings that should include the writing of the rest). Returns the document written.
  """
  # Imported here: matplotlib is needed only when results are written.
  from lbcl_jax import plots as plots_lib  # pylint: disable=g-import-not-at-top
  d = pathlib.Path(directory)
  files.atomic_write_text(d / "accuracy_matrix.csv", _csv(doc))
  files.atomic_write_text(d / "report.md", report_markdown(doc))
  if plots:
    average = doc.get("average_accuracy")
    title = doc["method"] + ("" if average is None else f": average accuracy {100 * average:.1f}")
    plots_lib.accuracy_heatmap(doc["accuracy_matrix"], doc["tasks"], doc["stages"],
                               d / "accuracy_matrix.png", title=title)
    plots_lib.sensitivity_plot(doc.get("sensitivity") or {}, d / "sensitivity.png")
    plots_lib.loss_curves(doc.get("losses") or {}, d / "loss_curves.png")
  doc = _json_safe({**doc, **(late_fields() if late_fields else {})})
  files.atomic_write_text(d / "results.json", json.dumps(doc, indent=2, allow_nan=False))
  return doc
