"""Continual-learning metrics from the accuracy matrix (written by `lbcl_jax.results`).

`R[i][j]` is the accuracy on task j after training task i (0-indexed, T tasks). Entries not
evaluated (e.g. j > i when future tasks are not tested) are None or NaN. Definitions:

* average accuracy (LB-CL, O-LoRA): mean_j R[T-1][j], over the tasks of the last row.
* backward transfer (Lopez-Paz & Ranzato, 2017, "Gradient Episodic Memory", GEM):
  BWT = 1/(T-1) sum_{j=0}^{T-2} (R[T-1][j] - R[j][j]); negative is forgetting.
* forward transfer (GEM): FWT = 1/(T-1) sum_{j=1}^{T-1} (R[j-1][j] - b[j]), where b[j] is a
  reference accuracy on task j before any training on it (GEM: a randomly initialised model;
  here whatever the caller passes, e.g. the zero-shot pretrained model). Needs the entries
  above the diagonal, so it is None unless future tasks were evaluated and `reference` is given.
* forgetting (Chaudhry et al., 2018, "Riemannian Walk"): the mean over j < T-1 of
  max_{j <= i <= T-2} R[i][j] - R[T-1][j]. It needs every row's seen tasks (the lower
  triangle): None for a matrix measured only on its diagonal and last row
  (`eval.matrix="diagonal_final"`), where the max would silently be the diagonal's.

Every metric is a plain float, or None when undefined (one task, a missing entry, a joint MTL
run): JSON-friendly.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


Matrix = Sequence[Sequence[float | None]]


def as_matrix(matrix: Matrix | np.ndarray) -> np.ndarray:
  """float64 [rows, T] with NaN for missing entries."""
  rows = [[np.nan if v is None else float(v) for v in row] for row in matrix]
  if not rows or any(len(r) != len(rows[0]) for r in rows):
    raise ValueError(f"the accuracy matrix must be a non-empty rectangle, got {matrix!r}")
  return np.asarray(rows, dtype=np.float64)


def _float(x: float) -> float | None:
  return None if x is None or not math.isfinite(x) else float(x)


def _square(r: np.ndarray) -> np.ndarray:
  if r.shape[0] != r.shape[1]:
    raise ValueError(f"this metric needs a square T x T matrix, got shape {r.shape}")
  return r


def average_accuracy(matrix: Matrix | np.ndarray) -> float | None:
  """Mean accuracy over all tasks after the last task (None if the last row has a gap)."""
  last = as_matrix(matrix)[-1]
  return None if np.isnan(last).any() else _float(last.mean())


def backward_transfer(matrix: Matrix | np.ndarray) -> float | None:
  """GEM's BWT (see the module docstring); None for T < 2 or a missing entry."""
  r = _square(as_matrix(matrix))
  t = r.shape[0]
  if t < 2:
    return None
  diffs = r[t - 1, :t - 1] - np.diag(r)[:t - 1]
  return None if np.isnan(diffs).any() else _float(diffs.mean())


def forward_transfer(matrix: Matrix | np.ndarray,
                     reference: Sequence[float | None] | None) -> float | None:
  """GEM's FWT against per-task reference accuracies `reference` (None: undefined)."""
  if reference is None:
    return None
  r = _square(as_matrix(matrix))
  t = r.shape[0]
  b = np.asarray([np.nan if v is None else float(v) for v in reference], dtype=np.float64)
  if b.shape != (t,):
    raise ValueError(f"reference must hold one accuracy per task ({t}), got {len(b)}")
  if t < 2:
    return None
  diffs = np.asarray([r[j - 1, j] - b[j] for j in range(1, t)])
  return None if np.isnan(diffs).any() else _float(diffs.mean())


def forgetting(matrix: Matrix | np.ndarray) -> float | None:
  """Chaudhry et al.'s average forgetting (see the module docstring); None for T < 2."""
  r = _square(as_matrix(matrix))
  t = r.shape[0]
  if t < 2:
    return None
  values = []
  for j in range(t - 1):
    past = r[j:t - 1, j]  # after training task j, before the last stage
    if np.isnan(past).any() or np.isnan(r[t - 1, j]):
      return None
    values.append(past.max() - r[t - 1, j])
  return _float(float(np.mean(values)))


def summarize(matrix: Matrix | np.ndarray, reference: Sequence[float | None] | None = None, *,
              joint: bool = False) -> dict[str, float | None]:
  """{"average_accuracy", "bwt", "fwt", "forgetting"}.

  Args:
    matrix: the accuracy matrix (rows: after each stage; columns: tasks).
    reference: per-task reference accuracies for FWT (None: FWT is None).
    joint: a multi-task run (one stage training every task): only the average is defined.
  """
  r = as_matrix(matrix)
  out = {"average_accuracy": average_accuracy(r), "bwt": None, "fwt": None, "forgetting": None}
  if joint or r.shape[0] != r.shape[1]:
    return out
  out["bwt"] = backward_transfer(r)
  out["fwt"] = forward_transfer(r, reference)
  out["forgetting"] = forgetting(r)
  return out
