"""Every method of the paper on the local CL benchmark with MiniLM: settings chosen on
validation, the paper's Table 1 in two label spaces, and the paper's analyses.

Phases, run in this order by `--grid=all` (each is also a `--grid` of its own):
  * validation: each method family gets the same budget of 8 runs on order 1, scored on a
    validation split carved from the train files (never on test):
      - SeqFT: the learning rate;
      - the LoRA family (IncLoRA, O-LoRA, MTL; swept on O-LoRA): the learning rate;
      - the SVD family (NLNB-CL, L-CL, B-CL, LB-CL; swept on LB-CL): learning rate x AdaLoRA's
        orth_reg_weight (6 runs, the paper's injection: every layer, with sigma), then two
        injection choices at the best of those (the top 2 blocks by depth, with sigma; every
        layer without sigma).
    The best validation average (the "seen" label space) of each family is its setting
    everywhere below.
  * main: seqft, inclora, olora, nlnbcl, lcl, bcl, lbcl and mtl on the paper's orders 1-3 with
    yahoo replaced by yelp (the local copy has no yahoo), and a zero-shot row;
  * seeds: seqft, inclora, olora and lbcl on order 1 with seeds 1 and 2;
  * after_adam: bcl and lbcl on orders 1-3 with the projection applied to Adam's update;
  * analyses, on order 1 with lbcl: rank r in {2, 4, 8, 16}; seed samples in
    {1, 2, 4, 8, 16, 32, 64}; injection with and without sigma, into every layer or the top 2
    blocks; the sensitivity of the old triplets by depth (from the main grid's lbcl runs).

Every run reports two label spaces: "seen" (the options are every label of the tasks trained
so far: no task identity, the paper's protocol; `table1`) and "task" (the evaluated task's own
labels, which tells the model the task; `table1_task`).

Every cell is one `python -m lbcl_jax.main --config=configs/minilm_cl_benchmark.py` run in its
own process, in `<workdir>/<cell>/`. Its summary goes to `benchmarks/results/cl_cells/<cell>.json`
in the repository: commit those as they come, and the grid resumes from them on any machine
(a cell with a record is never run again). `--report_only` rebuilds the outputs from the
records: `benchmarks/results/cl_methods.json`, `cl_methods.md`, `cl_analyses.png`,
`cl_sensitivity.png`.

  python benchmarks/cl_methods.py --data_dir ../shared/cl_benchmark [--grid all] [--jobs 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import threading
import time

import numpy as np

from lbcl_jax import files
from lbcl_jax import plots

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "minilm_cl_benchmark.py"
CELLS = ROOT / "benchmarks" / "results" / "cl_cells"

METHODS = ("seqft", "inclora", "olora", "nlnbcl", "lcl", "bcl", "lbcl", "mtl")
PAPER_NAMES = {"seqft": "SeqFT", "inclora": "IncLoRA", "olora": "O-LoRA", "nlnbcl": "NLNB-CL",
               "lcl": "L-CL", "bcl": "B-CL", "lbcl": "LB-CL", "mtl": "MTL"}
FAMILY = {"seqft": "seqft", "inclora": "lora", "olora": "lora", "mtl": "lora",
          "nlnbcl": "svd", "lcl": "svd", "bcl": "svd", "lbcl": "svd"}
INJECTS = ("lcl", "lbcl")
# The paper's orders 1-3 (lbcl_jax.tasks.ORDERS) with yahoo -> yelp.
ORDERS = {1: "dbpedia,amazon,yelp,agnews",
          2: "dbpedia,amazon,agnews,yelp",
          3: "yelp,amazon,agnews,dbpedia"}
# Every cell: 200 validation sentences per task carved from its train file (fixed seed; the
# 100-per-class training sample is drawn from the rest), and both label spaces measured.
COMMON = ["--config.data.validation_examples=200", "--config.eval.label_space=seen",
          "--config.eval.extra_label_spaces=task"]
SEEN, TASK = "seen", "task"

# -- validation: the same budget (8 runs) for every family ---------------------------------------
SEQFT_LRS = ("1e-5", "2e-5", "5e-5", "1e-4", "2e-4", "5e-4", "1e-3", "2e-3")
LORA_LRS = ("1e-4", "3e-4", "1e-3", "2e-3", "3e-3", "5e-3", "1e-2", "3e-2")
SVD_LRS = ("3e-3", "1e-2", "3e-2")
SVD_ORTH = ("0", "0.5")  # none, and AdaLoRA / PEFT's default
SVD_INJECTIONS = {"depth2": ["--config.injection.layers=depth:2"],
                  "nosigma": ["--config.injection.with_sigma=False"]}
VALIDATION_BUDGET = 8

RANKS = (2, 4, 8, 16)
SEED_METHODS = ("seqft", "inclora", "olora", "lbcl")
EXTRA_SEEDS = (1, 2)
SEED_SAMPLES = (1, 2, 4, 8, 16, 32, 64)
INJECTION_VARIANTS = {
    "all, with sigma": ["--config.injection.layers=all", "--config.injection.with_sigma=True"],
    "all, without sigma": ["--config.injection.layers=all",
                           "--config.injection.with_sigma=False"],
    "top 2 blocks, with sigma": ["--config.injection.layers=depth:2",
                                 "--config.injection.with_sigma=True"],
    "top 2 blocks, without sigma": ["--config.injection.layers=depth:2",
                                    "--config.injection.with_sigma=False"],
}

# Published T5-large average accuracies (%), for reference only: a different model (T5-large,
# 770M, generating the label) trained on the full benchmark with yahoo. O-LoRA's Table 1
# (Wang et al., 2023) gives orders 1 / 2 / 3 / average; the LB-CL paper (Qiao & Mahdavi, 2024)
# headline is its average of LB-CL and of its rerun of O-LoRA. The LB-CL paper's per-order
# numbers and its L-CL / B-CL / NLNB-CL rows were not available offline.
PAPER_OLORA_TABLE1 = {"seqft": (18.9, 24.9, 41.7, 28.5), "inclora": (66.0, 64.9, 68.3, 66.4),
                      "olora": (75.4, 75.7, 76.3, 75.8), "mtl": (80.0, 80.0, 80.0, 80.0)}
PAPER_LBCL_AVERAGE = {"lbcl": 76.7, "olora": 75.4}

# `python -m lbcl_jax.main`'s exit status when the training loss became NaN or infinite.
DIVERGED = 3


def _lr(lr: str) -> str:
  return f"--config.optim.learning_rate={lr}"


# ---------------------------------------------------------------------------------------------
# Cells.


def validation_cells(records: dict[str, dict]) -> dict[str, list[str]]:
  """Validation cell -> flags. The SVD family's injection cells exist once its first six
  cells have records (they run at the best of those)."""
  val = [f"--config.order={ORDERS[1]}", "--config.eval.split=validation"]
  out = {}
  for lr in SEQFT_LRS:
    out[f"val_seqft_lr{lr}"] = ["--config.method=seqft", *val, _lr(lr)]
  for lr in LORA_LRS:
    out[f"val_lora_lr{lr}"] = ["--config.method=olora", *val, _lr(lr)]
  for lr in SVD_LRS:
    for w in SVD_ORTH:
      out[f"val_svd_lr{lr}_orth{w}"] = ["--config.method=lbcl", *val, _lr(lr),
                                       f"--config.adapters.orth_reg_weight={w}"]
  first = [n for n in out if n.startswith("val_svd_")]
  if all(n in records for n in first):
    best = _best(records, first)
    for name, flags in SVD_INJECTIONS.items():
      out[f"val_svd_inj_{name}"] = records[best]["flags"] + flags
  return out


def _best(records: dict[str, dict], names) -> str:
  """The cell with the highest validation average (diverged cells never win; ties: first)."""
  scored = [(records[n]["average_accuracy"], -i, n) for i, n in enumerate(names)
            if n in records and records[n].get("average_accuracy") is not None]
  return max(scored)[2]


def choices(records: dict[str, dict]) -> dict[str, dict] | None:
  """Per family, its chosen flags (without method, order and split), or None while the
  validation grid is unfinished."""
  cells = validation_cells(records)
  if len(cells) < 3 * VALIDATION_BUDGET or not all(n in records for n in cells):
    return None
  out = {}
  for family in ("seqft", "lora", "svd"):
    names = [n for n in cells if n.startswith(f"val_{family}_")]
    best = _best(records, names)
    flags = [f for f in records[best]["flags"]
             if not f.startswith(("--config.method=", "--config.order=", "--config.eval.split="))]
    out[family] = {
        "cell": best, "flags": flags,
        "validation_average": records[best]["average_accuracy"],
        "sweep": [{"cell": n, "flags": cells[n],
                   "validation_average": records[n].get("average_accuracy"),
                   "diverged": bool(records[n].get("diverged"))} for n in names]}
  return out


# The paper's injection, spelled out, so that a cell means the same whatever the defaults are.
PAPER_INJECTION = ["--config.injection.layers=all", "--config.injection.with_sigma=True"]


def method_flags(method: str, chosen: dict[str, dict]) -> list[str]:
  flags = chosen[FAMILY[method]]["flags"]
  if method in INJECTS:
    given = {f.split("=", 1)[0] for f in flags}
    flags = [f for f in PAPER_INJECTION if f.split("=", 1)[0] not in given] + flags
  else:  # the injection choice means nothing to the other SVD methods
    flags = [f for f in flags if not f.startswith("--config.injection.")]
  return [f"--config.method={method}", *flags]


def grid_cells(grid: str, chosen: dict[str, dict]) -> dict[str, list[str]]:
  """Cell -> flags of the phases after validation (`chosen`: the validation's choices)."""
  out = {}
  if grid in ("main", "all"):
    for order, tasks in ORDERS.items():
      for method in METHODS:
        out[f"o{order}_{method}"] = [*method_flags(method, chosen), f"--config.order={tasks}"]
    # The pre-trained encoder untouched (learning rate 0): how much of each task label-name
    # scoring gets before any training.
    out["zeroshot"] = ["--config.method=inclora", f"--config.order={ORDERS[1]}",
                       "--config.optim.learning_rate=0.0", "--config.optim.max_steps_per_task=1"]
  if grid in ("seeds", "all"):
    for method in SEED_METHODS:
      for seed in EXTRA_SEEDS:
        out[f"o1_{method}_seed{seed}"] = [*method_flags(method, chosen),
                                          f"--config.order={ORDERS[1]}", f"--config.seed={seed}"]
  if grid in ("after_adam", "all"):
    for order, tasks in ORDERS.items():
      for method in ("bcl", "lbcl"):
        out[f"o{order}_{method}_after_adam"] = [*method_flags(method, chosen),
                                                f"--config.order={tasks}",
                                                "--config.projection.after_adam=True"]
  if grid in ("analyses", "all"):
    base = [*method_flags("lbcl", chosen), f"--config.order={ORDERS[1]}"]
    for r in RANKS:
      if r != 8:
        out[f"o1_lbcl_rank{r}"] = base + [f"--config.adapters.rank={r}"]
    for n in SEED_SAMPLES:
      if n != 8:
        out[f"o1_lbcl_seeds{n}"] = base + [f"--config.injection.num_seed_samples={n}"]
    for i, flags in enumerate(INJECTION_VARIANTS.values()):
      if not _same_injection(base, flags):
        out[f"o1_lbcl_injection{i}"] = [f for f in base if not f.startswith("--config.injection.")
                                        ] + flags
  return out


def _injection_of(flags: list[str]) -> tuple[str, bool]:
  layers, sigma = "all", True
  for f in flags:
    if f.startswith("--config.injection.layers="):
      layers = f.split("=", 1)[1]
    if f.startswith("--config.injection.with_sigma="):
      sigma = f.split("=", 1)[1] == "True"
  return layers, sigma


def _same_injection(a: list[str], b: list[str]) -> bool:
  return _injection_of(a) == _injection_of(b)


# ---------------------------------------------------------------------------------------------
# Running cells.


def load_records() -> dict[str, dict]:
  return {p.stem: json.loads(p.read_text()) for p in sorted(CELLS.glob("*.json"))}


def _record(name: str, flags: list[str], wall: float, results: dict) -> dict:
  cfg = results["config"]
  return {"cell": name, "flags": flags, "wall_seconds": round(wall, 1),
          "train_seconds": round(results["train_seconds"], 1), "tasks": results["tasks"],
          "eval_split": results["eval_split"], "label_space": results["label_space"],
          "accuracy_matrix": results["accuracy_matrix"],
          "average_accuracy": _pct(results["average_accuracy"]), "bwt": _pct(results["bwt"]),
          "forgetting": _pct(results["forgetting"]),
          "label_spaces": {k: {"accuracy_matrix": v["accuracy_matrix"],
                               "average_accuracy": _pct(v["average_accuracy"]),
                               "bwt": _pct(v["bwt"]), "forgetting": _pct(v["forgetting"])}
                           for k, v in results["label_spaces"].items()},
          "n_eval": (cfg["data"]["validation_examples"] if results["eval_split"] == "validation"
                     else cfg["data"]["max_test_examples"]),
          "sensitivity": results["sensitivity"],
          "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}


def run_cell(name: str, flags: list[str], workdir: pathlib.Path, data_dir: str, env) -> str:
  """Runs one cell and writes its record; returns a line for the log."""
  cell_dir = workdir / name
  cmd = [sys.executable, "-m", "lbcl_jax.main", f"--config={CONFIG}", f"--workdir={cell_dir}",
         f"--config.data.data_dir={data_dir}", *COMMON,
         *([] if any(f.startswith("--config.seed=") for f in flags) else ["--config.seed=0"]),
         *flags]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode == DIVERGED:
    # A NaN/inf loss: no results; the cell is recorded as diverged and never averaged.
    line = proc.stderr.strip().splitlines()[-1]
    files.atomic_write_text(CELLS / f"{name}.json", json.dumps(
        {"cell": name, "flags": flags, "wall_seconds": round(wall, 1), "diverged": True,
         "average_accuracy": None, "error": line}, indent=2) + "\n")
    return f"[{name}] diverged: {line}"
  if proc.returncode:
    cell_dir.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(cell_dir / "bench_error.txt", proc.stderr[-20000:])
    raise RuntimeError(f"cell {name} failed ({proc.returncode}); see {cell_dir}/bench_error.txt:"
                       f"\n{proc.stderr[-2000:]}")
  results = json.loads((cell_dir / "results.json").read_text())
  record = _record(name, flags, wall, results)
  files.atomic_write_text(CELLS / f"{name}.json", json.dumps(record, indent=1) + "\n")
  return f"[{name}] {wall:.0f} s, average accuracy {record['average_accuracy']:.1f}"


def run_cells(cells: dict[str, list[str]], args, env) -> list[str]:
  """Runs the cells without a record, `args.jobs` at a time; returns the failed ones."""
  records = load_records()
  todo = {n: f for n, f in cells.items()
          if n not in records and (not args.only or re.search(args.only, n))}
  failed, lock = [], threading.Lock()

  def one(name):
    print(f"[{name}] {' '.join(todo[name])}", flush=True)
    try:
      line = run_cell(name, todo[name], pathlib.Path(args.workdir), args.data_dir, env)
    except RuntimeError as e:
      line = str(e)
      with lock:
        failed.append(name)
    print(line, flush=True)

  with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
    list(pool.map(one, todo))
  return failed


# ---------------------------------------------------------------------------------------------
# The report.


def _pct(v):
  return None if v is None else round(100 * v, 1)


def _f(v):
  return "--" if v is None else f"{v:.1f}"


def _test_se(final_row, n: int) -> float | None:
  """Standard error (%) of the average accuracy from the finite evaluation sets (binomial,
  `n` examples per task)."""
  p = np.array([v for v in final_row if v is not None], np.float64)
  if not n or not p.size:
    return None
  return round(float(100 * np.sqrt(np.sum(p * (1 - p) / n)) / len(p)), 1)


def _space(record: dict, space: str) -> dict:
  """A record's matrix and metrics in label space `space`."""
  if record["label_space"] == space:
    return {k: record[k] for k in ("accuracy_matrix", "average_accuracy", "bwt", "forgetting")}
  return record["label_spaces"][space]


def table1(records: dict[str, dict], space: str, suffix: str = "",
           methods=METHODS) -> dict[str, dict]:
  rows = {}
  for method in methods:
    per = [records.get(f"o{o}_{method}{suffix}") for o in ORDERS]
    per = [None if p is None or p.get("diverged") else p for p in per]
    sp = [None if p is None else _space(p, space) for p in per]
    acc = [None if s is None else s["average_accuracy"] for s in sp]
    bwt = [None if s is None else s["bwt"] for s in sp]
    ses = [None if p is None else _test_se(s["accuracy_matrix"][-1], p["n_eval"])
           for p, s in zip(per, sp)]
    full = all(a is not None for a in acc)
    rows[method] = {
        "orders": acc, "average": round(float(np.mean(acc)), 1) if full else None,
        "average_test_se": (round(float(np.sqrt(np.sum(np.square(ses))) / len(ses)), 1)
                            if all(e is not None for e in ses) else None),
        "bwt": bwt,
        "bwt_average": round(float(np.mean(bwt)), 1) if all(b is not None for b in bwt) else None}
  return rows


def seed_variance(records: dict[str, dict], space: str) -> dict[str, dict]:
  """Order 1 average accuracy over seeds 0, 1, 2 per method."""
  out = {}
  for method in SEED_METHODS:
    names = [f"o1_{method}"] + [f"o1_{method}_seed{s}" for s in EXTRA_SEEDS]
    accs = [_space(records[n], space)["average_accuracy"] for n in names
            if n in records and not records[n].get("diverged")]
    if len(accs) > 1:
      out[method] = {"accuracies": accs, "mean": round(float(np.mean(accs)), 1),
                     "std": round(float(np.std(accs, ddof=1)), 1),
                     "se": round(float(np.std(accs, ddof=1) / np.sqrt(len(accs))), 1)}
  return out


def analyses(records: dict[str, dict]) -> dict[str, dict]:
  def get(name):
    r = records.get(name)
    if r is None or r.get("diverged"):
      return None
    return {"average_accuracy": r["average_accuracy"], "bwt": r["bwt"],
            "test_se": _test_se(r["accuracy_matrix"][-1], r["n_eval"])}
  base = records.get("o1_lbcl")
  injection = {}
  if base is not None:
    for i, (label, flags) in enumerate(INJECTION_VARIANTS.items()):
      injection[label] = get("o1_lbcl" if _same_injection(base["flags"], flags)
                             else f"o1_lbcl_injection{i}")
  return {
      "rank": {r: get("o1_lbcl" if r == 8 else f"o1_lbcl_rank{r}") for r in RANKS},
      "seed_samples": {n: get("o1_lbcl" if n == 8 else f"o1_lbcl_seeds{n}")
                       for n in SEED_SAMPLES},
      "injection": injection,
      "reference_bcl": get("o1_bcl"),
  }


def _block(path: str) -> int:
  m = re.search(r"layer_(\d+)/", path)
  return int(m.group(1)) if m else -1


def sensitivity_by_depth(records: dict[str, dict]) -> dict[str, dict]:
  """Per (order, scored task) of lbcl: each block's share (%) of all old-triplet scores."""
  shares = {}
  for order in ORDERS:
    run = records.get(f"o{order}_lbcl")
    if run is None or run.get("diverged"):
      continue
    for task, layers in run["sensitivity"].items():
      per_block: dict[int, float] = {}
      for path, v in layers.items():
        per_block[_block(path)] = per_block.get(_block(path), 0.0) + float(np.sum(v))
      z = sum(per_block.values()) or 1.0
      shares[f"order {order}: {task}"] = {b: round(100 * t / z, 2)
                                          for b, t in sorted(per_block.items())}
  return shares


def write_plots(report: dict, out_dir: pathlib.Path) -> None:
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  an = report["analyses"]
  fig = Figure(figsize=(13, 3.6))
  axes = fig.subplots(1, 3)
  for ax, key, xlabel in ((axes[0], "rank", "adapter rank r"),
                          (axes[1], "seed_samples", "seed samples")):
    pts = [(int(k), v["average_accuracy"], v["test_se"]) for k, v in an[key].items() if v]
    if pts:
      xs, ys, es = zip(*pts)
      ax.errorbar(xs, ys, yerr=None if None in es else list(es), fmt="o-", capsize=3,
                  label="lbcl (error bar: test SE)")
      ax.set_xscale("log", base=2)
      ax.set_xticks(xs, [str(x) for x in xs])
    if an.get("reference_bcl") and key == "seed_samples":
      ax.axhline(an["reference_bcl"]["average_accuracy"], ls="--", color="gray",
                 label="bcl (no injection)")
    ax.legend(fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("average accuracy (%), seen labels")
    ax.grid(alpha=0.3)
  pts = [(k, v["average_accuracy"], v["test_se"]) for k, v in an["injection"].items() if v]
  if pts:
    axes[2].bar(range(len(pts)), [p[1] for p in pts],
                yerr=None if any(p[2] is None for p in pts) else [p[2] for p in pts], capsize=3)
    axes[2].set_xticks(range(len(pts)), [p[0].replace(", ", "\n") for p in pts], fontsize=7)
  axes[2].set_ylabel("average accuracy (%)")
  axes[2].set_title("injection")
  fig.suptitle("LB-CL on order 1 (dbpedia, amazon, yelp, agnews), all-MiniLM-L6-v2")
  plots.save_figure(fig, out_dir / "cl_analyses.png")

  shares = report["sensitivity_by_depth"]
  fig = Figure(figsize=(7, 3.8))
  ax = fig.subplots()
  if shares:
    blocks = sorted({int(b) for s in shares.values() for b in s})
    m = np.array([[s.get(b, s.get(str(b), np.nan)) for b in blocks] for s in shares.values()])
    ax.bar(blocks, np.nanmean(m, axis=0), color="tab:blue", alpha=0.5, label="mean")
    for row, lab in zip(m, shares):
      ax.plot(blocks, row, ".-", alpha=0.6, label=lab)
    ax.axhline(100 / len(blocks), ls="--", color="gray", label="uniform")
    ax.set_xticks(blocks, [f"block {b}" for b in blocks])
    ax.legend(fontsize=6, ncol=2)
  ax.set_ylabel("share of old-triplet sensitivity (%)")
  ax.set_xlabel("depth (block 0 = bottom)")
  ax.set_title("Which blocks matter: sensitivity S of old triplets by depth (lbcl)")
  plots.save_figure(fig, out_dir / "cl_sensitivity.png")


def _table_md(t1: dict, title: str, paper: bool) -> list[str]:
  head = "| method | order 1 | order 2 | order 3 | **avg** | test SE | BWT avg |"
  sep = "| --- | --- | --- | --- | --- | --- | --- |"
  if paper:
    head += " O-LoRA paper T5-large (O1 / O2 / O3 / avg) | LB-CL paper T5-large avg |"
    sep += " --- | --- |"
  out = [title, "", head, sep]
  for method, row in t1.items():
    line = (f"| {PAPER_NAMES.get(method, method)} | " + " | ".join(_f(v) for v in row["orders"]) +
            f" | **{_f(row['average'])}** | {_f(row['average_test_se'])} | "
            f"{_f(row['bwt_average'])} |")
    if paper:
      ref = PAPER_OLORA_TABLE1.get(method)
      ref_s = " / ".join(f"{v:.1f}" for v in ref) if ref else "--"
      if method == "mtl" and ref:
        ref_s = f"{ref[-1]:.1f} (joint)"
      line += f" {ref_s} | {_f(PAPER_LBCL_AVERAGE.get(method))} |"
    out.append(line)
  return out + [""]


def markdown(report: dict) -> str:
  out = []
  ch = report["validation"]["chosen"]
  if ch:
    out += ["Chosen on order 1's validation split (8 runs per family, seen labels):", "",
            "| family | chosen flags | validation avg |", "| --- | --- | --- |"]
    for fam, c in ch.items():
      out.append(f"| {fam} | `{' '.join(c['flags'])}` | {_f(c['validation_average'])} |")
    out += ["", "The sweep (validation average, %):", "", "| cell | flags | avg |",
            "| --- | --- | --- |"]
    for fam, c in ch.items():
      for s in c["sweep"]:
        out.append(f"| {s['cell']} | `{' '.join(f for f in s['flags'] if not f.startswith(('--config.order', '--config.eval.split')))}` | "
                   f"{'diverged' if s['diverged'] else _f(s['validation_average'])} |")
    out.append("")
  out += _table_md(report["table1"], "Table 1, seen labels (no task identity):", True)
  out += _table_md(report["table1_task"], "Table 1, the task's own labels:", False)
  if any(r["average"] is not None or any(o is not None for o in r["orders"])
         for r in report["projection_after_adam"]["seen"].values()):
    out += _table_md(report["projection_after_adam"]["seen"],
                     "Projection after Adam (seen labels):", False)
  zs = report.get("zeroshot")
  if zs:
    out += [f"Zero-shot (no training), seen labels: average {_f(zs['average_accuracy'])}; per "
            "task " + ", ".join(f"{t} {_f(a)}" for t, a in zs["per_task"].items()) + ".", ""]
  if report["seed_variance"]:
    out += ["Seed variance (order 1, seeds 0 / 1 / 2, seen labels):", "",
            "| method | accuracies | mean | std | SE |", "| --- | --- | --- | --- | --- |"]
    for method, v in report["seed_variance"].items():
      out.append(f"| {PAPER_NAMES[method]} | {' / '.join(_f(a) for a in v['accuracies'])} | "
                 f"{_f(v['mean'])} | {_f(v['std'])} | {_f(v['se'])} |")
    out.append("")
  an = report["analyses"]

  def cells(d):
    return " | ".join("--" if v is None else f"{v['average_accuracy']:.1f} / {_f(v['bwt'])}"
                      for v in d.values())
  out += ["Analyses (lbcl, order 1, seen labels; average accuracy % / BWT):", "",
          "| rank r | " + " | ".join(str(r) for r in an["rank"]) + " |",
          "| --- |" + " --- |" * len(an["rank"]), f"| avg / BWT | {cells(an['rank'])} |", "",
          "| seed samples | " + " | ".join(str(n) for n in an["seed_samples"]) + " |",
          "| --- |" + " --- |" * len(an["seed_samples"]),
          f"| avg / BWT | {cells(an['seed_samples'])} |", ""]
  if an["injection"]:
    out += ["| injection | " + " | ".join(an["injection"]) + " |",
            "| --- |" + " --- |" * len(an["injection"]),
            f"| avg / BWT | {cells(an['injection'])} |", ""]
  if report["sensitivity_by_depth"]:
    blocks = sorted({int(b) for s in report["sensitivity_by_depth"].values() for b in s})
    out += ["Share of old-triplet sensitivity by block (%; block 0 = bottom):", "",
            "| scored on | " + " | ".join(f"block {b}" for b in blocks) + " |",
            "| --- |" + " --- |" * len(blocks)]
    for k, s in report["sensitivity_by_depth"].items():
      out.append(f"| {k} | " + " | ".join(_f(s.get(b, s.get(str(b)))) for b in blocks) + " |")
  return "\n".join(out) + "\n"


def build_report(records: dict[str, dict], data_dir: str) -> dict:
  chosen = choices(records)
  zs = records.get("zeroshot")
  return {
      "settings": {"config": str(CONFIG.relative_to(ROOT)), "common_flags": COMMON,
                   "orders": ORDERS, "data_dir": data_dir, "seed": 0},
      "validation": {"budget_per_family": VALIDATION_BUDGET, "chosen": chosen,
                     "cells": {n: {"flags": r["flags"], "validation_average": r.get("average_accuracy"),
                                   "validation_average_task": (r["label_spaces"]["task"]["average_accuracy"]
                                                               if "label_spaces" in r else None)}
                               for n, r in records.items() if n.startswith("val_")}},
      "table1": table1(records, SEEN),
      "table1_task": table1(records, TASK),
      "projection_after_adam": {
          space: {**{f"{m} (before Adam)": table1(records, space, methods=(m,))[m]
                     for m in ("bcl", "lbcl")},
                  **{f"{m} (after Adam)": table1(records, space, "_after_adam", (m,))[m]
                     for m in ("bcl", "lbcl")}} for space in (SEEN, TASK)},
      "seed_variance": seed_variance(records, SEEN),
      "seed_variance_task": seed_variance(records, TASK),
      "zeroshot": ({"average_accuracy": zs["average_accuracy"],
                    "per_task": dict(zip(zs["tasks"], (_pct(v) for v in zs["accuracy_matrix"][-1])))}
                   if zs else None),
      "analyses": analyses(records),
      "sensitivity_by_depth": sensitivity_by_depth(records),
      "paper": {"olora_table1_t5_large": PAPER_OLORA_TABLE1,
                "lbcl_paper_average_t5_large": PAPER_LBCL_AVERAGE},
      "cells": {k: {kk: vv for kk, vv in v.items() if kk != "sensitivity"}
                for k, v in records.items()},
      "total_wall_seconds": round(sum(r["wall_seconds"] for r in records.values()), 1),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "cl_benchmark"),
                      help="a CL_Benchmark directory with TC/dbpedia, TC/agnews, SC/amazon, SC/yelp")
  parser.add_argument("--workdir", default="/tmp/lbcl_cl_methods", help="one sub-directory per cell")
  parser.add_argument("--grid", choices=("validation", "main", "seeds", "after_adam", "analyses",
                                         "all"), default="all")
  parser.add_argument("--only", default="", help="run only cells whose name matches this regex")
  parser.add_argument("--jobs", type=int, default=1,
                      help="cells run at once (2 on 2 cores: one compiles while one trains)")
  parser.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "results"))
  parser.add_argument("--report_only", action="store_true", help="rebuild outputs; run nothing")
  args = parser.parse_args()

  args.data_dir = str(pathlib.Path(args.data_dir).resolve())
  missing = [t for t in ("TC/dbpedia", "TC/agnews", "SC/amazon", "SC/yelp")
             if not (pathlib.Path(args.data_dir) / t / "train.json").exists()]
  if missing and not args.report_only:
    sys.exit(f"--data_dir={args.data_dir}: no train.json for {', '.join(missing)} "
             "(expected O-LoRA's CL_Benchmark layout)")
  CELLS.mkdir(parents=True, exist_ok=True)
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ)
  # The cells share shapes, so a persistent compilation cache saves most of each one's compiles.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(workdir / "jax_cache"))

  failed = []
  if not args.report_only:
    if args.grid in ("validation", "all"):
      failed += run_cells(validation_cells(load_records()), args, env)
      # The SVD family's injection cells exist once its first six have run.
      failed += run_cells(validation_cells(load_records()), args, env)
    if args.grid != "validation":
      chosen = choices(load_records())
      if chosen is None:
        sys.exit("the validation grid is unfinished (run --grid=validation first)")
      phases = ("main", "seeds", "after_adam", "analyses") if args.grid == "all" else (args.grid,)
      for phase in phases:
        failed += run_cells(grid_cells(phase, chosen), args, env)

  records = load_records()
  report = build_report(records, args.data_dir)
  out_dir = pathlib.Path(args.output_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  md = markdown(report)
  files.atomic_write_text(out_dir / "cl_methods.json", json.dumps(report, indent=1) + "\n")
  files.atomic_write_text(out_dir / "cl_methods.md", md)
  write_plots(report, out_dir)
  print(md)
  print(f"{len(records)} cells, {report['total_wall_seconds'] / 60:.1f} min of runs; "
        f"wrote {out_dir}/cl_methods.json, cl_methods.md, cl_analyses.png, cl_sensitivity.png")
  if failed:
    sys.exit(f"failed cells: {', '.join(failed)}")


if __name__ == "__main__":
  main()
