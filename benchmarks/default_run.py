"""Wall time, where it goes, and peak memory of the embedded default run (`python -m lbcl_jax.main`).

Runs the command in a fresh process (so its peak RSS and its imports are its own), prints a table
and writes `benchmarks/results/default_run.json`. The phases come from the run's own
`results.json["timings"]`; `import` is the time to import the driver, and `compile` (tracing,
lowering and XLA compilation, from JAX's monitoring events) overlaps the phases it happened in.

`--baseline DIR` first runs the same command from another checkout (e.g. a `git worktree` of an
earlier commit), in its own process, so that the two are measured side by side on one machine;
phases an older driver does not record show as n/a.

  python benchmarks/default_run.py [--baseline /tmp/before] [-- extra --config.* flags]
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import machine

ROOT = pathlib.Path(__file__).resolve().parents[1]
PHASES = ("import", "model_load", "data", "stage_setup", "train", "eval", "checkpoint", "results")

# Runs lbcl_jax.main as `python -m` would, recording the import time and JAX's compile time.
_WRAPPER = r"""
import json, sys, time
t0 = time.perf_counter()
from jax import monitoring
compile_seconds = [0.0]
def _on_event(name, seconds, **_):
  if name.startswith("/jax/core/compile/"):
    compile_seconds[0] += seconds
monitoring.register_event_duration_secs_listener(_on_event)
import lbcl_jax.train, lbcl_jax.main
imported = time.perf_counter() - t0
sidecar, argv = sys.argv[1], sys.argv[2:]
def _write():
  with open(sidecar, "w") as f:
    json.dump({"import": imported, "compile": compile_seconds[0]}, f)
import atexit
atexit.register(_write)
sys.argv = ["lbcl_jax.main", *argv]
lbcl_jax.main.run()
"""


def run_once(checkout: pathlib.Path, workdir: pathlib.Path, extra: list) -> dict:
  if workdir.exists():
    shutil.rmtree(workdir)
  workdir.mkdir(parents=True)
  sidecar = workdir.parent / (workdir.name + ".timing.json")
  env = dict(os.environ, PYTHONPATH=str(checkout))
  cmd = [sys.executable, "-c", _WRAPPER, str(sidecar), f"--workdir={workdir}", *extra]
  log = workdir.parent / (workdir.name + ".log")
  t0 = time.perf_counter()
  with open(log, "w") as out:
    proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=out, stderr=subprocess.STDOUT)
    # wait4 gives this child's own peak RSS (KiB on Linux), not the largest child's so far.
    _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - t0
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    sys.exit(f"the default run in {checkout} failed ({proc.returncode}):\n{log.read_text()[-4000:]}")
  peak = usage.ru_maxrss
  results = json.loads((workdir / "results.json").read_text())
  side = json.loads(sidecar.read_text())
  timings = dict(results.get("timings", {}))
  phases = {p: timings.get(p) for p in PHASES}
  phases["import"] = side["import"]
  return {
      "checkout": str(checkout),
      "wall_seconds": round(wall, 1),
      "phases_seconds": {k: None if v is None else round(v, 1) for k, v in phases.items()},
      "compile_seconds": round(side["compile"], 1),
      "train_seconds": round(results["train_seconds"], 1),
      "peak_rss_mib": round(peak / 1024, 1),
      "tasks": results["tasks"],
      "global_steps": results["global_steps"],
      "accuracy_matrix": results["accuracy_matrix"],
      "average_accuracy": results["average_accuracy"],
      "bwt": results["bwt"],
  }


def _cell(v, fmt="{:.1f}"):
  return "n/a" if v is None else fmt.format(v)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--baseline", default=None,
                      help="another checkout to run first, side by side (e.g. a git worktree)")
  parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "default_run.json"))
  parser.add_argument("extra", nargs="*", help="extra flags for lbcl_jax.main")
  args = parser.parse_args()
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="lbcl_default_"))
  runs = {}
  if args.baseline:
    runs["baseline"] = run_once(pathlib.Path(args.baseline).resolve(), tmp / "baseline", args.extra)
  runs["this"] = run_once(ROOT, tmp / "this", args.extra)
  shutil.rmtree(tmp, ignore_errors=True)

  names = list(runs)
  print(f"{'seconds':<22}" + "".join(f"{n:>12}" for n in names))
  rows = [("wall", "wall_seconds")] + [(p, p) for p in PHASES] + [
      ("  of which compiling", "compile_seconds"), ("peak RSS (MiB)", "peak_rss_mib")]
  for label, key in rows:
    vals = [r["phases_seconds"].get(key) if key in PHASES else r[key] for r in runs.values()]
    print(f"{label:<22}" + "".join(f"{_cell(v):>12}" for v in vals))
  print(f"{'average accuracy':<22}" + "".join(f"{100 * r['average_accuracy']:>12.1f}" for r in runs.values()))
  print(f"{'BWT':<22}" + "".join(f"{100 * (r['bwt'] or 0):>12.1f}" for r in runs.values()))
  out = {
      "command": "python -m lbcl_jax.main " + " ".join(args.extra),
      "machine": machine.describe(),
      "runs": runs,
  }
  from lbcl_jax import files  # pylint: disable=g-import-not-at-top
  files.atomic_write_text(args.output, json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
  main()
