"""The machinery of a continual-learning benchmark grid, shared by `cl_methods.py` (MiniLM),
`generative_cl.py` and `long_cl.py` (SmolLM2): cells, their records, validation choices,
Table 1, seed spread, the analyses and their plots.

A *cell* is one `python -m lbcl_jax.main --config=<spec.config>` run in its own process, in
`<workdir>/<cell>/`. Its summary (a *record*) goes to `<spec.cells_dir>/<cell>.json` in the
repository: commit those as they come, and the grid resumes from them on any machine (a cell
with a record is never run again). The report is a pure function of the records, so
`--report_only` rebuilds every output from them.

A grid script defines a `Spec` (what to run and how to name it) and calls `main(spec)`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import threading
import time
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from lbcl_jax import files
from lbcl_jax import plots

import machine

ROOT = pathlib.Path(__file__).resolve().parents[1]

METHODS = ("seqft", "inclora", "olora", "nlnbcl", "lcl", "bcl", "lbcl", "mtl")
PAPER_NAMES = {"seqft": "SeqFT", "inclora": "IncLoRA", "olora": "O-LoRA", "nlnbcl": "NLNB-CL",
               "lcl": "L-CL", "bcl": "B-CL", "lbcl": "LB-CL", "mtl": "MTL",
               "lbcl_published": "LB-CL as published (every layer, with sigma; order 1)"}
FAMILY = {"seqft": "seqft", "inclora": "lora", "olora": "lora", "mtl": "lora",
          "nlnbcl": "svd", "lcl": "svd", "bcl": "svd", "lbcl": "svd"}
FAMILIES = ("seqft", "lora", "svd")
INJECTS = ("lcl", "lbcl")
# The paper's orders 1-3 (lbcl_jax.tasks.ORDERS) with yahoo -> yelp (the local copy of the
# benchmark has no yahoo).
ORDERS = {1: "dbpedia,amazon,yelp,agnews",
          2: "dbpedia,amazon,agnews,yelp",
          3: "yelp,amazon,agnews,dbpedia"}
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
# The paper's injection, spelled out, so that a cell means the same whatever the defaults are.
PAPER_INJECTION = ("--config.injection.layers=all", "--config.injection.with_sigma=True")

# Published T5-large average accuracies (%), for reference only: a different model (T5-large,
# 770M, generating the label) trained on the full benchmark with yahoo. O-LoRA's Table 1
# (Wang et al., 2023) gives orders 1 / 2 / 3 / average; the LB-CL paper (Qiao & Mahdavi, 2024)
# headline is its average of LB-CL and of its rerun of O-LoRA. The LB-CL paper's per-order
# numbers and its L-CL / B-CL / NLNB-CL rows were not available offline.
PAPER_OLORA_TABLE1 = {"seqft": (18.9, 24.9, 41.7, 28.5), "inclora": (66.0, 64.9, 68.3, 66.4),
                      "olora": (75.4, 75.7, 76.3, 75.8), "mtl": (80.0, 80.0, 80.0, 80.0)}
PAPER_LBCL_AVERAGE = {"lbcl": 76.7, "olora": 75.4, "lbcl_published": 76.7}

# `python -m lbcl_jax.main`'s exit status when the training loss became NaN or infinite.
DIVERGED = 3


@dataclasses.dataclass(frozen=True)
class Row:
  """A method row beyond the paper's (a grid's `extra_rows`): validated as its own family
  (cells `val_<family>_...`, the same budget as every family), then run as the paper's rows
  are (order 1, and seeds 1 and 2 with `seeds`).

  Attributes:
    family: its validation family.
    flags: the flags that make it (`--config.method=...` and any `--config.<method>.over=`).
    label: its name in tables.
    injects: it injects as L-CL / LB-CL do (it gets the grid's injection where the validation
      chose none).
    seeds: it runs with seeds 1 and 2 too.
  """

  family: str
  flags: tuple[str, ...]
  label: str
  injects: bool = False
  seeds: bool = True


@dataclasses.dataclass(frozen=True)
class PaperColumn:
  """A published reference column of Table 1 (a grid's `paper_columns`).

  Attributes:
    heading: the column's heading, saying what the numbers are (model, orders, tasks).
    values: method -> the published value (%); the other rows show "--".
  """

  heading: str
  values: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class Section:
  """A grid's own part of the report, beside the shared ones (a grid's `section`).

  Attributes:
    build: (spec, records) -> the keys it adds to the report's JSON (a pure function of the
      records, as the rest of the report).
    head: (spec, report) -> markdown lines before the shared ones.
    tail: (spec, report) -> markdown lines after the shared ones.
    plots: (spec, report, out_dir) -> None: writes `outputs`.
    outputs: the files `plots` writes in the output directory.
  """

  build: Callable[["Spec", Mapping[str, dict]], dict]
  head: Callable[["Spec", dict], list[str]] = lambda spec, report: []
  tail: Callable[["Spec", dict], list[str]] = lambda spec, report: []
  plots: Optional[Callable[["Spec", dict, pathlib.Path], None]] = None
  outputs: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Spec:
  """What a grid runs and how its outputs are named.

  validation_cells(records) -> {cell: flags}: the validation sweep (cells named
  `val_<family>_...`); it may grow as records arrive (a second stage at the best of a first).
  Every family's sweep has `validation_budget` cells once complete.
  """

  name: str  # output stem: results/<name>.json, <name>.md
  plot_prefix: str  # results/<plot_prefix>_analyses.png, _sensitivity.png, _heatmaps.png
  model: str  # for titles
  config: pathlib.Path
  cells_dir: pathlib.Path
  common: tuple[str, ...]  # flags of every cell
  validation_cells: Callable[[Mapping[str, dict]], dict[str, list[str]]]
  validation_budget: int
  orders: Mapping[int, str] = dataclasses.field(default_factory=lambda: dict(ORDERS))
  # The orders the main phase runs (the others run only with --orders).
  main_orders: tuple[int, ...] = (1, 2, 3)
  # The methods the main phase runs on orders other than 1 (every method runs order 1).
  other_order_methods: tuple[str, ...] = METHODS
  # A "LB-CL as published" row (`o1_lbcl_published`: every layer, with sigma, at the SVD
  # family's chosen learning rate) where the validation chose another injection.
  published_row: bool = False
  # Whether `--grid=all` runs the analyses (else only `--grid=analyses` does).
  analyses_in_all: bool = True
  # The label spaces a record holds: the first is the record's own (`table1`); None for a
  # generative model, whose free-text answers have no label space.
  spaces: tuple[Optional[str], ...] = ("seen", "task")
  after_adam: bool = True
  # Regex with a group `index`: the block of an adapted layer's path (the model's BLOCK_PATTERN).
  block_pattern: str = r"layer_(?P<index>\d+)/"
  zeroshot_flags: tuple[str, ...] = ()
  heatmaps: bool = False
  data_tasks: tuple[str, ...] = ("TC/dbpedia", "TC/agnews", "SC/amazon", "SC/yelp")
  # A grid that reuses another grid's validation choices (a larger-scale rerun) names it here.
  choices_from: Optional["Spec"] = None
  # The injection of L-CL and LB-CL where the validation did not choose one (spelled out, so a
  # cell means the same whatever the config defaults are).
  injection: tuple[str, ...] = PAPER_INJECTION
  # Injection variants this grid's analyses add to INJECTION_VARIANTS (label -> flags), such as
  # a control that names the model's own layers by a path regex.
  extra_injections: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  # Methods beyond the paper's (replay, EWC, InfLoRA): row name -> `Row`.
  extra_rows: Mapping[str, Row] = dataclasses.field(default_factory=dict)
  # Per order, the methods the main phase runs there, in running order (None: every method on
  # order 1, `other_order_methods` on the others). Table 1's rows are then the methods that
  # run somewhere.
  order_methods: Optional[Mapping[int, tuple[str, ...]]] = None
  # The order-1 extras: a zero-shot cell in the main phase, the seeds phase, and the analyses
  # (the analyses phase, its table and plot, and the sensitivity by depth of the lbcl cells).
  zeroshot: bool = True
  seeds: bool = True
  analyses: bool = True
  # A line printed under Table 1's title (what every number of it is over).
  table_note: str = ""
  # Table 1's published reference columns (None: O-LoRA's Table 1 and the LB-CL paper's
  # average, on orders 1-3).
  paper_columns: Optional[tuple[PaperColumn, ...]] = None
  # The grid's own part of the report.
  section: Optional[Section] = None

  @property
  def methods(self) -> tuple[str, ...]:
    return METHODS + tuple(self.extra_rows)

  @property
  def families(self) -> tuple[str, ...]:
    return FAMILIES + tuple(dict.fromkeys(r.family for r in self.extra_rows.values()
                                          if r.family not in FAMILIES))

  @property
  def seed_methods(self) -> tuple[str, ...]:
    if not self.seeds:
      return ()
    return SEED_METHODS + tuple(m for m, r in self.extra_rows.items() if r.seeds)

  @property
  def table_methods(self) -> tuple[str, ...]:
    """Table 1's rows: every method, or with `order_methods` those that run on some order."""
    if self.order_methods is None:
      return self.methods
    ran = {m for ms in self.order_methods.values() for m in ms}
    return tuple(m for m in self.methods if m in ran)

  def runs_on(self, method: str, order: int) -> bool:
    """Whether the main phase runs `method` on `order`."""
    if self.order_methods is not None:
      return method in self.order_methods.get(order, ())
    return order == 1 or method in self.other_order_methods

  def family_of(self, method: str) -> str:
    return self.extra_rows[method].family if method in self.extra_rows else FAMILY[method]

  @property
  def labels(self) -> dict[str, str]:
    return {**PAPER_NAMES, **{m: r.label for m, r in self.extra_rows.items()}}

  @property
  def injection_variants(self) -> dict[str, list[str]]:
    """The analyses' injection variants in column order; variant i runs as cell
    `o1_lbcl_injection{i}` unless it is the base run's own injection."""
    return {**INJECTION_VARIANTS, **{k: list(v) for k, v in self.extra_injections.items()}}

  @property
  def outputs(self) -> tuple[str, ...]:
    p = self.plot_prefix
    return ((f"{self.name}.json", f"{self.name}.md") +
            ((f"{p}_analyses.png", f"{p}_sensitivity.png") if self.analyses else ()) +
            ((f"{p}_heatmaps.png",) if self.heatmaps else ()) +
            (self.section.outputs if self.section else ()))


def lr_flag(lr: str) -> str:
  return f"--config.optim.learning_rate={lr}"


# ---------------------------------------------------------------------------------------------
# Cells.


def best(records: Mapping[str, dict], names) -> str:
  """The cell with the highest validation average (diverged cells never win; ties: first)."""
  scored = [(records[n]["average_accuracy"], -i, n) for i, n in enumerate(names)
            if n in records and records[n].get("average_accuracy") is not None]
  return max(scored)[2]


def choices(spec: Spec, records: Mapping[str, dict],
            partial: bool = False) -> dict[str, dict] | None:
  """Per family, its chosen flags (without method, order and split), or None while the
  validation grid is unfinished. With `partial`, the families whose sweep is complete (so a
  grid can go on with them while another family's sweep still runs), None if there are none.
  A spec with `choices_from` takes that grid's choices of its own families (it waits for no
  sweep of a family it does not run)."""
  if spec.choices_from is not None:
    got = choices(spec.choices_from, load_records(spec.choices_from), partial=True) or {}
    got = {f: c for f, c in got.items() if f in spec.families}
    if not got or (len(got) < len(spec.families) and not partial):
      return None
    return got
  cells = spec.validation_cells(records)
  sweeps = {f: [n for n in cells if n.startswith(f"val_{f}_")] for f in spec.families}
  done = [f for f, names in sweeps.items()
          if len(names) == spec.validation_budget and all(n in records for n in names)]
  if len(done) < len(spec.families) and not (partial and done):
    return None
  out = {}
  for family in done:
    names = sweeps[family]
    chosen = best(records, names)
    flags = [f for f in records[chosen]["flags"]
             if not f.startswith(("--config.method=", "--config.order=", "--config.eval.split="))]
    out[family] = {
        "cell": chosen, "flags": flags,
        "validation_average": records[chosen]["average_accuracy"],
        "sweep": [{"cell": n, "flags": cells[n],
                   "validation_average": records[n].get("average_accuracy"),
                   "diverged": bool(records[n].get("diverged"))} for n in names]}
  return out


def method_flags(method: str, chosen: Mapping[str, dict],
                 injection: Sequence[str] = PAPER_INJECTION, row: Optional[Row] = None
                 ) -> list[str]:
  """A method's flags: its family's chosen ones; an injecting method also gets `injection`'s
  flags for what the validation did not choose. `row`: a method beyond the paper's."""
  if row is not None:
    flags = chosen[row.family]["flags"]
    if row.injects:
      given = {f.split("=", 1)[0] for f in flags}
      flags = [f for f in injection if f.split("=", 1)[0] not in given] + flags
    else:
      flags = [f for f in flags if not f.startswith("--config.injection.")]
    return [*row.flags, *[f for f in flags if f not in row.flags]]
  flags = chosen[FAMILY[method]]["flags"]
  if method in INJECTS:
    given = {f.split("=", 1)[0] for f in flags}
    flags = [f for f in injection if f.split("=", 1)[0] not in given] + flags
  else:  # the injection choice means nothing to the other SVD methods
    flags = [f for f in flags if not f.startswith("--config.injection.")]
  if method != "olora":  # nor O-LoRA's weights to the rest of the LoRA family
    flags = [f for f in flags if not f.startswith("--config.olora.")]
  return [f"--config.method={method}", *flags]


def published_flags(chosen: Mapping[str, dict]) -> list[str] | None:
  """LB-CL as published (every layer, with sigma) at the SVD family's chosen settings; None
  where that is the chosen injection (the `lbcl` row is then the published one)."""
  flags = method_flags("lbcl", chosen)
  if same_injection(flags, PAPER_INJECTION):
    return None
  return [f for f in flags if not f.startswith("--config.injection.")] + list(PAPER_INJECTION)


def grid_cells(spec: Spec, grid: str, chosen: Mapping[str, dict],
               orders: Sequence[int] | None = None) -> dict[str, list[str]]:
  """Cell -> flags of the phases after validation (`chosen`: the validation's choices)."""
  orders = spec.main_orders if orders is None else orders
  # Partial choices: the chosen families' methods.
  methods = [m for m in spec.methods if spec.family_of(m) in chosen]
  flags_of = lambda m: method_flags(m, chosen, spec.injection, spec.extra_rows.get(m))
  phases = grid_phases(spec, grid)
  out = {}
  if "main" in phases:
    for order in orders:
      # In the running order `order_methods` gives, where it does.
      ordered = methods if spec.order_methods is None else spec.order_methods.get(order, ())
      for method in ordered:
        if method in methods and spec.runs_on(method, order):
          out[f"o{order}_{method}"] = [*flags_of(method), f"--config.order={spec.orders[order]}"]
    published = published_flags(chosen) if spec.published_row and "svd" in chosen else None
    if published is not None and 1 in orders:
      out["o1_lbcl_published"] = [*published, f"--config.order={spec.orders[1]}"]
    if spec.zeroshot:
      # The pre-trained model untouched (learning rate 0): what each task gets before training.
      out["zeroshot"] = ["--config.method=inclora", f"--config.order={spec.orders[1]}",
                         "--config.optim.learning_rate=0.0",
                         "--config.optim.max_steps_per_task=1", *spec.zeroshot_flags]
  if "seeds" in phases:
    for method in [m for m in spec.seed_methods if m in methods]:
      for seed in EXTRA_SEEDS:
        out[f"o1_{method}_seed{seed}"] = [*flags_of(method), f"--config.order={spec.orders[1]}",
                                          f"--config.seed={seed}"]
  if spec.after_adam and "after_adam" in phases and "svd" in chosen:
    for order in orders:
      for method in ("bcl", "lbcl"):
        out[f"o{order}_{method}_after_adam"] = [*method_flags(method, chosen, spec.injection),
                                                f"--config.order={spec.orders[order]}",
                                                "--config.projection.after_adam=True"]
  if "analyses" in phases and spec.analyses and "svd" in chosen:
    base = [*method_flags("lbcl", chosen, spec.injection), f"--config.order={spec.orders[1]}"]
    for r in RANKS:
      if r != 8:
        out[f"o1_lbcl_rank{r}"] = base + [f"--config.adapters.rank={r}"]
    for n in SEED_SAMPLES:
      if n != 8:
        out[f"o1_lbcl_seeds{n}"] = base + [f"--config.injection.num_seed_samples={n}"]
    for i, flags in enumerate(spec.injection_variants.values()):
      if not same_injection(base, flags):
        out[f"o1_lbcl_injection{i}"] = [f for f in base if not f.startswith("--config.injection.")
                                        ] + flags
  return out


def grid_phases(spec: Spec, grid: str) -> tuple[str, ...]:
  """The phases `--grid=<grid>` runs after the validation sweep, in order; `all` includes the
  analyses only where `spec.analyses_in_all` says so."""
  if grid != "all":
    return (grid,)
  return ("main", "seeds", "after_adam") + (("analyses",) if spec.analyses_in_all else ())


def _injection_of(flags: Sequence[str]) -> tuple[str, bool]:
  layers, sigma = "all", True
  for f in flags:
    if f.startswith("--config.injection.layers="):
      layers = f.split("=", 1)[1]
    if f.startswith("--config.injection.with_sigma="):
      sigma = f.split("=", 1)[1] == "True"
  return layers, sigma


def same_injection(a: Sequence[str], b: Sequence[str]) -> bool:
  return _injection_of(a) == _injection_of(b)


# ---------------------------------------------------------------------------------------------
# Running cells.


def load_records(spec: Spec) -> dict[str, dict]:
  return {p.stem: json.loads(p.read_text()) for p in sorted(spec.cells_dir.glob("*.json"))}


def _pct(v):
  return None if v is None else round(100 * v, 1)


def _f(v):
  return "--" if v is None else f"{v:.1f}"


def cell_settings(cfg: Mapping) -> dict:
  """The settings a cell ran with, from its results.json config (whatever flags set them)."""
  return {"learning_rate": cfg["optim"]["learning_rate"], "grad_clip": cfg["optim"]["grad_clip"],
          "max_steps_per_task": cfg["optim"]["max_steps_per_task"],
          "global_batch_size": cfg["optim"]["global_batch_size"],
          "train_per_class": cfg["data"]["train_per_class"],
          "max_source_length": cfg["data"]["max_source_length"],
          # Records older than the field were cut as each family cut then (Llama: left).
          "truncation": cfg["data"].get("truncation"),
          "rank": cfg["adapters"]["rank"], "orth_reg_weight": cfg["adapters"]["orth_reg_weight"],
          "injection_layers": cfg["injection"]["layers"],
          "injection_with_sigma": cfg["injection"]["with_sigma"],
          "olora_lambda1": cfg["olora"]["lambda1"], "seed": cfg["seed"],
          # Records older than these fields measured the full matrix and stopped on an invalid
          # row.
          "eval_matrix": cfg.get("eval", {}).get("matrix", "full"),
          "invalid_rows": cfg["data"].get("invalid_rows", "error")}


def adapter_overlap(cell_dir: pathlib.Path) -> list[dict] | None:
  """`adapter_overlap.py`'s rows for a finished cell (in a process of its own, which loads the
  run), or None for a run without adapters or with one stage."""
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adapter_overlap.py"),
                         "--json", str(cell_dir)], cwd=ROOT, capture_output=True, text=True)
  if proc.returncode:
    return None
  return json.loads(proc.stdout)[0]["rows"] or None


def make_record(name: str, flags: Sequence[str], wall: float, results: dict,
                overlap: list[dict] | None = None) -> dict:
  cfg = results["config"]
  return {"cell": name, "flags": list(flags), "wall_seconds": round(wall, 1),
          "settings": cell_settings(cfg), "adapter_overlap": overlap,
          "train_seconds": round(results["train_seconds"], 1), "tasks": results["tasks"],
          "eval_split": results["eval_split"], "label_space": results["label_space"],
          "accuracy_matrix": results["accuracy_matrix"],
          "average_accuracy": _pct(results["average_accuracy"]), "bwt": _pct(results["bwt"]),
          "forgetting": _pct(results["forgetting"]),
          "label_spaces": {k: {"accuracy_matrix": v["accuracy_matrix"],
                               "average_accuracy": _pct(v["average_accuracy"]),
                               "bwt": _pct(v["bwt"]), "forgetting": _pct(v["forgetting"])}
                           for k, v in (results.get("label_spaces") or {}).items()},
          "n_eval": (cfg["data"]["validation_examples"] if results["eval_split"] == "validation"
                     else cfg["data"]["max_test_examples"]),
          "sensitivity": results["sensitivity"],
          # Per stage: set-up / end / training / evaluation / checkpoint seconds, the steady
          # step time, peak RSS, trainable and method-state bytes.
          "stage_costs": results.get("stage_costs"),
          # `data.invalid_rows=skip`: {task: {split: rows skipped}}.
          "skipped_rows": results.get("skipped_rows"),
          "machine": machine.describe(accelerator=results.get("devices"))}


def run_cell(spec: Spec, name: str, flags: Sequence[str], workdir: pathlib.Path, data_dir: str,
             env) -> str:
  """Runs one cell and writes its record; returns a line for the log."""
  cell_dir = workdir / name
  cmd = [sys.executable, "-m", "lbcl_jax.main", f"--config={spec.config}",
         f"--workdir={cell_dir}", f"--config.data.data_dir={data_dir}", *spec.common,
         *([] if any(f.startswith("--config.seed=") for f in flags) else ["--config.seed=0"]),
         *flags]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode == DIVERGED:
    # A NaN/inf loss: no results; the cell is recorded as diverged and never averaged.
    line = proc.stderr.strip().splitlines()[-1]
    files.atomic_write_text(spec.cells_dir / f"{name}.json", json.dumps(
        {"cell": name, "flags": list(flags), "wall_seconds": round(wall, 1), "diverged": True,
         "average_accuracy": None, "error": line}, indent=2) + "\n")
    return f"[{name}] diverged: {line}"
  if proc.returncode == 2 and "is in use by another run" in proc.stderr:
    # Another grid process (same --workdir) holds this cell: several may share one grid.
    return f"[{name}] skipped: another grid process is running it"
  if proc.returncode:
    cell_dir.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(cell_dir / "bench_error.txt", proc.stderr[-20000:])
    raise RuntimeError(f"cell {name} failed ({proc.returncode}); see {cell_dir}/bench_error.txt:"
                       f"\n{proc.stderr[-2000:]}")
  results = json.loads((cell_dir / "results.json").read_text())
  overlap = (adapter_overlap(cell_dir)
             if results["config"]["method"] != "seqft" and len(results["tasks"]) > 1 else None)
  record = make_record(name, flags, wall, results, overlap)
  files.atomic_write_text(spec.cells_dir / f"{name}.json", json.dumps(record, indent=1) + "\n")
  return f"[{name}] {wall:.0f} s, average accuracy {record['average_accuracy']:.1f}"


def run_cells(spec: Spec, cells: Mapping[str, list[str]], args, env) -> list[str]:
  """Runs the cells without a record, `args.jobs` at a time; returns the failed ones."""
  records = load_records(spec)
  todo = {n: f for n, f in cells.items()
          if n not in records and (not args.only or re.search(args.only, n))}
  failed, lock = [], threading.Lock()

  def one(name):
    if (spec.cells_dir / f"{name}.json").exists():  # another grid process finished it since
      print(f"[{name}] skipped: another grid process recorded it", flush=True)
      return
    print(f"[{name}] {' '.join(todo[name])}", flush=True)
    try:
      line = run_cell(spec, name, todo[name], pathlib.Path(args.workdir), args.data_dir, env)
    except RuntimeError as e:
      line = str(e)
      with lock:
        failed.append(name)
    print(line, flush=True)

  with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
    list(pool.map(one, todo))
  return failed


# ---------------------------------------------------------------------------------------------
# The report: a pure function of the records.


def test_se(final_row, n: int) -> float | None:
  """Standard error (%) of the average accuracy from the finite evaluation sets (binomial,
  `n` examples per task)."""
  p = np.array([v for v in final_row if v is not None], np.float64)
  if not n or not p.size:
    return None
  return round(float(100 * np.sqrt(np.sum(p * (1 - p) / n)) / len(p)), 1)


def space_of(record: dict, space: Optional[str]) -> dict:
  """A record's matrix and metrics in label space `space` (None: the record's own)."""
  if space is None or record["label_space"] == space:
    return {k: record[k] for k in ("accuracy_matrix", "average_accuracy", "bwt", "forgetting")}
  return record["label_spaces"][space]


def _usable(record):
  return None if record is None or record.get("diverged") else record


def _mean(values) -> float | None:
  """The mean to one decimal, or None if any value is missing."""
  return None if any(v is None for v in values) else round(float(np.mean(values)), 1)


def learned_row(matrix) -> np.ndarray:
  """Each task's accuracy right after the stage that trained it: the matrix's diagonal, or a
  joint run's (MTL: one stage trains every task) one row."""
  m = np.asarray(matrix, np.float64)  # None (not measured) -> NaN
  return m[0] if m.shape[0] == 1 and m.shape[1] > 1 else np.diag(m)


def table1(spec: Spec, records: Mapping[str, dict], space: Optional[str], suffix: str = "",
           methods=None, orders: Sequence[int] | None = None) -> dict[str, dict]:
  orders = spec.main_orders if orders is None else orders
  methods = spec.table_methods if methods is None else methods
  rows = {}
  for method in methods:
    per = [_usable(records.get(f"o{o}_{method}{suffix}")) for o in orders]
    sp = [None if p is None else space_of(p, space) for p in per]
    acc = [None if s is None else s["average_accuracy"] for s in sp]
    bwt = [None if s is None else s["bwt"] for s in sp]
    ses = [None if p is None else test_se(s["accuracy_matrix"][-1], p["n_eval"])
           for p, s in zip(per, sp)]
    # Each task right after its own training (the matrix's diagonal): what was learned.
    learned = [None if s is None else _pct(float(np.mean(learned_row(s["accuracy_matrix"]))))
               for s in sp]
    rows[method] = {
        "orders": acc, "average": _mean(acc),
        "learned": learned, "learned_average": _mean(learned),
        "average_test_se": (round(float(np.sqrt(np.sum(np.square(ses))) / len(ses)), 1)
                            if all(e is not None for e in ses) else None),
        "bwt": bwt,
        "bwt_average": _mean(bwt)}
  return rows


def seed_variance(records: Mapping[str, dict], space: Optional[str],
                  methods: Sequence[str] = SEED_METHODS) -> dict[str, dict]:
  """Order 1 average accuracy and BWT over seeds 0, 1, 2 per method."""
  out = {}
  for method in methods:
    names = [f"o1_{method}"] + [f"o1_{method}_seed{s}" for s in EXTRA_SEEDS]
    sp = [space_of(records[n], space) for n in names if _usable(records.get(n))]
    accs = [s["average_accuracy"] for s in sp]
    if len(accs) > 1:
      bwts = [s["bwt"] for s in sp]
      out[method] = {"accuracies": accs, "mean": _mean(accs),
                     "std": round(float(np.std(accs, ddof=1)), 1),
                     "se": round(float(np.std(accs, ddof=1) / np.sqrt(len(accs))), 1),
                     "bwts": bwts,
                     "bwt_mean": _mean(bwts)}
  return out


def costs(spec: Spec, records: Mapping[str, dict]) -> dict[str, dict]:
  """Per method, what a task costs on order 1, seed 0 (records with `stage_costs`), as the
  mean over its stages: the stage's set-up and end (the method's own passes: injection
  scoring, a Fisher, layer inputs), its training, and the bytes it trains and keeps."""
  out = {}
  for method in spec.methods:
    r = _usable(records.get(f"o1_{method}"))
    stages = list((r or {}).get("stage_costs") or {})
    if not stages:
      continue
    c = [r["stage_costs"][s] for s in stages]
    mean = lambda k: round(float(np.mean([x.get(k, 0.0) for x in c])), 1)
    out[method] = {"setup_and_end_seconds": round(float(np.mean(
                       [x.get("begin_seconds", 0.0) + x.get("end_seconds", 0.0) for x in c])), 1),
                   "train_seconds": mean("train_seconds"),
                   "trainable_mb": round(mean("trainable_bytes") / 2**20, 1),
                   "method_state_mb_last": round(c[-1].get("method_state_bytes", 0) / 2**20, 1)}
  return out


def analyses(spec: Spec, records: Mapping[str, dict]) -> dict[str, dict]:
  def get(name):
    r = _usable(records.get(name))
    if r is None:
      return None
    return {"average_accuracy": r["average_accuracy"], "bwt": r["bwt"],
            "test_se": test_se(r["accuracy_matrix"][-1], r["n_eval"])}
  base = records.get("o1_lbcl")
  injection = {}
  if base is not None:
    for i, (label, flags) in enumerate(spec.injection_variants.items()):
      injection[label] = get("o1_lbcl" if same_injection(base["flags"], flags)
                             else f"o1_lbcl_injection{i}")
  return {
      "rank": {r: get("o1_lbcl" if r == 8 else f"o1_lbcl_rank{r}") for r in RANKS},
      "seed_samples": {n: get("o1_lbcl" if n == 8 else f"o1_lbcl_seeds{n}")
                       for n in SEED_SAMPLES},
      "injection": injection,
      "reference_bcl": get("o1_bcl"),
  }


def sensitivity_by_depth(spec: Spec, records: Mapping[str, dict]) -> dict[str, dict]:
  """Per (order, scored task) of lbcl: each block's share (%) of all old-triplet scores."""
  shares = {}
  for order in spec.orders:
    run = _usable(records.get(f"o{order}_lbcl"))
    if run is None:
      continue
    for task, layers in run["sensitivity"].items():
      per_block: dict[int, float] = {}
      for path, v in layers.items():
        m = re.search(spec.block_pattern, path)
        block = int(m.group("index")) if m else -1
        per_block[block] = per_block.get(block, 0.0) + float(np.sum(v))
      z = sum(per_block.values()) or 1.0
      shares[f"order {order}: {task}"] = {b: round(100 * t / z, 2)
                                          for b, t in sorted(per_block.items())}
  return shares


def depth_summary(shares: Mapping[str, Mapping]) -> dict | None:
  """Mean share (%) of the top and bottom quarter of the blocks, against uniform."""
  if not shares:
    return None
  blocks = sorted({int(b) for s in shares.values() for b in s if int(b) >= 0})
  m = np.array([[s.get(b, s.get(str(b), np.nan)) for b in blocks] for s in shares.values()])
  mean = np.nanmean(m, axis=0)
  q = max(1, len(blocks) // 4)
  return {"blocks": len(blocks), "quarter": q,
          "top_quarter_share": round(float(np.sum(mean[-q:])), 1),
          "bottom_quarter_share": round(float(np.sum(mean[:q])), 1),
          "uniform_quarter_share": round(100.0 * q / len(blocks), 1),
          "most_sensitive_block": int(blocks[int(np.argmax(mean))])}


def write_plots(spec: Spec, report: dict, records: Mapping[str, dict],
                out_dir: pathlib.Path) -> None:
  if spec.analyses:
    _analyses_plots(spec, report, out_dir)
  if spec.heatmaps:
    _heatmaps(spec, records, out_dir)
  if spec.section and spec.section.plots:
    spec.section.plots(spec, report, out_dir)


def _analyses_plots(spec: Spec, report: dict, out_dir: pathlib.Path) -> None:
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  an = report["analyses"]
  space = spec.spaces[0] or "exact match"
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
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"average accuracy (%), {space}")
    ax.grid(alpha=0.3)
  pts = [(k, v["average_accuracy"], v["test_se"]) for k, v in an["injection"].items() if v]
  if pts:
    axes[2].bar(range(len(pts)), [p[1] for p in pts],
                yerr=None if any(p[2] is None for p in pts) else [p[2] for p in pts], capsize=3)
    short = [p[0].replace(" blocks", "").replace("without sigma", "no sigma").replace(", ", "\n")
             for p in pts]
    axes[2].set_xticks(range(len(pts)), short, fontsize=7)
  axes[2].set_ylabel("average accuracy (%)")
  axes[2].set_title("injection")
  fig.suptitle(f"LB-CL on order 1 ({spec.orders[1].replace(',', ', ')}), {spec.model}")
  plots.save_figure(fig, out_dir / f"{spec.plot_prefix}_analyses.png")

  shares = report["sensitivity_by_depth"]
  fig = Figure(figsize=(max(7, 0.3 * (len(next(iter(shares.values()))) if shares else 0)), 3.8))
  ax = fig.subplots()
  if shares:
    blocks = sorted({int(b) for s in shares.values() for b in s})
    m = np.array([[s.get(b, s.get(str(b), np.nan)) for b in blocks] for s in shares.values()])
    ax.bar(blocks, np.nanmean(m, axis=0), color="tab:blue", alpha=0.5, label="mean")
    for row, lab in zip(m, shares):
      ax.plot(blocks, row, ".-", alpha=0.6, label=lab)
    ax.axhline(100 / len(blocks), ls="--", color="gray", label="uniform")
    if len(blocks) <= 12:
      ax.set_xticks(blocks, [f"block {b}" for b in blocks])
    ax.legend(fontsize=6, ncol=2)
  ax.set_ylabel("share of old-triplet sensitivity (%)")
  ax.set_xlabel("depth (block 0 = bottom)")
  ax.set_title(f"Which blocks matter: sensitivity S of old triplets by depth (lbcl, {spec.model})")
  plots.save_figure(fig, out_dir / f"{spec.plot_prefix}_sensitivity.png")


def _heatmaps(spec: Spec, records: Mapping[str, dict], out_dir: pathlib.Path) -> None:
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  runs = [(m, _usable(records.get(f"o1_{m}"))) for m in spec.methods]
  runs = [(m, r) for m, r in runs if r]
  if runs:
    cols = 4
    rows = -(-len(runs) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, (method, r) in zip(axes, runs):
      plots.draw_accuracy_heatmap(ax, r["accuracy_matrix"], r["tasks"], r["tasks"])
      ax.set_title(f"{spec.labels[method]}: avg {_f(r['average_accuracy'])}, "
                   f"BWT {_f(r['bwt'])}", fontsize=9)
    for ax in axes[len(runs):]:
      ax.set_axis_off()
    fig.suptitle(f"Accuracy matrices, order 1, seed 0, {spec.model} (row: after training on)")
    plots.save_figure(fig, out_dir / f"{spec.plot_prefix}_heatmaps.png")


SPACE_WORDS = {"seen": "seen labels", "task": "the task's own labels", None: "exact match"}


def _table_md(t1: dict, title: str, paper: bool, orders: Sequence[int],
              labels: Mapping[str, str] = PAPER_NAMES, note: str = "",
              columns: Optional[Sequence[PaperColumn]] = None) -> list[str]:
  """Table 1 in markdown; `paper`: with the published reference columns (`columns`, or by
  default O-LoRA's Table 1 and the LB-CL paper's average)."""
  head = ("| method | " + " | ".join(f"order {o}" for o in orders) +
          " | **avg** | test SE | BWT avg | learned (diagonal) avg |")
  sep = "| --- |" + " --- |" * len(orders) + " --- | --- | --- | --- |"
  if paper and columns is not None:
    head += "".join(f" {c.heading} |" for c in columns)
    sep += " --- |" * len(columns)
  elif paper:
    head += " O-LoRA paper T5-large (O1 / O2 / O3 / avg) | LB-CL paper T5-large avg |"
    sep += " --- | --- |"
  out = [title, "", *([note, ""] if note else []), head, sep]
  same = [m for m, row in t1.items() if row.get("same_cells_as")]
  for method, row in t1.items():
    line = (f"| {labels.get(method, method)} | " + " | ".join(_f(v) for v in row["orders"]) +
            f" | **{_f(row['average'])}** | {_f(row['average_test_se'])} | "
            f"{_f(row['bwt_average'])} | {_f(row.get('learned_average'))} |")
    if paper and columns is not None:
      line += "".join(f" {_f(c.values.get(method))} |" for c in columns)
    elif paper:
      ref = PAPER_OLORA_TABLE1.get(method)
      ref_s = " / ".join(f"{v:.1f}" for v in ref) if ref else "--"
      if method == "mtl" and ref:
        ref_s = f"{ref[-1]:.1f} (joint)"
      line += f" {ref_s} | {_f(PAPER_LBCL_AVERAGE.get(method))} |"
    out.append(line)
  for method in same:
    out += ["", f"{labels.get(method, method)}: the cells of the "
                f"{labels.get(t1[method]['same_cells_as'], t1[method]['same_cells_as'])} row "
                "(order 1), since validation chose the published injection."]
  return out + [""]


def markdown(spec: Spec, report: dict) -> str:
  out = list(spec.section.head(spec, report)) if spec.section else []
  space = spec.spaces[0]
  ch = report["validation"]["chosen"] or report["validation"].get("chosen_so_far")
  if ch:
    grid = f" of {spec.choices_from.name}" if spec.choices_from else ""
    so_far = "" if report["validation"]["chosen"] else (
        " so far (the families whose sweep is complete; the others' sweeps are listed after)")
    out += [f"Chosen on order 1's validation split{grid} ({spec.validation_budget} runs per "
            f"family, {SPACE_WORDS[space]}){so_far}:", "",
            "| family | chosen flags | validation avg |", "| --- | --- | --- |"]
    for fam, c in ch.items():
      out.append(f"| {fam} | `{' '.join(c['flags'])}` | {_f(c['validation_average'])} |")
    out += ["", "The sweep (validation average, %):", "", "| cell | flags | avg |",
            "| --- | --- | --- |"]
    for c in ch.values():
      for s in c["sweep"]:
        shown = [f for f in s["flags"]
                 if not f.startswith(("--config.order", "--config.eval.split"))]
        out.append(f"| {s['cell']} | `{' '.join(shown)}` | "
                   f"{'diverged' if s['diverged'] else _f(s['validation_average'])} |")
    out.append("")
  swept = {sw["cell"] for c in (ch or {}).values() for sw in c["sweep"]}
  unfinished = {n: c for n, c in report["validation"]["cells"].items() if n not in swept}
  if unfinished and not report["validation"]["chosen"]:
    out += ["The validation sweep so far (unfinished; validation average, %):", "",
            "| cell | avg |", "| --- | --- |"]
    for name, c in sorted(unfinished.items()):
      out.append(f"| {name} | {_f(c['validation_average'])} |")
    out.append("")
  orders = report["settings"]["main_orders"]
  if space is None:
    out += _table_md(report["table1"], "Table 1, exact match of the generated answer (no task "
                     "identity):", True, orders, spec.labels, spec.table_note, spec.paper_columns)
  else:
    out += _table_md(report["table1"], "Table 1, seen labels (no task identity):", True, orders,
                     spec.labels, spec.table_note, spec.paper_columns)
  if "table1_task" in report:
    out += _table_md(report["table1_task"], "Table 1, the task's own labels:", False, orders,
                     spec.labels)
  after = report.get("projection_after_adam")
  if after and any(r["average"] is not None or any(o is not None for o in r["orders"])
                   for r in after[str(space)].values()):
    out += _table_md(after[str(space)], f"Projection after Adam ({SPACE_WORDS[space]}):", False,
                     orders)
  zs = report.get("zeroshot")
  if zs:
    out += [f"Zero-shot (no training), {SPACE_WORDS[space]}: average "
            f"{_f(zs['average_accuracy'])}; per task " +
            ", ".join(f"{t} {_f(a)}" for t, a in zs["per_task"].items()) + ".", ""]
  if report["seed_variance"]:
    out += [f"Seed variance (order 1, seeds 0 / 1 / 2, {SPACE_WORDS[space]}):", "",
            "| method | accuracies | mean | std | SE | BWTs | BWT mean |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for method, v in report["seed_variance"].items():
      out.append(f"| {spec.labels[method]} | {' / '.join(_f(a) for a in v['accuracies'])} | "
                 f"{_f(v['mean'])} | {_f(v['std'])} | {_f(v['se'])} | "
                 f"{' / '.join(_f(b) for b in v['bwts'])} | {_f(v['bwt_mean'])} |")
    out.append("")
  if report.get("costs"):
    out += ["Cost per task (order 1, seed 0; means over the tasks; the machine of each record):",
            "", "| method | set-up + end s | training s | trained MB | method state MB after "
            "the last task |", "| --- | --- | --- | --- | --- |"]
    for method, c in report["costs"].items():
      out.append(f"| {spec.labels[method]} | {c['setup_and_end_seconds']} | "
                 f"{c['train_seconds']} | {c['trainable_mb']} | {c['method_state_mb_last']} |")
    out.append("")
  ran_on: dict[str, int] = {}  # records of one CPU may differ in fields older ones lack
  for m in report["settings"]["machines"]:
    words = _machine_words(m["machine"])
    ran_on[words] = ran_on.get(words, 0) + m["cells"]
  out += ["Cells ran on (their records' machines; seconds and costs are theirs): " + "; ".join(
      f"{words} ({n} cell{'s' * (n != 1)})" for words, n in ran_on.items()) + ".", ""]
  if spec.analyses:
    out += _analyses_md(spec, report)
  if spec.section:
    out += spec.section.tail(spec, report)
  return "\n".join(out) + "\n"


def _analyses_md(spec: Spec, report: dict) -> list[str]:
  out = []
  space = spec.spaces[0]
  an = report["analyses"]

  def cells(d):
    return " | ".join("--" if v is None else f"{v['average_accuracy']:.1f} / {_f(v['bwt'])}"
                      for v in d.values())
  out += [f"Analyses (lbcl, order 1, {SPACE_WORDS[space]}; average accuracy % / BWT):", "",
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
    d = report.get("depth_summary")
    if d:
      out += ["", f"Top {d['quarter']} of {d['blocks']} blocks: {d['top_quarter_share']}% of the "
              f"sensitivity; bottom {d['quarter']}: {d['bottom_quarter_share']}% (uniform: "
              f"{d['uniform_quarter_share']}%); most sensitive: block {d['most_sensitive_block']}."]
  return out


def _machine_words(m) -> str:
  """A record's machine as a phrase (`machine.summary` of its dict), or its old line."""
  if not isinstance(m, dict):
    return "unnamed" if m is None else f"{m} (no CPU model recorded)"
  return machine.summary(m)


def machines(records: Mapping[str, dict]) -> list[dict]:
  """Each machine the records name (`machine.describe()`'s dict; older records hold a line
  naming no CPU model), with how many cells ran on it."""
  counts: dict[str, int] = {}
  for r in records.values():
    key = json.dumps(r.get("machine"), sort_keys=True)
    counts[key] = counts.get(key, 0) + 1
  out = []
  for k, n in counts.items():
    m = json.loads(k)
    # An older record's line names no CPU: say so, rather than name this machine's.
    out.append({"machine": m, "cells": n} if isinstance(m, dict) else
               {"machine": m, "cpu_model": None, "cells": n,
                "note": "the records predate machine.describe() and name no CPU model"})
  return out


def build_report(spec: Spec, records: Mapping[str, dict], data_dir: str) -> dict:
  chosen = choices(spec, records)
  # The families whose sweep is complete, while others' still run (what the grid's test cells
  # already use).
  so_far = chosen or choices(spec, records, partial=True)
  zs = _usable(records.get("zeroshot"))
  space = spec.spaces[0]
  report = {
      "settings": {"config": str(spec.config.relative_to(ROOT)), "common_flags": list(spec.common),
                   "orders": dict(spec.orders), "main_orders": list(spec.main_orders),
                   "data_dir": data_dir, "seed": 0,
                   # Seconds and costs are the machines' that ran the cells, not this one's.
                   "machines": machines(records)},
      "validation": {"budget_per_family": spec.validation_budget, "chosen": chosen,
                     # Only while the sweep is unfinished (else it is `chosen`).
                     "chosen_so_far": None if chosen else so_far,
                     "chosen_on": (spec.choices_from or spec).name,
                     "cells": {n: {"flags": r["flags"],
                                   "validation_average": r.get("average_accuracy"),
                                   **({"validation_average_task": (
                                       r["label_spaces"]["task"]["average_accuracy"]
                                       if "label_spaces" in r else None)}
                                      if "task" in spec.spaces[1:] else {})}
                               for n, r in records.items() if n.startswith("val_")}},
      "table1": table1(spec, records, space),
  }
  if spec.published_row:
    # Where validation chose the published injection, no second cell runs (`published_flags`):
    # the row is the LB-CL row's order-1 cells, and says so.
    same = bool(so_far) and "svd" in so_far and published_flags(so_far) is None
    row = table1(spec, records, space, "" if same else "_published", ("lbcl",),
                 orders=(1,))["lbcl"]
    report["table1"]["lbcl_published"] = {
        **row, "orders": row["orders"] + [None] * (len(spec.main_orders) - 1),
        "learned": row["learned"] + [None] * (len(spec.main_orders) - 1),
        "same_cells_as": "lbcl" if same else None}
  for extra in spec.spaces[1:]:
    report[f"table1_{extra}"] = table1(spec, records, extra)
  if spec.after_adam:
    report["projection_after_adam"] = {
        str(sp): {**{f"{m} (before Adam)": table1(spec, records, sp, methods=(m,))[m]
                     for m in ("bcl", "lbcl")},
                  **{f"{m} (after Adam)": table1(spec, records, sp, "_after_adam", (m,))[m]
                     for m in ("bcl", "lbcl")}} for sp in spec.spaces}
  report["seed_variance"] = seed_variance(records, space, spec.seed_methods)
  for extra in spec.spaces[1:]:
    report[f"seed_variance_{extra}"] = seed_variance(records, extra, spec.seed_methods)
  shares = sensitivity_by_depth(spec, records) if spec.analyses else {}
  report.update({
      "zeroshot": ({"average_accuracy": zs["average_accuracy"],
                    "per_task": dict(zip(zs["tasks"],
                                         (_pct(v) for v in zs["accuracy_matrix"][-1])))}
                   if zs else None),
      "analyses": analyses(spec, records) if spec.analyses else None,
      "costs": costs(spec, records),
      "sensitivity_by_depth": shares,
      "depth_summary": depth_summary(shares),
      "paper": ({"olora_table1_t5_large": PAPER_OLORA_TABLE1,
                 "lbcl_paper_average_t5_large": PAPER_LBCL_AVERAGE}
                if spec.paper_columns is None else
                {c.heading: dict(c.values) for c in spec.paper_columns}),
      "cells": {k: {kk: vv for kk, vv in v.items() if kk != "sensitivity"}
                for k, v in records.items()},
      "total_wall_seconds": round(sum(r["wall_seconds"] for r in records.values()), 1),
  })
  if spec.section:
    report.update(spec.section.build(spec, records))
  return report


def write_outputs(spec: Spec, records: Mapping[str, dict], data_dir: str,
                  out_dir: pathlib.Path) -> str:
  report = build_report(spec, records, data_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  md = markdown(spec, report)
  files.atomic_write_text(out_dir / f"{spec.name}.json", json.dumps(report, indent=1) + "\n")
  files.atomic_write_text(out_dir / f"{spec.name}.md", md)
  write_plots(spec, report, records, out_dir)
  return md


# ---------------------------------------------------------------------------------------------
# The command line.


def main(spec: Spec, description: str, argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "cl_benchmark"),
                      help="a CL_Benchmark directory with " + ", ".join(spec.data_tasks))
  parser.add_argument("--workdir", default=f"/tmp/lbcl_{spec.name}",
                      help="one sub-directory per cell")
  parser.add_argument("--grid", choices=("validation", "main", "seeds", "after_adam", "analyses",
                                         "all"), default="all")
  parser.add_argument("--orders", default=",".join(str(o) for o in spec.main_orders),
                      help="the orders of the main (and after-Adam) phase, e.g. 1 or 1,2,3")
  parser.add_argument("--only", default="", help="run only cells whose name matches this regex")
  parser.add_argument("--jobs", type=int, default=1,
                      help="cells run at once (2 on 2 cores: one compiles while one trains)")
  parser.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "results"))
  parser.add_argument("--report_only", action="store_true", help="rebuild outputs; run nothing")
  parser.add_argument("--extra_flags", default="",
                      help="flags added to every cell, e.g. '--config.model.path=/m.gguf' "
                      "(recorded in the report's settings)")
  args = parser.parse_args(argv)

  try:
    orders = tuple(int(o) for o in args.orders.split(","))
    if any(o not in spec.orders for o in orders):
      raise ValueError
  except ValueError:
    sys.exit(f"--orders={args.orders}: expected a comma-separated subset of "
             f"{', '.join(str(o) for o in spec.orders)}")
  spec = dataclasses.replace(spec, main_orders=orders,
                             common=spec.common + tuple(shlex.split(args.extra_flags)))
  args.data_dir = str(pathlib.Path(args.data_dir).resolve())
  missing = [t for t in spec.data_tasks
             if not (pathlib.Path(args.data_dir) / t / "train.json").exists()]
  if missing and not args.report_only:
    sys.exit(f"--data_dir={args.data_dir}: no train.json for {', '.join(missing)} "
             "(expected O-LoRA's CL_Benchmark layout)")
  if spec.choices_from is not None and choices(spec, {}) is None and not args.report_only:
    src = spec.choices_from
    ready = choices(src, load_records(src), partial=True) or {}
    sys.exit(f"{spec.name} waits for the validation choices of {src.name}: the sweeps of "
             f"{', '.join(f for f in spec.families if f not in ready)} are unfinished "
             f"({src.cells_dir}); rerun when they are")
  spec.cells_dir.mkdir(parents=True, exist_ok=True)
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ)
  # The cells share shapes, so a persistent compilation cache saves most of each one's compiles.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(workdir / "jax_cache"))

  failed = []
  if not args.report_only:
    if args.grid in ("validation", "all") and spec.choices_from is None:
      failed += run_cells(spec, spec.validation_cells(load_records(spec)), args, env)
      # A second stage of the sweep exists once its first stage has records.
      failed += run_cells(spec, spec.validation_cells(load_records(spec)), args, env)
    if args.grid != "validation":
      # The families whose sweep is complete go on while another family's still runs.
      chosen = choices(spec, load_records(spec), partial=True)
      if chosen is None:
        sys.exit("no family's validation sweep is complete (run --grid=validation first)")
      for phase in grid_phases(spec, args.grid):
        failed += run_cells(spec, grid_cells(spec, phase, chosen), args, env)
      if len(chosen) < len(spec.families):
        missing = ", ".join(f for f in spec.families if f not in chosen)
        sys.exit(f"ran the chosen families' cells; the validation sweep of {missing} is "
                 "unfinished: rerun when it is")

  records = load_records(spec)
  out_dir = pathlib.Path(args.output_dir)
  md = write_outputs(spec, records, args.data_dir, out_dir)
  print(md)
  total = sum(r["wall_seconds"] for r in records.values())
  print(f"{len(records)} cell{'s' * (len(records) != 1)}, {total / 60:.1f} min of runs; wrote "
        + ", ".join(str(out_dir / o) for o in spec.outputs if (out_dir / o).exists()))
  if failed:
    sys.exit(f"failed cells: {', '.join(failed)}")
