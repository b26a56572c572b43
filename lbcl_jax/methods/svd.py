"""The SVD family: NLNB-CL, L-CL, B-CL and LB-CL, switches of one class.

Every task gets an AdaLoRA-style adapter `U diag(sigma) V` (sigma starts at 0).
- **Learn more** (`inject`): before a task trains, every old triplet is scored on seed samples
  of the new task and the new adapter starts as the alpha-weighted sum of the old triplets
  (`lbcl_jax.injection`).
- **Bother less** (`project`): the new U and V gradients are projected off the old tasks' U
  columns and V rows (`lbcl_jax.projection.orthogonal_projection`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Optional

import jax
import optax

from lbcl_jax import injection
from lbcl_jax import projection
from lbcl_jax import sensitivity
from lbcl_jax.methods.base import Method, MethodSettings, ScoreFn

PyTree = Any


@dataclasses.dataclass(frozen=True)
class SVDFamily(Method):
  """SVD adapters, with knowledge injection and/or gradient projection switched on.

  Attributes:
    inject: initialise the new adapter from sensitivity-weighted old triplets.
    project: project the new U/V gradients off the old subspaces.
    inject_sigma: inject sigma too (False: the paper's "without sigma" variant).
    inject_layers: 'all' | int n (top n by total score) | tuple of paths, see `injection`.
    num_seed_samples: samples of the new task used to score old triplets.
    score_aggregation: 'mean' | 'adalora' | 'fisher', see `lbcl_jax.sensitivity`.
    projection_rtol: rank tolerance of the projection bases.
  """

  name: str = "nlnbcl"
  description: str = "SVD adapters, neither injection nor projection"
  inject: bool = False
  project: bool = False
  inject_sigma: bool = True
  inject_layers: Any = "all"
  num_seed_samples: int = 8
  score_aggregation: str = "mean"
  projection_rtol: float = 1e-6

  def __post_init__(self):
    super().__post_init__()
    if self.score_aggregation not in sensitivity.AGGREGATIONS:
      raise ValueError(f"unknown score_aggregation {self.score_aggregation!r}; "
                       f"expected one of {sensitivity.AGGREGATIONS}")
    if isinstance(self.inject_layers, list):
      # Keep the dataclass hashable (usable as a static jit argument).
      object.__setattr__(self, "inject_layers", tuple(self.inject_layers))

  def init_adapter(self, fresh: PyTree, old: Optional[PyTree],
                   score_old: ScoreFn) -> tuple[PyTree, Optional[Mapping[str, jax.Array]]]:
    if not (self.inject and old):
      return fresh, None
    scores = score_old(self.num_seed_samples)
    inject = functools.partial(injection.inject, with_sigma=self.inject_sigma,
                               layers=self.inject_layers)
    return jax.jit(lambda o, s, f: inject(o, s, fresh=f))(old, scores, fresh), scores

  def gradient_transform(self, old: Optional[PyTree]) -> Optional[optax.GradientTransformation]:
    if not (self.project and old):
      return None
    return projection.orthogonal_projection(old, rtol=self.projection_rtol)

  def configured(self, settings: MethodSettings) -> "SVDFamily":
    return dataclasses.replace(
        self, inject_sigma=settings.inject_sigma, inject_layers=settings.inject_layers,
        num_seed_samples=settings.num_seed_samples,
        score_aggregation=settings.score_aggregation,
        projection_rtol=settings.projection_rtol)
