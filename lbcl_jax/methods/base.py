"""The method interface: what a continual-learning method decides, as hooks the driver calls.

A method is a frozen dataclass (hashable, so it can be a static argument of `jax.jit`). The
driver (`lbcl_jax.train`) runs, for every stage the method asks for:

  adapter, scores = method.init_adapter(fresh, old, score_old)     # unless method.trains_base
  tx = build_optimizer(method, old, settings)                      # gradient_transform inside
  train: loss = backbone loss (+ method.regularizer(new, old))
  old = append(old, adapter)                                       # or base = trained base

The base class is the plainest adapter method: a new adapter per task, old ones frozen and
folded into the base, no injection, no constraint. Subclasses override only what differs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence, Union

import jax
import optax

from lbcl_jax import adapters

PyTree = Any
ScalarOrSchedule = Union[float, optax.Schedule]
# score_old(num_seed_samples) -> {layer path: [K, r] triplet scores of the old adapters on
# seed samples of the new task}; given by the driver, which owns the data and the model.
ScoreFn = Callable[[int], Mapping[str, jax.Array]]


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
  def trains_base(self) -> bool:
    """Whether the base model's weights train (then there are no adapters)."""
    return False

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

  def regularizer(self, new: PyTree, old: Optional[PyTree]) -> Optional[jax.Array]:
    """A term added to the training loss (None: nothing is added)."""
    del new, old
    return None

  def gradient_transform(self, old: Optional[PyTree]) -> Optional[optax.GradientTransformation]:
    """A transform of the new adapter's gradients before AdamW (None: none)."""
    del old
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
    params: what the optimizer sees: base params (`trains_base`), a 'new' tree, or a full
      adapter state `{'old', 'new'}`.

  Returns:
    A pytree of strings with the structure of `params`.
  """
  full = adapters.is_full_state(params)

  def label(path, _):
    keys = [adapters.key_name(e) for e in path]
    if method.trains_base:
      return "train"
    if full and keys and keys[0] == "old":
      return "frozen"
    if not method.train_sigma and keys and keys[-1] == "sigma":
      return "frozen"
    return "train"

  return jax.tree_util.tree_map_with_path(label, params)


def build_optimizer(method: Method, old: Optional[PyTree] = None,
                    settings: OptimizerSettings = OptimizerSettings()
                    ) -> optax.GradientTransformation:
  """The optimizer of one stage of `method`.

  `[method.gradient_transform(old)] -> [clip_by_global_norm] -> adamw` (the transform after
  Adam with `settings.transform_after_adam`), wrapped so that frozen leaves (old adapters in a
  full state, sigma of LoRA-style methods) get exactly zero updates and no Adam moments. It
  accepts any params tree: base params, the 'new' tree, or the full `{'old', 'new'}` state.
  """
  s = settings
  adam = optax.adamw(s.learning_rate, b1=s.b1, b2=s.b2, eps=s.eps, weight_decay=s.weight_decay)
  clip = [optax.clip_by_global_norm(s.max_grad_norm)] if s.max_grad_norm else []
  transform = method.gradient_transform(old or None)
  extra = [transform] if transform is not None else []
  if s.transform_after_adam:
    inner = optax.chain(*clip, adam, *extra)
  else:
    inner = optax.chain(*extra, *clip, adam)
  if method.trains_base:
    return inner
  return optax.multi_transform(
      {"train": inner, "frozen": optax.set_to_zero()},
      lambda params: param_labels(method, params),
  )
