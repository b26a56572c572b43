"""Faults a long run meets: divergence, damaged checkpoints, SIGTERM, a second run in the same
workdir, and a write that fails."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import driver_utils as du
from lbcl_jax import results


def _results(wd):
  return json.loads((wd / "results.json").read_text())


def _args(tmp_path, *more):
  return [*du.FAST, *du.tiny_bert(tmp_path), "--config.checkpoint.every_steps=2",
          "--config.optim.max_steps_per_task=6", "--config.optim.num_epochs=3",
          "--config.plots=False", *more]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """(args, workdir) of one uninterrupted run, which the resumed runs below must equal."""
  tmp = tmp_path_factory.mktemp("straight")
  args = _args(tmp, "--config.optim.max_steps_per_task=12")
  du.run_main(tmp / "wd", *args)
  return args, tmp / "wd"


def _last_line(proc):
  return proc.stderr.strip().splitlines()[-1]


def test_non_finite_loss_stops_the_run_without_results(tmp_path):
  wd = tmp_path / "wd"
  proc = du.run_main(wd, *_args(tmp_path, "--config.method=seqft",
                                "--config.optim.learning_rate=1e30"), check=False)
  assert proc.returncode == 3, proc.stderr[-3000:]
  last = _last_line(proc)
  assert last.startswith("error: training diverged: the training loss of task syn_news")
  assert "nan" in last or "inf" in last
  assert "--config.optim.learning_rate" in last and "Traceback" not in proc.stderr
  assert not (wd / "results.json").exists()


def test_damaged_newest_checkpoint_falls_back_and_ends_identical(tmp_path, straight):
  args, straight = straight
  wd = tmp_path / "wd"
  proc = du.run_main(wd, *args, "--config.debug.kill_at_step=17", check=False)
  assert proc.returncode == -9
  ckpts = wd / "checkpoints"
  newest = max(int(d.name) for d in ckpts.iterdir() if d.name.isdigit())
  for f in (ckpts / str(newest) / "trainable").rglob("*"):
    if f.is_file() and f.stat().st_size > 16 and "ocdbt" not in f.name and f.suffix != ".json":
      f.write_bytes(f.read_bytes()[:8])
  proc = du.run_main(wd, *args)
  assert f"checkpoint {ckpts / str(newest)} could not be restored" in proc.stderr
  assert (wd / "damaged_checkpoints" / str(newest)).is_dir()
  du.assert_same_run(_results(straight), _results(wd))


def test_no_intact_checkpoint_is_one_error_line(tmp_path):
  args = _args(tmp_path)
  wd = tmp_path / "wd"
  proc = du.run_main(wd, *args, "--config.debug.kill_at_step=9", check=False)
  assert proc.returncode == -9
  for step_dir in (wd / "checkpoints").iterdir():
    for f in step_dir.rglob("*"):
      if f.is_file() and f.stat().st_size > 16 and f.suffix != ".json":
        f.write_bytes(f.read_bytes()[:8])
  proc = du.run_main(wd, *args, check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert _last_line(proc).startswith("error: no checkpoint in ")
  assert not (wd / "results.json").exists()


def test_sigterm_at_a_random_point_checkpoints_and_resumes_identical(tmp_path, straight):
  args, straight = straight
  wd = tmp_path / "wd"
  env = dict(os.environ, PYTHONPATH=str(du.REPO_ROOT))
  proc = subprocess.Popen([sys.executable, "-m", "lbcl_jax.main", f"--workdir={wd}", *args],
                          cwd=du.REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while not (wd / "checkpoints").exists() and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(random.Random(os.getpid()).uniform(0.0, 1.5))
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  if proc.returncode == 0:  # the run had finished before the signal landed
    du.assert_same_run(_results(straight), _results(wd))
    return
  assert proc.returncode == 75, stderr[-3000:]
  assert stderr.strip().splitlines()[-1].startswith("preempted: stopped on SIGTERM")
  assert not (wd / "results.json").exists()
  du.run_main(wd, *args)
  du.assert_same_run(_results(straight), _results(wd))


def test_second_run_in_a_workdir_in_use_is_refused(tmp_path):
  args = _args(tmp_path)
  wd = tmp_path / "wd"
  wd.mkdir()
  from lbcl_jax import checkpointing  # pylint: disable=g-import-not-at-top
  lock = checkpointing.WorkdirLock(wd).acquire()  # a live run holds the workdir
  try:
    proc = du.run_main(wd, *args, check=False)
  finally:
    lock.release()
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert _last_line(proc).startswith(f"error: workdir {wd} is in use by another run (pid "
                                     f"{os.getpid()})")
  # A killed run leaves no stuck lock: the kernel drops it with the process.
  proc = du.run_main(wd, *args, "--config.debug.kill_at_step=3", check=False)
  assert proc.returncode == -9
  du.run_main(wd, *args)
  assert (wd / "results.json").exists()


def test_a_failed_write_leaves_the_previous_results(tmp_path, monkeypatch):
  doc = results.results_document(method="lbcl", tasks=["a"], stages=["a"], matrix=[[0.5]])
  results.write_results(tmp_path, doc, plots=False)
  before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
  newer = results.results_document(method="lbcl", tasks=["a"], stages=["a"], matrix=[[0.9]])

  def broken_fsync(fd):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "fsync", broken_fsync)
  with pytest.raises(OSError):
    results.write_results(tmp_path, newer, plots=False)
  # Every file is the previous complete one, and no temporary file is left behind.
  assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before
