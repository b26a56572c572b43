"""Continual-learning metrics on hand-computed matrices, and atomic result files."""

import math

import numpy as np
import pytest

from lbcl_jax import metrics

# After task 0: 0.9 on task 0; after task 1: 0.7, 0.8; after task 2: 0.6, 0.5, 0.95.
# Entries above the diagonal were not evaluated.
R = [[0.9, None, None],
     [0.7, 0.8, None],
     [0.6, 0.5, 0.95]]


def test_hand_computed_metrics():
  assert metrics.average_accuracy(R) == pytest.approx((0.6 + 0.5 + 0.95) / 3)
  # BWT = ((0.6 - 0.9) + (0.5 - 0.8)) / 2
  assert metrics.backward_transfer(R) == pytest.approx(-0.3)
  # Forgetting: task 0: max(0.9, 0.7) - 0.6 = 0.3; task 1: max(0.8) - 0.5 = 0.3.
  assert metrics.forgetting(R) == pytest.approx(0.3)
  # FWT needs R[j-1][j]: not evaluated here.
  assert metrics.forward_transfer(R, [0.1, 0.2, 0.3]) is None
  assert metrics.forward_transfer(R, None) is None


def test_forward_transfer_and_forgetting_with_a_full_matrix():
  full = np.array([[0.9, 0.3, 0.2],
                   [0.95, 0.8, 0.4],
                   [0.85, 0.7, 0.9]])
  b = [0.25, 0.2, 0.1]
  # FWT = ((0.3 - 0.2) + (0.4 - 0.1)) / 2
  assert metrics.forward_transfer(full, b) == pytest.approx(0.2)
  # Forgetting: task 0: max(0.9, 0.95) - 0.85 = 0.1; task 1: max(0.3, 0.8) - 0.7 = 0.1.
  assert metrics.forgetting(full) == pytest.approx(0.1)
  assert metrics.backward_transfer(full) == pytest.approx(((0.85 - 0.9) + (0.7 - 0.8)) / 2)
  summary = metrics.summarize(full, b)
  assert summary == pytest.approx({"average_accuracy": 0.8166666666666667, "bwt": -0.075,
                                   "fwt": 0.2, "forgetting": 0.1})
  with pytest.raises(ValueError, match="one accuracy per task"):
    metrics.forward_transfer(full, [0.1])


def test_a_diagonal_and_last_row_matrix_keeps_average_and_bwt_but_not_forgetting():
  # eval.matrix="diagonal_final": R[1][0] was not measured. Taking the max over what was
  # measured would give task 0's forgetting as 0.9 - 0.6 whatever R[1][0] was.
  sparse = [[0.9, None, None],
            [None, 0.8, None],
            [0.6, 0.5, 0.95]]
  assert metrics.average_accuracy(sparse) == metrics.average_accuracy(R)
  assert metrics.backward_transfer(sparse) == pytest.approx(metrics.backward_transfer(R))
  assert metrics.forgetting(sparse) is None
  # With R[1][0] measured above R[0][0], forgetting takes it (1.0 - 0.6 for task 0).
  full = [[0.9, None, None], [1.0, 0.8, None], [0.6, 0.5, 0.95]]
  assert metrics.forgetting(full) == pytest.approx(((1.0 - 0.6) + (0.8 - 0.5)) / 2)


def test_degenerate_matrices():
  assert metrics.summarize([[0.5]]) == {"average_accuracy": 0.5, "bwt": None, "fwt": None,
                                        "forgetting": None}
  # A joint (MTL) run: one stage training all tasks.
  assert metrics.summarize([[0.5, 0.7]], joint=True) == pytest.approx(
      {"average_accuracy": 0.6, "bwt": None, "fwt": None, "forgetting": None})
  assert metrics.average_accuracy([[0.5, None], [0.4, None]]) is None  # a gap in the last row
  assert metrics.backward_transfer([[None, None], [0.4, 0.6]]) is None
  with pytest.raises(ValueError, match="rectangle"):
    metrics.as_matrix([[0.1], [0.1, 0.2]])
  with pytest.raises(ValueError, match="square"):
    metrics.backward_transfer([[0.1, 0.2]])


def test_missing_entries_become_nan():
  # (The atomic writer's tests are in test_files.py.)
  assert math.isnan(metrics.as_matrix([[None]])[0, 0])
