"""A run's task data: every task's train and test split, loaded and tokenised up front.

`DataConfig` is the run config's data fields, typed once; `load_task_data` reads every split
before training starts, so bad data fails before any work is done.

A validation split (`validation_examples` > 0) is carved from each task's train split with a
fixed seed, the same whatever the run's seed: runs that choose hyper-parameters on it and the
runs they choose for train on the same examples, and no validation example is ever trained on
or drawn from the test split. For the local source the carving comes first and the per-class
training sample is drawn from the rest; the other sources sample their own training split
(their protocol sizes), and the validation rows come out of that sample.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

from lbcl_jax import tasks as tasks_lib
from lbcl_jax.data import Example
from lbcl_jax.data import load_split
from lbcl_jax.data import sample_examples
from lbcl_jax.data import sample_indices
from lbcl_jax.data import pipeline
from lbcl_jax.errors import InputError


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
  """

  source: str
  data_dir: str = ""
  train_per_class: int = 0
  max_test_examples: int = 0
  seed: int = 0
  train_padding: str = "task"
  validation_examples: int = 0

  @classmethod
  def from_config(cls, config) -> "DataConfig":
    d = config.data
    return cls(source=d.source, data_dir=d.data_dir, train_per_class=d.train_per_class,
               max_test_examples=d.max_test_examples, seed=config.seed,
               train_padding=d.train_padding, validation_examples=d.validation_examples)

  def source_options(self, split: str) -> dict[str, Any]:
    """`load_split`'s options for `split`."""
    opts: dict[str, Any] = {"seed": self.seed}
    if self.source == "local":
      opts["root"] = os.path.expanduser(self.data_dir)
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
  """One task's examples and tokenised splits."""

  train_examples: list[Example]
  train: pipeline.BatchSource
  test: pipeline.BatchSource
  validation: pipeline.BatchSource | None = None

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
    train = load_split(task, "train", config.source, **config.source_options("train"))
    validation = None
    if config.validation_examples:
      train, validation = carve_validation(train, config.validation_examples)
      if config.source == "local" and config.train_per_class:
        train = sample_examples(train, per_class=config.train_per_class, seed=config.seed)
    test = load_split(task, "test", config.source, **config.source_options("test"))
    out[name] = TaskData(train_examples=train, train=encode(train, task), test=encode(test, task),
                         validation=None if validation is None else encode(validation, task))
  return out


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
