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
`cl_sensitivity.png`. The machinery is `cl_grid.py`'s, shared with `generative_cl.py`.

  python benchmarks/cl_methods.py --data_dir ../shared/cl_benchmark [--grid all] [--jobs 2]
"""

from __future__ import annotations

import cl_grid

ORDERS = cl_grid.ORDERS
# Every cell: 200 validation sentences per task carved from its train file (fixed seed; the
# 100-per-class training sample is drawn from the rest), and both label spaces measured.
COMMON = ("--config.data.validation_examples=200", "--config.eval.label_space=seen",
          "--config.eval.extra_label_spaces=task")

# -- validation: the same budget (8 runs) for every family ---------------------------------------
SEQFT_LRS = ("1e-5", "2e-5", "5e-5", "1e-4", "2e-4", "5e-4", "1e-3", "2e-3")
LORA_LRS = ("1e-4", "3e-4", "1e-3", "2e-3", "3e-3", "5e-3", "1e-2", "3e-2")
SVD_LRS = ("3e-3", "1e-2", "3e-2")
SVD_ORTH = ("0", "0.5")  # none, and AdaLoRA / PEFT's default
SVD_INJECTIONS = {"depth2": ["--config.injection.layers=depth:2"],
                  "nosigma": ["--config.injection.with_sigma=False"]}
VALIDATION_BUDGET = 8


def validation_cells(records) -> dict[str, list[str]]:
  """Validation cell -> flags. The SVD family's injection cells exist once its first six
  cells have records (they run at the best of those)."""
  val = [f"--config.order={ORDERS[1]}", "--config.eval.split=validation"]
  out = {}
  for lr in SEQFT_LRS:
    out[f"val_seqft_lr{lr}"] = ["--config.method=seqft", *val, cl_grid.lr_flag(lr)]
  for lr in LORA_LRS:
    out[f"val_lora_lr{lr}"] = ["--config.method=olora", *val, cl_grid.lr_flag(lr)]
  for lr in SVD_LRS:
    for w in SVD_ORTH:
      out[f"val_svd_lr{lr}_orth{w}"] = ["--config.method=lbcl", *val, cl_grid.lr_flag(lr),
                                       f"--config.adapters.orth_reg_weight={w}"]
  first = [n for n in out if n.startswith("val_svd_")]
  if all(n in records for n in first):
    best = cl_grid.best(records, first)
    for name, flags in SVD_INJECTIONS.items():
      out[f"val_svd_inj_{name}"] = records[best]["flags"] + flags
  return out


SPEC = cl_grid.Spec(
    name="cl_methods", plot_prefix="cl", model="all-MiniLM-L6-v2",
    config=cl_grid.ROOT / "configs" / "minilm_cl_benchmark.py",
    cells_dir=cl_grid.ROOT / "benchmarks" / "results" / "cl_cells",
    common=COMMON, validation_cells=validation_cells, validation_budget=VALIDATION_BUDGET,
    spaces=("seen", "task"), block_pattern=r"layer_(?P<index>\d+)/")


if __name__ == "__main__":
  cl_grid.main(SPEC, __doc__)
