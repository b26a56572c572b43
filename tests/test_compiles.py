"""The driver compiles its train step and its evaluation once per distinct input shape.

JAX logs every lowering it compiles ("Compiling jit(step) with global shapes and types ...")
when `jax_log_compiles` is on; the records carry the abstract inputs, so a second compile of
the same shapes (a new jit per stage, an input that differs only in sharding or weak type)
shows as a count above one.
"""

from __future__ import annotations

import collections
import logging

import jax
import pytest

import driver_utils as du

_PXLA_LOGGER = "jax._src.interpreters.pxla"
_WATCHED = ("jit(step)", "jit(predict)")


class _CompileCounter(logging.Handler):
  """Counts compilations of the watched functions by their (shape, dtype) signature."""

  def __init__(self):
    super().__init__(level=logging.DEBUG)
    self.counts: collections.Counter = collections.Counter()

  def emit(self, record):
    if not str(record.msg).startswith("Compiling ") or not record.args:
      return
    name, avals = record.args[0], record.args[1]
    if name in _WATCHED:
      signature = tuple((tuple(a.shape), str(a.dtype)) for a in avals)
      self.counts[(name, signature)] += 1


def _compiles_of_run(tmp_path, *overrides):
  from lbcl_jax import train  # pylint: disable=g-import-not-at-top
  counter = _CompileCounter()
  logger = logging.getLogger(_PXLA_LOGGER)
  logger.addHandler(counter)
  previous = jax.config.jax_log_compiles
  jax.config.update("jax_log_compiles", True)
  try:
    results = train.train_and_evaluate(
        du.make_config(*du.FAST, *du.tiny_bert(tmp_path), "--config.plots=False", *overrides),
        str(tmp_path / "wd"))
  finally:
    jax.config.update("jax_log_compiles", previous)
    logger.removeHandler(counter)
  return counter.counts, results


# lbcl: new shapes every stage (old adapters, projection bases); seqft: the same shapes in
# both stages, so a stage that recompiles them shows.
@pytest.mark.parametrize("method", ["lbcl", "seqft"])
def test_two_task_run_compiles_each_shape_once(tmp_path, method):
  # Two tasks with the same options, cut to the smallest length bucket (16 tokens): both
  # stages' batches have the same shapes, so a stage that compiles anew what the stage before
  # compiled shows up.
  counts, results = _compiles_of_run(tmp_path, f"--config.method={method}",
                                     "--config.order=syn_sentiment,syn_sentiment_flip",
                                     "--config.optim.max_steps_per_task=4",
                                     "--config.data.max_source_length=16")
  assert len(results["accuracy_matrix"]) == 2
  steps = {sig: n for (name, sig), n in counts.items() if name == "jit(step)"}
  evals = {sig: n for (name, sig), n in counts.items() if name == "jit(predict)"}
  assert steps and evals, f"no compilation was seen: {counts}"
  repeated = {k: n for k, n in counts.items() if n > 1}
  assert not repeated, f"compiled more than once for the same shapes: {repeated}"
  # Evaluation sees one shape in both stages; the step sees one per stage at most (the old
  # adapters lbcl carries into the second stage change its inputs), one for seqft.
  assert len(evals) == 1
  assert len(steps) == (1 if method == "seqft" else 2)


def test_programs_for_an_earlier_stack_size_are_freed(tmp_path, monkeypatch):
  """The sensitivity pass and the merge compile once for each size K of the old stack, which
  grows every stage: what an earlier K compiled is freed, not kept for the run's life (on
  SmolLM2 that held about 100 MB a stage). And a stage's set-up builds its bases once."""
  from lbcl_jax import stage as stage_lib  # pylint: disable=g-import-not-at-top
  from lbcl_jax import train  # pylint: disable=g-import-not-at-top
  seen = []
  begin = stage_lib.Stage.begin

  def recording_begin(self, state, names):
    seen.append(self)
    return begin(self, state, names)

  monkeypatch.setattr(stage_lib.Stage, "begin", recording_begin)
  from lbcl_jax import projection  # pylint: disable=g-import-not-at-top
  bases = []
  build_bases = projection.build_bases
  monkeypatch.setattr(projection, "build_bases",
                      lambda *a, **k: bases.append(1) or build_bases(*a, **k))
  results = train.train_and_evaluate(
      du.make_config(*du.FAST, *du.tiny_bert(tmp_path), "--config.plots=False",
                     "--config.method=lbcl", "--config.num_tasks=3",
                     "--config.optim.max_steps_per_task=2"),
      str(tmp_path / "wd"))
  assert len(results["accuracy_matrix"]) == 3 and len(seen) == 3
  slots = seen[-1].kept._slots  # pylint: disable=protected-access
  # The last stage scored K = 2 old tasks and its evaluation merged K = 3: one program each
  # (kept for every size, they would be 2 and 3).
  assert slots["score/mean"][1]._cache_size() == 1  # pylint: disable=protected-access
  assert slots["merge"][1]._cache_size() == 1  # pylint: disable=protected-access
  # The projection bases (an SVD per factor and layer) are built once a stage with old tasks,
  # not once to see whether the method has a transform and again for the optimizer.
  assert len(bases) == 2
