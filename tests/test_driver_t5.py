"""The paper's evaluation path through the driver: a tiny random T5, greedy generation + exact
match (and rank classification), two tasks of `python -m lbcl_jax.main`, and a kill -9 resume.

The tokenizer is built at test time (tests/tiny_tokenizer.py), so nothing here needs shared/.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import driver_utils as du

# 6 steps per task, a checkpoint every 4 steps of a task (and at its end): global steps 4, 6,
# 10, 12. The kill at global step 11 falls in the second task, 1 step after a mid-task
# checkpoint (half the checkpoints of every 2 steps, the same coverage).
STEPS = ["--config.optim.max_steps_per_task=6", "--config.optim.num_epochs=3",
         "--config.checkpoint.every_steps=4", "--config.eval.max_new_tokens=4",
         "--config.plots=False"]


def _results(workdir):
  return json.loads((workdir / "results.json").read_text())


def _check_matrix(results):
  """A 2x2 lower-triangular accuracy matrix of fractions, and the summary metrics beside it."""
  m = results["accuracy_matrix"]
  assert results["tasks"] == ["syn_news", "syn_sentiment"]
  assert len(m) == 2 and all(len(row) == 2 for row in m)
  assert m[0][1] is None
  for v in (m[0][0], *m[1]):
    assert isinstance(v, float) and 0.0 <= v <= 1.0
  assert results["average_accuracy"] == pytest.approx(np.mean(m[1]), abs=1e-12)
  assert results["bwt"] == pytest.approx(m[1][0] - m[0][0], abs=1e-12)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  """(args, workdir) of an uninterrupted two-task lbcl run in generate mode, shared by the
  output test and the resume test (one run fewer)."""
  tmp = tmp_path_factory.mktemp("t5_generate")
  args = [*du.FAST, *du.tiny_t5(tmp), "--config.method=lbcl", "--config.eval.mode=generate",
          *STEPS]
  du.run_main(tmp / "straight", *args)
  return args, tmp / "straight"


def test_generate_two_tasks(generated):
  """Greedy generation + exact match after each task (the paper's evaluation)."""
  _, wd = generated
  r = _results(wd)
  _check_matrix(r)
  assert r["config"]["eval"]["mode"] == "generate" and r["config"]["model"]["family"] == "t5"
  assert r["global_steps"] == 12


def test_rank_two_tasks(tmp_path):
  """Rank classification: every option's likelihood under the decoder."""
  wd = tmp_path / "rank"
  du.run_main(wd, *du.FAST, *du.tiny_t5(tmp_path), "--config.method=lbcl",
              "--config.eval.mode=rank", "--config.optim.max_steps_per_task=3",
              "--config.plots=False", "--config.checkpoint.every_steps=0")
  r = _results(wd)
  _check_matrix(r)
  assert r["config"]["eval"]["mode"] == "rank"


def test_resume_after_kill_is_identical(generated, tmp_path):
  """SIGKILL in the second task, resume: the same accuracies, losses and sensitivity scores as
  the uninterrupted run, bit for bit."""
  args, straight = generated
  # Killed after step 11, it resumes from the checkpoint at global step 10.
  resumed = du.killed_then_resumed(tmp_path / "killed", args, kill_at_step=11)
  du.assert_same_run(_results(straight), resumed)
  assert resumed["global_steps"] == 12


def test_trained_tiny_t5_generates_the_labels(tmp_path):
  """Generation + exact match measures learning: the random T5 (frozen) with trained adapters
  writes the exact label strings of an easy task after 100 steps. Measured on 32 test rows:
  seqft 1.0 (final loss 0.03); lbcl 0.81 (0.91 at 150 steps), hence seqft here;
  the untrained model 0. Source length 64 keeps the sentence, which 32 cuts off."""
  wd = tmp_path / "learn"
  du.run_main(wd, *du.FAST, *du.tiny_t5(tmp_path), "--config.method=seqft",
              "--config.order=syn_sentiment", "--config.num_tasks=1",
              "--config.eval.mode=generate", "--config.eval.max_new_tokens=4",
              "--config.data.train_per_class=32", "--config.data.max_test_examples=32",
              "--config.data.max_source_length=64", "--config.optim.learning_rate=5e-3",
              "--config.optim.max_steps_per_task=100", "--config.optim.num_epochs=100",
              "--config.log_every_steps=10", "--config.plots=False",
              "--config.checkpoint.every_steps=0")
  (accuracy,), = _results(wd)["accuracy_matrix"]
  assert accuracy >= 0.75


def test_tiny_tokenizer_is_t5_like_and_decodes_every_label(tmp_path):
  """The ids T5 code relies on, `</s>` after every sequence, identical files on every build,
  and generated label ids decode to strings exact match accepts."""
  import tiny_tokenizer  # pylint: disable=g-import-not-at-top
  from lbcl_jax import evaluation, tasks  # pylint: disable=g-import-not-at-top
  from lbcl_jax.models import hf  # pylint: disable=g-import-not-at-top
  tiny_tokenizer.save(tmp_path / "a")
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "tokenizer.json").write_text(tiny_tokenizer.build().to_str(pretty=True))
  assert ((tmp_path / "a" / "tokenizer.json").read_bytes()
          == (tmp_path / "b" / "tokenizer.json").read_bytes())
  tok = hf.load_tokenizer(tmp_path / "a")
  assert tok.is_fast and len(tok) <= du.TINY_T5["vocab_size"]
  assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
  assert tok("")["input_ids"] == [1] and tok("Hi there")["input_ids"][-1] == 1
  for task in tasks.SYNTHETIC_TASKS:
    ids = tok(text_target=list(task.labels))["input_ids"]
    assert all(2 not in row for row in ids)  # every label word is in the vocabulary
    # As `t5.greedy_generate` returns them: label, EOS, then padding.
    width = max(map(len, ids)) + 2
    rows = np.asarray([row + [0] * (width - len(row)) for row in ids])
    texts = evaluation.decode(tok, rows)
    assert texts == list(task.labels)
    np.testing.assert_array_equal(evaluation.match_options(texts, task.labels),
                                  np.arange(task.num_labels))
