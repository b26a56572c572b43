"""Builds the benchmark's splits from TensorFlow Datasets, with the same protocol as the hub source.

TFDS has builders for 11 of the 15 tasks:

| task | builder | test split |
| --- | --- | --- |
| agnews | ag_news_subset (title and description kept apart: O-LoRA's exact format) | test |
| imdb | imdb_reviews | test |
| sst-2 / mnli / qqp | glue/sst2, glue/mnli, glue/qqp | validation (mnli: validation_matched) |
| rte / cb / copa / wic / boolqa / multirc | super_glue/<name> (boolqa: boolq) | validation |

amazon (5-class Amazon Review Full), yelp (5-class Yelp Review Full; TFDS has only the 2-class
yelp_polarity_reviews), dbpedia and yahoo have no TFDS builder: use the "hf" or "local" source.

Label mappings, sentence formats and sampling are those of `lbcl_jax.data.hf_hub` (its table
documents the protocol); TFDS' ClassLabel names are checked against them before mapping.
Requires `tensorflow-datasets` and TensorFlow (`pip install lbcl_jax[tfds]`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from lbcl_jax import tasks as tasks_lib
from lbcl_jax.data import DataError
from lbcl_jax.data import Example
from lbcl_jax.data import hf_hub
from lbcl_jax.data import make_example

_TV = {"train": "train", "test": "validation"}
_TT = {"train": "train", "test": "test"}


def _from_hub(name: str, builder: str, splits: Mapping[str, str]) -> hf_hub.HubSpec:
  return dataclasses.replace(hf_hub.SPECS[name], path=builder, config=None, splits=splits)


SPECS: Mapping[str, hf_hub.HubSpec] = {
    "agnews": _from_hub("agnews", "ag_news_subset", _TT),
    "imdb": _from_hub("imdb", "imdb_reviews", _TT),
    "sst-2": _from_hub("sst-2", "glue/sst2", _TV),
    "mnli": _from_hub("mnli", "glue/mnli", {"train": "train", "test": "validation_matched"}),
    "qqp": _from_hub("qqp", "glue/qqp", _TV),
    "rte": _from_hub("rte", "super_glue/rte", _TV),
    "cb": _from_hub("cb", "super_glue/cb", _TV),
    "copa": _from_hub("copa", "super_glue/copa", _TV),
    "wic": _from_hub("wic", "super_glue/wic", _TV),
    "boolqa": _from_hub("boolqa", "super_glue/boolq", _TV),
    "multirc": _from_hub("multirc", "super_glue/multirc", _TV),
}


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the TFDS source needs tensorflow-datasets and TensorFlow: "
                      "pip install 'lbcl_jax[tfds]'") from e
  return tfds


def _decode(value: Any, where: str, row: int, key: str) -> Any:
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(f"{where}: row {row}: field {key!r} is not UTF-8 at byte {e.start}") from None
  return value


def load(task: str | tasks_lib.Task, split: str, *,
         train_per_class: int | None = hf_hub.TRAIN_PER_CLASS, test_per_class: int | None = None,
         test_size: int | str | None = "default", per_class: int | None = None,
         max_examples: int | None = None, seed: int = 0, data_dir: str | None = None,
         download: bool = True, builder: str | None = None) -> list[Example]:
  """One split of one task from TFDS, sampled with the benchmark's protocol.

  Args:
    task: a task name or `Task`.
    split: "train" or "test".
    train_per_class, test_per_class, test_size, per_class, max_examples, seed: as
      `lbcl_jax.data.hf_hub.load`.
    data_dir: the TFDS data directory (None: TFDS' default).
    download: let TFDS download and prepare the dataset when it is not there yet.
    builder: another builder name with the same features.

  Raises:
    ValueError: a task without a TFDS builder (naming the covered ones) or an unknown split;
      `DataError` for labels outside the mapping or a reordered ClassLabel.
  """
  task = tasks_lib.get_task(task)
  if task.name not in SPECS:
    raise ValueError(f"no TFDS builder for task {task.name!r} (TFDS covers "
                     f"{', '.join(SPECS)}); use source='hf' or 'local' for it")
  spec = SPECS[task.name]
  if builder is not None:
    spec = dataclasses.replace(spec, path=builder)
  if split not in spec.splits:
    raise ValueError(f"unknown split {split!r} for task {task.name!r}; valid splits: "
                     f"{', '.join(spec.splits)}")
  tfds = _import_tfds()
  tfds_split = spec.splits[split]
  where = f"tfds:{spec.path}[{tfds_split}]"
  ds, info = tfds.load(spec.path, split=tfds_split, data_dir=data_dir, download=download,
                       with_info=True, shuffle_files=False)
  hf_hub.check_class_names(getattr(info.features[spec.label_column], "names", None), spec, where)

  # First pass: labels only (cheap), to pick the rows; second pass: format the kept rows.
  label_col = spec.label_column
  source_ids = np.concatenate(
      [np.asarray(b, dtype=np.int64).reshape(-1)
       for b in tfds.as_numpy(ds.map(lambda x: x[label_col]).batch(8192))] or
      [np.zeros((0,), np.int64)])
  label_ids = hf_hub.map_labels(spec, source_ids, where)
  if test_size == "default":
    test_size = spec.test_size
  idx = hf_hub.split_indices(task, split, label_ids, train_per_class=train_per_class,
                             test_per_class=test_per_class, test_size=test_size,
                             per_class=per_class, max_examples=max_examples, seed=seed)
  keep = set(idx.tolist())
  fmt = hf_hub.FORMATTERS[task.name]
  examples = []
  for i, row in enumerate(tfds.as_numpy(ds)):
    if i not in keep:
      continue
    fields = {k: _decode(v, where, i, k) for k, v in row.items() if not isinstance(v, dict)}
    examples.append(make_example(task, fmt(fields), int(label_ids[i])))
  return examples
