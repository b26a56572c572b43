"""Every method of the paper on the local CL benchmark with MiniLM, and the paper's analyses.

The grid (`--grid=all`, 52 runs, about 95 minutes on 2 CPU cores):
  * main: seqft, inclora, olora, nlnbcl, lcl, bcl, lbcl and mtl on the paper's orders 1-3 with
    yahoo replaced by yelp (the local copy has no yahoo), the VARIANTS rows (injection without
    sigma; the SVD-adapter methods at a learning rate that suits them), and a zero-shot row;
  * analyses, on order 1 with lbcl: rank r in {2, 4, 8, 16}; seed samples in
    {1, 2, 4, 8, 16, 32, 64}; injection with and without sigma; per-layer sensitivity (a plot of
    the triplet scores the lbcl runs of the main grid recorded).

Every cell is one `python -m lbcl_jax.main --config=configs/minilm_cl_benchmark.py` run in its
own process (seed 0, so the grid is re-runnable bit for bit on one machine), in
`<workdir>/<cell>/`. Cells whose `results.json` exists are not run again, so an interrupted grid
resumes where it stopped; `--report_only` rebuilds the outputs from the cells present. Outputs:
`benchmarks/results/cl_methods.json`, `cl_methods.md` (a table laid out like the paper's Table
1, with the published T5-large numbers beside ours), `cl_analyses.png`, `cl_sensitivity.png`.

  python benchmarks/cl_methods.py --data_dir ../shared/cl_benchmark [--grid main|analyses|all]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import time

import numpy as np

from lbcl_jax import files
from lbcl_jax import plots

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "minilm_cl_benchmark.py"

METHODS = ("seqft", "inclora", "olora", "nlnbcl", "lcl", "bcl", "lbcl", "mtl")
PAPER_NAMES = {"seqft": "SeqFT", "inclora": "IncLoRA", "olora": "O-LoRA", "nlnbcl": "NLNB-CL",
               "lcl": "L-CL", "bcl": "B-CL", "lbcl": "LB-CL", "mtl": "MTL"}
# The paper's orders 1-3 (lbcl_jax.tasks.ORDERS) with yahoo -> yelp.
ORDERS = {1: "dbpedia,amazon,yelp,agnews",
          2: "dbpedia,amazon,agnews,yelp",
          3: "yelp,amazon,agnews,dbpedia"}
# Full fine-tuning of MiniLM diverges at the adapters' 3e-3 (and collapses at 1e-3, see
# tests/test_minilm_cl.py); 1e-4 is the usual BERT fine-tuning rate and learned amazon as well
# as the adapters did in a probe (0.38 vs 0.43 after one task).
METHOD_FLAGS = {"seqft": ["--config.optim.learning_rate=1e-4"]}
# Extra rows of the main table. "without sigma" is the paper's variant that injects only U and V
# (sigma starts at 0); 1e-2 is a learning rate at which the AdaLoRA-initialised SVD adapters
# (sigma = 0, U and V ~ N(0, 0.02^2), slow to start) learn as much as LoRA does at 3e-3.
_NOSIGMA, _LR = "--config.injection.with_sigma=False", "--config.optim.learning_rate=1e-2"
VARIANTS = {"lcl_nosigma": ("lcl", [_NOSIGMA]),
            "lbcl_nosigma": ("lbcl", [_NOSIGMA]),
            "nlnbcl_lr1e-2": ("nlnbcl", [_LR]),
            "bcl_lr1e-2": ("bcl", [_LR]),
            "lcl_nosigma_lr1e-2": ("lcl", [_NOSIGMA, _LR]),
            "lbcl_nosigma_lr1e-2": ("lbcl", [_NOSIGMA, _LR])}
VARIANT_NAMES = {"lcl_nosigma": "L-CL, without sigma", "lbcl_nosigma": "LB-CL, without sigma",
                 "nlnbcl_lr1e-2": "NLNB-CL, lr 1e-2", "bcl_lr1e-2": "B-CL, lr 1e-2",
                 "lcl_nosigma_lr1e-2": "L-CL, without sigma, lr 1e-2",
                 "lbcl_nosigma_lr1e-2": "LB-CL, without sigma, lr 1e-2"}
RANKS = (2, 4, 8, 16)
# The seed-variance grid (`--grid=seeds`): the ranking's methods re-run with other seeds.
SEED_METHODS = ("seqft", "inclora", "olora", "lbcl")
EXTRA_SEEDS = (1, 2)
SEED_SAMPLES = (1, 2, 4, 8, 16, 32, 64)

# Published T5-large average accuracies (%), for reference only: a different model (T5-large,
# 770M, generating the label) trained on the full benchmark with yahoo. O-LoRA's Table 1
# (Wang et al., 2023) gives orders 1 / 2 / 3 / average; the LB-CL paper (Qiao & Mahdavi, 2024)
# headline is its average of LB-CL and of its rerun of O-LoRA. The LB-CL paper's per-order
# numbers and its L-CL / B-CL / NLNB-CL rows were not available offline.
PAPER_OLORA_TABLE1 = {"seqft": (18.9, 24.9, 41.7, 28.5), "inclora": (66.0, 64.9, 68.3, 66.4),
                      "olora": (75.4, 75.7, 76.3, 75.8), "mtl": (80.0, 80.0, 80.0, 80.0)}
PAPER_LBCL_AVERAGE = {"lbcl": 76.7, "olora": 75.4}


def cells(grid: str) -> dict[str, list[str]]:
  """Cell name -> the lbcl_jax.main flags that define it (besides --config and --workdir)."""
  out = {}
  if grid in ("main", "all"):
    for order, tasks in ORDERS.items():
      for method in METHODS:
        out[f"o{order}_{method}"] = [f"--config.method={method}", f"--config.order={tasks}",
                                     *METHOD_FLAGS.get(method, [])]
      for variant, (method, flags) in VARIANTS.items():
        out[f"o{order}_{variant}"] = [f"--config.method={method}", f"--config.order={tasks}",
                                      *flags]
    # The pre-trained encoder untouched (learning rate 0, new adapters start at sigma = 0): how
    # much of each task the label-name scoring gets before any training.
    out["zeroshot"] = ["--config.method=inclora", f"--config.order={ORDERS[1]}",
                       "--config.optim.learning_rate=0.0", "--config.optim.max_steps_per_task=1"]
  if grid == "seeds":
    for method in SEED_METHODS:
      for seed in EXTRA_SEEDS:
        out[f"o1_{method}_seed{seed}"] = [f"--config.method={method}", f"--config.order={ORDERS[1]}",
                                          *METHOD_FLAGS.get(method, []), f"--config.seed={seed}"]
  if grid in ("analyses", "all"):
    base = ["--config.method=lbcl", f"--config.order={ORDERS[1]}"]
    out.setdefault("o1_lbcl", base)
    for r in RANKS:
      if r != 8:
        out[f"o1_lbcl_rank{r}"] = base + [f"--config.adapters.rank={r}"]
    for n in SEED_SAMPLES:
      if n != 8:
        out[f"o1_lbcl_seeds{n}"] = base + [f"--config.injection.num_seed_samples={n}"]
    out.setdefault("o1_lbcl_nosigma", base + ["--config.injection.with_sigma=False"])
  return out


# `python -m lbcl_jax.main`'s exit status when the training loss became NaN or infinite.
DIVERGED = 3


def run_cell(name: str, flags: list[str], workdir: pathlib.Path, data_dir: str, env) -> None:
  """Runs one cell unless its results exist; records its wall time in bench.json."""
  cell_dir = workdir / name
  bench_file = cell_dir / "bench.json"
  if (cell_dir / "results.json").exists() and bench_file.exists():
    print(f"[{name}] done already", flush=True)
    return
  if bench_file.exists() and json.loads(bench_file.read_text()).get("diverged"):
    print(f"[{name}] diverged already (never averaged)", flush=True)
    return
  cmd = [sys.executable, "-m", "lbcl_jax.main", f"--config={CONFIG}", f"--workdir={cell_dir}",
         f"--config.data.data_dir={data_dir}",
         *([] if any(f.startswith("--config.seed=") for f in flags) else ["--config.seed=0"]),
         *flags]
  print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode == DIVERGED:
    # A NaN/inf loss: the driver wrote no results.json, so `collect` never averages the cell.
    line = proc.stderr.strip().splitlines()[-1]
    files.atomic_write_text(bench_file, json.dumps(
        {"cell": name, "flags": flags, "wall_seconds": round(wall, 1), "diverged": True,
         "error": line}, indent=2))
    print(f"[{name}] diverged: {line}", flush=True)
    return
  if proc.returncode:
    cell_dir.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(cell_dir / "bench_error.txt", proc.stderr[-20000:])
    raise RuntimeError(f"cell {name} failed ({proc.returncode}); see {cell_dir}/bench_error.txt:\n"
                       f"{proc.stderr[-2000:]}")
  record = {"cell": name, "flags": flags, "wall_seconds": round(wall, 1)}
  files.atomic_write_text(bench_file, json.dumps(record, indent=2))
  acc = json.loads((cell_dir / "results.json").read_text())["average_accuracy"]
  print(f"[{name}] {wall:.0f} s, average accuracy {100 * acc:.1f}", flush=True)


def _pct(v):
  return None if v is None else round(100 * v, 1)


def _f(v):
  return "--" if v is None else f"{v:.1f}"


def _test_se(final_row, n_test: int) -> float | None:
  """Standard error of the average accuracy from the finite test sets alone (binomial).

  Assumes every test set has `n_test` examples (`data.max_test_examples`, smaller than each
  local test split); None when the whole splits were used (`n_test` = 0).
  """
  if not n_test:
    return None
  p = np.array([v for v in final_row if v is not None])
  return float(np.sqrt(np.sum(p * (1 - p) / n_test)) / len(p))


def collect(workdir: pathlib.Path, names) -> dict[str, dict]:
  out = {}
  for name in names:
    res, bench = workdir / name / "results.json", workdir / name / "bench.json"
    if res.exists() and bench.exists():
      r = json.loads(res.read_text())
      b = json.loads(bench.read_text())
      out[name] = {"flags": b["flags"], "wall_seconds": b["wall_seconds"],
                   "train_seconds": round(r["train_seconds"], 1), "tasks": r["tasks"],
                   "accuracy_matrix": r["accuracy_matrix"],
                   "average_accuracy": _pct(r["average_accuracy"]), "bwt": _pct(r["bwt"]),
                   "forgetting": _pct(r["forgetting"]),
                   "test_se": _pct(_test_se(r["accuracy_matrix"][-1],
                                            r["config"]["data"]["max_test_examples"])),
                   "sensitivity": r["sensitivity"]}
  return out


def table1(runs: dict[str, dict]) -> dict[str, dict]:
  rows = {}
  for method in (*METHODS, *VARIANTS):
    per = [runs.get(f"o{o}_{method}") for o in ORDERS]
    acc = [None if p is None else p["average_accuracy"] for p in per]
    bwt = [None if p is None else p["bwt"] for p in per]
    done = [a for a in acc if a is not None]
    ses = [None if p is None else p["test_se"] for p in per]
    rows[method] = {"orders": acc,
                    "average": round(float(np.mean(done)), 1) if len(done) == len(acc) else None,
                    "average_test_se": (round(float(np.sqrt(np.sum(np.square(ses))) / len(ses)), 1)
                                        if all(e is not None for e in ses) else None),
                    "bwt": bwt,
                    "bwt_average": (round(float(np.mean(bwt)), 1)
                                    if all(b is not None for b in bwt) else None)}
  return rows


def analyses(runs: dict[str, dict]) -> dict[str, dict]:
  def get(name):
    r = runs.get(name)
    return None if r is None else {"average_accuracy": r["average_accuracy"], "bwt": r["bwt"],
                                   "test_se": r["test_se"]}
  return {
      "rank": {r: get("o1_lbcl" if r == 8 else f"o1_lbcl_rank{r}") for r in RANKS},
      "seed_samples": {n: get("o1_lbcl" if n == 8 else f"o1_lbcl_seeds{n}") for n in SEED_SAMPLES},
      "sigma": {"with sigma": get("o1_lbcl"), "without sigma": get("o1_lbcl_nosigma")},
      "reference_bcl": get("o1_bcl"),
  }


def seed_variance(runs: dict[str, dict]) -> dict[str, dict]:
  """Order 1 average accuracy over seeds 0, 1, 2 (the `seeds` grid) per method."""
  out = {}
  for method in SEED_METHODS:
    accs = [runs[n]["average_accuracy"] for n in
            [f"o1_{method}"] + [f"o1_{method}_seed{s}" for s in EXTRA_SEEDS] if n in runs]
    if len(accs) > 1:
      out[method] = {"accuracies": accs, "mean": round(float(np.mean(accs)), 1),
                     "std": round(float(np.std(accs, ddof=1)), 1)}
  return out


def layer_sensitivity(runs: dict[str, dict]) -> dict[str, dict]:
  """Per adapted layer: its share of all old-triplet scores, per (order, scored task) of lbcl."""
  shares = {}
  for order in ORDERS:
    run = runs.get(f"o{order}_lbcl")
    if run is None:
      continue
    for task, layers in run["sensitivity"].items():
      total = {path: float(np.sum(v)) for path, v in layers.items()}
      z = sum(total.values()) or 1.0
      shares[f"order {order}: {task}"] = {path: t / z for path, t in sorted(total.items())}
  return shares


def _short(path: str) -> str:
  """'encoder/layer/3/attention/self/query' -> 'L3 query'."""
  nums = re.findall(r"\d+", path)
  return f"L{nums[0]} {path.rsplit('/', 1)[-1]}" if nums else path


def _bars(errors):
  """Error bars for matplotlib, or none when some test SE is unknown."""
  return None if any(e is None for e in errors) else list(errors)


def write_plots(report: dict, out_dir: pathlib.Path) -> None:
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  an = report["analyses"]
  fig = Figure(figsize=(13, 3.6))
  axes = fig.subplots(1, 3)
  for ax, key, xlabel, logx in ((axes[0], "rank", "adapter rank r", True),
                                (axes[1], "seed_samples", "seed samples", True)):
    pts = [(int(k), v["average_accuracy"], v["test_se"]) for k, v in an[key].items() if v]
    if pts:
      xs, ys, es = zip(*pts)
      ax.errorbar(xs, ys, yerr=_bars(es), fmt="o-", capsize=3, label="lbcl (error bar: test SE)")
      ax.set_xscale("log", base=2)
      ax.set_xticks(xs, [str(x) for x in xs])
    if an.get("reference_bcl") and key == "seed_samples":
      ax.axhline(an["reference_bcl"]["average_accuracy"], ls="--", color="gray",
                 label="bcl (no injection)")
    ax.legend(fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("average accuracy (%)")
    ax.grid(alpha=0.3)
  pts = [(k, v["average_accuracy"], v["test_se"]) for k, v in an["sigma"].items() if v]
  if pts:
    axes[2].bar([p[0] for p in pts], [p[1] for p in pts], yerr=_bars([p[2] for p in pts]),
                capsize=3)
  axes[2].set_ylabel("average accuracy (%)")
  axes[2].set_title("injection")
  fig.suptitle("LB-CL on order 1 (dbpedia, amazon, yelp, agnews), all-MiniLM-L6-v2")
  plots.save_figure(fig, out_dir / "cl_analyses.png")

  shares = report["layer_sensitivity"]
  fig = Figure(figsize=(9, 3.8))
  ax = fig.subplots()
  if shares:
    layers = sorted({p for s in shares.values() for p in s},
                    key=lambda p: (int((re.findall(r"\d+", p) or ["0"])[0]), p))
    m = np.array([[s.get(p, np.nan) for p in layers] for s in shares.values()]) * 100
    x = np.arange(len(layers))
    ax.bar(x, np.nanmean(m, axis=0), color="tab:blue", alpha=0.6, label="mean")
    for row, lab in zip(m, shares):
      ax.plot(x, row, ".", alpha=0.6, label=lab)
    ax.set_xticks(x, [_short(p) for p in layers], rotation=45, ha="right", fontsize=8)
    ax.legend(fontsize=6, ncol=2)
  ax.set_ylabel("share of old-triplet sensitivity (%)")
  ax.set_title("Which layers matter: sensitivity S of old triplets per adapted layer (lbcl)")
  plots.save_figure(fig, out_dir / "cl_sensitivity.png")


def markdown(report: dict) -> str:
  t1 = report["table1"]
  out = ["| method | order 1 | order 2 | order 3 | **avg** | test SE | BWT avg | O-LoRA paper "
         "T5-large (O1 / O2 / O3 / avg) | LB-CL paper T5-large avg |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for method, row in t1.items():
    ref = PAPER_OLORA_TABLE1.get(method)
    ref_s = " / ".join(f"{v:.1f}" for v in ref) if ref else "--"
    if method == "mtl" and ref:
      ref_s = f"{ref[-1]:.1f} (joint)"
    out.append(f"| {PAPER_NAMES.get(method) or VARIANT_NAMES[method]} | " + " | ".join(_f(v) for v in row["orders"]) +
               f" | **{_f(row['average'])}** | {_f(row['average_test_se'])} | "
               f"{_f(row['bwt_average'])} | {ref_s} | "
               f"{_f(PAPER_LBCL_AVERAGE.get(method))} |")
  zs = report.get("zeroshot")
  if zs:
    out.append(f"| zero-shot (no training) | -- | -- | -- | **{_f(zs['average_accuracy'])}** | "
               f"-- | -- | -- | -- |")
    out += ["", "Zero-shot accuracy per task: " + ", ".join(
        f"{t} {_f(a)}" for t, a in zs["per_task"].items()) + "."]
  if report["seed_variance"]:
    out += ["", "Seed variance (order 1, seeds 0 / 1 / 2):", "",
            "| method | accuracies | mean | std |", "| --- | --- | --- | --- |"]
    for method, v in report["seed_variance"].items():
      out.append(f"| {PAPER_NAMES[method]} | {' / '.join(_f(a) for a in v['accuracies'])} | "
                 f"{_f(v['mean'])} | {_f(v['std'])} |")
  an = report["analyses"]
  out += ["", "Analyses (lbcl, order 1; average accuracy % / BWT):", "",
          "| rank r | " + " | ".join(str(r) for r in an["rank"]) + " |",
          "| --- |" + " --- |" * len(an["rank"]),
          "| avg / BWT | " + " | ".join(
              "--" if v is None else f"{v['average_accuracy']:.1f} / {_f(v['bwt'])}"
              for v in an["rank"].values()) + " |", "",
          "| seed samples | " + " | ".join(str(n) for n in an["seed_samples"]) + " |",
          "| --- |" + " --- |" * len(an["seed_samples"]),
          "| avg / BWT | " + " | ".join(
              "--" if v is None else f"{v['average_accuracy']:.1f} / {_f(v['bwt'])}"
              for v in an["seed_samples"].values()) + " |", "",
          "| injection | avg | BWT |", "| --- | --- | --- |"]
  for k, v in an["sigma"].items():
    out.append(f"| {k} | {'--' if v is None else _f(v['average_accuracy'])} | "
               f"{'--' if v is None else _f(v['bwt'])} |")
  return "\n".join(out) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "cl_benchmark"),
                      help="a CL_Benchmark directory with TC/dbpedia, TC/agnews, SC/amazon, SC/yelp")
  parser.add_argument("--workdir", default="/tmp/lbcl_cl_methods", help="one sub-directory per cell")
  parser.add_argument("--grid", choices=("main", "analyses", "all", "seeds"), default="all",
                      help="seeds: seed variance of four methods on order 1 (not part of all)")
  parser.add_argument("--only", default="", help="run only cells whose name matches this regex")
  parser.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "results"))
  parser.add_argument("--report_only", action="store_true", help="rebuild outputs; run nothing")
  args = parser.parse_args()

  data_dir = pathlib.Path(args.data_dir).resolve()
  missing = [t for t in ("TC/dbpedia", "TC/agnews", "SC/amazon", "SC/yelp")
             if not (data_dir / t / "train.json").exists()]
  if missing and not args.report_only:
    sys.exit(f"--data_dir={args.data_dir}: no train.json for {', '.join(missing)} "
             "(expected O-LoRA's CL_Benchmark layout)")
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  grid = cells(args.grid)
  env = dict(os.environ)
  # The cells share shapes, so a persistent compilation cache saves most of each one's compiles.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(workdir / "jax_cache"))

  failed = []
  if not args.report_only:
    for name, flags in grid.items():
      if args.only and not re.search(args.only, name):
        continue
      try:
        run_cell(name, flags, workdir, str(data_dir), env)
      except RuntimeError as e:
        print(e, file=sys.stderr, flush=True)
        failed.append(name)

  runs = collect(workdir, {**cells("all"), **cells("seeds")})
  report = {
      "settings": {"config": str(CONFIG.relative_to(ROOT)), "seed": 0, "orders": ORDERS,
                   "method_flags": METHOD_FLAGS, "data_dir": str(data_dir)},
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
      "table1": table1(runs),
      "analyses": analyses(runs),
      "seed_variance": seed_variance(runs),
      "zeroshot": ({"average_accuracy": runs["zeroshot"]["average_accuracy"],
                    "per_task": dict(zip(runs["zeroshot"]["tasks"],
                                         (_pct(v) for v in runs["zeroshot"]["accuracy_matrix"][-1])))}
                   if "zeroshot" in runs else None),
      "layer_sensitivity": layer_sensitivity(runs),
      "paper": {"olora_table1_t5_large": PAPER_OLORA_TABLE1,
                "lbcl_paper_average_t5_large": PAPER_LBCL_AVERAGE},
      "runs": {k: {kk: vv for kk, vv in v.items() if kk != "sensitivity"} for k, v in runs.items()},
      "total_wall_seconds": round(sum(r["wall_seconds"] for r in runs.values()), 1),
  }
  out_dir = pathlib.Path(args.output_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  md = markdown(report)
  files.atomic_write_text(out_dir / "cl_methods.json", json.dumps(report, indent=2) + "\n")
  files.atomic_write_text(out_dir / "cl_methods.md", md)
  write_plots(report, out_dir)
  print(md)
  print(f"{len(runs)} cells, {report['total_wall_seconds'] / 60:.1f} min of runs; "
        f"wrote {out_dir}/cl_methods.json, cl_methods.md, cl_analyses.png, cl_sensitivity.png")
  if failed:
    sys.exit(f"failed cells: {', '.join(failed)}")


if __name__ == "__main__":
  main()
