"""Experience replay over any method: a small memory of every finished task's examples, mixed
into each training batch of the later tasks.

After each task, `per_task` of its training examples (stratified over labels, drawn from the
run's seed) join the memory, which is the method's state: their task's position in the run and
their indices into its training examples, `{'task': int32[K], 'index': int32[K, per_task]}`, so
it is checkpointed, and restored, with the run. Every later batch of B rows holds
`k = round(share * B)` memory rows and B - k rows of the new task: the new task's own stream at
B - k rows a step (so an epoch still visits each of its examples once, in more steps), and memory
rows drawn uniformly, with replacement, from the step's key: `batch(step)` stays a pure function
of (seed, step), and a resumed run draws the same batches.

The rows of a batch share one shape: both parts are collated at the larger of their lengths,
the memory's fixed for the stage (its longest example), so one stage compiles one step. Rows of
different tasks in one batch need a batch layout without per-task arrays: generative backbones
(T5, decoders), not the encoders' label-name scoring (whose batch carries one task's options).

Replay is `Over` a method (`config.replay.over`): with SeqFT, the O-LoRA paper's "Replay"
baseline (the whole model fine-tuned with a memory); with LB-CL or a LoRA, replay on top of the
adapters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from lbcl_jax.data import pipeline
from lbcl_jax.errors import InputError
from lbcl_jax.methods.base import MethodSettings, Over

PyTree = Any

# The probe's draw of a finished task's memory examples.
MEMORY_SALT = 0x4E9


class ReplayStream:
  """Training batches of one task with `num_old` rows of each drawn from a memory.

  Args:
    new: the new task's stream (`pipeline.TrainStream`), at `batch_size - num_old` rows.
    memory: (task data, example index) per memory example.
    num_old: memory rows per batch.
    seed: the seed of the memory draws.
    process_index, process_count: this process and how many (default: JAX's).

  Attributes:
    num_steps_per_epoch: the new task's.
    global_batch_size: rows per step over every process.
  """

  def __init__(self, new: pipeline.TrainStream, memory: Sequence[tuple[Any, int]],
               num_old: int, seed: int, *, process_index: int | None = None,
               process_count: int | None = None):
    if not memory:
      raise ValueError("a replay stream needs a memory")
    self.new, self.memory, self.num_old, self.seed = new, list(memory), int(num_old), int(seed)
    self.global_batch_size = new.global_batch_size + self.num_old
    self.num_steps_per_epoch = new.num_steps_per_epoch
    index, count = pipeline._process(process_index, process_count)  # pylint: disable=protected-access
    self._rows = pipeline._local_rows(self.global_batch_size, index, count)  # pylint: disable=protected-access
    self.local_batch_size = self.global_batch_size // count
    new_len = new.data.lengths(np.arange(len(new.data)))
    by_source: dict[int, tuple[Any, list[int]]] = {}
    for data, i in self.memory:
      by_source.setdefault(id(data), (data, []))[1].append(i)
    old_len = [data.lengths(np.asarray(idx)) for data, idx in by_source.values()]
    # One shape for the stage: every batch padded to the longest example either part has.
    self.lengths = tuple(max(parts) for parts in zip(new_len, *old_len))

  def memory_rows(self, step: int) -> np.ndarray:
    """Which memory examples fill the old rows of global step `step`."""
    rng = np.random.default_rng([self.seed, int(step), 0x4E9])
    return rng.integers(0, len(self.memory), size=self.num_old)

  def sources(self, step: int) -> list[tuple[Any, int]]:
    """(data, index) of every row of global step `step` (the new task's first, then the
    memory's), fewer than the batch at the new task's epoch end."""
    new = [(self.new.data, int(i)) for i in self.new.global_indices(step)]
    return new + [self.memory[int(j)] for j in self.memory_rows(step)]

  def batch(self, step: int) -> dict:
    """This process's rows of global step `step`."""
    rows = self.sources(step)
    rows += [None] * (self.global_batch_size - len(rows))
    local = [r for r in rows[self._rows] if r is not None]
    parts, order = [], []
    for data in dict.fromkeys(id(d) for d, _ in local):
      picked = [(d, i) for d, i in local if id(d) == data]
      parts.append(picked[0][0].collate(np.asarray([i for _, i in picked]), len(picked),
                                        self.lengths))
      order.append(len(picked))
    pad = self.local_batch_size - len(local)
    if pad:  # the epoch's last batch: rows of weight 0, as `TrainStream` pads
      parts.append(self.new.data.collate(np.zeros((0,), np.int64), pad, self.lengths))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def __call__(self, step: int) -> dict:
    return self.batch(step)


@dataclasses.dataclass(frozen=True)
class Replay(Over):
  """`inner` trained with a replay memory (see the module docstring).

  Attributes:
    per_task: examples of each finished task the memory keeps.
    share: the fraction of every batch's rows drawn from the memory.
  """

  name: str = "replay"
  description: str = "experience replay: a memory of each finished task mixed into later batches"
  per_task: int = 16
  share: float = 0.25

  def num_old(self, batch_size: int) -> int:
    """Memory rows in a batch of `batch_size`: round(share * batch_size), at least one and
    leaving at least one row of the new task."""
    k = int(round(self.share * batch_size))
    if not 0 < self.share < 1 or not 1 <= k < batch_size:
      raise InputError(f"config.replay.share={self.share:g}: a batch of {batch_size} rows "
                       f"would hold {k} memory rows; it needs between 1 and {batch_size - 1}")
    return k

  def resolve(self, backbone, paths):
    from lbcl_jax.backbones import generative  # pylint: disable=g-import-not-at-top
    if not isinstance(backbone, generative.GenerativeBackbone):
      raise InputError(f"config.method={self.name!r} mixes tasks in a batch, which needs a "
                       "generative backbone (T5 or a decoder): an encoder's label-name scoring "
                       "batch carries one task's options")
    return super().resolve(backbone, paths)

  def stages(self, tasks):
    stages = super().stages(tasks)
    if any(len(s) > 1 for s in stages):
      raise InputError(f"config.replay.over={self.inner_name!r} trains every task in one "
                       "stage: there is no finished task to replay")
    return stages

  def end_stage(self, state, trained, old, probe=None):
    inner = self._in.end_stage(self.inner_state(state), trained, old, probe)
    mine = self.own(state)
    task = jnp.asarray([probe.run_tasks.index(probe.tasks[0])], jnp.int32)
    picked = probe.sample(self.per_task, MEMORY_SALT)
    if len(picked) < self.per_task:
      raise InputError(f"config.replay.per_task={self.per_task}: task {probe.tasks[0]!r} has "
                       f"only {len(picked)} training examples")
    index = jnp.asarray(picked, jnp.int32)[None]
    if mine is not None:
      task = jnp.concatenate([mine["task"], task])
      index = jnp.concatenate([mine["index"], index])
    return self.joined(inner, {"task": task, "index": index})

  def batches(self, data: Mapping[str, Any], tasks, batch_size, seed, train_padding="task",
              state=None):
    mine = self.own(state)
    if mine is None:
      return super().batches(data, tasks, batch_size, seed, train_padding, state)
    k = self.num_old(batch_size)
    new = super().batches(data, tasks, batch_size - k, seed, train_padding, state)
    memory = [(data[task].train, i) for task, i in memory_examples(state, data)]
    return ReplayStream(new, memory, k, seed + 0x4E9)

  def configured(self, settings: MethodSettings) -> "Replay":
    return dataclasses.replace(self, inner_name=settings.replay_over,
                               per_task=settings.replay_per_task, share=settings.replay_share)

  def __post_init__(self):
    super().__post_init__()
    if self.per_task < 1:
      raise InputError(f"config.replay.per_task={self.per_task}: the memory needs at least "
                       "one example per task")


def memory_examples(state: Optional[PyTree], data: Mapping[str, Any]) -> list[tuple[str, int]]:
  """(task, example index) of every memory example of a `Replay` state."""
  mine = Replay.own(state)
  if mine is None:
    return []
  names = list(data)
  return [(names[int(t)], int(i)) for t, row in zip(_host(mine["task"]), _host(mine["index"]))
          for i in row]


def _host(x) -> np.ndarray:
  """A replicated state array's values on this host (every process holds a copy)."""
  shards = getattr(x, "addressable_shards", None)
  return np.asarray(shards[0].data if shards else x)

