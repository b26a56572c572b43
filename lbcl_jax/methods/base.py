"""The method interface: what a continual-learning method decides, as hooks the driver calls.

A method is a frozen dataclass (hashable, so it can be a static argument of `jax.jit`). The
driver (`lbcl_jax.train`) runs, once: `method = method.resolve(backbone, paths)`; then for every
stage the method asks for:

  trainable, scores = method.trainable.start(method, params, fresh, old, probe, state)
                      # a new adapter: method.init_adapter(fresh(), old, probe, state)
  tx = build_optimizer(method, old, settings, state)              # gradient_transform inside
  batches = method.batches(data, tasks, batch_size, seed, train_padding, state)
  train: loss = backbone loss (+ method.regularizer(new, old, state))
  params, old = method.trainable.finish(trainable, params, old)   # old + the new adapter
  state = method.end_stage(state, trainable, old, probe)          # checkpointed with the run

What trains is the method's `trainable` (`NewAdapter` by default, `TrainedBase` for SeqFT,
`ContinuedAdapter` for SeqLoRA), so the driver never asks which kind of method it runs. What a
method may ask of the stage's data and model (seed-sample scores, a sample of the task's
examples, squared per-sample gradients, the adapted layers' input statistics) it asks of the
`Probe` the driver hands to `init_adapter` and `end_stage`. `Over` puts a method on top of
another (replay or EWC over any method): every hook is the inner method's plus its own.

The base class is the plainest adapter method: a new adapter per task, old ones frozen and
folded into the base, no injection, no constraint, no state. Subclasses override only what
differs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, ClassVar, Optional, Protocol, Sequence, Union

import jax
import numpy as np
import optax

from lbcl_jax import adapters
from lbcl_jax.data import task_data

PyTree = Any
ScalarOrSchedule = Union[float, optax.Schedule]


class Probe(Protocol):
  """What a method may ask of a stage's data and model. The driver gives one to
  `Method.init_adapter` (about the stage to come, the model before it) and to
  `Method.end_stage` (about the stage just trained). Every draw is a pure function of the run's
  seed, the stage and the caller's `salt`, so a resumed run asks and gets the same.

  Under `jax.eval_shape` (the driver traces `end_stage` to know a checkpointed state's shapes)
  the array arguments are abstract: answers built from them are traced, host draws are not.
  """

  tasks: Sequence[str]       # the stage's tasks
  run_tasks: Sequence[str]   # every task of the run, in order
  # The most adapters the frozen stack holds in the run (0: not known). A method that compiles
  # a program over the old stack pads the stack to it (`adapters.pad_tasks`), so that the
  # program compiles once a run instead of once a stage.
  old_capacity: int

  def score_old(self, num_seed_samples: int, aggregation: str = "mean"
                ) -> Mapping[str, jax.Array]:
    """{layer: [K, r]} scores of the old triplets on seed samples of the stage's task
    (`sensitivity.score_old_triplets`)."""

  def sample(self, n: int, salt: int) -> np.ndarray:
    """Indices of `n` training examples of the stage's (first) task (all of them if it has
    fewer), stratified over labels (`pipeline.seed_samples`' draw)."""

  def squared_grads(self, trained: PyTree, n: int, salt: int = 0) -> PyTree:
    """The mean over `n` training samples (at most) of the stage's task of the per-sample squared
    gradient of the backbone's loss with respect to `trained` (the stage's trainable tree, in
    the model the stage trained): the empirical diagonal Fisher."""

  def input_grams(self, stack: Optional[PyTree], n: int, salt: int = 0
                  ) -> Mapping[str, jax.Array]:
    """{adapted layer path: [d_in, d_in]} the sum over the tokens of `n` training samples of the
    stage's task of `x x^T`, `x` the layer's input, in the base with `stack` merged in."""


@dataclasses.dataclass(frozen=True)
class MethodSettings:
  """The run config's method-related fields, typed (methods never see the ConfigDict).

  Each method reads the fields it uses in `Method.configured`.
  """

  inject_sigma: bool = False
  # 'all' | int n (top n by score) | injection.TopBlocks(n) | regex | tuple of paths.
  inject_layers: Any = "all"
  num_seed_samples: int = 8
  score_aggregation: str = "mean"
  olora_lambda1: float = 0.5
  olora_lambda2: float = 0.0
  projection_rtol: float = 1e-6
  # AdaLoRA's orthogonality regulariser on the new SVD adapter (None: the method's default).
  orth_reg_weight: Optional[float] = None
  # Replay (`methods.replay`): the method underneath, memory examples per task, batch share.
  replay_over: str = "seqft"
  replay_per_task: int = 16
  replay_share: float = 0.25
  # EWC (`methods.ewc`): the method underneath, lambda, Fisher samples per task.
  ewc_over: str = "seqft"
  ewc_weight: float = 1e3
  ewc_samples: int = 64
  # InfLoRA (`methods.inflora`): samples whose layer inputs make the subspaces; GPM's threshold.
  inflora_samples: int = 32
  inflora_threshold: float = 0.95


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """AdamW and where the method's gradient transform goes."""

  learning_rate: ScalarOrSchedule = 1e-3
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  max_grad_norm: Optional[float] = None
  # Apply the method's transform to Adam's update instead of the gradient.
  transform_after_adam: bool = False


@dataclasses.dataclass(frozen=True)
class NewAdapter:
  """What a stage trains: a new adapter on the frozen base (every method but SeqFT).

  The driver asks the method's trainable, never the method's kind, how a stage starts, how the
  trainable joins the model, and what a finished stage leaves; a method training something
  else provides another one (`TrainedBase`).
  """

  # The optimizer labels leaves 'train' / 'frozen' (`param_labels`) and zeroes frozen ones.
  masks_frozen: ClassVar[bool] = True
  # The stage trains on the base with every old adapter merged in (False: on the base alone).
  merges_old: ClassVar[bool] = True

  def num_old(self, num_stages: int) -> int:
    """How many adapters the frozen stack holds after `num_stages` stages."""
    return num_stages

  def adapter(self, config: adapters.AdapterConfig) -> Optional[adapters.AdapterConfig]:
    """The adapters the base carries for this trainable (None: none)."""
    return config

  def start(self, method: "Method", params: PyTree, fresh: Callable[[], PyTree],
            old: Optional[PyTree], probe: Probe, state: Optional[PyTree] = None
            ) -> tuple[PyTree, Optional[Mapping[str, jax.Array]]]:
    """The stage's trainable tree before training, and the old triplets' scores if used.

    Args:
      method: the method (its `init_adapter`).
      params: the base the adapters apply to.
      fresh: makes a freshly initialised adapter (called only when one is needed).
      old: the stacked frozen adapters of finished stages (None before the first).
      probe: the stage's data and model, as the method may ask of them.
      state: the method's state (`Method.end_stage`'s; None before the first stage ends).
    """
    del params
    return method.init_adapter(fresh(), old, probe, state)

  def model(self, trainable: PyTree, base_eff: PyTree) -> tuple[PyTree, Optional[PyTree]]:
    """(the params the backbone runs on, a stack of adapters to add to them, or None)."""
    return base_eff, jax.tree.map(lambda x: x[None], trainable)

  def finish(self, trainable: PyTree, params: PyTree,
             old: Optional[PyTree]) -> tuple[PyTree, Optional[PyTree]]:
    """(params, old) after a stage: the trained adapter joins the frozen stack."""
    return params, adapters.append_task({"old": old or {}, "new": trainable})["old"]

  def like(self, params: PyTree, adapter: Callable[[], PyTree]) -> PyTree:
    """The trainable's abstract shapes (what a checkpoint restores it onto), given the base's
    (`params`) and a maker of one adapter's (`adapter`)."""
    del params
    return adapter()


@dataclasses.dataclass(frozen=True)
class TrainedBase(NewAdapter):
  """What a stage trains: every weight of the base itself (SeqFT); no adapters."""

  masks_frozen: ClassVar[bool] = False

  def adapter(self, config: adapters.AdapterConfig) -> Optional[adapters.AdapterConfig]:
    del config
    return None

  def num_old(self, num_stages):
    del num_stages
    return 0

  def start(self, method, params, fresh, old, probe, state=None):
    del method, fresh, old, probe, state
    return params, None

  def model(self, trainable, base_eff):
    del base_eff
    return trainable, None

  def finish(self, trainable, params, old):
    del params
    return trainable, old

  def like(self, params, adapter):
    del adapter
    return params


@dataclasses.dataclass(frozen=True)
class ContinuedAdapter(NewAdapter):
  """What a stage trains: one adapter carried through every stage (SeqLoRA). The first stage
  starts it as the method initialises a new adapter, each later one from where the last left
  it; the frozen stack holds just it, and a stage trains on the base alone (the adapter is the
  trainable, not a frozen part of the model)."""

  merges_old: ClassVar[bool] = False

  def num_old(self, num_stages):
    return min(num_stages, 1)

  def start(self, method, params, fresh, old, probe, state=None):
    if old is None:
      return super().start(method, params, fresh, old, probe, state)
    return jax.tree.map(lambda x: x[-1], old), None

  def finish(self, trainable, params, old):
    del old
    return params, jax.tree.map(lambda x: x[None], trainable)


NEW_ADAPTER = NewAdapter()
TRAINED_BASE = TrainedBase()
CONTINUED_ADAPTER = ContinuedAdapter()


@dataclasses.dataclass(frozen=True)
class Method:
  """A new adapter per task, old ones frozen; subclasses override the hooks that differ.

  Attributes:
    name: registry name.
    description: one line for logs.
    adapter_init: the new adapter's parametrisation, 'adalora' (SVD form, sigma = 0) or
      'lora' (U = 0, sigma = 1), see `lbcl_jax.adapters.init_layer`.
    train_sigma: sigma trains (False freezes it at its initial value: LoRA's `B A`).
    lora_alpha: the adapters' scaling is `lora_alpha / r` unless the run sets one (None:
      scaling 1, AdaLoRA's choice for SVD adapters).
    adapter_dropout: dropout on the adapter path's input while training unless the run sets
      one (PEFT's `lora_dropout`).
  """

  name: str = ""
  description: str = ""
  adapter_init: str = "adalora"
  train_sigma: bool = True
  lora_alpha: Optional[float] = None
  adapter_dropout: float = 0.0

  def __post_init__(self):
    if self.adapter_init not in adapters.INITS:
      raise ValueError(f"adapter_init must be one of {adapters.INITS}, got {self.adapter_init!r}")

  def scaling(self, rank: int) -> float:
    """The adapters' default output multiplier at rank `rank`."""
    return 1.0 if self.lora_alpha is None else float(self.lora_alpha) / rank

  # -- hooks --------------------------------------------------------------------------------

  @property
  def trainable(self) -> NewAdapter:
    """What the method's stages train (default: a new adapter per stage)."""
    return NEW_ADAPTER

  @property
  def trains_base(self) -> bool:
    """Whether the base model's weights train (then there are no adapters)."""
    return isinstance(self.trainable, TrainedBase)

  def resolve(self, backbone: Any, paths: Sequence[str]) -> "Method":
    """This method with its settings that depend on the model resolved (default: none).

    Args:
      backbone: the run's backbone (e.g. its `block_pattern`, to count blocks by depth).
      paths: the adapted layers' module paths.
    """
    del backbone, paths
    return self

  def stages(self, tasks: Sequence[str]) -> list[list[str]]:
    """The training stages: the tasks each trains on, in order (default: one per task)."""
    return [[t] for t in tasks]

  @property
  def frozen_factors(self) -> tuple[str, ...]:
    """The adapter factors ('U', 'sigma', 'V') the optimizer leaves at their initial value."""
    return () if self.train_sigma else ("sigma",)

  def init_adapter(self, fresh: PyTree, old: Optional[PyTree], probe: Probe,
                   state: Optional[PyTree] = None
                   ) -> tuple[PyTree, Optional[Mapping[str, jax.Array]]]:
    """The new task's adapter before training, and the old triplets' scores if it used them.

    Args:
      fresh: a freshly initialised adapter (`adapter_init`).
      old: the stacked frozen adapters of finished tasks (None before the first).
      probe: the new stage's data and model (e.g. `probe.score_old`, scores of the old
        triplets on the new task's seed samples).
      state: the method's state (`end_stage`'s; None before the first stage ends).
    """
    del old, probe, state
    return fresh, None

  def batches(self, data: Mapping[str, Any], tasks: Sequence[str], batch_size: int, seed: int,
              train_padding: str = "task", state: Optional[PyTree] = None) -> Any:
    """The stage's training batches: an object with `batch(step)` (a pure function of the
    step) and `num_steps_per_epoch` (default: the stage's tasks' own stream,
    `task_data.train_stream`).

    Args:
      data: every task's `task_data.TaskData`, in the run's order.
      tasks: the stage's tasks.
      batch_size: rows per step (the micro-batch, over every process).
      seed: the stage's data seed.
      train_padding: "task" or "batch" (`config.data.train_padding`).
      state: the method's state.
    """
    del state
    return task_data.train_stream(data, tasks, batch_size, seed, train_padding=train_padding)

  def regularizer(self, new: PyTree, old: Optional[PyTree],
                  state: Optional[PyTree] = None) -> Optional[jax.Array]:
    """A term added to the training loss (None: nothing is added).

    Args:
      new: the stage's trainable tree.
      old: the stacked frozen adapters of finished stages (None before the first). The driver
        pads the stack with zero adapters to the run's most old tasks, so that the train
        step sees one shape a run: a zero adapter must add nothing to the term.
      state: the method's state (`end_stage`'s, traced; None before the first stage ends).
    """
    del new, old, state
    return None

  def gradient_transform(self, old: Optional[PyTree], state: Optional[PyTree] = None
                         ) -> Optional[optax.GradientTransformation]:
    """A transform of the new adapter's gradients before AdamW (None: none).

    The driver hands `old` padded with zero adapters to the run's most old tasks (as it does
    `regularizer`), so that what it builds can have one shape a run."""
    del old, state
    return None

  @property
  def transform_in_state(self) -> bool:
    """True when `gradient_transform`'s `update` does the same thing every stage and reads
    what differs between stages (the old tasks' bases) from its optimizer state, whose shapes
    do not change over a run. The driver then keeps the first stage's update, and the train
    step compiled for it, for the whole run, instead of compiling a step a stage."""
    return False

  def end_stage(self, state: Optional[PyTree], trained: PyTree, old: Optional[PyTree],
                probe: Optional[Probe] = None) -> Optional[PyTree]:
    """The method's state after a stage: what later stages need from the finished ones (EWC's
    Fisher, a replay memory, GPM's bases). The driver checkpoints it with the run and restores
    it on resume, and hands it to `regularizer` and `gradient_transform`.

    It must be a pure function of its arrays (the driver traces it with `jax.eval_shape` to
    know what to restore a checkpointed state onto), returning a pytree of arrays or None.

    Args:
      state: the state after the previous stage (None after none).
      trained: the finished stage's trained tree (its adapter, or the trained base).
      old: the frozen adapters after the stage (its adapter included; None if there are none).
      probe: the finished stage's data and model (a stage's training examples, squared
        gradients, layer inputs).

    Returns:
      The new state (default: None, a method without state).
    """
    del state, trained, old, probe
    return None

  def configured(self, settings: MethodSettings) -> "Method":
    """This method with the run's settings applied (default: it reads none)."""
    del settings
    return self


@dataclasses.dataclass(frozen=True)
class Over(Method):
  """A method on top of another (`inner`): replay or EWC over any method. Every hook is the
  inner method's; a subclass overrides what it adds and calls the inner hook inside. The
  state is `{'inner': the inner method's, 'own': this one's}` (absent parts left out).

  `over(inner)` is how the registry composes one (`config.<name>.over` names the inner); until
  then `inner` is None and the method cannot run.

  Attributes:
    inner_name: the registry name of the method underneath.
    inner: that method, configured.
  """

  inner_name: str = "seqft"
  inner: Optional[Method] = None

  def over(self, inner: Method) -> "Over":
    """This method on top of `inner`, with the inner method's adapter settings."""
    return dataclasses.replace(
        self, inner=inner, adapter_init=inner.adapter_init, train_sigma=inner.train_sigma,
        lora_alpha=inner.lora_alpha, adapter_dropout=inner.adapter_dropout)

  @property
  def _in(self) -> Method:
    if self.inner is None:
      raise ValueError(f"method {self.name!r} has no method underneath: compose it with "
                       f"`over` (methods.get_method does)")
    return self.inner

  @staticmethod
  def own(state: Optional[PyTree]) -> Optional[PyTree]:
    return None if state is None else state.get("own")

  @staticmethod
  def inner_state(state: Optional[PyTree]) -> Optional[PyTree]:
    return None if state is None else state.get("inner")

  @staticmethod
  def joined(inner_state: Optional[PyTree], own: Optional[PyTree]) -> Optional[PyTree]:
    parts = {k: v for k, v in (("inner", inner_state), ("own", own)) if v is not None}
    return parts or None

  @property
  def trainable(self) -> NewAdapter:
    return self._in.trainable

  @property
  def frozen_factors(self) -> tuple[str, ...]:
    return self._in.frozen_factors

  def resolve(self, backbone, paths):
    return dataclasses.replace(self, inner=self._in.resolve(backbone, paths))

  def stages(self, tasks):
    return self._in.stages(tasks)

  def init_adapter(self, fresh, old, probe, state=None):
    return self._in.init_adapter(fresh, old, probe, self.inner_state(state))

  def batches(self, data, tasks, batch_size, seed, train_padding="task", state=None):
    return self._in.batches(data, tasks, batch_size, seed, train_padding, self.inner_state(state))

  def regularizer(self, new, old, state=None):
    return self._in.regularizer(new, old, self.inner_state(state))

  def gradient_transform(self, old, state=None):
    return self._in.gradient_transform(old, self.inner_state(state))

  @property
  def transform_in_state(self) -> bool:
    return self._in.transform_in_state

  def end_stage(self, state, trained, old, probe=None):
    return self.joined(self._in.end_stage(self.inner_state(state), trained, old, probe),
                       self.own(state))


def add_penalties(*terms: Optional[jax.Array]) -> Optional[jax.Array]:
  """The sum of the terms that are not None (None if all are)."""
  present = [t for t in terms if t is not None]
  return sum(present[1:], present[0]) if present else None


# ---------------------------------------------------------------------------------------------
# The optimizer every method trains with.


def param_labels(method: Method, params: PyTree) -> PyTree:
  """'train' / 'frozen' per leaf: old adapters and the method's `frozen_factors` (sigma of
  LoRA-style methods, InfLoRA's V too) are frozen.

  Args:
    method: the method.
    params: what the optimizer sees: a 'new' tree, a full adapter state `{'old', 'new'}`, or
      base params (a method training the base: every leaf trains).

  Returns:
    A pytree of strings with the structure of `params`.
  """
  full = adapters.is_full_state(params)
  frozen = () if not method.trainable.masks_frozen else method.frozen_factors

  def label(path, _):
    keys = [adapters.key_name(e) for e in path]
    if full and keys and keys[0] == "old":
      return "frozen"
    if keys and keys[-1] in frozen:
      return "frozen"
    return "train"

  return jax.tree_util.tree_map_with_path(label, params)


# `build_optimizer`'s default `transform`: the method's, built from `old` and `state`.
FROM_METHOD = object()


def build_optimizer(method: Method, old: Optional[PyTree] = None,
                    settings: OptimizerSettings = OptimizerSettings(),
                    state: Optional[PyTree] = None, *,
                    transform: Any = FROM_METHOD) -> optax.GradientTransformation:
  """The optimizer of one stage of `method`.

  `[method.gradient_transform(old)] -> [clip_by_global_norm] -> adamw` (the transform after
  Adam with `settings.transform_after_adam`), wrapped so that frozen leaves (old adapters in a
  full state, sigma of LoRA-style methods) get exactly zero updates and no Adam moments. It
  accepts any params tree: base params, the 'new' tree, or the full `{'old', 'new'}` state.
  `state` is the method's (`Method.end_stage`). `transform`: the method's gradient transform
  when the caller already built it from `old` and `state` (None: it has none); by default it is
  built here.
  """
  s = settings
  adam = optax.adamw(s.learning_rate, b1=s.b1, b2=s.b2, eps=s.eps, weight_decay=s.weight_decay)
  clip = [optax.clip_by_global_norm(s.max_grad_norm)] if s.max_grad_norm else []
  if transform is FROM_METHOD:
    transform = method.gradient_transform(old or None, state)
  extra = [transform] if transform is not None else []
  if s.transform_after_adam:
    inner = optax.chain(*clip, adam, *extra)
  else:
    inner = optax.chain(*extra, *clip, adam)
  if not method.trainable.masks_frozen:
    return inner
  return optax.multi_transform(
      {"train": inner, "frozen": optax.set_to_zero()},
      lambda params: param_labels(method, params),
  )
