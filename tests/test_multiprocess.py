"""Several processes on one machine, as several hosts run: launch, results, kill, resume.

Two processes on localhost with two fake CPU devices each (four devices in all) run a two-task
LB-CL sequence through `launch/gpu.sh`'s multi-node mode (gloo collectives), and are compared
with one process driving four devices: the same global batch, so the same losses and accuracy
matrix up to float summation order. Kills (`debug.kill_at_step`, a SIGKILL of every process
at the same step) and restarts on another process count end where the uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

import driver_utils as du
from lbcl_jax import distributed
from lbcl_jax.errors import InputError

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = ["--config.method=lbcl", "--config.optim.max_steps_per_task=4",
       "--config.checkpoint.every_steps=2", "--config.log_every_steps=1"]
DEVICES = 4  # in all: one process x 4, or two processes x 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  return env


def _launch(workdir: pathlib.Path, processes: int, *args: str, timeout: int = 300,
            port: int | None = None, extra_flags: dict | None = None) -> list:
  """Runs the driver as `processes` processes through launch/gpu.sh; returns the
  CompletedProcess-like (returncode, stderr) of each."""
  port = port or _free_port()
  procs = []
  for i in range(processes):
    env = _env(DEVICES // processes)
    env.update(CONFIG=str(ROOT / "lbcl_jax" / "config_lib.py"), WORKDIR=str(workdir),
               PYTHON=sys.executable)
    if processes > 1:
      env.update(COORDINATOR=f"127.0.0.1:{port}", NUM_PROCESSES=str(processes),
                 PROCESS_ID=str(i))
    flags = list(args) + list((extra_flags or {}).get(i, []))
    procs.append(subprocess.Popen(["bash", str(ROOT / "launch" / "gpu.sh"), *flags], env=env,
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True))
  out = []
  for p in procs:
    try:
      _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      # Which process hung, and where: every process's state and the end of its stderr.
      running = [i for i, q in enumerate(procs) if q.poll() is None]
      for q in procs:
        q.kill()
      errs = [q.communicate()[1] for q in procs]
      tails = "\n".join(f"--- process {i} (rc {q.returncode}):\n{e[-1500:]}"
                        for i, (q, e) in enumerate(zip(procs, errs)))
      pytest.fail(f"{processes} process(es) not done after {timeout} s; process(es) {running} "
                  f"were still running\n{tails}")
    out.append((p.returncode, err))
  return out


def _ok(results):
  for rc, err in results:
    assert rc == 0, err[-3000:]


def _killed(results):
  for rc, err in results:
    assert rc == -9 or rc == 137, (rc, err[-3000:])


def _results(workdir):
  return json.loads((workdir / "results.json").read_text())


def _same_run(a, b):
  """The same run up to float summation order: losses and accuracies."""
  assert a["tasks"] == b["tasks"] and a["stages"] == b["stages"]
  assert a["losses"].keys() == b["losses"].keys()
  for label in a["losses"]:
    sa, la = zip(*a["losses"][label])
    sb, lb = zip(*b["losses"][label])
    assert sa == sb
    np.testing.assert_allclose(la, lb, rtol=2e-5, err_msg=label)
  np.testing.assert_allclose(np.asarray(a["accuracy_matrix"], float),
                             np.asarray(b["accuracy_matrix"], float), atol=1e-9)
  for task in a["sensitivity"]:
    for path, scores in a["sensitivity"][task].items():
      np.testing.assert_allclose(scores, b["sensitivity"][task][path], rtol=1e-4, atol=1e-9)


def _outputs(workdir):
  return sorted(p.name for p in workdir.iterdir()
                if p.name != "checkpoints" and not p.name.startswith("events.out"))


def _event_files(workdir):
  return len(list(workdir.glob("events.out.tfevents*")))


@pytest.fixture(scope="module")
def common(tmp_path_factory):
  du.minilm_dir()  # the tiny BERT borrows MiniLM's tokenizer
  return [*du.FAST, *du.tiny_bert(tmp_path_factory.mktemp("model")), *RUN]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, common):
  wd = tmp_path_factory.mktemp("reference") / "wd"
  _ok(_launch(wd, 1, *common))
  return wd


def test_two_processes_match_one_through_kills_and_size_changes(tmp_path, common, reference):
  """Two processes are killed mid-task-1 (both, SIGKILL), the run is restarted on one process
  (2 -> 1) and killed mid-task-2, then finished by two (1 -> 2): it ends where one
  uninterrupted process ends. Nothing was half-written at the kills, and exactly one process
  of each invocation wrote outputs."""
  wd = tmp_path / "wd"
  _killed(_launch(wd, 2, *common, "--config.debug.kill_at_step=3"))
  assert not (wd / "results.json").exists()
  assert not list(wd.rglob("*.tmp*"))  # the atomic writers leave no partial file behind
  _killed(_launch(wd, 1, *common, "--config.debug.kill_at_step=6"))
  _ok(_launch(wd, 2, *common))
  _same_run(_results(reference), _results(wd))
  assert _outputs(wd) == _outputs(reference)
  assert _event_files(wd) == 3  # one per invocation: process 0's


# ---------------------------------------------------------------------------------------------
# Bad input: one line, in bounded time.


def test_resolve_reads_flags_then_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert distributed.resolve(env=env) == distributed.Cluster("10.0.0.1:1234", 4, 3)
  assert distributed.resolve(process_id=1, env=env).process_id == 1  # a flag wins
  assert distributed.resolve(env={}) == distributed.Cluster()  # one process
  assert distributed.resolve(env={"TPU_WORKER_HOSTNAMES": "a,b"}).auto  # JAX detects TPU pods
  assert distributed.resolve(env={"SLURM_NTASKS": "2"}, multihost=False).distributed is False
  for bad, match in [({"JAX_COORDINATOR_ADDRESS": "h:1"}, "missing --num_processes"),
                     ({**env, "JAX_PROCESS_ID": "4"}, r"JAX_PROCESS_ID=4: must be in \[0, 4\)"),
                     ({**env, "JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two'"),
                     ({**env, "JAX_COORDINATOR_ADDRESS": "nohost"}, "expected host:port")]:
    with pytest.raises(InputError, match=match):
      distributed.resolve(env=bad)


def _one_line_error(rc, err, message):
  assert rc == 2, err[-3000:]
  assert "Traceback" not in err and "Check failure" not in err, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, err[-3000:]


def test_a_coordinator_that_never_answers_fails_in_bounded_time(tmp_path, common):
  (rc, err), = _launch(tmp_path / "wd", 1, *common, "--distributed_timeout=3",
                       "--coordinator_address=127.0.0.1:%d" % _free_port(),
                       "--num_processes=2", "--process_id=1", timeout=60)
  _one_line_error(rc, err, "within 3 s (coordinator did not answer")


def test_processes_with_different_configs_refuse_to_run(tmp_path, common):
  results = _launch(tmp_path / "wd", 2, *common, timeout=120,
                    extra_flags={1: ["--config.adapters.rank=4"]})
  for rc, err in results:
    _one_line_error(rc, err, "the run config of process(es) [1] differs from process 0's")
  assert not (tmp_path / "wd" / "checkpoints").exists() or not any(
      (tmp_path / "wd" / "checkpoints").iterdir())


def test_tpu_launcher_dry_run_prints_its_gcloud_commands():
  env = dict(os.environ, DRY_RUN="1", TPU_NAME="lbcl", ZONE="us-central2-b",
             ACCELERATOR="v4-32", REPO="https://example.com/lbcl_jax.git",
             WORKDIR="gs://bucket/run", EXTRA="--config.order=2")
  out = subprocess.run(["bash", str(ROOT / "launch" / "tpu_vm.sh"), "all"], env=env,
                       capture_output=True, text=True, check=True).stdout.splitlines()
  assert len(out) == 3 and all(line.startswith("gcloud compute tpus tpu-vm ") for line in out)
  assert "create lbcl --zone us-central2-b --accelerator-type v4-32" in out[0]
  assert "--worker=all" in out[1] and "https://example.com/lbcl_jax.git" in out[1]
  run = out[2].replace("\\", "")
  assert "--worker=all" in run and "python3 -m lbcl_jax.main --multihost" in run
  assert "--workdir='gs://bucket/run' --config.order=2" in run
  bad = subprocess.run(["bash", str(ROOT / "launch" / "tpu_vm.sh"), "launch"], env=env,
                       capture_output=True, text=True)
  assert bad.returncode == 2 and "unknown step 'launch'" in bad.stderr
