"""The long benchmark grid (`benchmarks/long_cl.py`) on synthetic records: its cells and flags
from generative_cl's validation choices, Table 1, the per-task tables, the cost table and its
goals, and `--report_only` before any record."""

import dataclasses
import json
import types

import numpy as np
import pytest

# benchmarks/ is on the path through pyproject.toml's pytest `pythonpath`.
import cl_grid
import generative_cl
import long_cl
from lbcl_jax import tasks as tasks_lib

CELLS = ["o4_lbcl", "o4_olora", "o4_inclora", "o4_seqft", "o4_mtl", "o5_lbcl", "o5_olora",
         "o6_lbcl", "o6_olora"]


def _validation_record(name, flags, avg):
  return {"cell": name, "flags": flags, "wall_seconds": 10.0, "average_accuracy": avg,
          "bwt": 0.0, "accuracy_matrix": [[0.5]], "tasks": ["dbpedia"], "label_space": "seen",
          "eval_split": "validation", "n_eval": 48}


@pytest.fixture
def specs(tmp_path):
  """(a generative_cl spec whose SeqFT, LoRA and SVD sweeps are complete in a tmp cells dir,
  while the sweeps beyond the paper's table are not; the long spec reusing it)."""
  gen = dataclasses.replace(generative_cl.SPEC, cells_dir=tmp_path / "generative_cells")
  gen.cells_dir.mkdir()
  records = {}
  for _ in range(2):  # the second stages exist once the first have records
    for i, (name, flags) in enumerate(gen.validation_cells(records).items()):
      if name.split("_")[1] in cl_grid.FAMILIES and name not in records:
        # Scores that make the second stage of each sweep win, at a setting of its own.
        records[name] = _validation_record(name, flags, 10.0 + i + 50 * ("lambda" in name or
                                                                          "_inj_" in name))
  for name, r in records.items():
    (gen.cells_dir / f"{name}.json").write_text(json.dumps(r))
  long = dataclasses.replace(long_cl.SPEC, choices_from=gen, cells_dir=tmp_path / "long_cells")
  return gen, long


def test_cells_and_flags_follow_generative_cl_choices(specs, tmp_path, monkeypatch):
  gen, long = specs
  gen_chosen = cl_grid.choices(gen, cl_grid.load_records(gen), partial=True)
  assert cl_grid.choices(gen, cl_grid.load_records(gen)) is None  # replay, EWC, ... unfinished
  chosen = cl_grid.choices(long, {})
  # The long grid waits only for the families it runs.
  assert sorted(chosen) == ["lora", "seqft", "svd"]
  assert all(chosen[f] == gen_chosen[f] for f in chosen)
  assert chosen["svd"]["cell"].startswith("val_svd_inj_")
  assert chosen["lora"]["cell"].startswith("val_lora_lambda")
  cells = cl_grid.grid_cells(long, "all", chosen)
  assert sorted(cells) == sorted(CELLS)
  assert list(cells)[0] == "o4_lbcl"  # the cost cell first
  for phase in ("seeds", "after_adam", "analyses"):
    assert not cl_grid.grid_cells(long, phase, chosen)
  gen_cells = cl_grid.grid_cells(gen, "main", gen_chosen)
  for name, flags in cells.items():
    order, method = int(name[1]), name.split("_", 1)[1]
    order_flags = [f for f in flags if f.startswith("--config.order=")]
    assert len(order_flags) == 1
    tasks = order_flags[0].split("=", 1)[1].split(",")
    assert len(tasks) == 14 and "yahoo" not in tasks
    assert tasks == [t for t in tasks_lib.ORDERS[order] if t != "yahoo"]
    # The settings generative_cl runs the same method with (its order-1 cell).
    rest = [f for f in flags if not f.startswith("--config.order=")]
    assert rest == [f for f in gen_cells[f"o1_{method}"] if not f.startswith("--config.order=")]
  assert any(f.startswith("--config.injection.layers=") for f in cells["o5_lbcl"])
  # The common flags: generative_cl's and the two of the long grid, no key given twice.
  assert long.common[:len(generative_cl.COMMON)] == generative_cl.COMMON
  assert {"--config.eval.matrix=diagonal_final", "--config.data.invalid_rows=skip"} <= set(
      long.common)
  keys = [f.split("=", 1)[0] for f in long.common]
  assert len(keys) == len(set(keys))
  # They reach the driver's command line.
  seen = {}

  def fake_run(cmd, **kwargs):
    seen["cmd"] = cmd
    return types.SimpleNamespace(returncode=2, stderr="is in use by another run", stdout="")

  monkeypatch.setattr(cl_grid.subprocess, "run", fake_run)
  line = cl_grid.run_cell(long, "o4_lbcl", cells["o4_lbcl"], tmp_path, "/data", {})
  assert "skipped" in line
  assert "--config.eval.matrix=diagonal_final" in seen["cmd"]
  assert "--config.data.invalid_rows=skip" in seen["cmd"]
  assert f"--config={generative_cl.SPEC.config}" in seen["cmd"]


def test_records_state_the_evaluation_matrix_and_invalid_rows():
  cfg = {"optim": {"learning_rate": 1e-3, "grad_clip": 1.0, "max_steps_per_task": 32,
                   "global_batch_size": 8},
         "data": {"train_per_class": 64, "max_source_length": 128, "max_test_examples": 48},
         "adapters": {"rank": 8, "orth_reg_weight": 0.5},
         "injection": {"layers": "all", "with_sigma": True}, "olora": {"lambda1": 0.5},
         "seed": 0}
  results = {"config": cfg, "train_seconds": 1.0, "tasks": ["mnli"], "eval_split": "test",
             "label_space": "seen", "accuracy_matrix": [[0.5]], "average_accuracy": 0.5,
             "bwt": None, "forgetting": None, "sensitivity": {}}
  old = cl_grid.make_record("o4_lbcl", [], 1.0, results)
  assert (old["settings"]["eval_matrix"], old["settings"]["invalid_rows"]) == ("full", "error")
  assert old["skipped_rows"] is None
  cfg = {**cfg, "eval": {"matrix": "diagonal_final"},
         "data": {**cfg["data"], "invalid_rows": "skip"}}
  new = cl_grid.make_record("o4_lbcl", [], 1.0, {**results, "config": cfg,
                                                 "skipped_rows": {"mnli": {"test": 131}}})
  assert (new["settings"]["eval_matrix"], new["settings"]["invalid_rows"]) == (
      "diagonal_final", "skip")
  assert new["skipped_rows"] == {"mnli": {"test": 131}}


def _diagonal_final(rng, k=14):
  """A `diagonal_final` matrix: the diagonal and the last row measured, None elsewhere."""
  m = [[None] * k for _ in range(k)]
  for i in range(k):
    m[i][i] = float(rng.uniform(0.3, 0.9))
  m[-1] = [float(rng.uniform(0.1, 0.9)) for _ in range(k)]
  return m


def _stage(old, step=1.0, rss=1000.0, begin=2.0, end=1.0, full=True):
  c = {"begin_seconds": begin, "end_seconds": end, "train_seconds": 50.0,
       "trainable_bytes": 2**20, "method_state_bytes": 2**21}
  if full:
    # diagonal_final: one task evaluated after each stage, all 14 after the last.
    evaluated = 14 if old == 13 else 1
    c.update(old_tasks=old, eval_seconds=20.0 * evaluated, evaluated_tasks=evaluated,
             checkpoint_seconds=2.0, step_seconds=step, peak_rss_bytes=int(rss * 2**20))
  return c


def _cell_record(name, tasks, rng, stage_costs=None):
  method = name.split("_", 1)[1]
  if method == "mtl":  # one stage: one row, BWT undefined
    m = [[float(rng.uniform(0.3, 0.9)) for _ in tasks]]
    bwt = None
  else:
    m = _diagonal_final(rng, len(tasks))
    bwt = round(100 * float(np.mean([m[-1][j] - m[j][j] for j in range(len(tasks) - 1)])), 1)
  return {"cell": name, "flags": [f"--config.method={method}"], "wall_seconds": 100.0,
          "train_seconds": 50.0, "tasks": tasks, "eval_split": "test", "label_space": "seen",
          "accuracy_matrix": m, "average_accuracy": round(100 * float(np.mean(m[-1])), 1),
          "bwt": bwt, "forgetting": None, "label_spaces": {}, "n_eval": 48, "sensitivity": {},
          "settings": {"eval_matrix": "diagonal_final", "invalid_rows": "skip"},
          "skipped_rows": {"mnli": {"test": 131}}, "stage_costs": stage_costs,
          "machine": "test"}


def _write_records(long, rng, steps=None, rss=None, begin13=2.0):
  long.cells_dir.mkdir(exist_ok=True)
  tasks = {o: long.orders[o].split(",") for o in (4, 5, 6)}
  steps = steps or [3.0] + [1.0 + 0.002 * i for i in range(13)]  # task 1 compiles: excluded
  rss = rss or [900.0] + [1000.0 + i for i in range(13)]
  costs = {}
  for i, task in enumerate(tasks[4]):
    # Task 5's stage lacks the fields newer than the record (an older run): None, no crash.
    costs[task] = _stage(i, steps[i], rss[i], begin=begin13 if i == 13 else 2.0, full=i != 4)
  records = {}
  for name in CELLS:
    records[name] = _cell_record(name, tasks[int(name[1])], rng,
                                 costs if name == "o4_lbcl" else None)
    (long.cells_dir / f"{name}.json").write_text(json.dumps(records[name]))
  return records


def _report(long, tmp_path, capsys):
  out = tmp_path / "out"
  cl_grid.main(long, "", ["--report_only", "--output_dir", str(out),
                          "--workdir", str(tmp_path / "wd")])
  capsys.readouterr()
  return json.loads((out / "long_cl.json").read_text()), (out / "long_cl.md").read_text(), out


def test_report_from_records(specs, tmp_path, capsys):
  _, long = specs
  rng = np.random.default_rng(0)
  records = _write_records(long, rng)
  report, md, out = _report(long, tmp_path, capsys)
  assert sorted(p.name for p in out.iterdir()) == sorted(long.outputs) == sorted(
      ["long_cl.json", "long_cl.md", "long_cl_cost.png"])
  # Item 5's table: one row per task of the cost cell, its spans counted from the rank.
  assert [e["task"] for e in report["span"]] == records["o4_lbcl"]["tasks"]
  assert "Room left for a new task" in md and "| 104 of 192 |" in md
  t1 = report["table1"]
  assert list(t1) == ["seqft", "inclora", "olora", "lbcl", "mtl"]
  for method in ("olora", "lbcl"):
    accs = [records[f"o{o}_{method}"]["average_accuracy"] for o in (4, 5, 6)]
    bwts = [records[f"o{o}_{method}"]["bwt"] for o in (4, 5, 6)]
    assert t1[method]["orders"] == accs
    assert t1[method]["average"] == round(float(np.mean(accs)), 1)
    assert t1[method]["bwt"] == bwts
    assert t1[method]["bwt_average"] == round(float(np.mean(bwts)), 1)
    diag = [np.mean([records[f"o4_{method}"]["accuracy_matrix"][i][i] for i in range(14)])]
    assert t1[method]["learned"][0] == round(100 * float(diag[0]), 1)
  # Order 4 only: no average over orders 4-6.
  assert t1["seqft"]["orders"] == [records["o4_seqft"]["average_accuracy"], None, None]
  assert t1["seqft"]["average"] is None
  # MTL's one stage trains every task: what it learned is its one row.
  mtl = records["o4_mtl"]["accuracy_matrix"][0]
  assert t1["mtl"]["learned"][0] == round(100 * float(np.mean(mtl)), 1)
  assert report["paper"] == {long_cl.PAPER_HEADING: long_cl.PAPER_LONG}
  assert report["validation"]["chosen_on"] == "generative_cl"
  assert sorted(report["validation"]["chosen"]) == ["lora", "seqft", "svd"]
  assert report["long"]["waiting_for"] == []
  run = report["long"]["runs"]["o5_lbcl"]
  m = records["o5_lbcl"]["accuracy_matrix"]
  assert run["learned"] == [round(100 * m[i][i], 1) for i in range(14)]
  assert run["final"] == [round(100 * v, 1) for v in m[-1]]
  assert run["eval_matrix"] == "diagonal_final" and run["invalid_rows"] == "skip"
  # The cost table: one entry per task, None where the record lacks a field.
  cost = report["cost"]
  assert [e["task"] for e in cost] == long.orders[4].split(",")
  assert cost[4]["step_seconds"] is None and cost[4]["peak_rss_mib"] is None
  assert cost[4]["wall_seconds"] is None and cost[4]["setup_seconds"] == 3.0
  last = cost[13]
  # Its wall counts its own evaluation (280 s over the 14 tasks it evaluated), not the run's
  # final row.
  assert last["eval_seconds"] == 280.0 and last["evaluated_tasks"] == 14
  assert (last["old_tasks"], last["setup_seconds"], last["wall_seconds"]) == (13, 3.0, 75.0)
  assert last["setup_share_percent"] == 4.0 and last["peak_rss_mib"] == 1012.0
  goals = report["cost_goals"]
  assert goals["step_time_flat"]["met"] is True
  assert goals["step_time_flat"]["measured"] == 12 and goals["step_time_flat"]["of"] == 13
  assert goals["step_time_flat"]["max_over_min"] == round(1.024 / 1.0, 4)
  assert goals["peak_rss_flat"]["met"] is True
  # The peak RSS grows 1 MiB a task from task 2 (task 5 unmeasured): a slope of 1 MiB over
  # the measured values' mean, on a straight line, so its SE is 0.
  mean = np.mean([1000.0 + i for i in range(13) if i != 3])
  assert goals["peak_rss_flat"]["trend"] == {"percent_per_task": round(100 / mean, 3),
                                             "se_percent_per_task": 0.0}
  assert "trend +0.10 +- 0.00 % a task" in md
  assert goals["setup_share"] == {"old_tasks": 13, "goal_percent": 10.0, "percent": 4.0,
                                  "met": True}
  assert "14 tasks, the published 15 without yahoo" in md
  assert "`eval.matrix=diagonal_final`, `data.invalid_rows=skip`" in md
  assert "mnli test 131" in md
  assert f"| LB-CL | {records['o4_lbcl']['average_accuracy']:.1f} |" in md
  assert "| 69.2 |" in md  # the paper's long-table LB-CL average
  assert md.count("not met") == 0 and md.count(": met.") == 3
  assert "Analyses" not in md and "Zero-shot" not in md


@pytest.mark.parametrize("change", ["step", "rss", "setup"])
def test_cost_goals_flip_beyond_their_thresholds(specs, tmp_path, capsys, change):
  _, long = specs
  rng = np.random.default_rng(1)
  steps = [3.0] + [1.0] * 13
  rss = [500.0] + [1000.0] * 13
  begin13 = 2.0
  if change == "step":
    steps[9] = 1.051  # 5.1 % over the others
  elif change == "rss":
    rss[13] = 1051.0
  else:
    begin13 = 8.0  # set-up 9 s of an 81 s wall: 11.1 %
  _write_records(long, rng, steps, rss, begin13)
  goals, md = (lambda r: (r[0]["cost_goals"], r[1]))(_report(long, tmp_path, capsys))
  key = {"step": "step_time_flat", "rss": "peak_rss_flat", "setup": "setup_share"}[change]
  assert goals[key]["met"] is False
  assert [g["met"] for k, g in goals.items() if k not in (key, "cell")] == [True, True]
  assert md.count("**not met**") == 1
  # Within the threshold, the same goal is met.
  steps, rss, begin13 = [3.0] + [1.0] * 13, [500.0] + [1000.0] * 13, 2.0
  if change == "step":
    steps[9] = 1.049
  elif change == "rss":
    rss[13] = 1049.0
  else:
    begin13 = 6.0  # 7 s of a 79 s wall: 8.9 %
  _write_records(long, rng, steps, rss, begin13)
  assert _report(long, tmp_path, capsys)[0]["cost_goals"][key]["met"] is True


def test_report_only_before_any_record(tmp_path, capsys):
  gen = dataclasses.replace(generative_cl.SPEC, cells_dir=tmp_path / "generative_cells")
  long = dataclasses.replace(long_cl.SPEC, choices_from=gen, cells_dir=tmp_path / "long_cells")
  report, md, out = _report(long, tmp_path, capsys)
  assert report["validation"]["chosen"] is None
  assert report["long"]["waiting_for"] == ["seqft", "lora", "svd"]
  assert report["cost"] == [] and report["cost_goals"]["step_time_flat"]["met"] is None
  assert all(row["average"] is None for row in report["table1"].values())
  assert "Waiting for generative_cl's validation choices" in md
  assert "no `o4_lbcl` record yet" in md
  assert (out / "long_cl_cost.png").exists()
  # Running cells waits for them too, with one line that says so.
  data = tmp_path / "data"
  for path in long.data_tasks:
    (data / path).mkdir(parents=True)
    (data / path / "train.json").write_text("[]")
  assert len(long.data_tasks) == 14
  with pytest.raises(SystemExit) as e:
    cl_grid.main(long, "", ["--data_dir", str(data), "--output_dir", str(tmp_path / "o2"),
                            "--workdir", str(tmp_path / "wd")])
  assert "waits for the validation choices of generative_cl" in str(e.value)


def test_step_time_flatness_compares_steps_of_one_padded_shape():
  """A task padded to a shorter bucket steps faster whatever the old tasks do: the goal
  compares the steps at the common shape, and still fails when one of those grows."""
  def entry(old, step, shape):
    return {"old_tasks": old, "step_seconds": step, "batch_shape": shape,
            "peak_rss_mib": 1000.0, "setup_share_percent": 5.0}
  long_shape, short_shape = [8, 136], [8, 64]
  table = [entry(i, 1.0 + 0.002 * i, long_shape) for i in range(14)]
  table[3] = entry(3, 0.5, short_shape)  # e.g. COPA's short prompts
  goal = long_cl.cost_goals(table)["step_time_flat"]
  assert goal["met"] is True and goal["batch_shape"] == long_shape
  assert goal["measured"] == 12 and goal["of"] == 13
  table[9] = entry(9, 1.2, long_shape)  # a step that grew with the old tasks
  assert long_cl.cost_goals(table)["step_time_flat"]["met"] is False
  # Without shapes (older records) every step is compared: the short task then fails it.
  for e in table:
    e["batch_shape"] = None
  table[9]["step_seconds"] = 1.0
  assert long_cl.cost_goals(table)["step_time_flat"]["met"] is False


def test_span_table_counts_the_old_dimensions_and_reads_the_measured_overlap():
  tasks = [f"t{i}" for i in range(1, 15)]
  overlap = [{"task": t, "U": 0.01 * t, "V": 0.02 * t, "dW": 0.03 * t, "layers": 60}
             for t in range(2, 15) if t != 7]  # task 7 unmeasured
  table = long_cl.span_table({"tasks": tasks, "settings": {"rank": 8},
                              "adapter_overlap": overlap})
  assert [e["old_tasks"] for e in table] == list(range(14))
  first, last = table[0], table[-1]
  assert first["old_dims"] == {"q_proj.U": 0, "q_proj.V": 0, "v_proj.U": 0, "v_proj.V": 0}
  assert first["chance_U"] == first["chance_V"] == 0 and first["U"] is None
  # 13 old tasks of rank 8: 104 of q's 576 output dims, 104 of v's 192, 104 of the 576 inputs.
  assert last["old_dims"] == {"q_proj.U": 104, "q_proj.V": 104, "v_proj.U": 104, "v_proj.V": 104}
  assert last["free_percent"]["q_proj.U"] == pytest.approx(100 * 472 / 576, abs=0.05)
  assert last["free_percent"]["v_proj.U"] == pytest.approx(100 * 88 / 192, abs=0.05)
  assert last["chance_U"] == pytest.approx(100 * (104 / 576 + 104 / 192) / 2, abs=0.05)
  assert last["chance_V"] == pytest.approx(100 * 104 / 576, abs=0.05)
  assert (last["U"], last["V"], last["dW"]) == pytest.approx((14.0, 28.0, 42.0))
  assert table[6]["U"] is None and table[5]["dW"] == pytest.approx(18.0)
  # A span never exceeds its space: rank 16 fills v's 192 output dims at 12 old tasks.
  wide = long_cl.span_table({"tasks": tasks, "settings": {"rank": 16}})
  assert wide[-1]["old_dims"]["v_proj.U"] == 192 and wide[-1]["free_percent"]["v_proj.U"] == 0
  assert long_cl.span_table(None) == []
