"""The method registry: what each continual-learning method does, as static choices.

| name    | trains                         | adapter init | inject | project | O-LoRA loss |
| ------- | ------------------------------ | ------------ | ------ | ------- | ----------- |
| seqft   | all base params, sequentially  | -            | -      | -       | -           |
| inclora | a new LoRA per task            | lora         | -      | -       | -           |
| olora   | a new LoRA per task            | lora         | -      | -       | yes         |
| nlnbcl  | a new SVD adapter per task     | adalora      | -      | -       | -           |
| lcl     | a new SVD adapter per task     | adalora      | yes    | -       | -           |
| bcl     | a new SVD adapter per task     | adalora      | -      | yes     | -           |
| lbcl    | a new SVD adapter per task     | adalora      | yes    | yes     | -           |
| mtl     | one LoRA on all tasks jointly  | lora         | -      | -       | -           |

LoRA-style methods keep sigma frozen at 1 (`train_sigma=False`) so the adapter is exactly
`B A` (B = U, A = V). Old adapters are always frozen. The driver follows:

  init_new -> [if inject and K > 0: score_old_triplets + inject] -> build_optimizer
  -> train (loss + olora_penalty if olora) -> append_task.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional, Union

import jax
import optax

from lbcl_jax import projection
from lbcl_jax.errors import InputError

PyTree = Any
ScalarOrSchedule = Union[float, optax.Schedule]


@dataclasses.dataclass(frozen=True)
class Method:
  """Static choices of a continual-learning method.

  Attributes:
    name: registry name.
    uses_adapters: trains adapters (False: the base params are trained).
    init: adapter init, 'adalora' (SVD form, sigma = 0) or 'lora' (U = 0, sigma = 1).
    inject: initialise the new adapter from sensitivity-weighted old triplets.
    inject_sigma: inject sigma too (False: the paper's "without sigma" variant).
    inject_layers: 'all' | int n (top n by total score) | list of paths, see `injection`.
    num_seed_samples: samples of the new task used to score old triplets.
    score_aggregation: 'mean' | 'adalora' | 'fisher', see `sensitivity`.
    project: project the new U/V gradients off the old subspaces.
    olora: add O-LoRA's orthogonality (+ L2) loss.
    olora_lambda1: O-LoRA's orthogonality weight.
    olora_lambda2: O-LoRA's L2 weight.
    full_finetune: fine-tune the base weights (SeqFT).
    joint: train once on the union of all tasks (multi-task upper bound).
    train_sigma: sigma is trainable (False freezes it at its init).
    description: one line for logs.
  """

  name: str
  uses_adapters: bool = True
  init: str = "adalora"
  inject: bool = False
  inject_sigma: bool = True
  inject_layers: Any = "all"
  num_seed_samples: int = 8
  score_aggregation: str = "mean"
  project: bool = False
  olora: bool = False
  olora_lambda1: float = 0.5
  olora_lambda2: float = 0.0
  full_finetune: bool = False
  joint: bool = False
  train_sigma: bool = True
  description: str = ""

  def __post_init__(self):
    if self.init not in ("adalora", "lora"):
      raise ValueError(f"init must be 'adalora' or 'lora', got {self.init!r}")
    if self.score_aggregation not in ("mean", "adalora", "fisher"):
      raise ValueError(f"unknown score_aggregation {self.score_aggregation!r}")
    if isinstance(self.inject_layers, list):
      # Keep the dataclass hashable (usable as a static jit argument).
      object.__setattr__(self, "inject_layers", tuple(self.inject_layers))


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("seqft", uses_adapters=False, full_finetune=True, init="lora",
               description="sequential full fine-tuning of the base model"),
        Method("inclora", init="lora", train_sigma=False,
               description="a new LoRA per task, old ones frozen, no constraint"),
        Method("olora", init="lora", train_sigma=False, olora=True,
               description="IncLoRA + O-LoRA orthogonality loss"),
        Method("nlnbcl", description="SVD adapters, neither injection nor projection"),
        Method("lcl", inject=True, description="SVD adapters + knowledge injection"),
        Method("bcl", project=True, description="SVD adapters + gradient projection"),
        Method("lbcl", inject=True, project=True,
               description="LB-CL: SVD adapters + injection + projection"),
        Method("mtl", init="lora", train_sigma=False, joint=True,
               description="one LoRA trained on all tasks jointly (upper bound)"),
    )
}


def get_method(name: str, **overrides) -> Method:
  """The registered method `name`, optionally with fields replaced.

  Raises:
    ValueError: for an unknown name (the message lists the valid ones).
  """
  if name not in METHODS:
    raise InputError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
  method = METHODS[name]
  return dataclasses.replace(method, **overrides) if overrides else method


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def param_labels(method: Method, params: PyTree) -> PyTree:
  """'train' / 'frozen' per leaf: old adapters and (if not trained) sigma are frozen.

  Args:
    method: the method.
    params: what the optimizer sees: base params (seqft), a 'new' tree, or a full adapter
      state `{'old', 'new'}`.

  Returns:
    A pytree of strings with the structure of `params`.
  """
  full = isinstance(params, Mapping) and set(params) == {"old", "new"}

  def label(path, _):
    keys = [_key_name(e) for e in path]
    if method.full_finetune:
      return "train"
    if full and keys and keys[0] == "old":
      return "frozen"
    if not method.train_sigma and keys and keys[-1] == "sigma":
      return "frozen"
    return "train"

  return jax.tree_util.tree_map_with_path(label, params)


def build_optimizer(
    method: Method,
    old_stack: Optional[PyTree] = None,
    learning_rate: ScalarOrSchedule = 1e-3,
    weight_decay: float = 0.0,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    max_grad_norm: Optional[float] = None,
    projection_rtol: float = 1e-6,
    projection_method: str = "svd",
    project_after_adam: bool = False,
) -> optax.GradientTransformation:
  """The optimizer of one task of `method`.

  `[orthogonal_projection(old_stack)] -> [clip_by_global_norm] -> adamw`, wrapped so that
  frozen leaves (old adapters in a full state, sigma of LoRA-style methods) get exactly zero
  updates and no Adam moments. It accepts any params tree: base params, the 'new' tree, or
  the full `{'old', 'new'}` state (old leaves frozen even with weight decay).

  Args:
    method: the method (`get_method(name)`).
    old_stack: `adapters['old']`; used when `method.project` (None or {} = no projection).
    learning_rate: scalar or optax schedule.
    weight_decay: AdamW decoupled weight decay.
    b1: Adam beta1.
    b2: Adam beta2.
    eps: Adam epsilon.
    max_grad_norm: clip the (projected) gradient's global norm; None = no clipping.
    projection_rtol: rank tolerance of the projection bases.
    projection_method: 'svd' | 'qr'.
    project_after_adam: project Adam's *update* instead of the gradient. The paper projects
      gradients (default); Adam's per-coordinate scaling (and weight decay) then moves the
      parameter slightly out of the orthogonal complement. Projecting after Adam makes the
      applied update exactly orthogonal to the old subspaces.

  Returns:
    An `optax.GradientTransformation`.
  """
  adam = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  clip = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
  proj = []
  if method.project and old_stack:
    proj = [projection.orthogonal_projection(
        old_stack, rtol=projection_rtol, method=projection_method)]
  if project_after_adam:
    inner = optax.chain(*clip, adam, *proj)
  else:
    inner = optax.chain(*proj, *clip, adam)
  if method.full_finetune:
    return inner
  return optax.multi_transform(
      {"train": inner, "frozen": optax.set_to_zero()},
      lambda params: param_labels(method, params),
  )
