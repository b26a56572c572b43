"""The SVD family: NLNB-CL, L-CL, B-CL and LB-CL, switches of one class.

Every task gets an AdaLoRA-style adapter `U diag(sigma) V` (sigma starts at 0).
- **Learn more** (`inject`): before a task trains, every old triplet is scored on seed samples
  of the new task and the new adapter starts as the alpha-weighted sum of the old triplets
  (`lbcl_jax.injection`).
- **Bother less** (`project`): the new U and V gradients are projected off the old tasks' U
  columns and V rows (`lbcl_jax.projection.orthogonal_projection`).

Any member can train the new adapter with AdaLoRA's orthogonality regulariser (`orth_reg_weight`
times `orthogonality_regularizer`, at PEFT's scale), which keeps the columns of U and the rows of
V near orthonormal, so that the triplets are singular vectors. Its weight is 0 by default:
validation on the MiniLM benchmark chose none (see `config_lib`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from absl import logging

from lbcl_jax import adapters as adapters_lib
from lbcl_jax import injection
from lbcl_jax import projection
from lbcl_jax import sensitivity
from lbcl_jax.methods.base import Method, MethodSettings, Probe

PyTree = Any


# One jitted injection for the process: a run's stages (and runs alike) reuse its program.
_inject = jax.jit(injection.inject, static_argnames=("with_sigma", "layers"))


def _safe_norm(x: jax.Array) -> jax.Array:
  """Frobenius norm whose gradient is 0 (not NaN) where x is exactly 0."""
  sq = jnp.sum(jnp.square(x))
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def orthogonality_regularizer(new: PyTree) -> jax.Array:
  """AdaLoRA's orthogonality term as PEFT computes it: `||U^T U - I||_F + ||V V^T - I||_F`
  summed over the adapted layers and divided by the number of matrices (2 per layer).

  PEFT's `AdaLoraModel.forward` adds `orth_reg_weight * sum_m ||P_m - I||_F / M` over its
  `lora_A` (our V) and `lora_B` (our U) matrices, with the *unsquared* norm (the AdaLoRA
  paper's eq. 5 squares it); this is that, so a weight here means what PEFT's does.

  Args:
    new: a single-task adapter tree, leaves `{'U': [d_out, r], 'sigma': [r], 'V': [r, d_in]}`.

  Returns:
    A float32 scalar (0 for an empty tree).
  """
  layers = adapters_lib.flatten_layers(new)
  if not layers:
    return jnp.zeros((), jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  total = jnp.zeros((), jnp.float32)
  for leaf in layers.values():
    u = jnp.asarray(leaf["U"], jnp.float32)
    v = jnp.asarray(leaf["V"], jnp.float32)
    eye = jnp.eye(u.shape[-1], dtype=jnp.float32)
    total += _safe_norm(jnp.matmul(u.T, u, precision=hi) - eye)
    total += _safe_norm(jnp.matmul(v, v.T, precision=hi) - eye)
  return total / (2 * len(layers))


@dataclasses.dataclass(frozen=True)
class SVDFamily(Method):
  """SVD adapters, with knowledge injection and/or gradient projection switched on.

  Attributes:
    inject: initialise the new adapter from sensitivity-weighted old triplets.
    project: project the new U/V gradients off the old subspaces.
    inject_sigma: inject sigma too (False, the default chosen on validation: the paper's
      "without sigma" variant).
    inject_layers: 'all' | int n (the n layers with the highest total score) |
      `injection.TopBlocks(n)` (the top n blocks by depth; `resolve` turns it into paths) |
      a regex | a tuple of paths, see `lbcl_jax.injection`.
    num_seed_samples: samples of the new task used to score old triplets.
    score_aggregation: 'mean' | 'adalora' | 'fisher', see `lbcl_jax.sensitivity`.
    projection_rtol: rank tolerance of the projection bases.
    orth_reg_weight: weight of AdaLoRA's orthogonality regulariser (0: none, the default
      chosen on validation; see `config_lib`).
  """

  name: str = "nlnbcl"
  description: str = "SVD adapters, neither injection nor projection"
  inject: bool = False
  project: bool = False
  inject_sigma: bool = False
  inject_layers: Any = "all"
  num_seed_samples: int = 8
  score_aggregation: str = "mean"
  projection_rtol: float = 1e-6
  orth_reg_weight: float = 0.0

  def __post_init__(self):
    super().__post_init__()
    if self.score_aggregation not in sensitivity.AGGREGATIONS:
      raise ValueError(f"unknown score_aggregation {self.score_aggregation!r}; "
                       f"expected one of {sensitivity.AGGREGATIONS}")
    if isinstance(self.inject_layers, list):
      # Keep the dataclass hashable (usable as a static jit argument).
      object.__setattr__(self, "inject_layers", tuple(self.inject_layers))

  def init_adapter(self, fresh: PyTree, old: Optional[PyTree], probe: Probe,
                   state: Optional[PyTree] = None
                   ) -> tuple[PyTree, Optional[Mapping[str, jax.Array]]]:
    del state
    if not (self.inject and old):
      return fresh, None
    scores = probe.score_old(self.num_seed_samples, self.score_aggregation)
    # Padded to the run's most old tasks (zero triplets, masked out of the weights): one
    # shape, so one compiled injection, for every stage of the run.
    k = adapters_lib.num_tasks(old)
    capacity = max(k, getattr(probe, "old_capacity", 0))
    injected = _inject(adapters_lib.pad_tasks(old, capacity),
                       adapters_lib.pad_tasks(scores, capacity),
                       fresh=fresh, task_mask=np.arange(capacity) < k,
                       with_sigma=self.inject_sigma, layers=self.inject_layers)
    return injected, scores

  def regularizer(self, new: PyTree, old: Optional[PyTree],
                  state: Optional[PyTree] = None) -> Optional[jax.Array]:
    del old, state
    if not self.orth_reg_weight:
      return None
    return self.orth_reg_weight * orthogonality_regularizer(new)

  def gradient_transform(self, old: Optional[PyTree], state: Optional[PyTree] = None
                         ) -> Optional[optax.GradientTransformation]:
    del state
    if not (self.project and old):
      return None
    # Spans of fixed shape [d, min(d, K*r)]: over the driver's padded stack, one shape a run.
    return projection.orthogonal_projection(old, rtol=self.projection_rtol, compact=False)

  @property
  def transform_in_state(self) -> bool:
    return True  # the projection's update reads its bases from its state

  def resolve(self, backbone: Any, paths: Sequence[str]) -> "SVDFamily":
    """A depth choice of injection (`injection.TopBlocks`) turned into the layer paths it
    names, by the backbone's block pattern."""
    if not isinstance(self.inject_layers, injection.TopBlocks):
      return self
    n = self.inject_layers.n
    chosen = injection.top_block_layers(list(paths), n, backbone.block_pattern)
    logging.info("Injection into the top %d blocks: %d layers (%s ...)", n, len(chosen),
                 ", ".join(chosen[:4]))
    return dataclasses.replace(self, inject_layers=chosen)

  def configured(self, settings: MethodSettings) -> "SVDFamily":
    return dataclasses.replace(
        self, inject_sigma=settings.inject_sigma, inject_layers=settings.inject_layers,
        num_seed_samples=settings.num_seed_samples,
        score_aggregation=settings.score_aggregation,
        projection_rtol=settings.projection_rtol,
        orth_reg_weight=(self.orth_reg_weight if settings.orth_reg_weight is None
                         else settings.orth_reg_weight))
