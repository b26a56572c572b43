"""The run's state between steps: `Progress` (host values, checkpointed as JSON) and
`LoopState` (everything else the stage loop carries, as one value)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax


@dataclasses.dataclass
class Progress:
  """Where a run is: checkpointed as JSON with the arrays, so a resumed run carries on.

  Attributes:
    stage: the stage being trained (or about to start).
    step: the step within the stage.
    global_step: steps over the whole run.
    phase: "stage_start" (the stage's adapter and optimizer are still to be made) or "train".
    accuracy_matrix: one row per finished stage, in the run's label space.
    label_space_matrices: the same in each further label space measured (`eval.extra_label_spaces`).
    losses: stage name -> [[global step, loss], ...] at the logging interval.
    sensitivity: stage name -> {layer: [K][r] scores of the old triplets}, for methods that
      score them.
    train_seconds: seconds spent in training steps, over every invocation.
    warnings: what the run found wrong but did not stop for (a collapsed task's loss), as
      printed in its `warning:` lines.
    stages: the stage names.
    rng_key: the run's PRNG key data (checked on resume).
    stage_costs: stage name -> what the stage cost: `old_tasks` (tasks trained before it),
      `begin_seconds` and `end_seconds` (its set-up and end, which hold the method's own
      passes: injection scoring, a Fisher, layer inputs), `train_seconds`, `step_seconds` (a
      training step after the first, which compiles) at `batch_shape` (the padded input ids'),
      `eval_seconds` (of `evaluated_tasks` tasks), `checkpoint_seconds`, `peak_rss_bytes`
      (the process's, over the stage: from where an invocation resumed it),
      `trainable_bytes`, `method_state_bytes` (after it).
  """

  stage: int = 0
  step: int = 0
  global_step: int = 0
  phase: str = "stage_start"
  accuracy_matrix: list = dataclasses.field(default_factory=list)
  label_space_matrices: dict = dataclasses.field(default_factory=dict)
  losses: dict = dataclasses.field(default_factory=dict)
  sensitivity: dict = dataclasses.field(default_factory=dict)
  warnings: list = dataclasses.field(default_factory=list)
  train_seconds: float = 0.0
  stages: list = dataclasses.field(default_factory=list)
  rng_key: list = dataclasses.field(default_factory=list)
  stage_costs: dict = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "Progress":
    return cls(**d)


@dataclasses.dataclass
class LoopState:
  """Everything the stage loop carries from one step to the next, as one value (as flax's
  `TrainState`): the stage functions (`stage.Stage.begin`, `train.train_stage`,
  `stage.Stage.end`, `stage.Stage.restore`) take it and return it, and a checkpoint holds all
  of it but `base_eff` (recomputed from `params` and `old`).

  Attributes:
    progress: where the run is (stage; step, the data position within it; phase) and what it
      has measured so far.
    key: the run's PRNG key; every draw is a pure function of it, the stage and the step.
    params: the base the adapters apply to: the pre-trained weights, or as a method that trains
      the base left them after the last finished stage.
    old: the frozen adapters of finished stages, stacked (None before the first).
    base_eff: `params` with every old adapter merged in, what the stage's forward pass starts
      from (None: still to be computed).
    trainable: what the stage's optimizer updates (the method's `trainable`; None between
      stages).
    optimizer: the stage's optimizer (None between stages).
    opt_state: its state (None between stages).
    method_state: what the method keeps from finished stages (`Method.end_stage`; None: none).
  """

  progress: Progress
  key: jax.Array
  params: Any
  old: Any = None
  base_eff: Any = None
  trainable: Any = None
  optimizer: Any = None
  opt_state: Any = None
  method_state: Any = None

  @property
  def stage_key(self) -> jax.Array:
    """The key of the stage being trained: its adapter's init, seed samples, data order and
    step draws are all folded from it."""
    return jax.random.fold_in(self.key, self.progress.stage)

  def replace(self, **changes) -> "LoopState":
    return dataclasses.replace(self, **changes)
