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


def test_programs_over_the_old_stack_compile_once_a_run(tmp_path, monkeypatch):
  """The old stack grows every stage; the sensitivity pass and the merge see it padded to the
  run's largest stack (`Stage.padded`), so each compiles one program for the whole run, not
  one per stack size K (on SmolLM2 each was about 5 s of a stage's set-up). And a stage's
  set-up builds its bases once."""
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
  assert seen[-1].old_capacity == 3
  slots = seen[-1].kept._slots  # pylint: disable=protected-access
  # Scored at K = 1 and 2, merged at K = 1, 2 and 3, all padded to 3; nothing is dropped
  # between stages, so one program each means one compile each (unpadded: 2 and 3).
  assert slots["score/mean"][1]._cache_size() == 1  # pylint: disable=protected-access
  assert slots["merge"][1]._cache_size() == 1  # pylint: disable=protected-access
  # Padding the stack compiles for each of its sizes, and a size's program is dropped when the
  # stack grows past it (`Stage.end`): only the last size's is held (K = 2 -> 3 of 3 needs
  # none after the last stage).
  assert slots["stack/pad"][1]._cache_size() <= 1  # pylint: disable=protected-access
  # The sensitivity scores of the padding are cut off: K x r per layer as scored.
  scores = results["sensitivity"]
  assert [len(next(iter(v.values()))) for v in scores.values()] == [1, 2]
  # The projection bases (an SVD per factor and layer) are built once a stage with old tasks,
  # not once to see whether the method has a transform and again for the optimizer.
  assert len(bases) == 2


@pytest.mark.parametrize("method", ["lbcl", "olora"])
def test_the_train_step_is_made_for_the_first_stage_and_once_for_the_rest(
    tmp_path, monkeypatch, method):
  """From the second stage on, the step's inputs keep one shape a run: the old stack its
  regulariser reads is padded to the run's capacity, and LB-CL's projection bases are spans
  of fixed width over that padded stack (`Method.transform_in_state`). The step is kept for
  the optimizer's `update`, which those stages share. So a 3-task run makes (and compiles) it
  for stage 1, which has no old adapters, and once for stages 2 and 3; before, LB-CL made a
  step a stage and both compiled one a stage (on SmolLM2 about 8 s and, kept by JAX, memory
  that grew every stage)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lbcl_jax import train  # pylint: disable=g-import-not-at-top
  made, seen = [], []
  make, apply = train.make_train_step, train.apply_train_step
  monkeypatch.setattr(train, "make_train_step",
                      lambda *a, **k: made.append(1) or make(*a, **k))

  def recording_apply(step_fn, state, batch, rng, old=None):
    # Every input but the batch: the step's, the trainable's, the optimizer state's and the
    # old stack's shapes.
    shapes = jax.tree.map(jnp.shape, (state.trainable, state.opt_state, old))
    seen.append((state.progress.stage, step_fn, jax.tree.structure(shapes),
                 jax.tree.leaves(shapes)))
    return apply(step_fn, state, batch, rng, old=old)

  monkeypatch.setattr(train, "apply_train_step", recording_apply)
  results = train.train_and_evaluate(
      du.make_config(*du.FAST, *du.tiny_bert(tmp_path), "--config.plots=False",
                     f"--config.method={method}", "--config.num_tasks=3",
                     "--config.optim.max_steps_per_task=2"),
      str(tmp_path / "wd"))
  assert len(results["accuracy_matrix"]) == 3
  by_stage = {}
  for stage, *rest in seen:
    by_stage.setdefault(stage, []).append(rest)
  assert sorted(by_stage) == [0, 1, 2]
  first = {k: v[0] for k, v in by_stage.items()}
  assert first[1][0] is first[2][0]  # the same jitted step ...
  assert first[1][1:] == first[2][1:]  # ... with the same input shapes
  assert first[0][1:] != first[1][1:]  # (stage 1 has no old stack, nor bases)
  # LB-CL's optimizer is new every stage (its bases are), O-LoRA's one for the run.
  assert len(made) == (2 if method == "lbcl" else 1)


def test_stages_share_the_projection_update_and_keep_their_own_bases(tmp_path):
  """`Stage.optimizer` gives every LB-CL stage the first stage's `update` with its own state:
  the update must project off this stage's old tasks, as a fresh optimizer does, and the
  state of any stage must have one shape."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lbcl_jax import methods  # pylint: disable=g-import-not-at-top
  from lbcl_jax import train  # pylint: disable=g-import-not-at-top
  _, stage, _, key = train.build_stage(du.make_config(
      *du.FAST, *du.tiny_bert(tmp_path), "--config.method=lbcl", "--config.num_tasks=3"))
  stage.old_capacity = 3
  rng = np.random.default_rng(0)
  fresh = stage.fresh_adapter(key)
  stack = lambda k: jax.tree.map(
      lambda x: jnp.asarray(rng.normal(0, 0.1, (k,) + x.shape), x.dtype), fresh)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), fresh)
  tx1, tx2 = stage.optimizer(stack(1)), stage.optimizer(stack(2))
  old3 = stack(3)
  tx3 = stage.optimizer(old3)
  assert tx3.update is tx1.update and tx2.update is tx1.update
  s1, s3 = tx1.init(fresh), tx3.init(fresh)
  assert jax.tree.map(jnp.shape, s1) == jax.tree.map(jnp.shape, s3)
  alone = methods.build_optimizer(stage.method, old3, stage.optimizer_settings)
  shared, _ = tx3.update(grads, s3, fresh)
  own, _ = alone.update(grads, alone.init(fresh), fresh)
  for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(own)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # And not the first stage's bases: its update differs from this stage's.
  stale, _ = tx1.update(grads, s1, fresh)
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(stale),
                                                    jax.tree.leaves(own)))


def test_padded_scoring_and_merge_equal_the_unpadded(tmp_path):
  """What the padding changes is only the shapes: the old triplets' scores, the injected
  adapter and the merged base are the unpadded ones (to float rounding)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lbcl_jax import adapters  # pylint: disable=g-import-not-at-top
  from lbcl_jax import train  # pylint: disable=g-import-not-at-top
  _, stage, tasks, key = train.build_stage(du.make_config(
      *du.FAST, *du.tiny_bert(tmp_path), "--config.method=lbcl", "--config.num_tasks=2"))
  params = stage.base.params
  rng = np.random.default_rng(0)
  # Two trained-looking old adapters (random, sigma too: a fresh one's sigma is 0).
  old = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, (2,) + x.shape), x.dtype),
                     stage.fresh_adapter(key))
  assert adapters.num_tasks(old) == 2
  fresh = stage.fresh_adapter(jax.random.fold_in(key, 1))
  results = {}
  for capacity in (0, 5):
    stage.old_capacity = capacity
    probe = stage.probe(tasks[:1], params, old, key)
    scores = probe.score_old(4)
    injected, _ = stage.method.init_adapter(fresh, old, probe)
    results[capacity] = (scores, injected, stage.merge(params, old))
  assert adapters.num_tasks(stage.padded(old)) == 5  # the second pass did run padded
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[5])):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
