"""How the process's C heap serves XLA's buffers, measured on a fixed training step: the step's
time, its fresh page faults and system time, under each heap policy (`config.process.malloc`)
with and without transparent huge pages (`config.process.huge_pages`).

XLA:CPU allocates an execution's working memory as one block and frees it at its end (1.26 GB
for SmolLM2's step at 8 x 136), and its smaller buffers likewise. Both settings are fixed
when a process starts (glibc reads its tunables then; the driver sets the policy before JAX
starts), so each candidate runs in a fresh process of its own, the candidates in turn, round
after round, so that a slow stretch of a shared machine falls on all of them. A worker times
peer_step.py's step of ours (inclora, f32, same weights and batch in every candidate) after
its warm-up steps; the candidates' losses must be equal (the heap changes no arithmetic).

  python benchmarks/heap_policies.py [--model smollm2] [--rounds 2] [--steps 5]
      # -> results/heap_policies.json, about 9 minutes for SmolLM2 on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# (policy, huge pages): issue 28's policy as it was, then each with huge pages.
CANDIDATES = (("return", False), ("reuse", False), ("return", True), ("reuse", True),
              ("glibc", True))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="smollm2", choices=("smollm2", "minilm", "t5"))
  p.add_argument("--seq-len", type=int, default=136, help="tokens a row (minilm / smollm2)")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--steps", type=int, default=5, help="timed steps a worker")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--output", type=pathlib.Path,
                 default=ROOT / "benchmarks" / "results" / "heap_policies.json")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: "policy,huge"
  return p.parse_args(argv)


def worker(args) -> dict:
  """One candidate in this process: the policy set before JAX loads, then the timed steps."""
  from lbcl_jax import timings  # pylint: disable=g-import-not-at-top
  policy = args.worker.split(",")[0]
  in_force = timings.set_malloc_policy(policy)
  import peer_step  # pylint: disable=g-import-not-at-top  (loads JAX)
  ns = peer_step.parse_args(["--seq-len", str(args.seq_len)])
  ns.dtype, ns.dot_dtype = "float32", ""
  setup = peer_step.SETUPS[args.model](ns, pathlib.Path(tempfile.mkdtemp()))
  stack = peer_step.JaxStack("ours", "inclora", 0, setup, ns)
  for _ in range(args.warmup):
    stack.step()
  times, faults, system = [], [], []
  for _ in range(args.steps):
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    stack.step()
    times.append(time.perf_counter() - t0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    faults.append(r1.ru_minflt - r0.ru_minflt)
    system.append(r1.ru_stime - r0.ru_stime)
  return {"policy": in_force, "huge_pages": timings.huge_pages_in_force(),
          "step_ms": 1e3 * statistics.median(times), "faults": statistics.median(faults),
          "system_s": statistics.median(system), "peak_rss_bytes": timings.peak_rss_bytes(),
          "loss": float(stack.loss)}


def run_candidate(args, policy: str, huge: bool) -> dict:
  from lbcl_jax import timings  # pylint: disable=g-import-not-at-top
  env = dict(os.environ)
  env.pop("GLIBC_TUNABLES", None)
  if huge:
    env = timings.huge_pages_environ(env)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"),
                                       env.get("PYTHONPATH", "")])
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "record.json"
    subprocess.run([sys.executable, __file__, f"--model={args.model}",
                    f"--seq-len={args.seq_len}", f"--steps={args.steps}",
                    f"--warmup={args.warmup}", f"--worker={policy},{int(huge)}",
                    f"--output={out}"], env=env, check=True)
    return json.loads(out.read_text())


def main(argv=None) -> int:
  args = parse_args(argv)
  from lbcl_jax import files  # pylint: disable=g-import-not-at-top
  if args.worker:
    files.atomic_write_text(args.output, json.dumps(worker(args)) + "\n")
    return 0
  from lbcl_jax import timings  # pylint: disable=g-import-not-at-top
  import machine  # pylint: disable=g-import-not-at-top
  if timings.huge_pages_environ({}) is None:
    sys.exit("this machine cannot switch huge pages per process (the kernel's mode is not "
             "'madvise', or glibc is older than 2.35): nothing to compare")
  records = []
  for r in range(args.rounds):
    for policy, huge in CANDIDATES:
      rec = run_candidate(args, policy, huge)
      rec.update(round=r, candidate=f"{policy}{' + huge pages' if huge else ''}")
      records.append(rec)
      print(f"round {r}  {rec['candidate']:<22} step {rec['step_ms']:7.0f} ms  faults "
            f"{rec['faults']:8.0f}  system {rec['system_s']:5.2f} s  peak RSS "
            f"{rec['peak_rss_bytes'] / 2**30:5.2f} GiB  loss {rec['loss']:.6f}", flush=True)
  losses = {rec["loss"] for rec in records}
  if len(losses) != 1:
    sys.exit(f"the candidates' losses differ: {sorted(losses)}")
  summary = {}
  for policy, huge in CANDIDATES:
    mine = [rec for rec in records if (rec["policy"], rec["huge_pages"]) == (policy, huge)]
    summary[mine[0]["candidate"]] = {
        "step_ms": [round(rec["step_ms"]) for rec in mine],
        "faults": [rec["faults"] for rec in mine],
        "system_s": [round(rec["system_s"], 2) for rec in mine]}
  print(f"\n{'candidate':<22} {'step ms, by round':>24} {'faults a step':>24}")
  for name, s in summary.items():
    print(f"{name:<22} {', '.join(map(str, s['step_ms'])):>24} "
          f"{', '.join(f'{f:.0f}' for f in s['faults']):>24}")
  doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "machine": machine.describe(), "settings": {k: str(v) for k, v in vars(args).items()},
         "summary": summary, "records": records}
  machine.write_record(args.output, doc)
  return 0


if __name__ == "__main__":
  sys.exit(main())
