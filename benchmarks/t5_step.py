"""Forward+backward step of flan-t5-small (random weights): lbcl_jax's Flax T5 vs HF PyTorch.

One training-step gradient (loss = the T5 backbone's, the driver's: mean target-token
cross-entropy; gradients for every parameter, no optimizer update) at batch 8, source 256,
target 8, on the same CPU in one process, with torch limited to the cores JAX uses. Both
models hold the same weights. Prints a table and writes JSON (atomically) to
benchmarks/results/t5_step.json.

  python benchmarks/t5_step.py --steps 5 --warmup 2
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from lbcl_jax import files
from lbcl_jax.models import hf
from lbcl_jax.models import t5

import core_overhead
import machine

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_CONFIG = REPO_ROOT.parent / "shared" / "t5_tokenizer" / "flan-t5-small" / "config.json"
# flan-t5-small's shape, used when ../shared is absent.
FLAN_T5_SMALL = dict(
    model_type="t5", architectures=["T5ForConditionalGeneration"], vocab_size=32128,
    d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
    layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=5, help="timed steps per framework")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps first (JAX's first one compiles)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--src-len", type=int, default=256)
  parser.add_argument("--tgt-len", type=int, default=8)
  parser.add_argument("--dropout", action="store_true",
                      help="train-mode dropout in both (default: off in both)")
  parser.add_argument("--threads", type=int, default=None,
                      help="torch threads (default: the cores this process may use)")
  parser.add_argument("--output", type=pathlib.Path,
                      default=REPO_ROOT / "benchmarks" / "results" / "t5_step.json")
  return parser.parse_args(argv)


def hf_config_dict() -> tuple[dict, str]:
  if SHARED_CONFIG.is_file():
    return json.loads(SHARED_CONFIG.read_text()), str(SHARED_CONFIG)
  return dict(FLAN_T5_SMALL), "built-in flan-t5-small shape"


def make_batch(args, vocab_size: int, seed: int = 0,
               decoder_start_id: int = 0) -> dict[str, np.ndarray]:
  """A T5 backbone batch (`pipeline.encode_seq2seq`'s keys) of random tokens: source rows padded
  to lengths between half and full, EOS-terminated; the first row's target is half padding."""
  rng = np.random.default_rng(seed)
  src = rng.integers(2, vocab_size, (args.batch, args.src_len))
  lengths = rng.integers(args.src_len // 2, args.src_len + 1, args.batch)
  src_mask = np.arange(args.src_len)[None, :] < lengths[:, None]
  src[np.arange(args.batch), lengths - 1] = 1
  src = np.where(src_mask, src, 0)
  labels = rng.integers(2, vocab_size, (args.batch, args.tgt_len))
  labels[:, -1] = 1
  label_mask = np.ones_like(labels, bool)
  label_mask[0, args.tgt_len // 2:] = False  # One shorter target.
  decoder_input_ids = np.concatenate(
      [np.full((args.batch, 1), decoder_start_id, labels.dtype), labels[:, :-1]], axis=1)
  return dict(input_ids=src, attention_mask=src_mask.astype(np.int64), labels=labels,
              label_mask=label_mask, decoder_input_ids=decoder_input_ids,
              weight=np.ones((args.batch,), np.float32))


def time_steps(step, n: int) -> list[float]:
  times = []
  for _ in range(n):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def bench_jax(args, model, params, batch) -> dict:
  inputs = {k: jnp.asarray(v) for k, v in batch.items()}
  backbone = core_overhead.backbone_for(model, params, dropout=args.dropout)
  grad_step = jax.jit(jax.value_and_grad(backbone.loss))

  keys = iter(jax.random.split(jax.random.key(0), args.warmup + args.steps + 1))

  def step():
    loss, grads = grad_step(params, inputs, next(keys))
    jax.block_until_ready(grads)
    return loss

  start = time.perf_counter()
  loss = step()
  first = time.perf_counter() - start
  time_steps(step, max(args.warmup - 1, 0))
  times = time_steps(step, args.steps)
  return dict(first_step_s=first, step_s=times, loss=float(loss))


def bench_torch(args, hf_dir, batch) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  model = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
  model.train(args.dropout)
  inputs = {k: torch.tensor(v) for k, v in batch.items()}
  labels = inputs["labels"].masked_fill(~inputs["label_mask"], -100)

  def step():
    model.zero_grad(set_to_none=True)
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                labels=labels)
    out.loss.backward()
    return out.loss.detach()

  start = time.perf_counter()
  loss = step()
  first = time.perf_counter() - start
  time_steps(step, max(args.warmup - 1, 0))
  times = time_steps(step, args.steps)
  return dict(first_step_s=first, step_s=times, loss=float(loss), threads=args.threads,
              attn_implementation=model.config._attn_implementation)


def summarize(result: dict) -> dict:
  times = np.asarray(result.pop("step_s"))
  return dict(result, median_step_s=float(np.median(times)), min_step_s=float(times.min()),
              steps_per_s=float(1.0 / np.median(times)), timed_steps=len(times))


def main(argv=None) -> dict:
  args = parse_args(argv)
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  args.threads = args.threads or cores
  cfg_dict, cfg_source = hf_config_dict()
  config = t5.config_from_hf(cfg_dict, dtype=jnp.float32, param_dtype=jnp.float32)
  model = t5.T5(config)
  # Same random weights for both: init ours (HF-style scales), export for torch.
  params = t5.init_params(model, jax.random.key(0), src_len=8, tgt_len=8)
  batch = make_batch(args, config.vocab_size, decoder_start_id=config.decoder_start_token_id)

  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = hf.save_pretrained(model, params, pathlib.Path(tmp) / "flan-t5-small-random")
    print(f"config: {cfg_source}; batch {args.batch}, source {args.src_len}, target "
          f"{args.tgt_len}; dropout {'on' if args.dropout else 'off'}; {args.threads} torch "
          f"threads, {cores} cores; jax {jax.__version__} on {jax.devices()[0].platform}",
          flush=True)
    jax_result = summarize(bench_jax(args, model, params, batch))
    torch_result = summarize(bench_torch(args, hf_dir, batch))

  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  ratio = jax_result["steps_per_s"] / torch_result["steps_per_s"]
  rows = [("lbcl_jax (jax.jit)", jax_result), ("HF PyTorch", torch_result)]
  print(f"\n{'implementation':<20} {'steps/s':>9} {'median ms':>10} {'min ms':>8} "
        f"{'1st step s':>11} {'loss':>8}")
  for name, r in rows:
    print(f"{name:<20} {r['steps_per_s']:>9.3f} {1e3 * r['median_step_s']:>10.1f} "
          f"{1e3 * r['min_step_s']:>8.1f} {r['first_step_s']:>11.2f} {r['loss']:>8.4f}")
  print(f"ratio (jax / torch steps/s): {ratio:.2f}x")

  payload = dict(
      benchmark="t5_step", model="flan-t5-small shape, random weights",
      config_source=cfg_source, config=dataclasses.asdict(config) | {
          "dtype": jnp.dtype(config.dtype).name,
          "param_dtype": jnp.dtype(config.param_dtype).name},
      batch=args.batch, src_len=args.src_len, tgt_len=args.tgt_len, dropout=args.dropout,
      warmup=args.warmup, steps=args.steps, cores=cores,
      jax=jax_result, torch=torch_result, ratio_jax_over_torch=ratio,
      versions=dict(python=sys.version.split()[0], jax=jax.__version__,
                    torch=torch.__version__, transformers=transformers.__version__),
      platform=platform.platform(), machine=machine.describe(),
      timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  files.atomic_write_text(args.output, json.dumps(payload, indent=2, sort_keys=True) + "\n")
  print(f"wrote {args.output}")
  return payload


if __name__ == "__main__":
  main()
