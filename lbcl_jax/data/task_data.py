"""A run's task data: every task's train and test split, loaded and tokenised up front.

`DataConfig` is the run config's data fields, typed once; `load_task_data` reads every split
before training starts, so bad data fails before any work is done.

A validation split (`validation_examples` > 0) is carved from each task's train split with a
fixed seed, the same whatever the run's seed: runs that choose hyper-parameters on it and the
runs they choose for train on the same examples, and no validation example is ever trained on
or drawn from the test split. For the local source the carving comes first and the per-class
training sample is drawn from the rest; the other sources sample their own training split
(their protocol sizes), and the validation rows come out of that sample.

A local file's invalid rows (`DataConfig.invalid_rows`) stop the run by default; skipped, they
are counted per split in `TaskData.skipped_rows`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

from lbcl_jax import tasks as tasks_lib
from lbcl_jax.data import Example
from lbcl_jax.data import InvalidRowError
from lbcl_jax.data import load_split_counted
from lbcl_jax.data import sample_examples
from lbcl_jax.data import sample_indices
from lbcl_jax.data import pipeline
from lbcl_jax.errors import InputError


# What `config.data.invalid_rows` may be (config_lib validates the run config with it).
INVALID_ROWS = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the tasks come from and how much of them a run uses.

  Attributes:
    source: "synthetic", "local", "hf" or "tfds" (see `lbcl_jax.data`).
    data_dir: the CL_Benchmark directory of the local source.
    train_per_class: training examples per class (0: the source's default).
    max_test_examples: test examples per task (0: the whole split).
    seed: the run's seed (sampling).
    train_padding: "task" (every batch of a task padded to one length) or "batch".
    validation_examples: validation examples per task carved from the train split (0: none).
    invalid_rows: what a row the source cannot use does (a label outside labels.json, such as
      MNLI's test rows labelled "-", an empty sentence, a missing key). "error": the run stops
      with one line naming the file, the row and this option. "skip": the local source drops
      the row before any sampling (so the sample is the one a file without it gives) and counts
      it in `TaskData.skipped_rows`. The other sources ignore the option: the synthetic suite
      has no invalid rows, and "hf"/"tfds" always raise on one (a label outside the task's
      mapping, such as GLUE's -1 test labels, or an empty sentence), since their benchmark
      splits hold none and skipping would change their protocol's sample.
  """

  source: str
  data_dir: str = ""
  train_per_class: int = 0
  max_test_examples: int = 0
  seed: int = 0
  train_padding: str = "task"
  validation_examples: int = 0
  invalid_rows: str = "error"

  def __post_init__(self):
    if self.invalid_rows not in INVALID_ROWS:
      raise InputError(f"invalid_rows={self.invalid_rows!r}: expected one of {INVALID_ROWS}")

  @classmethod
  def from_config(cls, config) -> "DataConfig":
    d = config.data
    return cls(source=d.source, data_dir=d.data_dir, train_per_class=d.train_per_class,
               max_test_examples=d.max_test_examples, seed=config.seed,
               train_padding=d.train_padding, validation_examples=d.validation_examples,
               # Configs saved before the field existed load with the old behaviour.
               invalid_rows=d.get("invalid_rows", "error"))

  def source_options(self, split: str) -> dict[str, Any]:
    """`load_split`'s options for `split`."""
    opts: dict[str, Any] = {"seed": self.seed}
    if self.source == "local":
      opts["root"] = os.path.expanduser(self.data_dir)
      opts["skip_invalid"] = self.invalid_rows == "skip"
      # With a validation split the per-class sample is drawn after it is carved out.
      if split == "train" and self.train_per_class and not self.validation_examples:
        opts["per_class"] = self.train_per_class
    elif self.train_per_class:
      opts["train_per_class"] = self.train_per_class
    if split == "test" and self.max_test_examples:
      opts["max_examples"] = self.max_test_examples
    return opts


@dataclasses.dataclass
class TaskData:
  """One task's examples and tokenised splits.

  Attributes:
    train_examples: the training examples (after any validation carving and sampling).
    train, test, validation: the tokenised splits (validation None without one).
    skipped_rows: {"train": n, "test": n}, both keys always present: the rows of each split's
      file dropped as invalid (`DataConfig.invalid_rows="skip"`), counted before sampling, so
      the count is the file's, whatever the sample size. The validation rows come out of the
      train file: its skipped rows are in "train". All 0 with "error" and for sources that do
      not skip.
  """

  train_examples: list[Example]
  train: pipeline.BatchSource
  test: pipeline.BatchSource
  validation: pipeline.BatchSource | None = None
  skipped_rows: dict[str, int] = dataclasses.field(default_factory=dict)

  def split(self, name: str) -> pipeline.BatchSource:
    """The evaluation split `name`: "test" or "validation"."""
    if name == "validation":
      if self.validation is None:
        raise ValueError("no validation split: set config.data.validation_examples > 0")
      return self.validation
    if name != "test":
      raise ValueError(f"unknown split {name!r}; expected 'test' or 'validation'")
    return self.test


Encoder = Callable[[Sequence[Example], tasks_lib.Task], pipeline.BatchSource]


def load_task_data(config: DataConfig, names: Sequence[str],
                   encode: Encoder) -> dict[str, TaskData]:
  """Loads and tokenises (with `encode`, the backbone's) every task's train and test split."""
  out = {}
  for name in names:
    task = tasks_lib.get_task(name)
    train, skipped_train = _load(config, task, "train")
    validation = None
    if config.validation_examples:
      train, validation = carve_validation(train, config.validation_examples)
      if config.source == "local" and config.train_per_class:
        train = sample_examples(train, per_class=config.train_per_class, seed=config.seed)
    test, skipped_test = _load(config, task, "test")
    out[name] = TaskData(train_examples=train, train=encode(train, task), test=encode(test, task),
                         validation=None if validation is None else encode(validation, task),
                         skipped_rows={"train": skipped_train, "test": skipped_test})
  return out


def _load(config: DataConfig, task: tasks_lib.Task, split: str) -> tuple[list[Example], int]:
  """One split and its count of skipped rows; a bad row's error names the option that skips it.

  The hint is added here, not by the reader: `lbcl_jax.data.local` is also used without a run
  config, where the option is its `skip_invalid` argument.
  """
  try:
    return load_split_counted(task, split, config.source, **config.source_options(split))
  except InvalidRowError as e:
    raise InvalidRowError(f"{e}; --config.data.invalid_rows=skip skips such rows (each one "
                          "counted in results.json)") from None


# The validation split's own seed: fixed, so every run seed validates on the same examples.
VALIDATION_SEED = 0x7A11D


def carve_validation(train: Sequence[Example], n: int) -> tuple[list[Example], list[Example]]:
  """(the rest, `n` validation examples) of a train split, drawn with `VALIDATION_SEED`.

  Raises:
    InputError: when the split has no more than `n` examples (nothing would be left to train).
  """
  if len(train) <= n:
    task = train[0].task if train else "?"
    raise InputError(f"config.data.validation_examples={n}: task {task!r} has only "
                     f"{len(train)} training examples")
  chosen = set(sample_indices([e.label_index for e in train], max_examples=n,
                              seed=VALIDATION_SEED).tolist())
  rest = [e for i, e in enumerate(train) if i not in chosen]
  return rest, [train[i] for i in sorted(chosen)]


def train_stream(data: dict[str, TaskData], names: Sequence[str], batch_size: int, seed: int,
                 *, train_padding: str = "task"):
  """The training batches of a stage: one task's stream, or a mixture of several (MTL)."""
  pad = train_padding == "task"
  streams = [pipeline.TrainStream(data[n].train, batch_size, seed + 7919 * i, pad_to_longest=pad)
             for i, n in enumerate(names)]
  return streams[0] if len(streams) == 1 else pipeline.MixedStream(streams, seed)
