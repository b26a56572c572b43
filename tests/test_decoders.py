"""Qwen2, Qwen3 and Mistral beside Llama: each against transformers' own PyTorch model.

Tiny random models built with transformers' config classes cover what each family changes
(Qwen2's q/k/v biases and per-layer sliding windows, Qwen3's q/k norms and explicit head_dim,
Mistral's sliding window on prompts three times the window): logits, cached greedy generation
and the checkpoint round trip both ways; GGUF files of Qwen2 and Mistral written with
`gguf.GGUFWriter` against transformers' GGUF loader; the driver (every method on Qwen2, lbcl and
seqft on the others, `configs/smollm2_cl.py` on each), export to HF (merged and PEFT) and the
parameters' logical axes on 8 fake devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lbcl_jax.models import hf
from lbcl_jax.models import llama
from lbcl_jax.models import mistral
from lbcl_jax.models import qwen2
from lbcl_jax.models import qwen3

import driver_utils as du
from conftest import REPO_ROOT
import hf_parity
from hf_parity import hf_greedy
from hf_parity import rel_diff

# torch's threads against JAX's on 2 cores (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODULES = {"qwen2": qwen2, "qwen3": qwen3, "mistral": mistral}
HF_CLASS = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
            "mistral": "MistralForCausalLM"}
WINDOW = 4
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# name -> (family, the HF config class's keyword arguments on top of TINY).
VARIANTS = {
    # As released Qwen2.5 checkpoints: no sliding window, tied head, theta 1e6.
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True, use_sliding_window=False,
                                 rope_parameters={"rope_type": "default",
                                                  "rope_theta": 1e6})),
    # The window switched on: layer 0 full (below max_window_layers), layer 1 windowed.
    "qwen2_window": ("qwen2", dict(tie_word_embeddings=False, use_sliding_window=True,
                                   sliding_window=WINDOW, max_window_layers=1)),
    # head_dim 16, not hidden_size / heads = 8.
    "qwen3": ("qwen3", dict(head_dim=16, tie_word_embeddings=True)),
    "mistral": ("mistral", dict(sliding_window=WINDOW, tie_word_embeddings=False)),
}
WINDOWED = ("qwen2_window", "mistral")

# Left-padded batch (pad id 0), every row longer than the window: 12, 9 and 14 real tokens.
LENGTH = 14
_REAL = np.array([12, 9, 14])
MASK = (np.arange(LENGTH)[None, :] >= (LENGTH - _REAL)[:, None]).astype(np.int64)
IDS = np.where(MASK > 0, np.random.RandomState(0).randint(3, 64, (3, LENGTH)), 0)
MAX_NEW = 8

generate = jax.jit(llama.greedy_generate, static_argnums=(0, 4),
                   static_argnames=("eos_token_id", "pad_token_id"))








def hf_config(transformers, variant: str):
  family, kwargs = VARIANTS[variant]
  return getattr(transformers, f"{HF_CLASS[family][:-len('ForCausalLM')]}Config")(
      **TINY, **kwargs)


def hf_tiny(transformers, torch, variant: str, seed: int = 0):
  """A tiny HF model with weights spread enough that greedy generations vary."""
  family, _ = VARIANTS[variant]
  model = getattr(transformers, HF_CLASS[family])(hf_config(transformers, variant))
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)
      elif name.endswith(".bias"):
        p.normal_(0.0, 0.3)
      elif "embed_tokens" in name or "lm_head" in name:
        # A large tied table makes each token predict itself again: smaller when tied.
        p.normal_(0.0, 0.1 if model.config.tie_word_embeddings else 1.0)
      else:
        p.normal_(0.0, p.shape[1] ** -0.5)
  return model.eval()


def hf_logits(torch, model, ids=IDS, mask=MASK):
  return hf_parity.hf_logits(torch, model, ids, mask)


def our_logits(model, params, ids=IDS, mask=MASK):
  return hf_parity.our_logits(model, params, ids, mask)



def greedy_without_cache(model, params, ids, mask, max_new, pad):
  """Greedy decoding recomputing every logit each step (the reference for the KV cache)."""
  batch, length = ids.shape
  seq = np.concatenate([ids, np.zeros((batch, max_new), ids.dtype)], axis=1)
  seq_mask = np.concatenate([mask, np.zeros((batch, max_new), mask.dtype)], axis=1)
  forward = jax.jit(model.apply)
  out = np.full((batch, max_new), pad, np.int64)
  for step in range(max_new):
    logits = np.asarray(forward({"params": params}, seq, seq_mask))
    out[:, step] = logits[:, length + step - 1].argmax(-1)
    seq[:, length + step], seq_mask[:, length + step] = out[:, step], 1
  return out


@pytest.fixture(scope="module")
def hf_dirs(transformers, torch, tmp_path_factory):
  """variant -> (HF model, the directory it was saved to), made on first use."""
  made = {}

  def get(variant):
    if variant not in made:
      ref = hf_tiny(transformers, torch, variant)
      path = tmp_path_factory.mktemp(variant)
      ref.save_pretrained(path)
      made[variant] = ref, path
    return made[variant]
  return get


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_checkpoint_loads_with_hf_logits(variant, torch, hf_dirs):
  family, kwargs = VARIANTS[variant]
  ref, path = hf_dirs(variant)
  model, params = hf.from_pretrained(path)
  assert type(model).__name__ == HF_CLASS[family]
  assert hf.family_of_model(model)[0] == family
  cfg = model.config
  assert cfg.tie_word_embeddings == kwargs["tie_word_embeddings"]
  assert cfg.qk_norm == (family == "qwen3")
  assert cfg.head_dim == (16 if family == "qwen3" else 8)  # Qwen3's explicit head_dim
  expected_windows = {"qwen2_window": (None, WINDOW), "mistral": (WINDOW, WINDOW)}
  assert cfg.layer_windows == expected_windows.get(variant, (None, None))
  theirs = hf_logits(torch, ref)
  ours = our_logits(model, params)
  assert ours.dtype == np.float32 and ours.shape == theirs.shape
  diff = rel_diff(ours, theirs, MASK)
  print(f"{variant} HF->ours: max relative logit difference {diff:.2e}")
  assert diff < 1e-5
  if variant in WINDOWED:
    # The window matters on these prompts: without it the logits are far off HF's.
    unwindowed = model.clone(config=dataclasses.replace(cfg, sliding_window=None))
    assert rel_diff(our_logits(unwindowed, params), theirs, MASK) > 1e-2
  if family == "qwen3":
    # And so do the q/k norms (scales drawn away from 1).
    plain = model.clone(config=dataclasses.replace(cfg, qk_norm=False))
    pruned = jax.tree_util.tree_map(lambda x: x, params)
    for i in range(cfg.num_hidden_layers):
      for name in ("q_norm", "k_norm"):
        del pruned["model"][f"layers_{i}"]["self_attn"][name]
    assert rel_diff(our_logits(plain, pruned), theirs, MASK) > 1e-2
  # Without padding (HF's plain positions), too.
  full_ids = np.random.RandomState(1).randint(3, 64, (2, LENGTH))
  ones = np.ones_like(full_ids)
  with torch.no_grad():
    plain_theirs = ref(input_ids=torch.tensor(full_ids)).logits.numpy()
  assert rel_diff(our_logits(model, params, full_ids, ones), plain_theirs, ones) < 1e-5


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_generate_matches_no_cache_and_hf(variant, torch, hf_dirs):
  ref, path = hf_dirs(variant)
  model, params = hf.from_pretrained(path)
  # No EOS: every row decodes all MAX_NEW tokens, to 22 slots, 5x the window.
  ours = np.asarray(generate(model, params, IDS, MASK, MAX_NEW, eos_token_id=(),
                             pad_token_id=0))
  # The test needs varied generations (a row repeating one token would hide a wrong mask).
  assert max(len(set(row)) for row in ours.tolist()) >= 3, ours
  np.testing.assert_array_equal(ours, greedy_without_cache(model, params, IDS, MASK, MAX_NEW, 0))
  np.testing.assert_array_equal(ours, hf_greedy(torch, ref, IDS, MASK, MAX_NEW, None, 0))
  # With an EOS the first row produces early: rows stop at different steps.
  eos = int(ours[0, 2])
  stopped = np.asarray(generate(model, params, IDS, MASK, MAX_NEW, eos_token_id=(eos,),
                                pad_token_id=0))
  np.testing.assert_array_equal(stopped, hf_greedy(torch, ref, IDS, MASK, MAX_NEW, [eos], 0))
  assert (stopped[0, 3:] == 0).all()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_saved_checkpoint_loads_in_hf_and_back(variant, torch, transformers, hf_dirs, tmp_path):
  family, _ = VARIANTS[variant]
  _, path = hf_dirs(variant)
  model, _ = hf.from_pretrained(path)
  # Fresh random weights of ours (biases and norm scales too), through HF and back.
  params = MODULES[family].init_params(model, jax.random.key(3))
  params = jax.tree_util.tree_map(lambda x: x * 20 if x.ndim == 2 else x + 0.3 * np.sin(
      np.arange(x.size, dtype=np.float32)).reshape(x.shape), params)
  hf.save_pretrained(model, params, tmp_path / "ckpt")
  saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
  assert saved["model_type"] == family and saved["architectures"] == [HF_CLASS[family]]
  ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
  assert type(ref).__name__ == HF_CLASS[family]
  assert getattr(ref.config, "sliding_window", None) == model.config.sliding_window
  if family != "mistral":  # HF's Qwen configs name each layer's attention
    assert list(ref.config.layer_types) == list(model.config.layer_types)
  diff = rel_diff(our_logits(model, params), hf_logits(torch, ref), MASK)
  print(f"{variant} ours->HF: max relative logit difference {diff:.2e}")
  assert diff < 1e-5
  again_model, again = hf.from_pretrained(tmp_path / "ckpt")
  assert again_model.config == model.config and type(again_model) is type(model)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_round_trip(variant, transformers):
  family, _ = VARIANTS[variant]
  module = MODULES[family]
  config = module.config_from_hf(hf_config(transformers, variant).to_dict())
  assert module.config_from_hf(module.config_to_hf(config)) == config
  # Another family's config is refused, by model_type and by its switches.
  with pytest.raises(ValueError, match="model_type"):
    module.config_from_hf({**module.config_to_hf(config), "model_type": "llama"})
  with pytest.raises(ValueError, match="switches"):
    llama.config_to_hf(config)  # each has a switch Llama's config.json cannot say


def test_defaults_follow_hf_config_classes(transformers):
  """A config.json with only the sizes takes each HF config class's defaults."""
  # 32 heads: Qwen's default 32 key/value heads and Mistral's 8 must divide them.
  sizes = dict(hidden_size=256, num_attention_heads=32, num_hidden_layers=2)
  for family, module in MODULES.items():
    theirs = getattr(transformers, f"{HF_CLASS[family][:-len('ForCausalLM')]}Config")(**sizes)
    ours = module.config_from_hf({"model_type": family, **sizes})
    assert ours.vocab_size == theirs.vocab_size, family
    assert ours.intermediate_size == theirs.intermediate_size, family
    assert ours.num_key_value_heads == theirs.num_key_value_heads, family
    assert ours.head_dim == (theirs.head_dim if hasattr(theirs, "head_dim") and
                             theirs.head_dim else 8), family
    assert ours.max_position_embeddings == theirs.max_position_embeddings, family
    assert ours.sliding_window == getattr(theirs, "sliding_window", None), family
    assert ours.bos_token_id == theirs.bos_token_id and ours.eos_token_id == theirs.eos_token_id


def test_adapter_targets_reach_every_family(hf_dirs):
  """The Llama module paths (adapter targets, transformer blocks) hold for each family."""
  from lbcl_jax import adapters as adapters_lib  # pylint: disable=g-import-not-at-top
  for variant in ("qwen2_window", "qwen3", "mistral"):
    model, params = hf.from_pretrained(hf_dirs(variant)[1])
    module = MODULES[VARIANTS[variant][0]]
    qv = adapters_lib.find_targets(params, module.ADAPTER_TARGETS)
    assert sorted(qv) == sorted(f"model/layers_{i}/self_attn/{p}" for i in range(2)
                                for p in ("q_proj", "v_proj"))
    assert len(adapters_lib.find_targets(params, module.ALL_LINEAR_TARGETS)) == 14


# ----------------------------------------------------------------------------- the driver

# The driver's tiny models: Llama's sizes (du.TINY_LLAMA, hidden 64, GQA) and tokenizer, with
# each family's switches; windows of 8 on prompts of up to 32 tokens.
DRIVER_SWITCHES = {
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                  tie_word_embeddings=True),
    "qwen3": dict(head_dim=32, tie_word_embeddings=False),
    "mistral": dict(sliding_window=8),
}
# Two tasks, 2 steps each, greedy generation of 4 tokens: the cheapest complete run.
DRIVER = [*du.FAST, "--config.optim.max_steps_per_task=2", "--config.eval.mode=generate",
          "--config.eval.max_new_tokens=4", "--config.checkpoint.every_steps=0",
          "--config.plots=False", "--config.data.max_test_examples=8",
          "--config.optim.learning_rate=0.05"]
# All methods on Qwen2 (biases, a tied head and a windowed layer); LB-CL and SeqFT on the others.
DRIVER_RUNS = [("qwen2", m) for m in ("seqft", "inclora", "olora", "nlnbcl", "lcl", "bcl",
                                      "mtl")] + [("qwen3", "seqft"), ("mistral", "seqft")]


def saved_decoder(tmp: pathlib.Path, family: str) -> pathlib.Path:
  """A saved HF directory (config.json, safetensors, tokenizer) of a tiny random `family`."""
  d = tmp / f"saved_{family}"
  if d.exists():
    return d
  du.tiny_llama(tmp)
  cfg = json.loads((tmp / "tiny_llama" / "config.json").read_text())
  cfg.update(architectures=[HF_CLASS[family]], model_type=family, **DRIVER_SWITCHES[family])
  module = MODULES[family]
  model = module.make_model(module.config_from_hf(cfg))
  params = module.init_params(model, jax.random.key(0))
  hf.save_pretrained(model, params, d)
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(tmp / "tiny_llama" / name, d / name)
  return d


@pytest.fixture(scope="module")
def driver_tmp(tmp_path_factory):
  return tmp_path_factory.mktemp("decoder_driver")


@pytest.fixture(scope="module")
def lbcl_runs(driver_tmp):
  """family -> workdir of LB-CL through `python -m lbcl_jax.main --config=configs/smollm2_cl.py`
  on a saved directory of the family (made on first use)."""
  made = {}

  def get(family):
    if family not in made:
      workdir = driver_tmp / f"{family}_lbcl"
      du.run_main(workdir, "--config=configs/smollm2_cl.py", *DRIVER,
                  f"--config.model.path={saved_decoder(driver_tmp, family)}",
                  "--config.method=lbcl")  # the config's family is "llama": the dir's runs
      made[family] = workdir
    return made[family]
  return get


def _check_run(results, family, method):
  joint = method == "mtl"
  m = results["accuracy_matrix"]
  assert results["config"]["model"]["family"] == family
  assert results["config"]["method"] == method
  assert results["config"]["eval"]["mode"] == "generate"
  assert len(m) == (1 if joint else 2) and all(len(row) == 2 for row in m)
  assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in m[-1])
  assert all(np.isfinite(v) for curve in results["losses"].values() for _, v in curve)
  assert sum(len(c) for c in results["losses"].values()) == 4  # 2 steps a task (MTL: 2 x 2)
  # The injecting methods score the decoder's layers (tests/test_method_battery.py's rows).
  assert bool(results["sensitivity"]) == (method in ("lcl", "lbcl"))


@pytest.mark.parametrize("family", sorted(MODULES))
def test_smollm2_config_lbcl_on_each_family(family, lbcl_runs):
  """`configs/smollm2_cl.py` (the decoder experiment) on a saved checkpoint of each family."""
  workdir = lbcl_runs(family)
  _check_run(json.loads((workdir / "results.json").read_text()), family, "lbcl")


@pytest.mark.parametrize("family,method", DRIVER_RUNS)
def test_method_through_the_driver(family, method, driver_tmp, tmp_path):
  from lbcl_jax import train  # pylint: disable=g-import-not-at-top
  path = saved_decoder(driver_tmp, family)
  results = train.train_and_evaluate(
      du.make_config(*DRIVER, f"--config.model.path={path}", f"--config.model.family={family}",
                     f"--config.method={method}"), str(tmp_path / "wd"))
  _check_run(results, family, method)


def test_empty_path_is_refused():
  """No family here has a default checkpoint: an empty path is a one-line InputError."""
  from lbcl_jax import backbones  # pylint: disable=g-import-not-at-top
  from lbcl_jax.errors import InputError  # pylint: disable=g-import-not-at-top
  for family in MODULES:
    config = backbones.BackboneConfig(family=family, path="")
    with pytest.raises(InputError, match="config.model.path is empty"):
      backbones.build(config)


# ----------------------------------------------------------------------------- export


def _export_inputs():
  rng = np.random.RandomState(0)
  ids = rng.randint(3, 400, (2, 20))  # longer than the windows of 8
  return ids, np.ones_like(ids)


@pytest.mark.parametrize("family", sorted(MODULES))
def test_export_merged_and_peft_load_in_transformers(family, lbcl_runs, driver_tmp, torch,
                                                     transformers):
  from lbcl_jax import export  # pylint: disable=g-import-not-at-top
  workdir = lbcl_runs(family)
  run = export.load_run(workdir)
  ids, mask = _export_inputs()
  ours = np.asarray(run.backbone.model.apply({"params": run.merged_params()}, ids, mask))

  def theirs(model):
    with torch.no_grad():
      return model(input_ids=torch.tensor(ids),
                   attention_mask=torch.tensor(mask)).logits.float().numpy()

  merged = export.export_run(workdir, driver_tmp / f"{family}_merged")
  model = transformers.AutoModelForCausalLM.from_pretrained(str(merged)).eval()
  assert type(model).__name__ == HF_CLASS[family]
  np.testing.assert_allclose(theirs(model), ours, atol=1e-4, rtol=0)
  # The adapters moved the model, so the match says something about them.
  base = np.asarray(run.backbone.model.apply({"params": run.params}, ids, mask))
  assert np.abs(base - ours).max() > 1e-3
  peft = pytest.importorskip("peft")
  out = export.export_run(workdir, driver_tmp / f"{family}_peft", fmt="peft")
  model = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(str(out / "base")),
      str(out / "stage_1"), adapter_name="stage_1")
  model.load_adapter(str(out / "stage_2"), adapter_name="stage_2")
  model.base_model.set_adapter(["stage_1", "stage_2"])
  np.testing.assert_allclose(theirs(model.eval()), ours, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- sharding


def sharding_report() -> dict:
  """Per family on a 2 x 2 x 2 (data, fsdp, tensor) mesh of 8 devices: parameters whose logical
  spec is incomplete, parameters the rules leave replicated, and the largest logit difference of
  the sharded forward from the single-device one. Run in a process with 8 fake devices."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from lbcl_jax import config_lib  # pylint: disable=g-import-not-at-top
  from lbcl_jax import sharding  # pylint: disable=g-import-not-at-top
  rules = sharding.normalized_rules(config_lib.default_config().mesh.logical_axis_rules)
  ruled = {name for name, _ in rules}
  # The driver's mesh and placement (its helpers), as the sharded driver runs use them.
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  report = {}
  for variant in ("qwen2_window", "qwen3", "mistral"):
    family, kwargs = VARIANTS[variant]
    module = MODULES[family]
    hf_cfg = {**TINY, **kwargs, "model_type": family, "num_key_value_heads": 2,
              "num_attention_heads": 4}
    model = module.make_model(module.config_from_hf(hf_cfg))
    params = module.init_params(model, jax.random.key(0))
    specs = module.param_logical_specs(model)
    flat_specs = dict(jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0])
    flat_params = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    incomplete, replicated = [], []
    for path, leaf in flat_params.items():
      spec = flat_specs.get(path)
      name = jax.tree_util.keystr(path)
      if spec is None or len(spec) != leaf.ndim or any(a not in ruled for a in spec):
        incomplete.append(f"{name}: {spec}")
        continue
      mesh_spec = nn.logical_to_mesh_axes(spec, rules)
      # Replicated although one of its axes has a rule naming a mesh axis.
      if all(a is None for a in mesh_spec) and any(dict(rules)[a] is not None for a in spec):
        replicated.append(name)
    shardings = sharding.logical_to_sharding(specs, params, mesh, rules)
    sharded = jax.device_put(params, shardings)
    ids = jnp.asarray(IDS, jnp.int32)
    mask = jnp.asarray(MASK, jnp.int32)
    expected = np.asarray(jax.jit(model.apply)({"params": params}, ids, mask))
    with sharding.on_mesh(mesh, rules):
      got = np.asarray(jax.jit(model.apply)({"params": sharded}, ids, mask))
    kinds = {str(s.spec).replace("PartitionSpec", "P") for s in jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(lambda x: x.sharding, sharded))}
    report[family] = {"incomplete": incomplete, "replicated": replicated,
                      "num_params": len(flat_params), "distinct_specs": sorted(kinds),
                      "max_diff": float(np.abs(got - expected).max() / np.abs(expected).max())}
  return report


def test_every_parameter_is_sharded_on_eight_devices():
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"),
                                       env.get("PYTHONPATH", "")])
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  code = ("import json, test_decoders as t; "
          "print('REPORT=' + json.dumps(t.sharding_report()))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-6000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("REPORT=")][-1]
  report = json.loads(line[len("REPORT="):])
  assert sorted(report) == sorted(MODULES)
  for family, r in report.items():
    assert not r["incomplete"], (family, r["incomplete"])
    assert not r["replicated"], (family, r["replicated"])
    assert r["max_diff"] < 1e-5, (family, r)
    # Kernels split over fsdp and tensor, q/k/v biases over tensor; only Qwen3's head norms
    # (axis 'kv', whose rule names no mesh axis) stay whole.
    assert {"P('fsdp', 'tensor')", "P('tensor', 'fsdp')", "P('fsdp',)"} <= set(
        r["distinct_specs"]), r
    assert ("P('tensor',)" in r["distinct_specs"]) == (family == "qwen2"), r
    assert ("P(None,)" in r["distinct_specs"]) == (family == "qwen3"), r


# ----------------------------------------------------------------------------- GGUF

# case -> (the HF model of VARIANTS, GGUF architecture, general.name, q/k permuted as
# llama.cpp's LlamaModel does, the family transformers loads it as). llama.cpp writes Mistral as
# 'llama' under the model's own name ("Mistral 7B ..."), which transformers loads as Llama.
GGUF_CASES = {"qwen2_tied": ("qwen2_tied", "qwen2", "tiny qwen", False, "qwen2"),
              "qwen2_window": ("qwen2_window", "qwen2", "tiny qwen", False, "qwen2"),
              "mistral_as_llama": ("mistral", "llama", "Mistral 7B", True, "llama")}


def _gguf_name(hf_name: str) -> str:
  from lbcl_jax.models import gguf as gguf_lib  # pylint: disable=g-import-not-at-top
  for ours, theirs in (("model.embed_tokens.", "token_embd."), ("model.norm.", "output_norm."),
                       ("lm_head.", "output.")):
    if hf_name.startswith(ours):
      return theirs + hf_name[len(ours):]
  _, _, layer, rest = hf_name.split(".", 3)
  module, kind = rest.rsplit(".", 1)
  inverse = {v: k for k, v in gguf_lib._BLOCK_TENSORS.items()}  # pylint: disable=protected-access
  return f"blk.{layer}.{inverse[module]}.{kind}"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf `LlamaModel.permute` (what the reader must undo)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def write_gguf(gguf, path, state, config, arch: str, name: str, permute: bool):
  """A GGUF of an HF state dict as llama.cpp's converter writes the architecture."""
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_name(name)
  writer.add_block_count(config.num_hidden_layers)
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_attention_heads)
  writer.add_head_count_kv(config.num_key_value_heads)
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  writer.add_rope_freq_base(config.rope_theta)
  writer.add_rope_dimension_count(config.head_dim)
  writer.add_vocab_size(config.vocab_size)
  writer.add_bos_token_id(config.bos_token_id)
  writer.add_eos_token_id(config.eos_token_id)
  writer.add_pad_token_id(config.pad_token_id)
  q8 = gguf.GGMLQuantizationType.Q8_0
  for hf_name, array in state.items():
    array = np.asarray(array, np.float32)
    if permute and ".q_proj." in hf_name:
      array = _permute(array, config.num_attention_heads)
    elif permute and ".k_proj." in hf_name:
      array = _permute(array, config.num_key_value_heads)
    gname = _gguf_name(hf_name)
    if gname == "blk.0.ffn_down.weight":  # one quantised tensor, as real files have many
      writer.add_tensor(gname, gguf.quants.quantize(array, q8), raw_dtype=q8)
    else:
      writer.add_tensor(gname, array)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return pathlib.Path(path)


def _gguf_of(gguf, variant, arch, name, permute, hf_dirs, tmp_path):
  """(path, HF state dict) of a GGUF written from the HF model of `variant`."""
  family, _ = VARIANTS[variant]
  ref, _ = hf_dirs(variant)
  state = {k: v.numpy() for k, v in ref.state_dict().items()
           if not (ref.config.tie_word_embeddings and k == "lm_head.weight")}
  config = MODULES[family].config_from_hf(ref.config.to_dict())
  return write_gguf(gguf, tmp_path / "tiny.gguf", state, config, arch, name, permute), state


def _assert_params(ours, state, expected_keys):
  assert sorted(ours) == sorted(expected_keys)
  for key in ours:
    if _gguf_name(key) == "blk.0.ffn_down.weight":  # Q8_0: within one quantisation step
      np.testing.assert_allclose(ours[key], state[key], atol=np.abs(state[key]).max() / 100)
    else:  # F32 tensors, q/k un-permuted: exact
      np.testing.assert_array_equal(ours[key], state[key], err_msg=key)


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_gguf_matches_hf_gguf_loader(case, hf_dirs, torch, transformers, tmp_path):
  gguf = pytest.importorskip("gguf", reason="GGUF tests need the `gguf` package")
  pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
  variant, arch, name, permute, family = GGUF_CASES[case]
  path, state = _gguf_of(gguf, variant, arch, name, permute, hf_dirs, tmp_path)
  model, params = hf.from_pretrained(path)
  assert hf.family_of_model(model)[0] == family
  theirs_model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file=path.name).eval()
  assert theirs_model.config.model_type == family
  # transformers' config is what the file says plus its class defaults: no window for Qwen2
  # (a GGUF file carries no use_sliding_window), none for Llama.
  assert model.config.sliding_window is None
  assert model.config.tie_word_embeddings == theirs_model.config.tie_word_embeddings
  ours = hf.get_family(family).params_to_hf(params, model.config)
  theirs_state = {k: v.numpy() for k, v in theirs_model.state_dict().items()
                  if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
  for key in ours:
    np.testing.assert_array_equal(ours[key], theirs_state[key], err_msg=key)
  _assert_params(ours, state, theirs_state)
  assert rel_diff(our_logits(model, params), hf_logits(torch, theirs_model), MASK) < 1e-5


def test_gguf_named_mistral_is_a_mistral_model(hf_dirs, torch, transformers, tmp_path):
  """A 'llama' file named exactly "mistral" is what transformers makes a Mistral model (its
  loader then needs a gguf-py with a 'mistral' architecture, which current gguf-py lacks, so
  the reference here is transformers' Mistral with the weights and MistralConfig's window)."""
  gguf = pytest.importorskip("gguf", reason="GGUF tests need the `gguf` package")
  path, state = _gguf_of(gguf, "mistral", "llama", "mistral", True, hf_dirs, tmp_path)
  model, params = hf.from_pretrained(path)
  assert hf.family_of_model(model)[0] == "mistral"
  default_window = transformers.MistralConfig().sliding_window
  assert model.config.sliding_window == default_window
  ours = mistral.params_to_hf(params, model.config)
  _assert_params(ours, state, state)
  ref_config = transformers.MistralConfig(**{**TINY, "sliding_window": default_window})
  ref = transformers.MistralForCausalLM(ref_config).eval()
  ref.load_state_dict({k: torch.tensor(v) for k, v in ours.items()})
  assert rel_diff(our_logits(model, params), hf_logits(torch, ref), MASK) < 1e-5
