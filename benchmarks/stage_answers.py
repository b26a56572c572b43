"""What a finished run's model answers on chosen tasks after each stage: when a task was lost,
and what it is answered with instead.

A run's last checkpoint holds every finished stage's adapter, so the model after any stage k is
the base plus adapters 1..k (`lbcl_jax.export.load_run`): this rebuilds the rows of the
accuracy matrix that `--config.eval.matrix=diagonal_final` skipped, for the tasks asked, from
each task's own stage to the last, through the driver's evaluation path
(`lbcl_jax.evaluation.answers`, in the run's label space: with "seen", the labels of the tasks
trained through stage k, as the driver scores them), and counts the answers:

  * `own`: rows answered with one of the task's own labels (right or wrong);
  * `other_task`: rows answered with a label of another task trained so far;
  * `none`: rows whose answer names no label of the space (malformed text);
  * `top`: the most frequent normalised answers, with their counts;
and, per stage, the norm of its adapter's update (`adapter_norms`).

On a two-label task, accuracy near 0 with `own` near 0 means the task's answers were replaced,
not flipped. `--without K,...` evaluates the last stage's model with stages K...'s adapters
left out: whether those stages' updates cost the tasks. Adapter methods only (a SeqFT run keeps
only its last base).

  python benchmarks/stage_answers.py --workdir W [--workdir W2 ...] --tasks multirc,wic \\
      [--without K,...] [--name NAME] [--out benchmarks/results/stage_answers.json]

Records go to `--out` under `runs[NAME]` (the workdir's base name by default), each with the
CPU it ran on; an existing file keeps its other runs.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import pathlib
import sys
import time
from typing import Sequence

import jax
import numpy as np

from lbcl_jax import evaluation
from lbcl_jax import export
from lbcl_jax import sharding
from lbcl_jax import tasks as tasks_lib
from lbcl_jax.data import task_data
from lbcl_jax.errors import InputError

import machine

OUT = pathlib.Path(__file__).resolve().parent / "results" / "stage_answers.json"
TOP = 5


def count_answers(texts, option, gold, weight, space, own) -> dict:
  """The answer counts of one task at one stage (the rows with weight > 0)."""
  keep = np.asarray(weight) > 0
  option, gold = np.asarray(option)[keep], np.asarray(gold)[keep]
  texts = [t for t, k in zip(texts, keep) if k]
  named = [space[i] if i >= 0 else None for i in option]
  top = collections.Counter(evaluation.normalize_answer(t) for t in texts).most_common(TOP)
  return {"rows": int(keep.sum()), "accuracy": float(np.mean(option == gold)) if keep.any()
          else None,
          "own": sum(n in own for n in named if n is not None),
          "other_task": sum(n not in own for n in named if n is not None),
          "none": sum(n is None for n in named),
          "top": [[text, n] for text, n in top]}


def merged(run: export.RunModel, stages: Sequence[int]) -> dict:
  """The base with the adapters of `stages` (1-based) folded in: the model after stage k is
  `merged(run, range(1, k + 1))`."""
  index = [k - 1 for k in stages]
  adapters = {path: {key: v[index] for key, v in layer.items()}
              for path, layer in run.adapters.items()}
  return dataclasses.replace(run, adapters=adapters, stage=len(index)).merged_params()


def adapter_norms(run: export.RunModel) -> list[float]:
  """Per stage, the Frobenius norm of its update over every adapted layer,
  sqrt(sum_layers ||scaling * U diag(sigma) V||^2): how far each stage moved the model."""
  sq = np.zeros(run.stage)
  for layer in run.adapters.values():
    u, sigma, v = (np.asarray(layer[k], np.float64) for k in ("U", "sigma", "V"))
    dw = run.scaling * np.einsum("kor,kr,kri->koi", u, sigma, v)
    sq += np.sum(dw * dw, axis=(1, 2))
  return [float(f"{x:.6g}") for x in np.sqrt(sq)]


def stage_answers(workdir: str, names: list[str], without: Sequence[int] = ()) -> dict:
  """Per task in `names`: its answers after each stage from its own to the last; with
  `without` (1-based stages), only the last stage's model, less those stages' adapters (an
  ablation: is the loss of a task that stage's doing?)."""
  run = export.load_run(workdir, need_adapters=True)
  kept = next(iter(run.adapters.values()))["U"].shape[0]
  if kept != run.stage:
    raise InputError(f"--workdir={workdir}: method {run.config.method!r} carries one adapter "
                     "through every stage, so the model after each stage is not kept")
  config, backbone = run.config, run.backbone
  stages = [s.split(", ") for s in run.stage_names]
  trained_at = {n: i for i, s in enumerate(stages) for n in s}
  unknown = [n for n in names if n not in trained_at]
  if unknown:
    raise InputError(f"--tasks: {unknown} not in the run's tasks {list(trained_at)}")
  bad = [k for k in without if not 1 <= k <= run.stage]
  if bad:
    raise InputError(f"--without: stages {bad} out of range 1..{run.stage}")
  data = task_data.load_task_data(task_data.DataConfig.from_config(config), names,
                                  backbone.encode)
  split = config.eval.split
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  predict = jax.jit(backbone.predict)
  out = {n: [] for n in names}
  for k in range(run.stage if without else 1, run.stage + 1):
    todo = [n for n in names if trained_at[n] < k]
    if not todo:
      continue
    params = merged(run, [i for i in range(1, k + 1) if i not in without])
    labels = evaluation.label_space(config.eval.label_space, [n for s in stages[:k] for n in s])
    for name in todo:
      own = tasks_lib.get_task(name).labels
      space = own if labels is None else labels  # the run's, as the driver scored it
      texts, option, gold, weight = [], [], [], []
      with sharding.on_mesh(mesh, tuple(config.mesh.logical_axis_rules)):
        for a in evaluation.answers(backbone, predict, params, data[name].split(split), name,
                                    batch_size=config.eval.batch_size, mesh=mesh,
                                    labels=space):
          # Generated ids are decoded; a family that picks an option (rank classification,
          # an encoder's classifier) answers with the option's text.
          texts += (evaluation.decode(backbone.tokenizer, a.raw) if a.raw.ndim == 2
                    else [space[i] if i >= 0 else "" for i in a.option])
          option.append(a.option)
          gold.append(a.gold)
          weight.append(a.weight)
      row = count_answers(texts, np.concatenate(option), np.concatenate(gold),
                          np.concatenate(weight), space, set(own))
      out[name].append({"stage": k, "stage_name": run.stage_names[k - 1], **row})
      if without:
        out[name][-1]["without"] = list(without)
      print(f"stage {k:>2} ({run.stage_names[k - 1]}) {name}: accuracy "
            f"{100 * row['accuracy']:.1f}, own {row['own']}, other task {row['other_task']}, "
            f"none {row['none']}; top {row['top'][:3]}", flush=True)
  return {"workdir": str(workdir), "method": config.method, "split": split,
          "stages": run.stage_names, "adapter_norms": adapter_norms(run),
          "without": list(without), "tasks": out}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", action="append", required=True)
  parser.add_argument("--tasks", required=True, help="comma-separated task names")
  parser.add_argument("--name", action="append", help="a record name per --workdir")
  parser.add_argument("--without", default="",
                      help="comma-separated stages (from 1) whose adapters the last stage's "
                           "model leaves out; only that model is evaluated")
  parser.add_argument("--out", default=str(OUT))
  args = parser.parse_args(argv)
  names = [n.strip() for n in args.tasks.split(",") if n.strip()]
  try:
    without = [int(k) for k in args.without.split(",") if k.strip()]
  except ValueError:
    parser.error(f"--without={args.without!r}: expected comma-separated stage numbers")
  suffix = "_without" + "_".join(map(str, without)) if without else ""
  labels = args.name or [pathlib.Path(w).name + suffix for w in args.workdir]
  if len(labels) != len(args.workdir):
    parser.error("give one --name per --workdir")
  out = pathlib.Path(args.out)
  doc = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
  for label, workdir in zip(labels, args.workdir):
    t0 = time.time()
    try:
      record = stage_answers(workdir, names, without)
    except InputError as e:
      sys.exit(f"error: {e}")
    record.update(seconds=round(time.time() - t0, 1), machine=machine.describe())
    doc["runs"][label] = record
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out)
    print(f"wrote {out} ({label}, {record['seconds']} s)")


if __name__ == "__main__":
  main()
