"""InfLoRA (Liang & Li, CVPR 2024): each task's LoRA down-projection fixed inside a subspace
that does not interfere with the old tasks; only the up-projection trains.

In this package's form `delta W = scaling * U diag(sigma) V` (U: [d_out, r], V: [r, d_in]):
InfLoRA's `A` (the down-projection, their "dimensionality reduction matrix") is V, fixed; its
`B` is U, trained from zero; sigma stays 1. For every adapted layer:

* before task t, the layer's inputs on `samples` training examples of task t (with the model as
  the old tasks left it) give the Gram matrix `G = sum_x x x^T` over tokens; projected off the
  old tasks' input subspace, `G' = (I - P) G (I - P)` (P the projector kept as method state), its
  top r eigenvectors are V's rows. Every row of V is then orthogonal to the old inputs' subspace,
  so `delta W x = 0` for each input x in it: training U leaves the old tasks' layer outputs as
  they were (to the subspace's threshold).
* after task t, the inputs on the trained model extend the subspace as GPM (Saha et al., 2021)
  does: the eigenvectors of the residual `G'` join P, largest first, until the subspace holds
  `threshold` of the inputs' energy (trace(P G) / trace(G)).

Simplified, with the reasons: the projector `P` ([d_in, d_in] per layer, fixed in shape, so a
checkpoint restores it by tracing; the state is `{layer path: P}`) is kept rather than DualGPM's
choice between a basis and its complement (a memory saving at large d_in); the threshold is one
value rather than InfLoRA's schedule from 0.95 rising over the tasks (which needs the number of
tasks in advance); V's rows are orthonormal (InfLoRA's eigenvectors) and the adapters' scaling
is the run's (1 by default).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from lbcl_jax import adapters as adapters_lib
from lbcl_jax.errors import InputError
from lbcl_jax.methods.base import Method, MethodSettings

PyTree = Any

# The probe's draws of the samples whose inputs design V (before a task) and extend the
# subspace (after it).
DESIGN_SALT, SUBSPACE_SALT = 0x1F1, 0x1F2


def design_v(gram: jax.Array, projector: Optional[jax.Array], rank: int) -> jax.Array:
  """[rank, d_in]: the top `rank` eigenvectors of `(I - P) G (I - P)` as rows, projected by
  `(I - P)` (so a layer without room left gets rows of zeros rather than old directions)."""
  d = gram.shape[0]
  q = jnp.eye(d, dtype=jnp.float32) if projector is None else jnp.eye(d) - projector
  hi = jax.lax.Precision.HIGHEST
  residual = jnp.matmul(jnp.matmul(q, gram, precision=hi), q, precision=hi)
  _, vecs = jnp.linalg.eigh((residual + residual.T) / 2)
  top = vecs[:, ::-1][:, :rank]
  return jnp.matmul(q, top, precision=hi).T


def extend_projector(gram: jax.Array, projector: Optional[jax.Array],
                     threshold: float) -> jax.Array:
  """GPM's update: P plus the residual's eigenvectors, largest first, until trace(P G) /
  trace(G) >= threshold (eigenvalues below 1e-6 of the largest never join)."""
  d = gram.shape[0]
  p = jnp.zeros((d, d), jnp.float32) if projector is None else projector
  hi = jax.lax.Precision.HIGHEST
  q = jnp.eye(d, dtype=jnp.float32) - p
  residual = jnp.matmul(jnp.matmul(q, gram, precision=hi), q, precision=hi)
  vals, vecs = jnp.linalg.eigh((residual + residual.T) / 2)
  vals, vecs = jnp.maximum(vals[::-1], 0.0), vecs[:, ::-1]
  total = jnp.maximum(jnp.trace(gram), 1e-30)
  kept = jnp.trace(jnp.matmul(p, gram, precision=hi))
  before = kept + jnp.cumsum(vals) - vals  # the energy held before each vector joins
  join = (before / total < threshold) & (vals > 1e-6 * jnp.max(vals))
  vecs = vecs * join[None, :].astype(vecs.dtype)
  return p + jnp.matmul(vecs, vecs.T, precision=hi)


@dataclasses.dataclass(frozen=True)
class InfLoRA(Method):
  """InfLoRA (see the module docstring).

  Attributes:
    samples: training examples whose layer inputs design V and extend the subspace.
    threshold: the share of the old tasks' input energy the subspace keeps (GPM's epsilon).
  """

  name: str = "inflora"
  description: str = "InfLoRA: V fixed off the old tasks' input subspace, U trained from zero"
  adapter_init: str = "lora"
  train_sigma: bool = False
  samples: int = 32
  threshold: float = 0.95

  def __post_init__(self):
    super().__post_init__()
    if not 0.0 < self.threshold <= 1.0:
      raise InputError(f"config.inflora.threshold={self.threshold}: must be in (0, 1]")
    if self.samples < 1:
      raise InputError(f"config.inflora.samples={self.samples}: must be >= 1")

  @property
  def frozen_factors(self) -> tuple[str, ...]:
    return ("sigma", "V")

  def resolve(self, backbone, paths):
    remat = getattr(getattr(backbone, "config", None), "remat", "none")
    if remat != "none":
      raise InputError(f"config.model.remat={remat!r}: InfLoRA records the adapted layers' "
                       "inputs, which a rematerialised block does not let out; use 'none'")
    return self

  def init_adapter(self, fresh, old, probe, state=None):
    grams = probe.input_grams(old, self.samples, DESIGN_SALT)
    flat = adapters_lib.flatten_layers(fresh)
    projectors = adapters_lib.flatten_arrays(state) if state is not None else {}

    def design(flat, grams, projectors):
      out = {}
      for path, leaf in flat.items():
        r = leaf["V"].shape[0]
        v = design_v(grams[path], projectors.get(path), r)
        out[path] = {"U": jnp.zeros_like(leaf["U"]), "sigma": jnp.ones_like(leaf["sigma"]),
                     "V": v.astype(leaf["V"].dtype)}
      return out

    designed = jax.jit(design)(flat, grams, projectors)
    return adapters_lib.unflatten_layers(designed), None

  def end_stage(self, state, trained, old, probe=None):
    del trained
    grams = probe.input_grams(old, self.samples, SUBSPACE_SALT)
    before = adapters_lib.flatten_arrays(state) if state is not None else {}
    return adapters_lib.unflatten_layers({
        path: extend_projector(g, before.get(path), self.threshold) for path, g in grams.items()})

  def configured(self, settings: MethodSettings) -> "InfLoRA":
    return dataclasses.replace(self, samples=settings.inflora_samples,
                               threshold=settings.inflora_threshold)
