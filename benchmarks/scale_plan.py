"""Pod scale on paper: the driver's own programs compiled for real model sizes on simulated meshes.

For SmolLM2-135M, T5-large (the paper's model), T5-XL, T5-XXL and a Llama-3-8B shape (configs
from the published model cards, random abstract weights: nothing is allocated), this builds the
programs the driver runs in the long benchmark's last task (LB-CL, 14 old tasks of rank 8 on
q and v):

* `train`: `train.make_train_step` with the stage's optimizer (orthogonal projection on the
  14 old tasks' bases, AdamW, clipping), the new adapter and its optimizer state donated;
* `sensitivity`: `Stage.scorer`, the per-sample gradients of the 8 seed samples that score the
  old triplets;
* `generate`: evaluation's `jax.jit(backbone.predict)`, greedy decoding with the KV cache;

on meshes of 8, 64 and 256 fake CPU devices, and of 1, 2 and 4 to find the smallest that fits
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`, one subprocess per mesh size), with the
`data` / `fsdp` / `tensor` splits a user would pick. Every
program is traced under the mesh and the config's logical axis rules, exactly as the driver
traces it (`sharding.on_mesh`), lowered on `jax.ShapeDtypeStruct`s that carry the driver's
shardings (`place_base(abstract=True)`, `abstract_adapter`, `Stage.init_opt_state`'s
`sharding.optimizer_state_shardings`, `sharding.batch_sharding`) and compiled by XLA's CPU
backend. Read from the compiled program, per device: argument, output, aliased and temporary bytes
(`memory_analysis`), FLOPs (`cost_analysis`) and the bytes moved by each kind of collective in
the optimized HLO; and which accelerator each fits.

Settings: bf16 compute and bf16 storage of the frozen base (adapters, their gradients and
AdamW's moments in f32), global batch 64 (the paper's), prompts of 512 tokens and answers of 8
(the benchmark's labels fit 8 tokens: the train step's answer bucket), generation of 50 new
tokens (the paper's max target length) over an evaluation batch of 64. Two block remat
policies (`config.model.remat`): "weights" (nothing recomputed; the base's fsdp-gathered
weights are gathered again for the backward pass instead of held) and, where a device holds 8
or more rows, "full" (the block recomputed in the backward pass).

Depth. The big models are not compiled at full depth on this machine (2 shared cores): the
train step and the sensitivity pass are compiled with 2 and with 4 blocks (T5: 2 + 2 and
4 + 4) and every number is extrapolated linearly per block to the model's depth; the
extrapolation is checked against full-depth compiles of T5-large and SmolLM2 (`depth_check`
in the results). Generation is compiled at full depth: its peak (every block's KV cache while
one block runs) does not grow linearly from a few blocks.

Fits: per-device peak = arguments + outputs - aliased (donated) + temporaries must be at most
90 % of the accelerator's memory (the rest for the runtime, XLA's scratch and fragmentation).
XLA's CPU backend compiles here, with its memory-minimising schedule
(`--xla_cpu_enable_concurrency_optimized_scheduler=false`; the default schedules for thread
concurrency and issues every fsdp all-gather at the start of the step). Its fusion and buffer
assignment differ from the TPU and GPU backends; notably it computes bf16 matmuls in f32, so a
gathered weight is held (and counted by the collectives) in f32 beside its bf16 copy. The
bytes are an estimate on the high side, not a promise.

Usage:
  python benchmarks/scale_plan.py                  # all models, meshes of 1 to 256
  python benchmarks/scale_plan.py --models smollm2-135m --devices 8 --remat weights
  python benchmarks/scale_plan.py --resume         # carry on after an interruption
  python benchmarks/scale_plan.py --rescore        # an older plan's records: resident bytes

Writes `benchmarks/results/scale_plan.json` (atomically; every compile's record also goes to
`scale_plan.records.jsonl` beside it as it finishes) and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time
from typing import Any, Mapping

import machine

REPO = pathlib.Path(__file__).resolve().parents[1]

RESULTS = REPO / "benchmarks" / "results" / "scale_plan.json"

# Published model cards' config.json fields (the ones our families read).
MODELS: dict[str, tuple[str, dict]] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct
    "smollm2-135m": ("llama", {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152,
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_act": "silu",
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}),
    # google-t5/t5-large (the paper's model; v1.0: ReLU, tied head)
    "t5-large": ("t5", {
        "model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": 32128,
        "d_model": 1024, "d_kv": 64, "d_ff": 4096, "num_layers": 24, "num_heads": 16,
        "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
        "feed_forward_proj": "relu", "tie_word_embeddings": True, "layer_norm_epsilon": 1e-6,
        "dropout_rate": 0.1, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}),
    # google/flan-t5-xl (T5 v1.1 XL, 2.85B: gated GELU, untied head)
    "t5-xl": ("t5", {
        "model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": 32128,
        "d_model": 2048, "d_kv": 64, "d_ff": 5120, "num_layers": 24, "num_decoder_layers": 24,
        "num_heads": 32, "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False, "layer_norm_epsilon": 1e-6, "dropout_rate": 0.1,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}),
    # google/flan-t5-xxl (T5 v1.1 XXL, 11.1B)
    "t5-xxl": ("t5", {
        "model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": 32128,
        "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_decoder_layers": 24,
        "num_heads": 64, "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False, "layer_norm_epsilon": 1e-6, "dropout_rate": 0.1,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}),
    # meta-llama/Meta-Llama-3-8B
    "llama-3-8b": ("llama", {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001}),
}

# HBM per chip (GiB).
ACCELERATORS = {"v5e": 16, "v4": 32, "H100": 80, "H200": 141}
# Share of an accelerator's memory a program may plan for.
USABLE = 0.9
GIB = 2 ** 30

PROGRAMS = ("train", "sensitivity", "generate")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Setting:
  """What the programs are built for (the paper's run, its last task by default)."""

  global_batch: int = 64
  source_length: int = 512
  target_length: int = 8
  old_tasks: int = 14
  rank: int = 8
  targets: str = "qv"
  seed_samples: int = 8
  eval_batch: int = 64
  max_new_tokens: int = 50
  dtype: str = "bfloat16"
  param_dtype: str = "bfloat16"
  method: str = "lbcl"
  remat: str = "weights"


def meshes_for(devices: int, global_batch: int = 64) -> dict[str, dict[str, int]]:
  """The splits a user would pick for `devices` chips; the batch axes (data x fsdp) never
  exceed the global batch (`settings.check_batch_sizes`), the rest goes to `tensor`."""
  dp = min(devices, global_batch)
  out = {"data": {"data": dp, "fsdp": 1, "tensor": devices // dp}}
  if devices > 1:
    out["fsdp"] = {"data": 1, "fsdp": dp, "tensor": devices // dp}
  if devices >= 8:
    out["fsdp+tensor"] = {"data": 1, "fsdp": devices // 8, "tensor": 8}
  return out


def num_blocks(family: str, hf_config: dict) -> int:
  return hf_config["num_layers"] if family == "t5" else hf_config["num_hidden_layers"]


def with_blocks(family: str, hf_config: dict, blocks: int) -> dict:
  """`hf_config` cut to `blocks` transformer blocks (T5: encoder and decoder alike)."""
  if family == "t5":
    return dict(hf_config, num_layers=blocks, num_decoder_layers=blocks)
  return dict(hf_config, num_hidden_layers=blocks)


# ---------------------------------------------------------------------------------------------
# The driver's programs on abstract arrays.


def run_config(family: str, mesh: dict[str, int], setting: Setting):
  """The run config a user would write for `setting` on `mesh`."""
  from lbcl_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.method = setting.method
  config.model.family = family
  config.model.random_init = True
  config.model.dtype = setting.dtype
  config.model.param_dtype = setting.param_dtype
  config.model.remat = setting.remat
  config.adapters.rank = setting.rank
  config.adapters.targets = setting.targets
  config.injection.num_seed_samples = setting.seed_samples
  config.data.max_source_length = setting.source_length
  config.optim.global_batch_size = setting.global_batch
  config.optim.grad_clip = 1.0
  config.eval.batch_size = setting.eval_batch
  config.eval.mode = "generate"
  config.eval.max_new_tokens = setting.max_new_tokens
  for axis, size in mesh.items():
    config.mesh[axis] = size
  return config


def batch_spec(family: str, rows: int, source: int, target: int) -> dict[str, Any]:
  """Shapes and dtypes of a batch of the family's pipeline (`lbcl_jax.data.pipeline`'s
  collate): T5's seq2seq batch, or a causal LM's prompt + answer batch."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  i32 = np.dtype(np.int32)
  if family == "t5":
    shapes = {"input_ids": (rows, source), "attention_mask": (rows, source),
              "labels": (rows, target), "label_mask": (rows, target),
              "decoder_input_ids": (rows, target)}
  elif family == "llama":
    total = source + target
    shapes = {"input_ids": (rows, total), "attention_mask": (rows, total),
              "labels": (rows, total), "label_mask": (rows, total),
              "prompt_ids": (rows, source), "prompt_mask": (rows, source)}
  else:
    raise ValueError(f"no batch spec for family {family!r}")
  out = {k: jax.ShapeDtypeStruct(s, i32) for k, s in shapes.items()}
  out["label_index"] = jax.ShapeDtypeStruct((rows,), i32)
  out["weight"] = jax.ShapeDtypeStruct((rows,), np.dtype(np.float32))
  return out


def _on(tree, shardings):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                      shardings)


class _Tokenizer:
  """The one tokenizer field the programs read (the EOS id of a causal LM's answers)."""

  def __init__(self, eos_token_id):
    self.eos_token_id = eos_token_id


def build_programs(family: str, hf_config: dict, mesh_sizes: dict[str, int],
                   setting: Setting = Setting(), devices=None,
                   programs=PROGRAMS) -> dict[str, Any]:
  """The driver's programs for `hf_config` on a mesh, lowered on abstract arrays.

  Returns {program: jax.stages.Lowered for each of `programs`, "params": the abstract base
  params (with shardings), "args": {program: its abstract arguments}, "mesh": the mesh}.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lbcl_jax import backbones  # pylint: disable=g-import-not-at-top
  from lbcl_jax import methods as methods_lib  # pylint: disable=g-import-not-at-top
  from lbcl_jax import settings  # pylint: disable=g-import-not-at-top
  from lbcl_jax import sharding  # pylint: disable=g-import-not-at-top
  from lbcl_jax import stage as stage_lib  # pylint: disable=g-import-not-at-top
  from lbcl_jax import train  # pylint: disable=g-import-not-at-top
  from lbcl_jax.backbones import base as backbone_base  # pylint: disable=g-import-not-at-top
  from lbcl_jax.models import hf  # pylint: disable=g-import-not-at-top

  config = run_config(family, mesh_sizes, setting)
  method = methods_lib.get_method(config.method, settings.method_settings(config))
  loop = settings.LoopConfig.from_config(config, method)
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  settings.check_batch_sizes(loop, mesh)
  bcfg = backbones.BackboneConfig.from_config(config)
  fam = hf.get_family(family)
  model = fam.make_model(fam.config_from_hf(hf_config, dtype=jnp.dtype(bcfg.dtype),
                                            param_dtype=jnp.dtype(bcfg.param_dtype)))
  model = backbone_base.with_model_options(model, bcfg)  # as `backbones.base.load_model`
  eos = hf_config.get("eos_token_id")
  backbone = backbones.backbone_class(family)(bcfg, model, _Tokenizer(eos), None)
  rules = tuple(config.mesh.logical_axis_rules)
  key = jax.random.key(config.seed)
  out: dict[str, Any] = {"args": {}}
  with sharding.on_mesh(mesh, rules):
    base = stage_lib.place_base(backbone, method, loop, key, mesh, rules, abstract=True)
    method = method.resolve(backbone, base.paths)
    stage = stage_lib.Stage(backbone=backbone, method=method, base=base, data={}, loop=loop,
                            optimizer_settings=settings.optimizer_settings(config),
                            kept=stage_lib.Kept())
    new = stage_lib.abstract_adapter(base, key)
    old = stage_lib.abstract_adapter(base, key, num_tasks=setting.old_tasks)
    tsh = stage.trainable_shardings(new)
    # The stage's optimizer, its bases built from traced old adapters (the same shapes as the
    # driver's from concrete ones: 14 x 8 directions of every factor are independent, so the
    # compact basis is the span [d, 112]). Its `update` reads only the state.
    made = {}

    def init(old_, trainable):
      made["tx"] = stage.optimizer(old_)
      return made["tx"].init(trainable)

    opt_shapes = jax.eval_shape(init, old, new)
    optimizer = made["tx"]
    osh = sharding.optimizer_state_shardings(opt_shapes, tsh, mesh)
    opt_state = _on(opt_shapes, osh)
    adapter = base.adapter_config
    step = train.make_train_step(
        backbone, method, optimizer, scaling=adapter.scaling, dropout=adapter.dropout,
        apply_mode=adapter.apply_mode, mesh=mesh, trainable_shardings=tsh, opt_shardings=osh)
    spec = batch_spec(family, setting.global_batch, setting.source_length,
                      setting.target_length)
    batch = {k: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                     sharding=sharding.batch_sharding(mesh, len(a.shape)))
             for k, a in spec.items()}
    rng = jax.eval_shape(lambda: jax.random.fold_in(key, 0))
    train_args = (new, opt_state, base.params, old, batch, rng)
    if "train" in programs:
      out["train"] = step.lower(*train_args)
    out["args"]["train"] = train_args

    # The sensitivity pass: seeds as the backbone collates them (one bucket), replicated.
    seeds = {k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding.replicated(mesh))
             for k, a in batch_spec(family, setting.seed_samples, setting.source_length,
                                    setting.target_length).items()}
    sens_args = (base.params, old, seeds)
    if "sensitivity" in programs:
      out["sensitivity"] = stage.scorer().lower(*sens_args)
    out["args"]["sensitivity"] = sens_args

    # Evaluation: the merged params (the base's shardings), a global batch of prompts.
    ev = {k: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                  sharding=sharding.batch_sharding(mesh, len(a.shape)))
          for k, a in batch_spec(family, setting.eval_batch, setting.source_length,
                                 setting.target_length).items()}
    gen_args = (base.params, ev)
    if "generate" in programs:
      out["generate"] = jax.jit(backbone.predict).lower(*gen_args)
    out["args"]["generate"] = gen_args
  out["params"] = base.params
  out["mesh"] = mesh
  return out


# ---------------------------------------------------------------------------------------------
# Reading a compiled program.

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(pred|[sufc]\d+|bf16)\[([\d,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def shape_bytes(text: str) -> int:
  """Bytes of every `dtype[dims]` array in an HLO type string (a tuple sums its parts)."""
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += n * _DTYPE_BYTES.get(dtype, 4)
  return total


def collective_bytes(hlo: str) -> dict[str, int]:
  """Result bytes per device of every collective in an optimized HLO module, by kind (an op
  inside a loop body counts once)."""
  out = {k: 0 for k in COLLECTIVES}
  for line in hlo.splitlines():
    m = _OP.search(line)
    if m:
      out[m.group(2)] += shape_bytes(m.group(1))
  return out


def buffer_shapes(hlo: str) -> set[tuple[str, tuple[int, ...]]]:
  """Every array shape an optimized HLO module holds (for asserting what is split)."""
  return {(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _SHAPE.findall(hlo)}


def analyse(compiled, resident_bytes: int) -> dict[str, Any]:
  """What a compiled program needs on a device. `resident_bytes`: its arguments' bytes on the
  fullest device, the ones the program does not read included (XLA prunes those from its own
  count, `program_argument_bytes`, but the driver holds them on the device all the same: the
  old tasks' stack, which only a regulariser reads, the batch's unused columns)."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  hlo = compiled.as_text()
  out = {
      "argument_bytes": int(resident_bytes),
      "program_argument_bytes": int(mem.argument_size_in_bytes),
      "output_bytes": int(mem.output_size_in_bytes),
      "alias_bytes": int(mem.alias_size_in_bytes),
      "temp_bytes": int(mem.temp_size_in_bytes),
      "flops": float((cost or {}).get("flops", 0.0)),
      "collective_bytes": collective_bytes(hlo),
  }
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                       + out["temp_bytes"])
  return out


def param_bytes(params) -> tuple[int, int]:
  """(total bytes, bytes on the fullest device) of an abstract tree (arguments without a
  sharding count whole, as a replicated array)."""
  import jax  # pylint: disable=g-import-not-at-top
  total = per_device = 0
  for a in jax.tree.leaves(params):
    # A PRNG key is its key data (two uint32 for threefry).
    item = 8 if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a.dtype.itemsize
    sharding = getattr(a, "sharding", None)
    shard = a.shape if sharding is None else sharding.shard_shape(a.shape)
    total += math.prod(a.shape) * item
    per_device += math.prod(shard) * item
  return total, per_device


def compile_model(family: str, hf_config: dict, mesh_sizes: dict[str, int], setting: Setting,
                  programs=PROGRAMS) -> dict[str, Any]:
  """Compiles the programs of one model on one mesh; returns their analyses."""
  import jax  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  built = build_programs(family, hf_config, mesh_sizes, setting, programs=programs)
  trace_s = time.perf_counter() - t0
  total, per_device = param_bytes(built["params"])
  out = {"param_bytes_total": total, "param_bytes_per_device": per_device,
         "trace_seconds": round(trace_s, 2), "programs": {}}
  for name in programs:
    t0 = time.perf_counter()
    compiled = built[name].compile()
    seconds = time.perf_counter() - t0
    resident = param_bytes(built["args"][name])[1]
    out["programs"][name] = dict(analyse(compiled, resident), compile_seconds=round(seconds, 2))
    del compiled
  del built
  jax.clear_caches()
  return out


# ---------------------------------------------------------------------------------------------
# Extrapolation over depth, fitting, the worker and the report.


def extrapolate(at: dict[int, Any], depth: int) -> Any:
  """Linear per-block extrapolation of every number in two compiles' results to `depth`."""
  (d1, a), (d2, b) = sorted(at.items())

  def lin(x, y):
    if isinstance(x, dict):
      return {k: lin(x[k], y[k]) for k in x}
    if isinstance(x, (int, float)) and not isinstance(x, bool):
      v = x + (y - x) * (depth - d1) / (d2 - d1)
      return int(round(v)) if isinstance(x, int) else v
    return x

  return lin(a, b)


def fits(peak_bytes: float) -> dict[str, bool]:
  return {name: peak_bytes <= USABLE * gib * GIB for name, gib in ACCELERATORS.items()}


def _record_key(rec: dict) -> tuple:
  return (rec["model"], rec["devices"], rec["split"], rec["remat"], rec["blocks"],
          tuple(sorted(rec.get("compiled", ()))))


def planned_compiles(models, devices: int, depths, remats, checks) -> list[dict]:
  """What one mesh size compiles, in order: per model and split, the train step and the
  sensitivity pass at two depths for every remat policy (and at full depth for the checked
  ones), and generation at full depth once (it has no backward pass, so remat leaves it
  alone; and its peak, the KV caches of every block, does not grow linearly from a few
  blocks, so it is never extrapolated)."""
  out = []
  for name in models:
    family, cfg = MODELS[name]
    full = num_blocks(family, cfg)
    for split, sizes in meshes_for(devices, Setting().global_batch).items():
      base = {"model": name, "devices": devices, "split": split, "mesh": sizes,
              "full_blocks": full}
      out.append(dict(base, blocks=full, remat=remats[0], compiled=["generate"]))
      per_device_batch = Setting().global_batch // (sizes["data"] * sizes["fsdp"])
      for remat in remats:
        if remat == "full" and per_device_batch < 8:
          continue  # recomputing pays only where a device holds many rows' activations
        ds = [d for d in depths if d < full]
        if (name, str(devices), split) in checks and remat == remats[0]:
          ds.append(full)
        for depth in ds:
          out.append(dict(base, blocks=depth, remat=remat, compiled=["train", "sensitivity"]))
  return out


def worker(args) -> None:
  """One mesh size: compiles what `planned_compiles` lists and is not in the records file
  yet, appending one JSON record a line (so an interrupted plan resumes)."""
  import jax  # pylint: disable=g-import-not-at-top
  checks = {tuple(c.split(":")) for c in args.check}
  done = {_record_key(r) for r in read_records(args.records)}
  for rec in planned_compiles(args.models, jax.device_count(), args.depths, args.remat, checks):
    if _record_key(rec) in done:
      continue
    family, cfg = MODELS[rec["model"]]
    try:
      rec.update(compile_model(family, with_blocks(family, cfg, rec["blocks"]), rec["mesh"],
                               Setting(remat=rec["remat"]), tuple(rec["compiled"])))
    except Exception as e:  # pylint: disable=broad-except
      rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    with open(args.records, "a", encoding="utf-8") as f:
      f.write(json.dumps(rec) + "\n")
    print("RECORD " + json.dumps(rec), flush=True)


def resident_bytes(rec: dict) -> dict[str, int]:
  """Per compiled program of `rec`: its arguments' bytes on the fullest device, from the
  abstract arguments alone (built, not lowered: seconds where a compile takes minutes)."""
  family, cfg = MODELS[rec["model"]]
  built = build_programs(family, with_blocks(family, cfg, rec["blocks"]), rec["mesh"],
                         Setting(remat=rec["remat"]), programs=())
  return {p: param_bytes(built["args"][p])[1] for p in rec.get("programs", {})}


def rescore(rec: dict, resident: Mapping[str, int]) -> dict:
  """A record compiled before `analyse` counted resident bytes (its `argument_bytes` were
  XLA's count of the arguments the program reads), brought to today's fields."""
  rec = json.loads(json.dumps(rec))
  for name, prog in rec.get("programs", {}).items():
    if "program_argument_bytes" in prog:
      continue
    prog["program_argument_bytes"] = prog["argument_bytes"]
    prog["argument_bytes"] = int(resident[name])
    prog["peak_bytes"] = (prog["argument_bytes"] + prog["output_bytes"] - prog["alias_bytes"]
                          + prog["temp_bytes"])
  return rec


def rescore_worker(args) -> None:
  """One mesh size: prints every record of that size that predates resident bytes, rescored."""
  import jax  # pylint: disable=g-import-not-at-top
  for rec in read_records(args.records):
    if (rec["devices"] != jax.device_count() or "error" in rec
        or all("program_argument_bytes" in p for p in rec["programs"].values())):
      continue
    print("RECORD " + json.dumps(rescore(rec, resident_bytes(rec))), flush=True)


def read_records(path) -> list[dict]:
  path = pathlib.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def summarise(records: list[dict]) -> dict[str, Any]:
  """Per model, mesh size, split and remat policy: the train step and the sensitivity pass at
  full depth (compiled, or extrapolated from two depths), generation compiled at full depth,
  and the accelerators all three fit."""
  ok = [r for r in records if "error" not in r]
  generate = {(r["model"], r["devices"], r["split"]): r for r in ok
              if "generate" in r["programs"] and r["blocks"] == r["full_blocks"]}
  groups: dict[tuple, dict[int, dict]] = {}
  for r in ok:
    if "train" in r["programs"]:
      groups.setdefault((r["model"], r["devices"], r["split"], r["remat"]), {})[r["blocks"]] = r
  out: dict[str, Any] = {}
  checks = []
  for (model, n, split, remat), by_depth in sorted(groups.items()):
    gen = generate.get((model, n, split))
    full = gen["full_blocks"] if gen else None
    if gen is None:
      continue
    small = {d: r for d, r in by_depth.items() if d != full}
    est = None
    if len(small) >= 2:
      two = dict(sorted(small.items())[:2])
      est = extrapolate({d: r["programs"] for d, r in two.items()}, full)
      for v in est.values():
        v.pop("compile_seconds", None)
    if full in by_depth:
      programs, how = by_depth[full]["programs"], "compiled"
      if est is not None:
        checks.append({"model": model, "devices": n, "split": split, "remat": remat,
                       "blocks": full, "from_blocks": sorted(small)[:2],
                       "relative_error": _relative_errors(est, programs)})
    elif est is not None:
      programs, how = est, f"extrapolated from {sorted(small)[:2]} blocks"
    else:
      continue
    programs = {p: dict(v) for p, v in programs.items()}
    programs["generate"] = dict(gen["programs"]["generate"])
    for p in programs.values():
      p["fits"] = fits(p["peak_bytes"])
    entry = {
        "mesh": gen["mesh"], "train_and_sensitivity": how,
        "param_bytes_total": gen["param_bytes_total"],
        "param_bytes_per_device": gen["param_bytes_per_device"],
        "programs": programs,
        "fits": {a: all(p["fits"][a] for p in programs.values()) for a in ACCELERATORS},
        "compile_seconds": {
            "generate": gen["programs"]["generate"]["compile_seconds"],
            **{f"{p}@{d}": r["programs"][p]["compile_seconds"]
               for d, r in sorted(by_depth.items()) for p in r["programs"]}},
    }
    out.setdefault(model, {}).setdefault(str(n), {}).setdefault(split, {})[remat] = entry
  return {"models": out, "depth_check": checks}


def _relative_errors(est: dict, got: dict) -> dict[str, float]:
  out = {}
  for p, g in got.items():
    e = est[p]
    for k in ("argument_bytes", "temp_bytes", "peak_bytes", "flops"):
      if g[k]:
        out[f"{p}.{k}"] = round((e[k] - g[k]) / g[k], 4)
  return out


def smallest_fits(summary: dict) -> dict[str, Any]:
  """Per model and accelerator: the fewest devices (of those planned) with a split and remat
  policy whose every program fits; of those, the one a user would run: no recomputation
  (remat "weights") if it fits, then the fewest bytes through collectives per train step, then
  the least memory; and its train step's FLOPs (all devices)."""
  out = {}
  for model, by_n in summary["models"].items():
    row = {}
    for acc in ACCELERATORS:
      best = None
      for n in sorted(by_n, key=int):
        ok = [(split, remat, e) for split, by_remat in by_n[n].items()
              for remat, e in by_remat.items() if e["fits"][acc]]
        if ok:
          split, remat, e = min(ok, key=lambda x: (
              x[1] == "full", sum(x[2]["programs"]["train"]["collective_bytes"].values()),
              x[2]["programs"]["train"]["peak_bytes"]))
          progs = e["programs"]
          best = {"devices": int(n), "split": split, "mesh": e["mesh"], "remat": remat,
                  "peak_gib": {p: round(v["peak_bytes"] / GIB, 2) for p, v in progs.items()},
                  "train_flops": progs["train"]["flops"] * int(n)}
          break
      row[acc] = best
    out[model] = row
  return out


def fsdp_split(summary: dict) -> dict[str, float]:
  """Per model: the fullest device's parameter bytes on the 64-device fsdp mesh over an even
  64th of the total (1.0: evenly split, nothing left whole)."""
  out = {}
  for model, by_n in summary["models"].items():
    for entry in by_n.get("64", {}).get("fsdp", {}).values():
      out[model] = round(entry["param_bytes_per_device"] / (entry["param_bytes_total"] / 64), 4)
  return out


def xla_flags(devices: int) -> list[str]:
  """N fake CPU devices, and XLA:CPU's memory-minimising schedule: its default schedules for
  thread concurrency and issues every fsdp all-gather at the start of the step, holding the
  whole gathered model, which no accelerator's memory-aware scheduler does."""
  return [f"--xla_force_host_platform_device_count={devices}",
          "--xla_cpu_enable_concurrency_optimized_scheduler=false"]


def run_mesh_size(n: int, args, records_path: pathlib.Path) -> None:
  env = dict(os.environ, XLA_FLAGS=" ".join(xla_flags(n)), JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="3")
  cmd = [sys.executable, __file__, "--worker", "--models", *args.models,
         "--depths", *map(str, args.depths), "--remat", *args.remat, "--check", *args.check,
         "--records", str(records_path)]
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=REPO)
  for line in proc.stdout:
    if line.startswith("RECORD "):
      rec = json.loads(line[len("RECORD "):])
      progs = rec.get("programs", {})
      print(f"  {n:>3} devices {rec['model']:<13} {rec['split']:<12} {rec['remat']:<8} "
            f"{rec['blocks']:>2} blocks: " + (rec.get("error") or ", ".join(
                f"{p} {v['peak_bytes'] / GIB:.2f} GiB ({v['compile_seconds']:.0f} s)"
                for p, v in progs.items())), flush=True)
  if proc.wait():
    raise SystemExit(f"the worker for {n} devices exited {proc.returncode}")
  print(f"  {n} devices: {time.perf_counter() - t0:.0f} s", flush=True)


def rescore_records(args, records_path: pathlib.Path) -> None:
  """`--rescore`: one worker per mesh size in the records; the file is rewritten once, whole."""
  from lbcl_jax import files  # pylint: disable=g-import-not-at-top
  records = read_records(records_path)
  new = {}
  for n in sorted({r["devices"] for r in records}):
    env = dict(os.environ, XLA_FLAGS=" ".join(xla_flags(n)), JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, __file__, "--worker", "--rescore", "--records", str(records_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, check=False)
    if proc.returncode:
      raise SystemExit(f"the rescore worker for {n} devices exited {proc.returncode}:\n"
                       f"{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
      if line.startswith("RECORD "):
        rec = json.loads(line[len("RECORD "):])
        new[_record_key(rec)] = rec
    print(f"  {n:>3} devices: {sum(r['devices'] == n for r in new.values())} records rescored",
          flush=True)
  records = [new.get(_record_key(r), r) for r in records]
  files.atomic_write_text(records_path, "".join(json.dumps(r) + "\n" for r in records))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  parser.add_argument("--devices", nargs="+", type=int, default=[1, 2, 4, 8, 64, 256])
  parser.add_argument("--depths", nargs="+", type=int, default=[2, 4])
  parser.add_argument("--check", nargs="*", default=["t5-large:8:fsdp", "smollm2-135m:8:fsdp"],
                      help="model:devices:split whose train step and sensitivity pass are also "
                           "compiled at full depth (the extrapolation's check)")
  parser.add_argument("--remat", nargs="+", default=["weights", "full"])
  parser.add_argument("--resume", action="store_true",
                      help="keep the records of an earlier (interrupted) plan and compile only "
                           "what they lack")
  parser.add_argument("--rescore", action="store_true",
                      help="compile nothing: bring the records of an older plan (which counted "
                           "only the arguments a program reads) to resident argument bytes, "
                           "then rewrite the summary")
  parser.add_argument("--worker", action="store_true")
  parser.add_argument("--records", default=None)
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args(argv)
  if args.worker:
    (rescore_worker if args.rescore else worker)(args)
    return
  from lbcl_jax import files  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(args.out)
  records_path = pathlib.Path(args.records or out.with_suffix(".records.jsonl"))
  records_path.parent.mkdir(parents=True, exist_ok=True)
  if not (args.resume or args.rescore) and records_path.exists():
    records_path.unlink()
  t0 = time.perf_counter()
  if args.rescore:
    rescore_records(args, records_path)
  else:
    for n in args.devices:
      run_mesh_size(n, args, records_path)
  records = [r for r in read_records(records_path)
             if r["model"] in args.models and r["devices"] in args.devices]
  summary = summarise(records)
  doc = {
      "setting": dataclasses.asdict(Setting()),
      "accelerators_gib": ACCELERATORS, "usable_fraction": USABLE,
      "cpu": machine.summary(), "jax": jax.__version__, "xla_flags": xla_flags(0)[1:],
      "wall_seconds_this_invocation": round(time.perf_counter() - t0),
      "compile_seconds_total": round(sum(
          p["compile_seconds"] for r in records for p in r.get("programs", {}).values())),
      "smallest_fits": smallest_fits(summary),
      "fsdp_64_param_split": fsdp_split(summary),
      **summary,
      "records_file": records_path.name,
  }
  files.atomic_write_text(out, json.dumps(doc, indent=1) + "\n")
  print(report(doc))


def report(doc: dict) -> str:
  """The smallest mesh per model and accelerator, as a markdown table."""
  lines = ["| model | " + " | ".join(f"{a} ({g} GiB)" for a, g in ACCELERATORS.items())
           + " | train step FLOPs |", "|---" * (len(ACCELERATORS) + 2) + "|"]
  for model, row in doc["smallest_fits"].items():
    cells, flops = [], None
    for acc in ACCELERATORS:
      b = row[acc]
      if b is None:
        cells.append("-")
        continue
      m = b["mesh"]
      cells.append(f"{b['devices']}: {m['data']}x{m['fsdp']}x{m['tensor']}, {b['remat']} "
                   f"({max(b['peak_gib'].values())} GiB)")
      flops = b["train_flops"]
    lines.append(f"| {model} | " + " | ".join(cells)
                 + f" | {'-' if flops is None else f'{flops / 1e12:.1f} T'} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
