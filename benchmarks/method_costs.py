"""What a task costs each continual-learning method on SmolLM2, side by side on one machine.

The grid's records (`generative_cl.py`) hold each cell's stage costs, but their cells ran on
different machines over days, some beside other work, so their seconds do not compare
methods. Here every method runs the same short sequence in turn, in a fresh process each, on
one machine in one run: the grid's settings (`generative_cl.COMMON`: batch 8 x 128 tokens,
clipping, the SmolLM2 config), order 1's first `--tasks` tasks, `--steps` steps a task and a
small evaluation. From each run's `results.json` (the driver's `stage_costs`), per method:

* set-up + end of a stage (the method's own passes: injection scoring, a Fisher, the layer
  inputs of InfLoRA, the replay memory) with the most old tasks (the last stage);
* a steady training step, the median over the stages (the step of the last stage too: the
  projection and penalties grow with old tasks);
* the bytes it trains, the method state it keeps after the last task, the peak RSS.

Learning rates are the configs' defaults: they change no step's cost. MTL trains one joint
stage, not a task after a task, and is left out.

  python benchmarks/method_costs.py --data_dir ../shared/cl_benchmark [--steps 6] [--tasks 3]
      # -> results/method_costs.json, about 30 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import generative_cl

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Table 1's rows that train task after task, and the four beyond the paper's table.
METHODS = {
    "SeqFT": ("--config.method=seqft",),
    "IncLoRA": ("--config.method=inclora",),
    "O-LoRA": ("--config.method=olora",),
    "NLNB-CL": ("--config.method=nlnbcl",),
    "L-CL": ("--config.method=lcl",),
    "B-CL": ("--config.method=bcl",),
    "LB-CL": ("--config.method=lbcl",),
    "Replay (SeqFT + memory)": generative_cl.REPLAY,
    "EWC (SeqFT)": generative_cl.EWC,
    "InfLoRA": ("--config.method=inflora",),
    "Replay + LB-CL": generative_cl.REPLAY_LBCL,
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "cl_benchmark"))
  p.add_argument("--steps", type=int, default=6, help="training steps a task (>= 3)")
  p.add_argument("--tasks", type=int, default=3, help="order 1's first tasks")
  p.add_argument("--eval_examples", type=int, default=8, help="test sentences a task")
  p.add_argument("--only", default="", help="comma-separated method labels (default: all)")
  p.add_argument("--output", type=pathlib.Path,
                 default=ROOT / "benchmarks" / "results" / "method_costs.json")
  return p.parse_args(argv)


def flags(args, method_flags) -> list[str]:
  order = generative_cl.ORDERS[1].split(",")[:args.tasks]
  common = [f for f in generative_cl.COMMON
            if not f.startswith(("--config.optim.max_steps_per_task=",
                                 "--config.data.max_test_examples="))]
  return [*common, f"--config.optim.max_steps_per_task={args.steps}",
          f"--config.data.max_test_examples={args.eval_examples}",
          f"--config.order={','.join(order)}", "--config.seed=0", *method_flags]


def run_method(args, label: str, method_flags, workdir: pathlib.Path) -> dict:
  cmd = [sys.executable, "-m", "lbcl_jax.main",
         f"--config={generative_cl.SPEC.config}", f"--workdir={workdir}",
         f"--config.data.data_dir={args.data_dir}", *flags(args, method_flags)]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode:
    sys.exit(f"{label}: the run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  results = json.loads((workdir / "results.json").read_text())
  stages = list(results["stage_costs"].values())
  last = stages[-1]
  steps = [s["step_seconds"] for s in stages if "step_seconds" in s]
  return {
      "method": label, "flags": list(method_flags), "wall_seconds": round(wall, 1),
      "last_stage_old_tasks": last.get("old_tasks"),
      "last_stage_setup_and_end_seconds": round(
          last.get("begin_seconds", 0.0) + last.get("end_seconds", 0.0), 2),
      "step_seconds_median": round(statistics.median(steps), 3),
      "last_step_seconds": last.get("step_seconds"),
      "trainable_mb": round(last["trainable_bytes"] / 2**20, 1),
      "method_state_mb": round(last.get("method_state_bytes", 0) / 2**20, 1),
      "peak_rss_gib": round(max(s.get("peak_rss_bytes", 0) for s in stages) / 2**30, 2),
      "stage_costs": results["stage_costs"]}


def main(argv=None) -> int:
  args = parse_args(argv)
  sys.path.insert(0, str(ROOT))
  import machine  # pylint: disable=g-import-not-at-top
  if args.steps < 3:
    sys.exit(f"--steps {args.steps}: at least 3 (the first step compiles; two time a step)")
  if not (pathlib.Path(args.data_dir) / "TC" / "dbpedia").is_dir():
    sys.exit(f"--data_dir {args.data_dir}: no TC/dbpedia there (O-LoRA's CL_Benchmark layout)")
  chosen = [m.strip() for m in args.only.split(",") if m.strip()] or list(METHODS)
  for m in chosen:
    if m not in METHODS:
      sys.exit(f"--only: unknown method {m!r} (one of: {', '.join(METHODS)})")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, label in enumerate(chosen):
      row = run_method(args, label, METHODS[label], pathlib.Path(tmp) / f"m{i}")
      rows.append(row)
      print(f"{label:<24} set-up+end {row['last_stage_setup_and_end_seconds']:6.1f} s  step "
            f"{row['step_seconds_median']:6.2f} s (last stage {row['last_step_seconds']:.2f})  "
            f"state {row['method_state_mb']:7.1f} MB  RSS {row['peak_rss_gib']:.2f} GiB  "
            f"({row['wall_seconds']:.0f} s)", flush=True)
  base = next((r["step_seconds_median"] for r in rows if r["method"] == "IncLoRA"), None)
  print(f"\n| method | set-up + end s (stage {args.tasks}) | step s (median) | step vs IncLoRA "
        "| trained MB | method state MB | peak RSS GiB |\n| --- | --- | --- | --- | --- | --- "
        "| --- |")
  for r in rows:
    ratio = f"{r['step_seconds_median'] / base:.2f}x" if base else "--"
    print(f"| {r['method']} | {r['last_stage_setup_and_end_seconds']} | "
          f"{r['step_seconds_median']} | {ratio} | {r['trainable_mb']} | "
          f"{r['method_state_mb']} | {r['peak_rss_gib']} |")
  doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "machine": machine.describe(),
         "settings": {**{k: str(v) for k, v in vars(args).items()},
                      "flags": flags(args, ())},
         "methods": rows}
  machine.write_record(args.output, doc)
  return 0


if __name__ == "__main__":
  sys.exit(main())
