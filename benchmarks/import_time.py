"""Import time of the optax transform: `import lbcl_jax.projection` against `import jax, optax`.

Each import runs in a fresh interpreter, the cases interleaved, `--runs` times; prints the
median wall and CPU (user + sys) seconds per case as a Markdown table (BENCHMARKS.md,
"Importing the optax transform").

    python benchmarks/import_time.py --runs 9
"""

import argparse
import platform
import resource
import statistics
import subprocess
import sys
import time

import machine

CASES = {
    "nothing (`python -c pass`)": "pass",
    "`jax, optax`": "import jax, optax",
    "`lbcl_jax.projection`": "import lbcl_jax.projection",
    "`lbcl_jax.projection, flax.linen` (what the import cost before)":
        "import lbcl_jax.projection, flax.linen",
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=9)
  args = parser.parse_args()
  wall = {k: [] for k in CASES}
  cpu = {k: [] for k in CASES}
  for _ in range(args.runs):
    for name, code in CASES.items():
      before = resource.getrusage(resource.RUSAGE_CHILDREN)
      start = time.perf_counter()
      subprocess.run([sys.executable, "-c", code], check=True)
      wall[name].append(time.perf_counter() - start)
      after = resource.getrusage(resource.RUSAGE_CHILDREN)
      cpu[name].append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
  print(f"{machine.summary()}, Python {platform.python_version()}, "
        f"{args.runs} runs, medians")
  print("| import | wall | CPU (user + sys) |\n| --- | --- | --- |")
  for name in CASES:
    print(f"| {name} | {statistics.median(wall[name]):.2f} s | "
          f"{statistics.median(cpu[name]):.2f} s |")


if __name__ == "__main__":
  main()
