"""EWC (Kirkpatrick et al., 2017) over a method whose trained tree carries on from stage to
stage: SeqFT (the base itself; the O-LoRA paper's "EWC" baseline) or SeqLoRA (one adapter).

After each task, the diagonal empirical Fisher of the trained tree, the mean over `samples` of
the task's training examples of each one's squared gradient (`Probe.squared_grads`, a scan, one
gradient held at a time), is added to the state's running sum, and the trained values become the
anchor `theta*`. Every later task adds `weight / 2 * sum F (theta - theta*)^2` to its loss.

Simplified, with the reason: one running Fisher sum and the latest anchor (online EWC, Schwarz
et al. 2018, with decay 1) rather than one penalty per old task: the state then stays two copies
of the trained tree (with SeqFT on SmolLM2, 2 x 135M floats) whatever the number of tasks.
With a method that starts a new adapter each task (IncLoRA, O-LoRA, the SVD family), the old
adapters are frozen and the new one has no anchor, so EWC has nothing to hold: it is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lbcl_jax.errors import InputError
from lbcl_jax.methods.base import ContinuedAdapter, MethodSettings, Over, TrainedBase, \
    add_penalties

PyTree = Any

# The probe's draw of the samples the Fisher is estimated on.
FISHER_SALT = 0xE3C


def ewc_penalty(theta: PyTree, anchor: PyTree, fisher: PyTree, weight: float) -> jax.Array:
  """`weight / 2 * sum F (theta - theta*)^2` over every leaf, in float32."""
  terms = jax.tree.map(
      lambda t, a, f: jnp.sum(f * jnp.square(t.astype(jnp.float32) - a.astype(jnp.float32))),
      theta, anchor, fisher)
  return 0.5 * weight * sum(jax.tree.leaves(terms))


@dataclasses.dataclass(frozen=True)
class EWC(Over):
  """`inner` (SeqFT or SeqLoRA) with EWC's quadratic penalty (see the module docstring).

  Attributes:
    weight: lambda, the penalty's weight.
    samples: training examples of a finished task its Fisher is estimated on.
  """

  name: str = "ewc"
  description: str = "EWC: a diagonal-Fisher quadratic penalty anchoring the trained weights"
  weight: float = 1e3
  samples: int = 64

  def over(self, inner):
    if not isinstance(inner.trainable, (TrainedBase, ContinuedAdapter)):
      raise InputError(f"config.ewc.over={inner.name!r}: EWC anchors a tree that trains on from "
                       "task to task, and that method starts a new adapter each task; use "
                       "seqft (the base) or seqlora (one adapter)")
    return super().over(inner)

  def regularizer(self, new, old, state=None):
    inner = super().regularizer(new, old, state)
    mine = self.own(state)
    if mine is None or not self.weight:
      return inner
    return add_penalties(inner, ewc_penalty(new, mine["anchor"], mine["fisher"], self.weight))

  def end_stage(self, state, trained, old, probe=None):
    inner = self._in.end_stage(self.inner_state(state), trained, old, probe)
    fisher = probe.squared_grads(trained, self.samples, FISHER_SALT)
    mine = self.own(state)
    if mine is not None:
      fisher = jax.tree.map(jnp.add, mine["fisher"], fisher)
    # A copy: the trained tree trains on in the next stage, whose step donates its buffers.
    anchor = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), trained)
    return self.joined(inner, {"fisher": fisher, "anchor": anchor})

  def configured(self, settings: MethodSettings) -> "EWC":
    return dataclasses.replace(self, inner_name=settings.ewc_over, weight=settings.ewc_weight,
                               samples=settings.ewc_samples)
