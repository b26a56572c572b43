"""A method with state, for the tests: the driver must keep what `Method.end_stage` returns.

`Anchored` trains a new SVD adapter per task, as the base `Method`, and keeps the running mean
of the finished tasks' trained adapters (and their count) as its state; its regulariser pulls
the new adapter toward that mean (`weight * sum ||new - mean||^2`) once a task has finished. So
a run whose state were lost or wrong on resume trains differently from an uninterrupted one.

Run as a module (`python -m stateful_method ...`, tests/ on the path) it is `lbcl_jax.main`
with `anchored` and `anchored_free` (weight 0) registered, for runs in a fresh process that can
be killed and resumed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from lbcl_jax import methods


@dataclasses.dataclass(frozen=True)
class Anchored(methods.Method):
  """A new adapter per task, pulled toward the running mean of the finished ones."""

  name: str = "anchored"
  description: str = "SVD adapters pulled toward the mean of the finished tasks' adapters"
  weight: float = 1.0

  def end_stage(self, state: Optional[Any], trained: Any, old: Optional[Any],
                probe: Any = None) -> Any:
    del old, probe
    if state is None:
      return {"count": jnp.ones((), jnp.float32), "mean": trained}
    count = state["count"] + 1
    mean = jax.tree.map(lambda m, t: m + (t - m) / count, state["mean"], trained)
    return {"count": count, "mean": mean}

  def regularizer(self, new: Any, old: Optional[Any],
                  state: Optional[Any] = None) -> Optional[jax.Array]:
    del old
    if state is None or not self.weight:
      return None
    squares = jax.tree.map(lambda n, m: jnp.sum(jnp.square(n - m)), new, state["mean"])
    return self.weight * sum(jax.tree.leaves(squares))


STATEFUL = {"anchored": Anchored(), "anchored_free": Anchored("anchored_free", weight=0.0)}


if __name__ == "__main__":
  methods.METHODS.update(STATEFUL)
  from lbcl_jax import main  # pylint: disable=g-import-not-at-top
  main.run()
