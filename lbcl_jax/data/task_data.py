"""A run's task data: every task's train and test split, loaded and tokenised up front.

`DataConfig` is the run config's data fields, typed once; `load_task_data` reads every split
before training starts, so bad data fails before any work is done.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

from lbcl_jax import tasks as tasks_lib
from lbcl_jax.data import Example
from lbcl_jax.data import load_split
from lbcl_jax.data import pipeline


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
  """

  source: str
  data_dir: str = ""
  train_per_class: int = 0
  max_test_examples: int = 0
  seed: int = 0
  train_padding: str = "task"

  @classmethod
  def from_config(cls, config) -> "DataConfig":
    d = config.data
    return cls(source=d.source, data_dir=d.data_dir, train_per_class=d.train_per_class,
               max_test_examples=d.max_test_examples, seed=config.seed,
               train_padding=d.train_padding)

  def source_options(self, split: str) -> dict[str, Any]:
    """`load_split`'s options for `split`."""
    opts: dict[str, Any] = {"seed": self.seed}
    if self.source == "local":
      opts["root"] = os.path.expanduser(self.data_dir)
      if split == "train" and self.train_per_class:
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


Encoder = Callable[[Sequence[Example], tasks_lib.Task], pipeline.BatchSource]


def load_task_data(config: DataConfig, names: Sequence[str],
                   encode: Encoder) -> dict[str, TaskData]:
  """Loads and tokenises (with `encode`, the backbone's) every task's train and test split."""
  out = {}
  for name in names:
    task = tasks_lib.get_task(name)
    train = load_split(task, "train", config.source, **config.source_options("train"))
    test = load_split(task, "test", config.source, **config.source_options("test"))
    out[name] = TaskData(train_examples=train, train=encode(train, task), test=encode(test, task))
  return out


def train_stream(data: dict[str, TaskData], names: Sequence[str], batch_size: int, seed: int,
                 *, train_padding: str = "task"):
  """The training batches of a stage: one task's stream, or a mixture of several (MTL)."""
  pad = train_padding == "task"
  streams = [pipeline.TrainStream(data[n].train, batch_size, seed + 7919 * i, pad_to_longest=pad)
             for i, n in enumerate(names)]
  return streams[0] if len(streams) == 1 else pipeline.MixedStream(streams, seed)
