"""Wall time and peak memory of the embedded default run (`python -m lbcl_jax.main`).

Runs the command in a fresh process (so its peak RSS is its own), prints a table and writes
`benchmarks/results/default_run.json`.

  python benchmarks/default_run.py [--workdir /tmp/lbcl_bench] [-- extra --config.* flags]
"""

import argparse
import json
import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from lbcl_jax import metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", default=None, help="run directory (default: a temp dir)")
  parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "default_run.json"))
  parser.add_argument("extra", nargs="*", help="extra flags for lbcl_jax.main")
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="lbcl_default_"))
  if workdir.exists():
    shutil.rmtree(workdir)
  cmd = [sys.executable, "-m", "lbcl_jax.main", f"--workdir={workdir}", *args.extra]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode:
    sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  # ru_maxrss of finished children, in KiB on Linux.
  peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
  results = json.loads((workdir / "results.json").read_text())
  row = {
      "command": " ".join(cmd[1:]),
      "wall_seconds": round(wall, 1),
      "train_seconds": round(results["train_seconds"], 1),
      "peak_rss_mib": round(peak_mib, 1),
      "tasks": results["tasks"],
      "global_steps": results["global_steps"],
      "average_accuracy": results["average_accuracy"],
      "bwt": results["bwt"],
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
  }
  print(f"{'wall (s)':>10} {'train (s)':>10} {'peak RSS (MiB)':>15} {'steps':>6} {'avg acc':>8} {'BWT':>7}")
  print(f"{row['wall_seconds']:>10} {row['train_seconds']:>10} {row['peak_rss_mib']:>15} "
        f"{row['global_steps']:>6} {100 * row['average_accuracy']:>8.1f} {100 * (row['bwt'] or 0):>7.1f}")
  metrics.atomic_write_text(args.output, json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
  main()
