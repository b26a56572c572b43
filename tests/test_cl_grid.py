"""The benchmark grids' machinery (`benchmarks/cl_grid.py`) on synthetic records: validation
choices, Table 1 and its standard error, seed spread, the analyses, sensitivity by depth and the
written outputs, for the MiniLM grid (two label spaces) and the generative one (exact match)."""

import json

import numpy as np
import pytest

# benchmarks/ is on the path through pyproject.toml's pytest `pythonpath`.
import cl_grid
import cl_methods
import generative_cl

TASKS = ["dbpedia", "amazon", "yelp", "agnews"]


def _matrix(rng, k=4):
  return [[float(rng.uniform(0.1, 0.9)) if j <= i else None for j in range(k)] for i in range(k)]


def _record(name, flags, rng, spaces=("seen", "task"), avg=None, n=48, sensitivity=None):
  """A record shaped as `cl_grid.make_record` writes it, with consistent metrics."""
  def metrics(m):
    final = m[-1]
    return {"accuracy_matrix": m, "average_accuracy": round(100 * float(np.mean(final)), 1)
            if avg is None else avg,
            "bwt": round(100 * float(np.mean([final[j] - m[j][j] for j in range(3)])), 1),
            "forgetting": 0.0}
  main = metrics(_matrix(rng))
  return {"cell": name, "flags": flags, "wall_seconds": 10.0, "train_seconds": 5.0,
          "tasks": TASKS, "eval_split": "test", "label_space": spaces[0] or "seen", **main,
          "label_spaces": {s: metrics(_matrix(rng)) for s in spaces[1:]}, "n_eval": n,
          "sensitivity": sensitivity or {}, "machine": "test"}


def test_test_se_is_the_binomial_standard_error_of_the_mean():
  row = [0.5, 0.9, None, 0.2]
  want = 100 * np.sqrt(0.25 / 40 + 0.09 / 40 + 0.16 / 40) / 3
  assert cl_grid.test_se(row, 40) == round(want, 1)
  assert cl_grid.test_se(row, 0) is None


def test_choices_take_the_best_validation_cell_and_wait_for_the_whole_sweep():
  spec = generative_cl.SPEC
  rng = np.random.default_rng(0)
  records = {}
  first = spec.validation_cells(records)
  # The LoRA family's lambda_1 cells, the SVD families' injection cells and EWC's lambda cells
  # wait for their learning-rate cells: 8 SeqFT, 5 LoRA and 4 SVD cells first, and beyond the
  # paper's table 4 replay + LB-CL, 5 EWC, 8 replay and 8 InfLoRA cells.
  paper = [n for n in first if n.split("_")[1] in cl_grid.FAMILIES]
  assert len(paper) == 8 + len(generative_cl.LORA_LRS) + len(generative_cl.SVD_LRS) == 8 + 5 + 4
  assert len([n for n in first if n.split("_")[1] not in cl_grid.FAMILIES]) == 25
  assert not any("lambda" in n or "_inj_" in n or "weight" in n for n in first)
  scores = dict(zip(first, rng.permutation(len(first)).astype(float)))
  for name, flags in first.items():
    records[name] = _record(name, flags, rng, spaces=(None,), avg=scores[name])
  assert cl_grid.choices(spec, records) is None  # the second stages have not run
  # The sweeps without a second stage are complete: they go on while the others' run.
  partial = cl_grid.choices(spec, records, partial=True)
  assert sorted(partial) == ["inflora", "replay", "seqft"]
  early = cl_grid.grid_cells(spec, "all", partial)
  assert sorted(early) == sorted(["o1_seqft", "o2_seqft", "o3_seqft", "zeroshot",
                                  "o1_seqft_seed1", "o1_seqft_seed2"] + [
                                      f"o1_{m}{s}" for m in ("replay", "inflora")
                                      for s in ("", "_seed1", "_seed2")])
  assert cl_grid.choices(spec, {}, partial=True) is None
  cells = spec.validation_cells(records)
  assert len(cells) == len(spec.families) * spec.validation_budget == 7 * 8
  best_lora = max((n for n in first if n.startswith("val_lora_")), key=scores.get)
  best_svd = max((n for n in first if n.startswith("val_svd_")), key=scores.get)
  for x in generative_cl.OLORA_LAMBDA1:
    assert cells[f"val_lora_lambda{x}"] == [
        f for f in records[best_lora]["flags"] if "lambda1" not in f] + [
            f"--config.olora.lambda1={x}"]
  for key, flags in generative_cl.SVD_INJECTIONS.items():
    assert cells[f"val_svd_inj_{key}"] == [
        f for f in records[best_svd]["flags"] if "injection" not in f] + list(flags)
  second = [n for n in cells if n not in records]
  for i, name in enumerate(second):
    records[name] = _record(name, cells[name], rng, spaces=(None,), avg=100.0 + i)
  assert second[:4] == [f"val_svd_inj_{k}" for k in generative_cl.SVD_INJECTIONS]
  # The best injection cell diverged: it never wins.
  top = [n for n in second if n.startswith("val_svd_")][-1]
  records[top] = {"cell": top, "flags": cells[top], "wall_seconds": 1.0, "diverged": True,
                  "average_accuracy": None}
  scores.update({n: 100.0 + i for i, n in enumerate(second) if n != top})
  chosen = cl_grid.choices(spec, records)
  for family in spec.families:
    names = [n for n in cells if n.startswith(f"val_{family}_")]
    assert len(names) == spec.validation_budget
    winner = max((n for n in names if n in scores), key=scores.get)
    assert chosen[family]["cell"] == winner
    assert not any(f.startswith(("--config.method=", "--config.order=", "--config.eval.split="))
                   for f in chosen[family]["flags"])
  assert [s["diverged"] for s in chosen["svd"]["sweep"]] == [False] * 7 + [True]


def test_method_flags_spell_out_the_injection_only_for_injecting_methods():
  chosen = {"svd": {"flags": ["--config.optim.learning_rate=1e-2",
                              "--config.injection.with_sigma=False"]},
            "lora": {"flags": ["--config.optim.learning_rate=3e-3"]}, "seqft": {"flags": []}}
  lbcl = cl_grid.method_flags("lbcl", chosen)
  assert "--config.injection.layers=all" in lbcl
  assert "--config.injection.with_sigma=False" in lbcl
  assert "--config.injection.with_sigma=True" not in lbcl
  assert not any("injection" in f for f in cl_grid.method_flags("bcl", chosen))
  assert cl_grid.method_flags("mtl", chosen) == ["--config.method=mtl",
                                                 "--config.optim.learning_rate=3e-3"]
  # O-LoRA's weight goes to O-LoRA alone.
  chosen["lora"]["flags"].append("--config.olora.lambda1=2.0")
  assert "--config.olora.lambda1=2.0" in cl_grid.method_flags("olora", chosen)
  assert not any("olora" in f for m in ("inclora", "mtl")
                 for f in cl_grid.method_flags(m, chosen))


def test_grid_cells_of_both_grids():
  chosen = {f: {"flags": ["--config.optim.learning_rate=1e-3"]} for f in cl_grid.FAMILIES}
  gen = cl_grid.grid_cells(generative_cl.SPEC, "all", chosen)
  assert not any("after_adam" in n for n in gen)  # the generative grid has no such phase
  # Order 1: the 8 methods; orders 2 and 3: the 4 main ones; zero-shot; 8 seed cells; no
  # analyses in "all"; no published row where the chosen injection is the paper's.
  assert sorted(n for n in gen if n.startswith(("o2_", "o3_"))) == sorted(
      f"o{o}_{m}" for o in (2, 3) for m in ("seqft", "inclora", "olora", "lbcl"))
  assert len(gen) == 8 + 2 * 4 + 1 + 8
  for cell in ("o1_lbcl", "o1_lcl", "o1_lbcl_seed1", "o3_lbcl"):
    assert "--config.injection.with_sigma=True" in gen[cell]
    assert "--config.injection.layers=all" in gen[cell]
  # A validated injection other than the paper's adds LB-CL as published, on order 1.
  picked = {**chosen, "svd": {"flags": ["--config.optim.learning_rate=1e-2",
                                        "--config.injection.layers=depth:2",
                                        "--config.injection.with_sigma=True"]}}
  gen = cl_grid.grid_cells(generative_cl.SPEC, "all", picked)
  assert len(gen) == 8 + 2 * 4 + 1 + 8 + 1
  # The rows beyond the paper's table, once their families are chosen: order 1 and two seeds
  # each; replay + LB-CL injects as LB-CL does.
  extras = {f: {"flags": ["--config.optim.learning_rate=1e-3"]}
            for f in ("replay", "ewc", "inflora", "replaysvd")}
  gen = cl_grid.grid_cells(generative_cl.SPEC, "all", {**picked, **extras})
  assert len(gen) == 8 + 2 * 4 + 1 + 8 + 1 + 4 * 3
  assert gen["o1_replay_lbcl"][:2] == ["--config.method=replay", "--config.replay.over=lbcl"]
  assert "--config.injection.layers=all" in gen["o1_replay_lbcl"]
  assert not any("injection" in f for f in gen["o1_ewc_seed2"])
  assert gen["o1_inflora"][0] == "--config.method=inflora"
  assert "--config.injection.layers=depth:2" in gen["o1_lbcl"]
  published = gen["o1_lbcl_published"]
  assert "--config.injection.layers=all" in published and "depth:2" not in " ".join(published)
  assert "--config.optim.learning_rate=1e-2" in published
  assert "--config.injection.with_sigma=True" in published
  # The first pass: order 1 with every method, its analyses, its injection (without sigma).
  old = cl_grid.grid_cells(generative_cl.PASS1_SPEC, "all", chosen)
  # 8 methods + zero-shot + 8 seeds + 3 ranks + 6 seed-sample counts + 3 injections + the 2
  # bottom-block controls.
  assert len(old) == 8 + 1 + 8 + 3 + 6 + 3 + 2
  assert old["o1_lbcl_rank2"][-1] == "--config.adapters.rank=2"
  for cell in ("o1_lbcl", "o1_lcl", "o1_lbcl_seed1"):
    assert "--config.injection.with_sigma=False" in old[cell]
  assert "--config.injection.with_sigma=True" in old["o1_lbcl_injection0"]
  three = cl_grid.grid_cells(generative_cl.PASS1_SPEC, "main", chosen, orders=(1, 2, 3))
  assert len(three) == 3 * 8 + 1
  mini = cl_grid.grid_cells(cl_methods.SPEC, "after_adam", chosen)
  assert sorted(mini) == sorted(f"o{o}_{m}_after_adam" for o in (1, 2, 3) for m in ("bcl", "lbcl"))


def test_pass1_report_rebuilds_from_its_records(tmp_path):
  """The first pass's committed records still make its report (history stays rebuildable)."""
  spec = generative_cl.PASS1_SPEC
  records = cl_grid.load_records(spec)
  if not records:
    pytest.skip(f"no first-pass records in {spec.cells_dir}")
  committed = json.loads((cl_grid.ROOT / "benchmarks" / "results" /
                          "generative_cl_pass1.json").read_text())
  report = cl_grid.build_report(spec, records, committed["settings"]["data_dir"])
  assert report["validation"]["chosen"] == committed["validation"]["chosen"]
  for method in cl_grid.METHODS:
    assert report["table1"][method]["average"] == committed["table1"][method]["average"]


def test_table1_seed_spread_and_analyses():
  spec = cl_methods.SPEC
  rng = np.random.default_rng(1)
  chosen = {f: {"flags": []} for f in cl_grid.FAMILIES}
  cells = {**cl_grid.grid_cells(spec, "all", chosen)}
  records = {n: _record(n, f, rng) for n, f in cells.items()}
  records["o3_lcl"] = {"cell": "o3_lcl", "flags": [], "wall_seconds": 1.0, "diverged": True,
                       "average_accuracy": None}
  t1 = cl_grid.table1(spec, records, "seen")
  want = [records[f"o{o}_olora"]["average_accuracy"] for o in (1, 2, 3)]
  assert t1["olora"]["orders"] == want
  assert t1["olora"]["average"] == round(float(np.mean(want)), 1)
  ses = [cl_grid.test_se(records[f"o{o}_olora"]["accuracy_matrix"][-1], 48) for o in (1, 2, 3)]
  assert t1["olora"]["average_test_se"] == round(float(np.sqrt(np.sum(np.square(ses))) / 3), 1)
  assert t1["lcl"]["orders"][2] is None and t1["lcl"]["average"] is None
  task = cl_grid.table1(spec, records, "task")
  assert task["olora"]["orders"][0] == records["o1_olora"]["label_spaces"]["task"][
      "average_accuracy"]
  spread = cl_grid.seed_variance(records, "seen")
  accs = [records[n]["average_accuracy"] for n in ("o1_lbcl", "o1_lbcl_seed1", "o1_lbcl_seed2")]
  assert spread["lbcl"]["accuracies"] == accs
  assert spread["lbcl"]["std"] == round(float(np.std(accs, ddof=1)), 1)
  bwts = [records[n]["bwt"] for n in ("o1_lbcl", "o1_lbcl_seed1", "o1_lbcl_seed2")]
  assert spread["lbcl"]["bwts"] == bwts
  assert spread["lbcl"]["bwt_mean"] == round(float(np.mean(bwts)), 1)
  an = cl_grid.analyses(spec, records)
  assert an["rank"][8]["average_accuracy"] == records["o1_lbcl"]["average_accuracy"]
  assert an["rank"][2]["average_accuracy"] == records["o1_lbcl_rank2"]["average_accuracy"]
  assert an["seed_samples"][64]["average_accuracy"] == records["o1_lbcl_seeds64"][
      "average_accuracy"]
  # The base run (the paper's injection when nothing is chosen) fills its own column.
  assert an["injection"]["all, with sigma"]["average_accuracy"] == records["o1_lbcl"][
      "average_accuracy"]


def test_generative_grid_adds_the_bottom_block_injection_control():
  """SmolLM2's analyses add injection into the bottom 2 blocks (a path regex), so that the top-2
  result can be told apart from injecting into few layers; MiniLM's grid has no such cells."""
  from lbcl_jax import injection
  spec = generative_cl.SPEC
  chosen = {f: {"flags": []} for f in cl_grid.FAMILIES}
  cells = cl_grid.grid_cells(spec, "analyses", chosen)
  labels = list(spec.injection_variants)
  i = labels.index("bottom 2 blocks, with sigma")
  flags = cells[f"o1_lbcl_injection{i}"]
  regex = next(f.split("=", 1)[1] for f in flags if f.startswith("--config.injection.layers="))
  paths = [f"model/layers_{b}/self_attn/{m}" for b in range(30) for m in ("q_proj", "v_proj")]
  picked = injection.select_injected_layers({p: np.ones((1, 8)) for p in paths},
                                            injection.parse_layers(regex))
  assert picked == paths[:4]
  assert "--config.injection.with_sigma=True" in flags
  rng = np.random.default_rng(3)
  records = {n: _record(n, f, rng) for n, f in cells.items()}
  records["o1_lbcl"] = _record("o1_lbcl", [*spec.injection], rng)
  an = cl_grid.analyses(spec, records)
  assert an["injection"]["bottom 2 blocks, with sigma"]["average_accuracy"] == records[
      f"o1_lbcl_injection{i}"]["average_accuracy"]
  assert not any("bottom" in k for k in cl_methods.SPEC.injection_variants)
  assert not any(k.startswith("o1_lbcl_injection4")
                 for k in cl_grid.grid_cells(cl_methods.SPEC, "analyses", chosen))


def test_sensitivity_by_depth_uses_the_model_block_pattern():
  spec = generative_cl.SPEC
  rng = np.random.default_rng(2)
  sens = {"amazon": {"model/layers_0/self_attn/q_proj": [[1.0, 1.0]],
                     "model/layers_0/self_attn/v_proj": [[2.0, 0.0]],
                     "model/layers_11/self_attn/q_proj": [[6.0, 0.0]]}}
  records = {"o1_lbcl": _record("o1_lbcl", [], rng, spaces=(None,), sensitivity=sens)}
  shares = cl_grid.sensitivity_by_depth(spec, records)
  assert shares == {"order 1: amazon": {0: 40.0, 11: 60.0}}
  summary = cl_grid.depth_summary(shares)
  assert summary["most_sensitive_block"] == 11 and summary["top_quarter_share"] == 60.0


@pytest.mark.parametrize("spec", [cl_methods.SPEC, generative_cl.SPEC], ids=["minilm", "smollm2"])
def test_outputs_are_written_from_records(tmp_path, spec):
  rng = np.random.default_rng(3)
  chosen_cells = spec.validation_cells({})
  records = {n: _record(n, f, rng, spaces=spec.spaces) for n, f in chosen_cells.items()}
  records.update({n: _record(n, f, rng, spaces=spec.spaces)
                  for n, f in spec.validation_cells(records).items() if n not in records})
  chosen = cl_grid.choices(spec, records)
  assert chosen is not None
  records.update({n: _record(n, f, rng, spaces=spec.spaces)
                  for n, f in cl_grid.grid_cells(spec, "all", chosen).items()})
  md = cl_grid.write_outputs(spec, records, "/data", tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(spec.outputs)
  report = json.loads((tmp_path / f"{spec.name}.json").read_text())
  assert report["validation"]["chosen"] == json.loads(json.dumps(chosen))
  assert report["table1"]["lbcl"]["orders"][0] == records["o1_lbcl"]["average_accuracy"]
  assert ("table1_task" in report) == ("task" in spec.spaces)
  assert f"| LB-CL | {records['o1_lbcl']['average_accuracy']:.1f} |" in md
  assert "sensitivity" not in report["cells"]["o1_lbcl"]  # kept out of the summary


def test_run_cells_skips_a_cell_another_process_recorded_meanwhile(tmp_path, monkeypatch):
  spec = generative_cl.SPEC
  spec = type(spec)(**{**spec.__dict__, "cells_dir": tmp_path / "cells"})
  spec.cells_dir.mkdir()
  ran = []

  def fake_run_cell(spec_, name, flags, workdir, data_dir, env):
    ran.append(name)
    # Meanwhile another grid process finishes (and records) cell "b".
    (spec_.cells_dir / "b.json").write_text("{}")
    return f"[{name}] done"

  monkeypatch.setattr(cl_grid, "run_cell", fake_run_cell)
  args = type("Args", (), {"only": None, "jobs": 1, "workdir": str(tmp_path), "data_dir": "/d"})
  failed = cl_grid.run_cells(spec, {"a": ["--x"], "b": ["--y"]}, args, {})
  assert failed == [] and ran == ["a"]


def test_bad_orders_flag_is_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    cl_grid.main(generative_cl.SPEC, "", ["--orders", "1,7", "--report_only",
                                          "--output_dir", str(tmp_path)])
  assert "--orders=1,7" in str(e.value)
  assert not list(tmp_path.iterdir())


def test_adapter_overlap_measures_the_share_in_old_spans():
  import adapter_overlap  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  d, r = 12, 2
  q, _ = np.linalg.qr(rng.normal(size=(d, 3 * r)))
  u1, v1 = q[:, :r], q[:, :r].T
  inside = u1 @ rng.normal(size=(r, r))  # task 2 in task 1's span
  outside = q[:, r:2 * r]  # task 3 orthogonal to both
  layer = {"U": np.stack([u1, inside, outside]), "sigma": np.ones((3, r)),
           "V": np.stack([v1, v1, q[:, 2 * r:].T])}
  rows = adapter_overlap.overlaps({"l": layer})
  assert [row["task"] for row in rows] == [2, 3]
  np.testing.assert_allclose([rows[0]["U"], rows[0]["V"], rows[0]["dW"]], 1.0, atol=1e-9)
  np.testing.assert_allclose([rows[1]["U"], rows[1]["V"], rows[1]["dW"]], 0.0, atol=1e-9)
  mixed = dict(layer, U=np.stack([u1, inside, (outside + u1) / np.sqrt(2)]))
  np.testing.assert_allclose(adapter_overlap.overlaps({"l": mixed})[1]["U"], 0.5, atol=1e-9)


def test_adapter_overlap_report_collects_the_records_rows(tmp_path):
  """`adapter_overlap.py --report_only` rebuilds its tables from the records alone."""
  import adapter_overlap  # pylint: disable=g-import-not-at-top
  cells = tmp_path / "benchmarks" / "results" / "cells"
  cells.mkdir(parents=True)
  rows = [{"task": 2, "U": 0.9, "V": 0.8, "dW": 0.7, "layers": 60},
          {"task": 3, "U": 0.5, "V": 0.4, "dW": 0.3, "layers": 60}]
  (cells / "o1_lbcl.json").write_text(json.dumps(
      {"flags": ["--config.method=lbcl"], "adapter_overlap": rows, "bwt": -3.0,
       "average_accuracy": 40.0}))
  (cells / "o1_seqft.json").write_text(json.dumps(
      {"flags": ["--config.method=seqft"], "adapter_overlap": None}))
  out = adapter_overlap.report(cells)
  assert list(out["runs"]) == ["o1_lbcl"]
  run = out["runs"]["o1_lbcl"]
  assert run["method"] == "lbcl" and run["rows"] == rows and run["bwt"] == -3.0
  np.testing.assert_allclose([run["mean"][k] for k in ("U", "V", "dW")], [0.7, 0.6, 0.5])
  assert out["machines"] == cl_grid.machines({"o1_lbcl": {}})  # the runs' machines, here none


def test_cell_settings_and_learned_column():
  """A record states what it ran with, whatever flags set it; Table 1's learned column is the
  mean of the matrix's diagonal."""
  cfg = {"optim": {"learning_rate": 1e-3, "grad_clip": 1.0, "max_steps_per_task": 32,
                   "global_batch_size": 8},
         "data": {"train_per_class": 64, "max_source_length": 128, "truncation": "sentence"},
         "adapters": {"rank": 8, "orth_reg_weight": 0.5},
         "injection": {"layers": "depth:2", "with_sigma": True}, "olora": {"lambda1": 0.5},
         "seed": 1}
  s = cl_grid.cell_settings(cfg)
  assert (s["grad_clip"], s["truncation"], s["max_steps_per_task"], s["injection_layers"],
          s["seed"]) == (1.0, "sentence", 32, "depth:2", 1)
  rng = np.random.default_rng(5)
  rec = _record("o1_olora", [], rng, spaces=(None,))
  row = cl_grid.table1(generative_cl.SPEC, {"o1_olora": rec}, None, methods=("olora",),
                       orders=(1,))["olora"]
  want = round(100 * float(np.mean([rec["accuracy_matrix"][i][i] for i in range(4)])), 1)
  assert row["learned"] == [want] and row["learned_average"] == want


def test_costs_are_the_means_over_a_records_stages():
  spec = generative_cl.SPEC
  stage = lambda b, e, t, tb, sb: {"begin_seconds": b, "end_seconds": e, "train_seconds": t,
                                   "trainable_bytes": tb, "method_state_bytes": sb}
  records = {"o1_ewc": {"stage_costs": {"a": stage(1.0, 3.0, 10.0, 2**20, 2**21),
                                        "b": stage(2.0, 4.0, 20.0, 2**20, 2**22)}},
             "o1_seqft": {"stage_costs": None}, "o1_lbcl": {"diverged": True}}
  assert cl_grid.costs(spec, records) == {"ewc": {
      "setup_and_end_seconds": 5.0, "train_seconds": 15.0, "trainable_mb": 1.0,
      "method_state_mb_last": 4.0}}


def test_the_report_names_the_machines_its_cells_ran_on():
  """Seconds and costs in a report are the cells' machines', which the records name (older
  records only a line with no CPU model): the report lists each with its cell count, and its
  markdown merges records of one CPU that differ in fields older records lack."""
  new = {"arch": "x86_64", "cpu_model": "Xeon X", "vector_extensions": ["AVX2", "AVX-512"],
         "usable_cores": 2, "logical_cores": 2}
  older = {**new, "logical_cores": None, "recorded_as": "Xeon X (AVX2, AVX-512), 2 cores"}
  records = {"a": {"machine": new}, "b": {"machine": new}, "c": {"machine": "x86_64, 2 cores"},
             "d": {"machine": older}}
  got = cl_grid.machines(records)
  assert sorted(m["cells"] for m in got) == [1, 1, 2]
  assert {json.dumps(m["machine"], sort_keys=True) for m in got} == {
      json.dumps(x, sort_keys=True) for x in (new, older, "x86_64, 2 cores")}
  # A line naming no CPU says so in the JSON too, rather than borrowing this machine's.
  assert [m["cpu_model"] for m in got if not isinstance(m["machine"], dict)] == [None]
  assert cl_grid._machine_words(new) == "Xeon X (AVX2, AVX-512), 2 cores"  # pylint: disable=protected-access
  assert cl_grid._machine_words(older) == cl_grid._machine_words(new)  # pylint: disable=protected-access
  assert "no CPU model" in cl_grid._machine_words("x86_64, 2 cores")  # pylint: disable=protected-access
  spec = generative_cl.SPEC
  md = cl_grid.markdown(spec, cl_grid.build_report(spec, {}, "/data") | {
      "settings": {**cl_grid.build_report(spec, {}, "/data")["settings"], "machines": got}})
  assert ("Xeon X (AVX2, AVX-512), 2 cores (3 cells); x86_64, 2 cores (no CPU model recorded) "
          "(1 cell).") in md


def test_the_published_row_is_lbcls_where_validation_chose_the_published_injection(tmp_path):
  """No second cell runs then (`published_flags` is None), so the row shows the LB-CL cells
  and says so; the chosen settings of the finished families show while others' sweeps run."""
  spec = generative_cl.SPEC
  rng = np.random.default_rng(5)
  paper = ("seqft", "lora", "svd")
  records = {}
  for stage in range(2):
    for name, flags in spec.validation_cells(records).items():
      if name not in records and name.split("_")[1] in paper:
        # The SVD family's best cell is a learning-rate cell: the paper's injection.
        avg = 90.0 if name == "val_svd_lr3e-2" else 10.0 + stage
        records[name] = _record(name, flags, rng, spaces=(None,), avg=avg)
  assert cl_grid.choices(spec, records) is None  # the families beyond the paper have not run
  so_far = cl_grid.choices(spec, records, partial=True)
  assert sorted(so_far) == sorted(paper) and cl_grid.published_flags(so_far) is None
  cells = cl_grid.grid_cells(spec, "main", so_far)
  assert "o1_lbcl_published" not in cells
  records["o1_lbcl"] = _record("o1_lbcl", cells["o1_lbcl"], rng, spaces=(None,))
  md = cl_grid.write_outputs(spec, records, "/data", tmp_path)
  report = json.loads((tmp_path / f"{spec.name}.json").read_text())
  row = report["table1"]["lbcl_published"]
  assert row["orders"][0] == records["o1_lbcl"]["average_accuracy"]
  assert row["same_cells_as"] == "lbcl"
  assert "the cells of the LB-CL row" in md
  assert "validation split (8 runs per family, exact match) so far" in md
  assert "| svd | `" in md


def test_method_costs_runs_each_sequential_method_with_the_grid_settings():
  import method_costs  # pylint: disable=g-import-not-at-top
  from driver_utils import make_config  # pylint: disable=g-import-not-at-top
  from lbcl_jax import methods  # pylint: disable=g-import-not-at-top
  args = method_costs.parse_args(["--steps", "5", "--tasks", "2", "--eval_examples", "4"])
  ran = set()
  for label, method_flags in method_costs.METHODS.items():
    flags = method_costs.flags(args, method_flags)
    # The benchmark's sizes replace the grid's, never sit beside them (the last would win).
    for key in ("optim.max_steps_per_task", "data.max_test_examples", "order", "seed"):
      assert sum(f.startswith(f"--config.{key}=") for f in flags) == 1, (label, key)
    config = make_config(*flags)
    assert config.optim.max_steps_per_task == 5 and config.data.max_test_examples == 4
    assert config.order == ",".join(generative_cl.ORDERS[1].split(",")[:2])
    assert config.optim.global_batch_size == 8 and config.data.max_source_length == 128
    methods.get_method(config.method, methods.MethodSettings(
        replay_over=config.replay.over, ewc_over=config.ewc.over))  # a registered method
    ran.add((config.method, config.replay.over if config.method == "replay" else
             config.ewc.over if config.method == "ewc" else ""))
  # Table 1's methods that train task after task (not MTL's joint stage) and the four beyond it.
  assert ran == ({(m, "") for m in cl_grid.METHODS if m != "mtl"}
                 | {("replay", "seqft"), ("replay", "lbcl"), ("ewc", "seqft"), ("inflora", "")})


def test_grid_all_runs_the_analyses_only_where_the_spec_says():
  """SmolLM2's `--grid all` stops after the seeds (its analyses run with `--grid analyses`);
  the MiniLM grid's `all` includes them. Each phase planned as `--grid all` plans it."""
  chosen = {f: {"flags": []} for f in cl_grid.FAMILIES}
  for spec, with_analyses in ((generative_cl.SPEC, False), (cl_methods.SPEC, True)):
    assert spec.analyses_in_all is with_analyses
    phases = cl_grid.grid_phases(spec, "all")
    assert ("analyses" in phases) is with_analyses
    cells = {k for phase in phases for k in cl_grid.grid_cells(spec, phase, chosen)}
    assert any(k.startswith("o1_lbcl_rank") for k in cells) is with_analyses
    assert any(k.endswith("_seed1") for k in cells)
  assert cl_grid.grid_phases(generative_cl.SPEC, "analyses") == ("analyses",)
