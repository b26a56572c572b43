"""The method interface: what a continual-learning method decides, as hooks the driver calls.

A method is a frozen dataclass (hashable, so it can be a static argument of `jax.jit`). The
driver (`lbcl_jax.train`) runs, once: `method = method.resolve(backbone, paths)`; then for every
stage the method asks for:

  trainable, scores = method.trainable.start(method, params, fresh, old, score_old)
                      # a new adapter: method.init_adapter(fresh(), old, score_old)
  tx = build_optimizer(method, old, settings, state)              # gradient_transform inside
  train: loss = backbone loss (+ method.regularizer(new, old, state))
  params, old = method.trainable.finish(trainable, params, old)   # old + the new adapter
  state = method.end_stage(state, trainable, old)                 # checkpointed with the run

What trains is the method's `trainable` (`NewAdapter` by default, `TrainedBase` for SeqFT), so
the driver never asks which kind of method it runs. The base class is the plainest adapter
method: a new adapter per task, old ones frozen and folded into the base, no injection, no
constraint, no state. Subclasses override only what differs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import jax
import optax

from lbcl_jax import adapters

PyTree = Any
ScalarOrSchedule = Union[float, optax.Schedule]
# score_old(num_seed_samples, aggregation="mean") -> {layer path: [K, r] triplet scores of the
# old adapters on seed samples of the new task, aggregated over the samples as
# `sensitivity.score_old_triplets`' `aggregation`}; given by the driver, which owns the data and
# the model.
ScoreFn = Callable[..., Mapping[str, jax.Array]]


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

  def adapter(self, config: adapters.AdapterConfig) -> Optional[adapters.AdapterConfig]:
    """The adapters the base carries for this trainable (None: none)."""
    return config

  def start(self, method: "Method", params: PyTree, fresh: Callable[[], PyTree],
            old: Optional[PyTree], score_old: ScoreFn
            ) -> tuple[PyTree, Optional[Mapping[str, jax.Array]]]:
    """The stage's trainable tree before training, and the old triplets' scores if used.

    Args:
      method: the method (its `init_adapter`).
      params: the base the adapters apply to.
      fresh: makes a freshly initialised adapter (called only when one is needed).
      old: the stacked frozen adapters of finished stages (None before the first).
      score_old: scores the old triplets on the new task's seed samples.
    """
    del params
    return method.init_adapter(fresh(), old, score_old)

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

  def start(self, method, params, fresh, old, score_old):
    del method, fresh, old, score_old
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


NEW_ADAPTER = NewAdapter()
TRAINED_BASE = TrainedBase()


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

  def init_adapter(self, fresh: PyTree, old: Optional[PyTree],
                   score_old: ScoreFn) -> tuple[PyTree, Optional[Mapping[str, jax.Array]]]:
    """The new task's adapter before training, and the old triplets' scores if it used them.

    Args:
      fresh: a freshly initialised adapter (`adapter_init`).
      old: the stacked frozen adapters of finished tasks (None before the first).
      score_old: scores the old triplets on the new task's seed samples.
    """
    del old, score_old
    return fresh, None

  def regularizer(self, new: PyTree, old: Optional[PyTree],
                  state: Optional[PyTree] = None) -> Optional[jax.Array]:
    """A term added to the training loss (None: nothing is added).

    Args:
      new: the stage's trainable tree.
      old: the stacked frozen adapters of finished stages (None before the first).
      state: the method's state (`end_stage`'s, traced; None before the first stage ends).
    """
    del new, old, state
    return None

  def gradient_transform(self, old: Optional[PyTree], state: Optional[PyTree] = None
                         ) -> Optional[optax.GradientTransformation]:
    """A transform of the new adapter's gradients before AdamW (None: none)."""
    del old, state
    return None

  def end_stage(self, state: Optional[PyTree], trained: PyTree,
                old: Optional[PyTree]) -> Optional[PyTree]:
    """The method's state after a stage: what later stages need from the finished ones (EWC's
    Fisher, a replay memory, GPM's bases). The driver checkpoints it with the run and restores
    it on resume, and hands it to `regularizer` and `gradient_transform`.

    It must be a pure function of its arrays (the driver traces it with `jax.eval_shape` to
    know what to restore a checkpointed state onto), returning a pytree of arrays or None.

    Args:
      state: the state after the previous stage (None after none).
      trained: the finished stage's trained tree (its adapter, or the trained base).
      old: the frozen adapters after the stage (its adapter included; None if there are none).

    Returns:
      The new state (default: None, a method without state).
    """
    del state, trained, old
    return None

  def configured(self, settings: MethodSettings) -> "Method":
    """This method with the run's settings applied (default: it reads none)."""
    del settings
    return self


# ---------------------------------------------------------------------------------------------
# The optimizer every method trains with.


def param_labels(method: Method, params: PyTree) -> PyTree:
  """'train' / 'frozen' per leaf: old adapters and (unless trained) sigma are frozen.

  Args:
    method: the method.
    params: what the optimizer sees: a 'new' tree, a full adapter state `{'old', 'new'}`, or
      base params (a method training the base: every leaf trains).

  Returns:
    A pytree of strings with the structure of `params`.
  """
  full = adapters.is_full_state(params)

  def label(path, _):
    keys = [adapters.key_name(e) for e in path]
    if full and keys and keys[0] == "old":
      return "frozen"
    if not method.train_sigma and keys and keys[-1] == "sigma":
      return "frozen"
    return "train"

  return jax.tree_util.tree_map_with_path(label, params)


def build_optimizer(method: Method, old: Optional[PyTree] = None,
                    settings: OptimizerSettings = OptimizerSettings(),
                    state: Optional[PyTree] = None) -> optax.GradientTransformation:
  """The optimizer of one stage of `method`.

  `[method.gradient_transform(old)] -> [clip_by_global_norm] -> adamw` (the transform after
  Adam with `settings.transform_after_adam`), wrapped so that frozen leaves (old adapters in a
  full state, sigma of LoRA-style methods) get exactly zero updates and no Adam moments. It
  accepts any params tree: base params, the 'new' tree, or the full `{'old', 'new'}` state.
  `state` is the method's (`Method.end_stage`).
  """
  s = settings
  adam = optax.adamw(s.learning_rate, b1=s.b1, b2=s.b2, eps=s.eps, weight_decay=s.weight_decay)
  clip = [optax.clip_by_global_norm(s.max_grad_norm)] if s.max_grad_norm else []
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
