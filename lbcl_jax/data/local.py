"""Reads a directory in O-LoRA's CL_Benchmark layout.

    <root>/<category>/<dataset>/labels.json    a JSON list of the label strings
    <root>/<category>/<dataset>/train.json     a JSON list of {"label": ..., "sentence": ...}
    <root>/<category>/<dataset>/test.json      (and dev.json, which O-LoRA ships equal to test)

`<category>/<dataset>` is the task's `path` in `lbcl_jax.tasks` (e.g. "SC/SST-2").

Nothing is dropped silently: a bad row raises `InvalidRowError` (a `DataError`) naming the file
and the row. With `skip_invalid=True` bad rows are skipped instead, each one logged, and the
count is logged and returned by `read_split` and `load_counted`. File-level faults (a missing
file, bytes that are not UTF-8, text that is not JSON, JSON that is not a list) always raise,
`skip_invalid` or not: no row can be trusted after them.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from absl import logging

from lbcl_jax import tasks as tasks_lib
from lbcl_jax.data import DataError
from lbcl_jax.data import Example
from lbcl_jax.data import InvalidRowError
from lbcl_jax.data import sample_examples

SPLITS = ("train", "dev", "test")


def task_dir(root: str | os.PathLike[str], task: tasks_lib.Task) -> pathlib.Path:
  return pathlib.Path(root) / task.category / task.dataset


def _read_json(path: pathlib.Path) -> Any:
  """Parses a JSON file, decoding its bytes as strict UTF-8, with errors naming the position."""
  raw = path.read_bytes()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    raise DataError(f"{path}: bytes that are not UTF-8 at byte offset {e.start} (line {line}): "
                    f"{raw[e.start:e.end]!r} ({e.reason})") from None
  if text.startswith("\ufeff"):  # a byte-order mark is valid UTF-8 but not valid JSON
    text = text[1:]
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} "
                    f"(character {e.pos}): {e.msg}") from None


def read_labels(root: str | os.PathLike[str], task: tasks_lib.Task) -> tuple[str, ...]:
  """The task's labels.json, checked against the registry's label set.

  The registry's order defines the prompt and the label indices (it is O-LoRA's labels.json
  order); a labels.json with the same labels in another order is accepted with a warning.
  """
  path = task_dir(root, task) / "labels.json"
  if not path.is_file():
    raise DataError(f"{path}: labels file not found (task {task.name!r} in {root})")
  labels = _read_json(path)
  if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
    raise DataError(f"{path}: expected a JSON list of label strings, got {labels!r}")
  if len(set(labels)) != len(labels):
    raise DataError(f"{path}: duplicate labels in {labels}")
  if set(labels) != set(task.labels):
    raise DataError(f"{path}: labels {labels} differ from task {task.name!r}'s registered "
                    f"labels {list(task.labels)}")
  if tuple(labels) != task.labels:
    logging.warning("%s lists the labels of %s in another order (%s); using the registry's "
                    "order %s", path, task.name, labels, list(task.labels))
  return tuple(labels)


def _check_row(row: Any, task: tasks_lib.Task) -> str | None:
  """The reason `row` is invalid, or None."""
  if not isinstance(row, dict):
    return f"expected an object with 'label' and 'sentence', got {type(row).__name__}"
  missing = [k for k in ("label", "sentence") if k not in row]
  if missing:
    return f"missing {' and '.join(repr(k) for k in missing)} (keys: {sorted(row)})"
  label, sentence = row["label"], row["sentence"]
  if not isinstance(label, str):
    return f"label {label!r} is not a string"
  if label not in task.labels:
    return f"label {label!r} is not in labels.json {list(task.labels)}"
  if not isinstance(sentence, str):
    return f"sentence {sentence!r} is not a string"
  if not sentence.strip():
    return "empty sentence"
  return None


def read_split(root: str | os.PathLike[str], task: str | tasks_lib.Task, split: str, *,
               skip_invalid: bool = False) -> tuple[list[Example], int]:
  """Every valid row of one split file, and the number of rows skipped.

  Args:
    root: the CL_Benchmark directory.
    task: a task name or `Task`.
    split: "train", "dev" or "test".
    skip_invalid: skip (and log) bad rows instead of raising.

  Returns:
    (examples in file order, number of rows skipped).

  Raises:
    DataError: a missing or unreadable file; `InvalidRowError` (without `skip_invalid`) for a
      bad row. The message names the file and the row.
  """
  task = tasks_lib.get_task(task)
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
  directory = task_dir(root, task)
  if not directory.is_dir():
    raise DataError(f"{directory}: no directory for task {task.name!r} ({task.path}) under "
                    f"{root}")
  read_labels(root, task)
  path = directory / f"{split}.json"
  if not path.is_file():
    present = sorted(p.name for p in directory.iterdir())
    raise DataError(f"{path}: split file not found for task {task.name!r}; {directory} holds "
                    f"{present}")
  rows = _read_json(path)
  if not isinstance(rows, list):
    raise DataError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
  examples, skipped = [], 0
  for i, row in enumerate(rows):
    reason = _check_row(row, task)
    if reason is not None:
      if not skip_invalid:
        raise InvalidRowError(f"{path}: row {i}: {reason}")
      skipped += 1
      logging.warning("%s: row %d skipped: %s", path, i, reason)
      continue
    examples.append(Example(task=task.name, sentence=row["sentence"], label=row["label"],
                            label_index=task.labels.index(row["label"])))
  if skipped:
    logging.warning("%s: skipped %d invalid row(s) of %d (skip_invalid=True)", path, skipped,
                    len(rows))
  return examples, skipped


def load(task: str | tasks_lib.Task, split: str, **opts: Any) -> list[Example]:
  """One split of one task, optionally sampled: `load_counted` (same options) without the count."""
  return load_counted(task, split, **opts)[0]


def load_counted(task: str | tasks_lib.Task, split: str, *,
                 root: str | os.PathLike[str] | None = None,
                 data_dir: str | os.PathLike[str] | None = None, skip_invalid: bool = False,
                 per_class: int | None = None, max_examples: int | None = None,
                 seed: int = 0) -> tuple[list[Example], int]:
  """One split of one task, optionally sampled (seeded, stratified by class), and the number of
  invalid rows skipped.

  Args:
    task: a task name or `Task`.
    split: "train", "dev" or "test".
    root: the CL_Benchmark directory (`data_dir` is accepted as an alias).
    skip_invalid: skip bad rows (logged, counted) instead of raising.
    per_class: keep at most this many examples per class (None/0: all).
    max_examples: keep at most this many examples in all (None/0: all).
    seed: the sampling seed.

  Returns:
    (the sampled examples, the number of the file's rows skipped as invalid). The count is taken
    before sampling; the sample is drawn from the valid rows alone, so it is the one a file
    without the skipped rows gives.
  """
  root = root if root is not None else data_dir
  if not root:
    raise ValueError("the local source needs root= (the CL_Benchmark directory)")
  examples, skipped = read_split(root, task, split, skip_invalid=skip_invalid)
  return sample_examples(examples, per_class=per_class, max_examples=max_examples,
                         seed=seed), skipped
