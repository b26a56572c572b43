"""Task data: one `Example` type and one `load_split` entry point over four sources.

Sources (each a module of this package, imported only when used so that importing
`lbcl_jax.data` pulls in neither `datasets` nor TensorFlow):

* "local": a directory in O-LoRA's CL_Benchmark layout (`lbcl_jax.data.local`);
* "hf": Hugging Face `datasets`, sampled with the benchmark's protocol (`lbcl_jax.data.hf_hub`);
* "tfds": TensorFlow Datasets builders, same protocol (`lbcl_jax.data.tfds_source`);
* "synthetic": the embedded synthetic suite (`lbcl_jax.data.synthetic`).

The input pipeline (tokenisation, length buckets, batches, the training stream) is
`lbcl_jax.data.pipeline`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Sequence

import numpy as np

from lbcl_jax import tasks as tasks_lib
from lbcl_jax.errors import InputError

SOURCES = ("local", "hf", "tfds", "synthetic")
_SOURCE_MODULES = {
    "local": "lbcl_jax.data.local",
    "hf": "lbcl_jax.data.hf_hub",
    "tfds": "lbcl_jax.data.tfds_source",
    "synthetic": "lbcl_jax.data.synthetic",
}


@dataclasses.dataclass(frozen=True)
class Example:
  """One labelled example.

  Attributes:
    task: the registry name of its task (`lbcl_jax.tasks.get_task(task)`).
    sentence: the input text as O-LoRA's data files hold it (before the prompt is added).
    label: the target label string, one of the task's labels.
    label_index: the label's index in the task's `labels`.
  """

  task: str
  sentence: str
  label: str
  label_index: int


class DataError(InputError):
  """Bad input data; the message names the file (or source) and the row."""


class InvalidRowError(DataError):
  """One bad row (the rest of its file may be fine), raised by a source that can skip such rows.

  The local source raises it unless `skip_invalid` is set; file-level faults stay `DataError`,
  so a caller can tell the faults that skipping would get past from those it would not.
  """


def make_example(task: tasks_lib.Task, sentence: str, label_index: int) -> Example:
  return Example(task=task.name, sentence=sentence, label=task.labels[label_index],
                 label_index=int(label_index))


def _cap(value: int | None) -> int | None:
  """0 and None both mean "no cap" (config files use 0)."""
  if value is None or value == 0:
    return None
  if value < 0:
    raise ValueError(f"a sample size must be >= 0 (0 = no cap), got {value}")
  return int(value)


def sample_indices(label_ids: Sequence[int], *, per_class: int | None = None,
                   max_examples: int | None = None, seed: int = 0) -> np.ndarray:
  """Indices of a seeded sample, stratified by class, in increasing order.

  `per_class` keeps at most that many rows of every class (all rows of a smaller class);
  `max_examples` then keeps at most that many rows in all, drawn uniformly. Every class draws
  from its own generator seeded with (seed, class id), so one class's sample does not depend on
  how many rows the other classes have. No global random state is touched.

  Args:
    label_ids: the class id of every row.
    per_class: cap per class (None or 0: no cap).
    max_examples: cap on the total (None or 0: no cap).
    seed: the sampling seed.

  Returns:
    int64 indices into `label_ids`, sorted.
  """
  per_class, max_examples = _cap(per_class), _cap(max_examples)
  labels = np.asarray(label_ids, dtype=np.int64).reshape(-1)
  keep = np.arange(labels.size)
  if per_class is not None:
    chosen = []
    for c in np.unique(labels):
      rows = np.flatnonzero(labels == c)
      if rows.size > per_class:
        rng = np.random.default_rng([seed, int(c), 0x5EED])
        rows = rng.choice(rows, size=per_class, replace=False)
      chosen.append(rows)
    keep = np.sort(np.concatenate(chosen)) if chosen else keep[:0]
  if max_examples is not None and keep.size > max_examples:
    rng = np.random.default_rng([seed, 0x7074])
    keep = np.sort(rng.choice(keep, size=max_examples, replace=False))
  return keep


def sample_examples(examples: Sequence[Example], *, per_class: int | None = None,
                    max_examples: int | None = None, seed: int = 0) -> list[Example]:
  """`sample_indices` applied to examples (order preserved)."""
  idx = sample_indices([e.label_index for e in examples], per_class=per_class,
                       max_examples=max_examples, seed=seed)
  return [examples[i] for i in idx]


def load_split(task: str | tasks_lib.Task, split: str, source: str, **opts: Any) -> list[Example]:
  """Loads one split of one task from `source`: `load_split_counted` without the count.

  Args:
    task: a task name or `Task`.
    split: "train" or "test" (the local source also reads "dev").
    source: one of `SOURCES`.
    **opts: the source's options. All sources take `per_class`, `max_examples` and `seed`
      (seeded sampling, see `sample_indices`); for `per_class` None or 0 means the source's
      default size (local: every row; hf/tfds: the benchmark protocol's, 1000 per class for
      training; synthetic: 200 train / 50 test per class), for `max_examples` no cap. "local"
      needs `root` (the CL_Benchmark directory) and takes `skip_invalid`; "hf"/"tfds" take the
      protocol's sizes (`train_per_class`, `test_per_class`, `test_size`) and their loader
      hooks; "synthetic" takes `suite_seed`, `train_per_class`, `test_per_class`. See each
      module's `load` (local: `load_counted`).

  Returns:
    The examples, each with its label string and label index.

  Raises:
    ValueError: unknown task or source; `DataError` (a ValueError) for bad data.
  """
  return load_split_counted(task, split, source, **opts)[0]


def load_split_counted(task: str | tasks_lib.Task, split: str, source: str,
                       **opts: Any) -> tuple[list[Example], int]:
  """`load_split`, and how many rows of the split the source skipped as invalid.

  Only the local source skips rows (with `skip_invalid=True`); the count is of rows in its file,
  taken before sampling. The other sources raise on a bad row instead, and count 0.

  Args:
    task, split, source, **opts: as `load_split`.

  Returns:
    (the examples, exactly as `load_split` returns them; the number of rows skipped).
  """
  task = tasks_lib.get_task(task)
  if source not in _SOURCE_MODULES:
    raise InputError(f"unknown data source {source!r}; valid sources: {', '.join(SOURCES)}")
  if source != "local":
    # A driver may pass its (empty) data directory to every source; a set one is a mistake.
    for key in ("root", "data_dir"):
      if opts.get(key):
        raise ValueError(f"{key}={opts[key]!r} is only read by source='local', not {source!r}")
      opts.pop(key, None)
  module = importlib.import_module(_SOURCE_MODULES[source])
  if source == "local":
    return module.load_counted(task, split, **opts)
  return module.load(task, split, **opts), 0
