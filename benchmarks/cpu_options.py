"""XLA:CPU's own options for our adapter train step: which of them makes it fastest here.

Issue 33 asks the step to be fast on every machine it meets, measured against the machine's
own limit (peer_step.py's roofline). Part of that limit is XLA:CPU's configuration, which is
set through XLA_FLAGS -- read once, when jax's CPU client starts, so every candidate runs in a
fresh subprocess with XLA_FLAGS set before jax is imported. Candidates (CANDIDATES): the
installed jaxlib's defaults (baseline); the pre-thunk runtime; fast-math variants; oneDNN
(thunks, fusions, custom calls, and the older `xla_cpu_use_mkl_dnn` name); XNNPACK off and its
fusions; XLA's vector width and optimisation preset; and bf16 compute for ours (the
`--config.model.dtype=bfloat16` of the driver: bf16 compute, f32 params and optimizer) and
bf16 matmul operands (`--config.model.dot_dtype=bfloat16`: the Dense layers' matmuls in bf16
with f32 accumulation, the rest f32), where the CPU has BF16 or AMX units
(benchmarks/machine.py).

Discovery first: each candidate's flags are tried on a tiny jax program (`probe_flags`). A flag
the installed jaxlib does not know, or a value it refuses, aborts flag parsing ("Unknown flag in
XLA_FLAGS", "Illegal value"): such a candidate is recorded `unsupported`, not a failure. A flag
that parses but is only kept for compatibility is run and marked `deprecated`.

Each supported candidate then builds our step as peer_step.py does (`peer_step.SETUPS`,
`peer_step.JaxStack`: core_overhead's compiled driver step, inclora by default), runs --warmup
untimed then --steps timed steps from the same initial adapters on the same batch, and reports
its median step time, the ratio to the baseline's, XLA's FLOPs for the compiled step, and the
losses of every step: `max_abs_loss_diff` vs the baseline's losses at the same step says whether
the option keeps the outputs equal (within --loss-rtol of the baseline's loss). The fastest
candidate, and the fastest within tolerance, are recorded; nothing here changes the package's
defaults.

  python benchmarks/cpu_options.py                          # smollm2, all candidates
  python benchmarks/cpu_options.py --models smollm2,t5,minilm --steps 10
  python benchmarks/cpu_options.py --steps 2 --warmup 1 --output /tmp/co.json   # smoke
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import numpy as np

from lbcl_jax import files

import machine

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# What XLA prints when XLA_FLAGS does not parse (the process then aborts).
PARSE_ERRORS = ("Unknown flag in XLA_FLAGS", "Illegal value for", "Flag parsing failed",
                "nknown command line flag")
DEPRECATED = ("no longer supported", "is deprecated")
PROBE_OK = "cpu_options probe ok"
PROBE = (
    "import numpy as np, jax, jax.numpy as jnp\n"
    "x = np.arange(64, dtype=np.float32).reshape(8, 8) / 64\n"
    "got = float(jax.jit(lambda a: (a @ a).sum())(jnp.asarray(x)))\n"
    f"print({PROBE_OK!r} if np.isclose(got, float((x @ x).sum()), rtol=1e-5) else got)\n")


@dataclasses.dataclass(frozen=True)
class Candidate:
  name: str
  flags: tuple[str, ...] = ()
  dtype: str = "float32"  # ours' compute dtype
  dot_dtype: str = ""  # ours' config.model.dot_dtype: the Dense matmuls' operand dtype
  note: str = ""

  @property
  def xla_flags(self) -> str:
    return " ".join(self.flags)


FAST_MATH = ("--xla_cpu_enable_fast_math=true",)
CANDIDATES = (
    Candidate("baseline", note="the installed jaxlib's defaults"),
    Candidate("thunk_runtime_off", ("--xla_cpu_use_thunk_runtime=false",),
              note="the pre-thunk runtime (newer jaxlibs keep the flag but ignore it)"),
    Candidate("fast_math", FAST_MATH, note="fast math, honouring NaN/Inf/division/functions"),
    Candidate("fast_math_unsafe", FAST_MATH + (
        "--xla_cpu_fast_math_honor_nans=false", "--xla_cpu_fast_math_honor_infs=false",
        "--xla_cpu_fast_math_honor_division=false", "--xla_cpu_fast_math_honor_functions=false"),
              note="fast math without the honour flags (approximate functions, reciprocals)"),
    Candidate("onednn", ("--xla_cpu_use_onednn=true",), note="oneDNN thunks for matmuls"),
    Candidate("onednn_dot_fusion", ("--xla_cpu_use_onednn=true",
                                    "--xla_cpu_experimental_onednn_fusion_type=dot"),
              note="oneDNN thunks + oneDNN dot fusions"),
    Candidate("onednn_custom_call", ("--xla_cpu_experimental_onednn_custom_call=true",),
              note="oneDNN custom calls"),
    Candidate("onednn_legacy", ("--xla_cpu_use_mkl_dnn=true",),
              note="older jaxlibs' name for oneDNN"),
    Candidate("xnnpack_off", ("--xla_cpu_use_xnnpack=false",), note="no XNNPACK"),
    Candidate("xnn_dot_fusion", ("--xla_cpu_experimental_xnn_fusion_type=dot",),
              note="XNNPACK dot fusions"),
    Candidate("xnn_fusions_all", ("--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",),
              note="XNNPACK dot, elementwise and reduce fusions"),
    Candidate("xnn_graph_greedy",
              ("--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",),
              note="XNNPACK graph fusion, greedy"),
    Candidate("ynn_dot_fusion", ("--xla_cpu_experimental_ynn_fusion_type=dot",),
              note="YNN dot fusions"),
    Candidate("vector_width_512", ("--xla_cpu_prefer_vector_width=512",),
              note="LLVM codegen prefers 512-bit vectors (AVX-512 machines)"),
    Candidate("opt_fast_runtime", ("--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME",),
              note="XLA:CPU's fast-runtime optimisation preset"),
    Candidate("bf16", dtype="bfloat16", note="ours in bf16 compute (f32 params / optimizer)"),
    Candidate("bf16_onednn", ("--xla_cpu_use_onednn=true",), dtype="bfloat16",
              note="bf16 compute + oneDNN thunks"),
    Candidate("bf16_dots", dot_dtype="bfloat16",
              note="f32 compute, the Dense matmuls in bf16 operands with f32 accumulation"),
    Candidate("bf16_compute_dots", dtype="bfloat16", dot_dtype="bfloat16",
              note="bf16 compute with the Dense matmuls accumulating in f32"),
)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="smollm2", help="comma-separated: smollm2, t5, minilm")
  p.add_argument("--candidates", default="",
                 help="comma-separated candidate names (default all; baseline always runs)")
  p.add_argument("--method", default="inclora", help="ours' method: inclora or lbcl")
  p.add_argument("--old-tasks", type=int, default=5, help="K old tasks (lbcl)")
  p.add_argument("--steps", type=int, default=10, help="timed steps per candidate")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=128, help="smollm2 / minilm tokens")
  p.add_argument("--src-len", type=int, default=256, help="t5 source tokens")
  p.add_argument("--tgt-len", type=int, default=16, help="t5 target tokens")
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--loss-rtol", type=float, default=1e-4,
                 help="outputs count as equal when max |loss - baseline loss| <= rtol * "
                      "max |baseline loss| over the steps")
  p.add_argument("--timeout", type=float, default=1800.0, help="seconds per candidate run")
  p.add_argument("--output", type=pathlib.Path,
                 default=REPO_ROOT / "benchmarks" / "results" / "cpu_options.json")
  # Internal: one candidate's measurement, in the subprocess XLA_FLAGS was set for.
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  p.add_argument("--dot-dtype", default="", help=argparse.SUPPRESS)
  p.add_argument("--result", type=pathlib.Path, default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


# ----------------------------------------------------------------------------- discovery


def _env(xla_flags: str) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags  # exactly the candidate's: an inherited XLA_FLAGS is replaced
  env.setdefault("JAX_PLATFORMS", "cpu")
  return env


def _tail(text: str, n: int = 1500) -> str:
  return text[-n:].strip()


def classify_probe(returncode: int, stdout: str, stderr: str) -> dict[str, Any]:
  """`supported` (the probe ran and answered right; `deprecated` if XLA said the flag is kept
  only for compatibility), `unsupported` (XLA_FLAGS did not parse: unknown flag or refused
  value) or `error` (anything else: a crash, a wrong answer)."""
  if returncode == 0 and PROBE_OK in stdout:
    return dict(status="supported", deprecated=any(d in stderr for d in DEPRECATED),
                detail=_tail(stderr, 400))
  if any(e in stderr for e in PARSE_ERRORS):
    lines = [l for l in stderr.splitlines() if any(e in l for e in PARSE_ERRORS)]
    return dict(status="unsupported", deprecated=False, detail="\n".join(lines)[-600:])
  return dict(status="error", deprecated=False,
              detail=f"exit {returncode}: {_tail(stdout + stderr, 600)}")


def probe_flags(xla_flags: str, timeout: float = 120.0) -> dict[str, Any]:
  """Whether the installed jaxlib accepts `xla_flags`: a tiny jit'ed matmul in a fresh
  interpreter with XLA_FLAGS set before jax is imported."""
  try:
    r = subprocess.run([sys.executable, "-c", PROBE], env=_env(xla_flags), capture_output=True,
                       text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return dict(status="error", deprecated=False, detail=f"probe timed out after {timeout}s")
  return classify_probe(r.returncode, r.stdout, r.stderr)


def hardware_skip(candidate: Candidate, desc: dict[str, Any]) -> Optional[str]:
  """Why `candidate` is not for this machine (None: it is)."""
  if "bfloat16" in (candidate.dtype, candidate.dot_dtype):
    ext = desc.get("vector_extensions")
    if ext is None:
      return "vector extensions unknown on this OS: bf16 not tried"
    if not {"BF16", "AMX"} & set(ext):
      return "no BF16 or AMX units: bf16 compute would be emulated"
  return None


# ----------------------------------------------------------------------------- worker


def hlo_markers(hlo_text: str) -> dict[str, int]:
  """What the compiled program hands to libraries: library fusion kinds (`__ynn_fusion`,
  `__xnn_fusion`, oneDNN's) and custom-call targets, with their counts."""
  found = re.findall(r"__(?:onednn|xnn|ynn)\w*", hlo_text)
  found += [f"custom_call:{t}" for t in re.findall(r'custom_call_target="([^"]+)"', hlo_text)]
  return dict(sorted(collections.Counter(found).items()))



def worker(args) -> dict[str, Any]:
  """One candidate, one model: our step built as peer_step.py builds it, timed."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top

  import peer_step  # pylint: disable=g-import-not-at-top

  ns = peer_step.parse_args([
      "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--src-len",
      str(args.src_len), "--tgt-len", str(args.tgt_len), "--rank", str(args.rank),
      "--old-tasks", str(args.old_tasks)])
  ns.dtype = args.dtype
  ns.dot_dtype = args.dot_dtype
  k = args.old_tasks if args.method == "lbcl" else 0
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    setup = peer_step.SETUPS[args.worker](ns, pathlib.Path(tmp))
    stack = peer_step.JaxStack(f"ours {args.method}", args.method, k, setup, ns)
    hlo = stack.cfg.compiled.as_text()
    losses, times = [], []
    for i in range(args.warmup + args.steps):
      t = time.perf_counter()
      stack.step()
      dt = time.perf_counter() - t
      losses.append(stack.loss)
      if i >= args.warmup:
        times.append(dt)
  t = np.asarray(times)
  return dict(
      model=args.worker, desc=setup["desc"], method=args.method, dtype=args.dtype,
      dot_dtype=args.dot_dtype,
      xla_flags=os.environ.get("XLA_FLAGS", ""), compile_s=stack.compile_s,
      xla_flops=stack.flops, xla_peak_bytes=stack.xla_peak, losses=losses,
      hlo_sha256=hashlib.sha256(hlo.encode()).hexdigest(), hlo_markers=hlo_markers(hlo),
      step_s=[round(float(x), 5) for x in t], median_step_s=float(np.median(t)),
      min_step_s=float(t.min()), wall_s=time.perf_counter() - t0, jax=jax.__version__,
      jaxlib=jaxlib.__version__)


def run_worker(candidate: Candidate, model: str, args) -> dict[str, Any]:
  with tempfile.TemporaryDirectory() as tmp:
    result = pathlib.Path(tmp) / "result.json"
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", model,
           "--dtype", candidate.dtype, "--dot-dtype", candidate.dot_dtype, "--result",
           str(result), "--method", args.method,
           "--old-tasks", str(args.old_tasks), "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
           "--src-len", str(args.src_len), "--tgt-len", str(args.tgt_len), "--rank",
           str(args.rank)]
    t0 = time.perf_counter()
    try:
      r = subprocess.run(cmd, env=_env(candidate.xla_flags), capture_output=True, text=True,
                         timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
      return dict(status="failed", detail=f"timed out after {args.timeout}s")
    if r.returncode != 0 or not result.exists():
      return dict(status="failed", detail=f"exit {r.returncode}: {_tail(r.stderr)}",
                  wall_s=time.perf_counter() - t0)
    out = json.loads(result.read_text(encoding="utf-8"))
    out["status"] = "ok"
    return out


# ----------------------------------------------------------------------------- compare


def compare(runs: dict[str, dict], loss_rtol: float) -> dict[str, Any]:
  """Each ok run against the baseline's: time ratio and loss differences; the fastest."""
  base = runs.get("baseline", {})
  if base.get("status") != "ok":
    return dict(fastest=None, fastest_within_tolerance=None,
                note="baseline did not run: no comparison")
  base_losses = np.asarray(base["losses"], np.float64)
  tol = loss_rtol * float(np.max(np.abs(base_losses)))
  for r in runs.values():
    if r.get("status") != "ok":
      continue
    losses = np.asarray(r["losses"], np.float64)
    diff = np.abs(losses - base_losses)
    r["time_over_baseline"] = r["median_step_s"] / base["median_step_s"]
    r["speedup_vs_baseline"] = base["median_step_s"] / r["median_step_s"]
    r["max_abs_loss_diff"] = float(diff.max())
    r["first_step_abs_loss_diff"] = float(diff[0])
    r["within_tolerance"] = bool(np.all(np.isfinite(losses)) and diff.max() <= tol)
    r["same_hlo_as_baseline"] = r["hlo_sha256"] == base["hlo_sha256"]
  ok = {n: r for n, r in runs.items() if r.get("status") == "ok"}
  fastest = min(ok, key=lambda n: ok[n]["median_step_s"])
  equal = [n for n in ok if ok[n]["within_tolerance"]]
  return dict(fastest=fastest, fastest_speedup=ok[fastest]["speedup_vs_baseline"],
              fastest_within_tolerance=min(equal, key=lambda n: ok[n]["median_step_s"]),
              loss_tolerance_abs=tol)


def print_table(model: str, candidates, runs: dict[str, dict], summary: dict):
  ms = lambda r, k: f"{1e3 * r[k]:.1f}" if k in r else "-"
  print(f"\n[{model}] {'candidate':20s} {'status':12s} {'med ms':>8s} {'min ms':>8s} "
        f"{'vs base':>8s} {'max|dL|':>9s} {'equal':>5s} {'GFLOP':>7s} {'compile':>7s} {'HLO':>4s}")
  for c in candidates:
    r = runs[c.name]
    status = r["status"] + ("*" if r.get("deprecated") else "")
    if r["status"] == "ok":
      print(f"  {c.name:27s} {status:12s} {ms(r, 'median_step_s'):>8s} "
            f"{ms(r, 'min_step_s'):>8s} {r['time_over_baseline']:7.3f}x "
            f"{r['max_abs_loss_diff']:9.2e} {str(r['within_tolerance']):>5s} "
            f"{r['xla_flops'] / 1e9:7.2f} {r['compile_s']:6.1f}s "
            f"{'=' if r['same_hlo_as_baseline'] else 'new':>4s}")
    else:
      reason = ((r.get("detail") or "").splitlines() or [""])[-1]
      reason = reason.split("] ", 1)[-1]  # the message, without XLA's log prefix
      print(f"  {c.name:27s} {status:12s} {reason[:80]}")
  print(f"  fastest: {summary.get('fastest')} ({summary.get('fastest_speedup', float('nan')):.3f}x"
        f" the baseline's speed); fastest with equal outputs: "
        f"{summary.get('fastest_within_tolerance')}  (* deprecated flag; vs base = step time "
        "/ baseline's; equal = max|dL| within --loss-rtol; HLO '=' the baseline's graph)",
        flush=True)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.worker:
    out = worker(args)
    files.atomic_write_text(args.result, json.dumps(out))
    return out
  t_start = time.perf_counter()
  desc = machine.describe()
  wanted = {n for n in args.candidates.split(",") if n} | {"baseline"}
  unknown = wanted - {c.name for c in CANDIDATES}
  if unknown:
    raise SystemExit(f"unknown candidates {sorted(unknown)}; known: "
                     f"{[c.name for c in CANDIDATES]}")
  candidates = [c for c in CANDIDATES if not args.candidates or c.name in wanted]
  models = [m for m in args.models.split(",") if m]
  print(f"{machine.summary(desc)}; {len(candidates)} candidates x {models}; warmup "
        f"{args.warmup}, {args.steps} timed steps each", flush=True)
  probes: dict[str, dict] = {}
  for c in candidates:
    skip = hardware_skip(c, desc)
    probes[c.name] = (dict(status="skipped", deprecated=False, detail=skip) if skip
                      else probe_flags(c.xla_flags))
    p = probes[c.name]
    print(f"  probe {c.name:20s} {p['status']}{' (deprecated)' if p['deprecated'] else ''}",
          flush=True)
  results = {}
  for model in models:
    runs = {}
    for c in candidates:
      p = probes[c.name]
      if p["status"] != "supported":
        runs[c.name] = dict(status=p["status"], detail=p["detail"])
      else:
        runs[c.name] = run_worker(c, model, args) | {"deprecated": p["deprecated"]}
      r = runs[c.name]
      print(f"  [{model}] {c.name:20s} {r['status']}" + (
          f" {1e3 * r['median_step_s']:.1f} ms/step, loss {r['losses'][-1]:.5f}"
          if r["status"] == "ok" else ""), flush=True)
      for k, v in dict(name=c.name, flags=list(c.flags), xla_flags=c.xla_flags,
                       compute_dtype=c.dtype, note=c.note).items():
        r.setdefault(k, v)
    summary = compare(runs, args.loss_rtol)
    print_table(model, candidates, runs, summary)
    results[model] = dict(candidates=runs, **summary)
  import jax  # pylint: disable=g-import-not-at-top  (versions only; no computation here)
  import jaxlib  # pylint: disable=g-import-not-at-top
  payload = dict(
      benchmark="cpu_options",
      description=(f"our adapter train step ({args.method}, rank {args.rank} on q/v, "
                   "peer_step.py's setup) under XLA:CPU options, each in a fresh process with "
                   "XLA_FLAGS set before jax is imported"),
      machine=desc, models=results, probes=probes,
      args={k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()
            if k not in ("worker", "dtype", "result")},
      inherited_xla_flags_replaced=os.environ.get("XLA_FLAGS"),
      note=("status: ok (ran), unsupported (the installed jaxlib refused the flag or its "
            "value when parsing XLA_FLAGS), skipped (not for this CPU), error (the probe "
            "crashed), failed (the step crashed or timed out). deprecated: XLA said the flag "
            "is no longer supported (it parses but may do nothing). time_over_baseline = "
            "median step time / baseline's (< 1 is faster). max_abs_loss_diff: over all "
            "--warmup + --steps steps from the same initial adapters on the same batch, vs the "
            "baseline's loss at the same step; within_tolerance when <= loss_tolerance_abs = "
            "--loss-rtol * max |baseline loss|. xla_flops: XLA's cost analysis of the compiled "
            "step (library custom calls may count differently from XLA's own kernels). "
            "same_hlo_as_baseline: the optimised HLO text is identical to the baseline's, i.e. "
            "the flag did not change XLA's graph or its library fusions (it may still change "
            "LLVM code generation -- fast math, vector width -- or the runtime); hlo_markers: "
            "library fusions / custom calls in it. With few --steps on a shared machine, "
            "differences of a few percent are noise."),
      versions=dict(python=sys.version.split()[0], jax=jax.__version__,
                    jaxlib=jaxlib.__version__),
      platform=platform.platform(),
      timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  payload["wall_s"] = time.perf_counter() - t_start
  files.atomic_write_text(args.output, json.dumps(payload, indent=2, sort_keys=True) + "\n")
  print(f"\ntotal wall {payload['wall_s']:.0f}s; wrote {args.output}")
  return payload


if __name__ == "__main__":
  main()
