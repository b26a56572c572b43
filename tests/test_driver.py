"""The driver end to end: `python -m lbcl_jax.main` outputs, resume identity, bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import platform

import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from lbcl_jax import timings
from lbcl_jax.errors import InputError

import driver_utils as du


def _results(workdir):
  return json.loads((workdir / "results.json").read_text())


def test_default_config_two_tasks_writes_every_output(tmp_path):
  """The embedded default (real MiniLM weights), cut to 2 tasks and a few steps."""
  du.minilm_dir()
  wd = tmp_path / "run"
  du.run_main(wd, *du.FAST, "--config.optim.max_steps_per_task=3", "--config.optim.num_epochs=2",
              "--config.eval.extra_label_spaces=seen")
  r = _results(wd)
  assert r["warnings"] == []  # nothing collapsed (run_main also checks stderr)
  assert r["malloc_policy"] == ("reuse" if platform.libc_ver()[0] == "glibc" else "glibc")
  # The devices it ran on, which a benchmark record names beside the host CPU.
  assert r["devices"] == {"platform": "cpu", "kind": "cpu", "count": 1}
  # Every seen label as an option: a superset of the task's own, so never more accurate (up to
  # one near-tie of the 16 test rows, which float rounding of other padded shapes may flip), and
  # the same before a second task's labels exist.
  assert r["label_space"] == "task" and r["eval_split"] == "test"
  seen = r["label_spaces"]["seen"]["accuracy_matrix"]
  np.testing.assert_allclose(seen[0][0], r["accuracy_matrix"][0][0], atol=1 / 16 + 1e-9)
  assert all(s <= t + 1 / 16 + 1e-9 for s, t in zip(seen[1], r["accuracy_matrix"][1]))
  assert r["method"] == "lbcl" and r["tasks"] == ["syn_news", "syn_sentiment"]
  m = r["accuracy_matrix"]
  assert len(m) == 2 and m[0][1] is None and all(0.0 <= v <= 1.0 for v in m[1])
  assert math.isclose(r["average_accuracy"], np.mean(m[1]), abs_tol=1e-12)
  assert math.isclose(r["bwt"], m[1][0] - m[0][0], abs_tol=1e-12)
  assert r["config"]["method"] == "lbcl"
  # lbcl scored the first task's triplets on the second task's seeds: one [K=1][r] per layer.
  (scores,) = r["sensitivity"].values()
  assert scores and all(np.asarray(v).shape == (1, 8) for v in scores.values())
  assert all(len(c) == 3 for c in r["losses"].values())  # logged every step
  with open(wd / "accuracy_matrix.csv") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["after", "syn_news", "syn_sentiment"]
  assert float(rows[2][1]) == pytest.approx(m[1][0], abs=1e-6)
  report = (wd / "report.md").read_text()
  assert f"{100 * r['average_accuracy']:.2f}" in report
  for png in ("accuracy_matrix.png", "sensitivity.png", "loss_curves.png"):
    with Image.open(wd / png) as im:
      assert im.format == "PNG" and im.size[0] > 100
  _check_event_file(wd, r)
  assert (wd / "checkpoints").is_dir() and (wd / "config.json").is_file()


def _check_event_file(wd, results):
  """The TensorBoard event file holds the logged losses, the accuracies and the hparams."""
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  (path,) = wd.glob("events.out.tfevents*")
  scalars, plugins = {}, set()
  for event in event_file_loader.EventFileLoader(str(path)).Load():
    for value in event.summary.value:
      plugin = value.metadata.plugin_data.plugin_name
      plugins.add(plugin)
      if plugin == "scalars":
        scalars.setdefault(value.tag, []).append((event.step, value.tensor.float_val[0]))
  assert "hparams" in plugins
  for label, curve in results["losses"].items():
    logged = scalars[f"train_loss/{label}"]
    assert [s for s, _ in logged] == [s for s, _ in curve]
    np.testing.assert_allclose([v for _, v in logged], [v for _, v in curve], rtol=1e-6)
  last = results["accuracy_matrix"][-1]
  for j, task in enumerate(results["tasks"]):
    assert scalars[f"accuracy/{task}"][-1][1] == pytest.approx(last[j])


@pytest.mark.parametrize("method", ["lbcl", "seqft"])
def test_resume_after_kill_is_identical(tmp_path, method):
  """SIGKILL in the middle of the second task, resume, and end exactly where an uninterrupted
  run ends: same accuracy matrix, same loss curve bit for bit, same sensitivity scores."""
  args = [*du.FAST, *du.tiny_bert(tmp_path), f"--config.method={method}",
          "--config.checkpoint.every_steps=2", "--config.optim.max_steps_per_task=6",
          "--config.optim.num_epochs=3"]
  straight = tmp_path / "straight"
  du.run_main(straight, *args)
  # Killed after step 9, it resumes from the checkpoint at global step 8.
  resumed = du.killed_then_resumed(tmp_path / "killed", args, kill_at_step=9)
  du.assert_same_run(_results(straight), resumed)
  assert resumed["global_steps"] == 12


def test_refuses_workdir_of_another_config(tmp_path):
  args = [*du.FAST, *du.tiny_bert(tmp_path), "--config.optim.max_steps_per_task=1",
          "--config.num_tasks=1"]
  du.run_main(tmp_path / "wd", *args)
  proc = du.run_main(tmp_path / "wd", *args, "--config.adapters.rank=4", check=False)
  assert proc.returncode != 0
  assert "holds a run of a different config" in proc.stderr
  assert "adapters.rank: 8 there, 4 now" in proc.stderr


def test_a_field_added_since_at_its_default_is_the_same_run(tmp_path):
  """A workdir whose recorded config predates a field (the code gained it since) resumes when
  the run leaves the field at its default, and is refused when the run sets it otherwise."""
  from lbcl_jax import checkpointing  # pylint: disable=g-import-not-at-top
  config = du.make_config(*du.FAST)
  checkpointing.check_workdir_config(tmp_path, config)
  path = tmp_path / checkpointing.CONFIG_FILE
  recorded = json.loads(path.read_text())
  del recorded["ewc"], recorded["replay"]["share"]
  path.write_text(json.dumps(recorded))
  checkpointing.check_workdir_config(tmp_path, config)  # the defaults: the same run
  config.process.mmap_threshold_bytes = 0  # how the process allocates: may differ on resume
  checkpointing.check_workdir_config(tmp_path, config)
  config.replay.share = 0.5
  with pytest.raises(InputError, match=r"replay.share: '<absent>' there, 0.5 now"):
    checkpointing.check_workdir_config(tmp_path, config)


@pytest.mark.parametrize("override, message", [
    ("--config.method=lora2", "lora2"),
    ("--config.order=9", "9"),
    ("--config.order=agnews,nosuchtask", "nosuchtask"),
    ("--config.no_such_key=1", "no_such_key"),
    ("--config.optim.lr=1", "closest valid keys: optim.learning_rate"),
    ("--config.adapters.rank=abc", "--config.adapters.rank=abc"),
    ("--config=nowhere/config.py", "no such config file"),
    ("--config.adapters.rank=65", "exceeds min(d_in, d_out)"),
    ("--config.optim.global_batch_size=12", "not divisible by the data-parallel size 8"),
    ("--config.model.path=/nonexistent/model", "/nonexistent/model"),
    ("--config.data.source=local", "data_dir"),
    ("--config.process.mmap_threshold_bytes=-1", "config.process.mmap_threshold_bytes=-1"),
    ("--config.process.malloc=fast", "config.process.malloc='fast'"),
])
def test_bad_input_fails_before_any_work(tmp_path, override, message):
  wd = tmp_path / "wd"
  args = [*du.FAST, *du.tiny_bert(tmp_path), override]
  proc = du.run_main(wd, *args, devices=8, check=False, timeout=300)
  _assert_one_line_error(proc, message)
  assert not (wd / "checkpoints").exists() or not any((wd / "checkpoints").iterdir())
  assert not (wd / "results.json").exists()


def _assert_one_line_error(proc, message):
  """Bad input: exit status 2, no traceback, and a last line `error: ...` holding `message`."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, proc.stderr[-3000:]


def test_missing_data_dir_names_it(tmp_path):
  proc = du.run_main(tmp_path / "wd", *du.FAST, *du.tiny_bert(tmp_path), "--config.data.source=local",
                     "--config.order=agnews", f"--config.data.data_dir={tmp_path}/nowhere",
                     check=False)
  _assert_one_line_error(proc, f"{tmp_path}/nowhere")


def test_a_bug_keeps_its_traceback(tmp_path):
  """Only bad input is shortened to one line: any other exception is a bug and shows in full."""
  code = ("import sys; from lbcl_jax import main, train\n"
          "def boom(config, workdir): raise RuntimeError('a bug in the driver')\n"
          "train.train_and_evaluate = boom\n"
          "sys.argv = ['lbcl_jax.main', '--workdir=' + sys.argv[1]]\n"
          "main.run()\n")
  proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "wd")], cwd=du.REPO_ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert "Traceback" in proc.stderr and "RuntimeError: a bug in the driver" in proc.stderr
  assert "error: " not in proc.stderr


def test_diagonal_final_matrix_measures_what_average_and_bwt_need(tmp_path):
  """`eval.matrix=diagonal_final` trains exactly as "full" does and measures its diagonal and
  last row, nothing else; forgetting, which needs the rest, is absent and the report says why.
  Both runs record each stage's costs. The C heap differs too (the full run with huge pages,
  for which `python -m lbcl_jax.main` starts itself again where the kernel gives them only on
  request; the sparse one under issue 28's policy): how the heap serves XLA's buffers does not
  change a loss."""
  args = [*du.FAST, *du.tiny_bert(tmp_path), "--config.num_tasks=3",
          "--config.optim.max_steps_per_task=3", "--config.checkpoint.every_steps=2"]
  du.run_main(tmp_path / "full", *args, "--config.process.huge_pages=True")
  du.run_main(tmp_path / "sparse", *args, "--config.eval.matrix=diagonal_final",
              "--config.process.malloc=return")
  full, sparse = _results(tmp_path / "full"), _results(tmp_path / "sparse")
  assert full["eval_matrix"] == "full" and sparse["eval_matrix"] == "diagonal_final"
  restarted = timings.huge_pages_environ() or os.environ
  assert full["huge_pages"] == timings.huge_pages_in_force(restarted)
  assert sparse["huge_pages"] == timings.huge_pages_in_force(os.environ)
  if platform.libc_ver()[0] == "glibc":
    assert (full["malloc_policy"], sparse["malloc_policy"]) == ("reuse", "return")
  assert full["losses"] == sparse["losses"]
  f, s = full["accuracy_matrix"], sparse["accuracy_matrix"]
  for i in range(3):
    for j in range(3):
      measured = i == j or i == 2
      assert (s[i][j] is not None) == measured, (i, j)
      if measured:
        assert s[i][j] == f[i][j]
  assert f[1][0] is not None  # the full run measured what the sparse one skipped
  assert sparse["average_accuracy"] == full["average_accuracy"]
  assert sparse["bwt"] == full["bwt"]
  assert full["forgetting"] is not None and sparse["forgetting"] is None
  assert "n/a (needs `--config.eval.matrix=full`)" in (tmp_path / "sparse" / "report.md").read_text()
  for r in (full, sparse):
    costs = [r["stage_costs"][label] for label in r["stages"]]
    assert [c["old_tasks"] for c in costs] == [0, 1, 2]
    assert [c["evaluated_tasks"] for c in costs] == (
        [1, 2, 3] if r is full else [1, 1, 3])
    for c in costs:
      assert c["step_seconds"] > 0 and c["eval_seconds"] > 0
      assert c["checkpoint_seconds"] > 0 and c["peak_rss_bytes"] > 2**20
      assert c["batch_shape"][0] == 8 and c["batch_shape"][1] <= 32  # the padded input ids
      # 3 steps, one of them the compiling first: the steady steps fit in the stage's training.
      assert 2 * c["step_seconds"] < c["train_seconds"]
