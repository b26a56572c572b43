"""Flax Gemma 2 vs Hugging Face's PyTorch Gemma 2, and Gemma 2 through the driver.

Tiny random models built with transformers' own `Gemma2Config` (sliding and global layers, a
window of 4 slots under 12-token prompts, both soft-caps on, `query_pre_attn_scalar` unlike
head_dim, an explicit head_dim) are saved by transformers and loaded by us: the logits agree,
left padding included, and so do greedy generations that run past the window. Each Gemma 2
difference from Llama is shown to matter (switching it off breaks the agreement). Our checkpoints
load in transformers and back exactly; the driver trains and evaluates a tiny Gemma 2 (LB-CL
through `main` with configs/smollm2_cl.py, and SeqFT), `lbcl_jax.export` gives transformers (and
PEFT) the trained model, and every parameter is sharded by a logical spec on 8 devices.
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
import safetensors.numpy

from lbcl_jax import adapters as adapters_lib
from lbcl_jax import methods
from lbcl_jax import train
from lbcl_jax.models import gemma2
from lbcl_jax.models import hf
from lbcl_jax.models import llama
from lbcl_jax.models import ops

import driver_utils as du
from conftest import REPO_ROOT
from test_method_battery import BATTERY
import hf_parity
from hf_parity import hf_greedy
from hf_parity import hf_positions
from hf_parity import rel_diff

# torch's threads against JAX's on 2 cores (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Left-padded batch (pad id 0) of prompts of up to 12 tokens: three times the window.
IDS = np.array([[0, 0, 0, 5, 6, 7, 8, 9, 10, 11, 12, 13],
                [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22],
                [0, 0, 0, 0, 0, 30, 31, 32, 33, 34, 35, 36]], np.int64)
MASK = (IDS != 0).astype(np.int64)
MAX_NEW = 10

generate = jax.jit(gemma2.greedy_generate, static_argnums=(0, 4),
                   static_argnames=("eos_token_id", "pad_token_id"))

# transformers' Gemma2Config arguments of the tiny models. 3 layers: sliding, full, sliding.
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=64, rms_norm_eps=1e-6, sliding_window=4,
            query_pre_attn_scalar=8, attn_logit_softcapping=3.0, final_logit_softcapping=5.0,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0},
            pad_token_id=0, eos_token_id=2, bos_token_id=1)
VARIANTS = {
    # Gemma 2 as released: tied head, grouped-query attention, both caps.
    "tied": {},
    # What HF's config also allows: an own lm_head, biases, no caps, 4 layers, MHA.
    "untied_bias_nocap": dict(tie_word_embeddings=False, attention_bias=True,
                              attn_logit_softcapping=None, final_logit_softcapping=None,
                              num_hidden_layers=4, num_key_value_heads=4),
}








def hf_tiny(transformers, torch, variant: str, seed: int = 0):
  """A tiny HF Gemma 2 with weights spread enough that greedy generations vary.

  The post-norms are large and the embedding small: with the tied head reading the embedding
  table, a residual stream dominated by the input token's embedding would only ever repeat it.
  """
  config = transformers.Gemma2Config(**{**TINY, **VARIANTS[variant]},
                                     attn_implementation="eager")  # soft-capping needs eager
  model = transformers.Gemma2ForCausalLM(config)
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "post_" in name:
        p.uniform_(1.0, 4.0)
      elif "norm" in name:
        p.uniform_(-0.5, 0.5)
      elif name.endswith(".bias"):
        p.normal_(0.0, 0.1)
      elif "embed_tokens" in name or "lm_head" in name:
        p.normal_(0.0, 0.2)
      else:
        p.normal_(0.0, p.shape[1] ** -0.5)
  return model.eval()


def hf_logits(torch, model, ids=IDS, mask=MASK):
  return hf_parity.hf_logits(torch, model, ids, mask)


def our_logits(model, params, ids=IDS, mask=MASK):
  return hf_parity.our_logits(model, params, ids, mask)



def from_hf_model(ref):
  """Our model and params of an in-memory HF model (its config through config.json's dict)."""
  config = gemma2.config_from_hf(ref.config.to_dict())
  params = gemma2.params_from_hf({k: v.numpy() for k, v in ref.state_dict().items()}, config,
                                 source="memory")
  return gemma2.Gemma2ForCausalLM(config), params


# ----------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_checkpoint_loads_with_hf_logits(variant, torch, transformers, tmp_path):
  ref = hf_tiny(transformers, torch, variant)
  ref.save_pretrained(tmp_path)
  model, params = hf.from_pretrained(tmp_path)
  assert isinstance(model, gemma2.Gemma2ForCausalLM)
  cfg = model.config
  expected = {**TINY, **VARIANTS[variant]}
  for name in ("num_hidden_layers", "head_dim", "sliding_window", "query_pre_attn_scalar",
               "attn_logit_softcapping", "final_logit_softcapping"):
    assert getattr(cfg, name) == expected[name], name
  assert cfg.tie_word_embeddings == expected.get("tie_word_embeddings", True)
  # HF's layer_types: layer 0 slides, then every other one.
  assert cfg.layer_types == tuple(ref.config.layer_types)
  assert cfg.layer_windows[:2] == (4, None) and cfg.hidden_act == "gelu_pytorch_tanh"
  theirs = hf_logits(torch, ref)
  ours = our_logits(model, params)
  assert ours.dtype == np.float32 and ours.shape == theirs.shape
  diff = rel_diff(ours, theirs, MASK)
  print(f"tiny gemma2 {variant} HF->ours: max relative logit difference {diff:.2e}")
  assert diff < 1e-5
  # A left-padded row computes what the same row does unpadded.
  alone = our_logits(model, params, IDS[2:, 5:], MASK[2:, 5:])
  np.testing.assert_allclose(alone[0], ours[2, 5:], rtol=0, atol=1e-5 * np.abs(alone).max())


def test_each_gemma_difference_matters(torch, transformers, monkeypatch):
  """The parity test would catch each difference done wrong: the window one slot off either
  way, the sliding layers swapped, head_dim's scaling, a missing cap, Llama's RMSNorm (`w`, not
  `1 + w`) or no embedding scale all move the logits far beyond its tolerance."""
  ref = hf_tiny(transformers, torch, "tied")
  model, params = from_hf_model(ref)
  theirs = hf_logits(torch, ref)
  assert rel_diff(our_logits(model, params), theirs, MASK) < 1e-5
  cfg = model.config
  wrong = {
      "window + 1": dataclasses.replace(cfg, sliding_window=5),
      "window - 1": dataclasses.replace(cfg, sliding_window=3),
      "odd layers slide": dataclasses.replace(
          cfg, layer_types=("full_attention", "sliding_attention", "full_attention")),
      "head_dim scaling": dataclasses.replace(cfg, query_pre_attn_scalar=cfg.head_dim),
      "no attention cap": dataclasses.replace(cfg, attn_logit_softcapping=None),
      "no final cap": dataclasses.replace(cfg, final_logit_softcapping=None),
  }
  for name, config in wrong.items():
    diff = rel_diff(our_logits(gemma2.Gemma2ForCausalLM(config), params), theirs, MASK)
    assert diff > 1e-3, (name, diff)
  # Without the embedding's sqrt(hidden) scale: the same table, divided by it.
  unscaled = jax.tree_util.tree_map(lambda x: x, params)
  unscaled["model"]["embed_tokens"]["embedding"] = (
      params["model"]["embed_tokens"]["embedding"] / np.sqrt(cfg.hidden_size))
  assert rel_diff(our_logits(model, unscaled), theirs, MASK) > 1e-3
  # Llama's norm in every place of Gemma's (the layers look the class up when called).
  monkeypatch.setattr(gemma2, "Gemma2RMSNorm", llama.LlamaRMSNorm)
  assert rel_diff(our_logits(gemma2.Gemma2ForCausalLM(cfg), params), theirs, MASK) > 1e-3


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_saved_checkpoint_loads_in_hf_and_back_exactly(variant, torch, transformers, tmp_path):
  config = gemma2.config_from_hf(
      gemma2.config_to_hf(gemma2.config_from_hf({**TINY, **VARIANTS[variant]})))
  config = dataclasses.replace(config, initializer_range=0.3)
  model = gemma2.Gemma2ForCausalLM(config)
  params = gemma2.init_params(model, jax.random.key(1))
  # The norms start at zero ((1 + w) = 1); random ones make the round trip of them say more.
  key = iter(jax.random.split(jax.random.key(2), 64))
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jax.random.uniform(next(key), x.shape, x.dtype, -0.5, 0.5)
      if "norm" in jax.tree_util.keystr(path) else x, params)
  hf.save_pretrained(model, params, tmp_path / "ckpt")
  saved = safetensors.numpy.load_file(str(tmp_path / "ckpt" / hf.SAFETENSORS_NAME))
  assert ("lm_head.weight" in saved) == (not config.tie_word_embeddings)
  assert sum(".pre_feedforward_layernorm." in k for k in saved) == config.num_hidden_layers
  ref = transformers.Gemma2ForCausalLM.from_pretrained(
      tmp_path / "ckpt", attn_implementation="eager").eval()
  assert ref.config.sliding_window == config.sliding_window
  assert ref.config.query_pre_attn_scalar == config.query_pre_attn_scalar
  diff = rel_diff(our_logits(model, params), hf_logits(torch, ref), MASK)
  print(f"tiny gemma2 {variant} ours->HF: max relative logit difference {diff:.2e}")
  assert diff < 1e-5
  _, again = hf.from_pretrained(tmp_path / "ckpt")
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def greedy_without_cache(model, params, ids, mask, max_new, eos, pad):
  """Greedy decoding that recomputes all logits each step (the reference for the cache)."""
  batch, length = ids.shape
  seq = np.concatenate([ids, np.zeros((batch, max_new), ids.dtype)], axis=1)
  seq_mask = np.concatenate([mask, np.zeros((batch, max_new), mask.dtype)], axis=1)
  forward = jax.jit(model.apply)
  out = np.full((batch, max_new), pad, np.int64)
  done = np.zeros(batch, bool)
  for step in range(max_new):
    logits = np.asarray(forward({"params": params}, seq, seq_mask))
    token = np.where(done, pad, logits[:, length + step - 1].argmax(-1))
    out[:, step] = token
    seq[:, length + step], seq_mask[:, length + step] = token, 1
    done |= np.isin(token, eos)
    if done.all():
      break
  return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_generate_matches_no_cache_and_hf(variant, torch, transformers):
  """KV-cached generation past the window (12-token prompts, 10 new tokens, a window of 4)
  equals HF's generate and our own uncached decoding, with and without an early EOS."""
  ref = hf_tiny(transformers, torch, variant, seed=3)
  model, params = from_hf_model(ref)
  free = np.asarray(generate(model, params, IDS, MASK, MAX_NEW, eos_token_id=()))
  assert len(set(free.ravel().tolist())) > 5, free  # the test needs varied generations
  eos = int(free[0, 2])
  for eos_ids in ((), (eos,)):
    ours = np.asarray(generate(model, params, IDS, MASK, MAX_NEW, eos_token_id=eos_ids,
                               pad_token_id=0))
    assert ours.shape == (len(IDS), MAX_NEW) and ours.dtype == np.int32
    np.testing.assert_array_equal(
        ours, greedy_without_cache(model, params, IDS, MASK, MAX_NEW, eos_ids, 0))
    np.testing.assert_array_equal(
        ours, hf_greedy(torch, ref, IDS, MASK, MAX_NEW, list(eos_ids) or None, 0))
  assert (ours[0, 3:] == 0).all()  # after its EOS the first row holds padding


def test_decode_cache_steps_match_full_forward():
  """Prefill + single-token steps past the window give the logits of one full forward."""
  config = gemma2.config_from_hf({**TINY, "initializer_range": 0.3})
  model = gemma2.Gemma2ForCausalLM(config)
  params = gemma2.init_params(model, jax.random.key(2))
  full = our_logits(model, params)
  prefill = jax.jit(gemma2.prefill, static_argnums=(0, 4))
  decode_step = jax.jit(gemma2.decode_step, static_argnums=0)
  logits, cache = prefill(model, params, IDS[:, :5], MASK[:, :5], IDS.shape[1])
  steps = [np.asarray(logits)]
  for t in range(5, IDS.shape[1]):
    logits, cache = decode_step(model, params, cache, IDS[:, t:t + 1], MASK[:, t:t + 1])
    steps.append(np.asarray(logits))
  assert rel_diff(np.concatenate(steps, axis=1), full, MASK) < 1e-5


def test_bfloat16_and_remat_track_the_plain_model():
  """bf16 compute stays near f32 (the embedding scale rounded to bf16, as HF rounds it); block
  remat changes neither the logits nor the gradients."""
  config = gemma2.config_from_hf({**TINY, "initializer_range": 0.3})
  model = gemma2.Gemma2ForCausalLM(config)
  params = gemma2.init_params(model, jax.random.key(5))
  full = our_logits(model, params)
  half = our_logits(gemma2.Gemma2ForCausalLM(dataclasses.replace(config, dtype=jnp.bfloat16)),
                    params)
  assert half.dtype == np.float32 and np.isfinite(half).all()
  assert rel_diff(half, full, MASK) < 5e-2
  remat = gemma2.Gemma2ForCausalLM(dataclasses.replace(config, remat="full"))

  def loss(m, p):
    return jnp.mean(m.apply({"params": p}, IDS, MASK) ** 2)

  np.testing.assert_allclose(our_logits(remat, params), full, rtol=1e-6, atol=1e-6)
  g, g_remat = (jax.jit(jax.grad(lambda p, m=m: loss(m, p)))(params) for m in (model, remat))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         g_remat, g)


def _full_residuals(f, x):
  """How many of f's VJP residuals have x's shape (as tests/test_ops.py counts them)."""
  return sum(leaf.shape == x.shape for leaf in jax.tree_util.tree_leaves(jax.vjp(f, x)[1]))


def test_softcap_values_gradient_and_residuals():
  """ops.softcap is HF's `tanh(x / cap) * cap`, and its custom gradient autodiff's; its backward
  pass keeps one tensor (x), as ops' contract says, and so does Gemma's (1 + w) norm."""
  x = jnp.linspace(-200.0, 200.0, 41)
  ref = lambda x: jnp.tanh(x / 30.0) * 30.0
  np.testing.assert_allclose(ops.softcap(x, 30.0), ref(x), rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(ops.softcap(x, 30.0)).max()) <= 30.0
  g = jnp.cos(x)  # an arbitrary cotangent
  # 1 - tanh^2 loses digits in f32 where tanh is near 1: equal to 1e-6 of the largest value.
  np.testing.assert_allclose(jax.vjp(lambda x: ops.softcap(x, 30.0), x)[1](g)[0],
                             jax.vjp(ref, x)[1](g)[0], rtol=1e-5, atol=1e-6)
  big = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 16)), jnp.float32)
  assert _full_residuals(lambda x: ops.softcap(x, 30.0), big) == 1
  norm = gemma2.Gemma2RMSNorm()
  w = norm.init(jax.random.key(0), big)
  assert _full_residuals(lambda x: norm.apply(w, x), big) == 1


def test_adapters_specs_and_config_checks():
  """Adapter presets find Llama's paths; every parameter has a logical spec; bad configs are
  refused with the field named."""
  config = gemma2.config_from_hf({**TINY, "initializer_range": 0.3})
  model = gemma2.Gemma2ForCausalLM(config)
  params = gemma2.init_params(model, jax.random.key(0))
  n = config.num_hidden_layers
  assert adapters_lib.find_targets(params, "qv", family=gemma2) == [
      f"model/layers_{i}/self_attn/{p}" for i in range(n) for p in ("q_proj", "v_proj")]
  assert len(adapters_lib.find_targets(params, "all_linear", family=gemma2)) == 7 * n
  specs = gemma2.param_logical_specs(model)
  flat = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: x is None or (
      isinstance(x, tuple) and not isinstance(x, dict)))
  assert len(flat) == len(jax.tree_util.tree_leaves(params))
  for path, spec in flat:
    assert spec is not None and any(a is not None for a in spec), jax.tree_util.keystr(path)
  layer = specs["model"]["layers_0"]
  assert tuple(layer["pre_feedforward_layernorm"]["scale"]) == ("embed",)
  assert tuple(layer["self_attn"]["q_proj"]["kernel"]) == ("embed", "joined_kv")
  # config.json round trip, and the refusals.
  assert gemma2.config_from_hf(gemma2.config_to_hf(config)) == config
  with pytest.raises(ValueError, match="model_type"):
    gemma2.config_from_hf({**TINY, "model_type": "llama"})
  with pytest.raises(ValueError, match="use_bidirectional_attention"):
    gemma2.config_from_hf({**TINY, "use_bidirectional_attention": True})
  with pytest.raises(ValueError, match="layer_types"):
    gemma2.config_from_hf({**TINY, "layer_types": ["sliding_attention"]})
  with pytest.raises(ValueError, match="attn_logit_softcapping"):
    gemma2.config_from_hf({**TINY, "attn_logit_softcapping": 0.0})
  with pytest.raises(ValueError, match="qk_norm"):
    dataclasses.replace(config, qk_norm=True)


def test_missing_feedforward_norm_names_file_and_key(tmp_path):
  config = gemma2.config_from_hf(TINY)
  model = gemma2.Gemma2ForCausalLM(config)
  ckpt = hf.save_pretrained(model, gemma2.init_params(model, jax.random.key(0)),
                            tmp_path / "ckpt")
  weights = ckpt / hf.SAFETENSORS_NAME
  tensors = safetensors.numpy.load_file(str(weights))
  key = "model.layers.1.post_feedforward_layernorm.weight"
  safetensors.numpy.save_file({k: v for k, v in tensors.items() if k != key}, str(weights),
                              metadata={"format": "pt"})
  with pytest.raises(hf.CheckpointError, match=rf"{weights}.*{key}"):
    hf.from_pretrained(ckpt)
  safetensors.numpy.save_file({**tensors, "model.layers.0.extra.weight": tensors[key]},
                              str(weights), metadata={"format": "pt"})
  with pytest.raises(hf.CheckpointError, match=r"unexpected tensor 'model.layers.0.extra"):
    hf.from_pretrained(ckpt)


# ----------------------------------------------------------------------------- the driver

# Hidden 64, a head_dim of 24 (heads * head_dim = 96 != hidden), a window of 8 slots under
# prompts of up to 32 tokens (du.FAST), both caps; the special ids are the tiny tokenizer's.
TINY_GEMMA2 = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 512,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6, "sliding_window": 8, "query_pre_attn_scalar": 16,
    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
    "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1,
}
# A pretrained-style config (SmolLM2's, configs/smollm2_cl.py) made small: synthetic data,
# the tiny Gemma 2, two tasks of two steps, generation.
SMALL = ["--config=configs/smollm2_cl.py", *du.FAST, "--config.optim.max_steps_per_task=2",
         "--config.eval.max_new_tokens=4", "--config.checkpoint.every_steps=0",
         "--config.plots=False", "--config.optim.learning_rate=0.05"]


def tiny_gemma2(tmp: pathlib.Path, saved: bool = False) -> list[str]:
  """Overrides for a tiny Gemma 2 with du.tiny_llama's tokenizer (a BOS `<s>`): random weights
  from its config.json, or (`saved`) a checkpoint directory `hf.save_pretrained` wrote."""
  du.tiny_llama(tmp)
  src, d = tmp / "tiny_llama", tmp / ("saved_gemma2" if saved else "tiny_gemma2")
  bos = json.loads((src / "config.json").read_text())["bos_token_id"]
  config = dict(TINY_GEMMA2, bos_token_id=bos)
  if saved:
    model = gemma2.make_model(gemma2.config_from_hf(config))
    hf.save_pretrained(model, gemma2.init_params(model, jax.random.key(0)), d)
  d.mkdir(parents=True, exist_ok=True)
  for f in src.iterdir():
    if f.name != "config.json":
      shutil.copy(f, d / f.name)
  if not saved:
    (d / "config.json").write_text(json.dumps(config))
  return [f"--config.model.path={d}", f"--config.model.random_init={not saved}",
          "--config.model.family=gemma2"]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  return tmp_path_factory.mktemp("gemma2")


@pytest.fixture(scope="module")
def lbcl_run(tmp):
  """A finished two-task lbcl run of `python -m lbcl_jax.main --config=configs/smollm2_cl.py`
  on a saved checkpoint directory of the tiny Gemma 2 (its weights loaded)."""
  workdir = tmp / "lbcl"
  du.run_main(workdir, *SMALL, *tiny_gemma2(tmp, saved=True), "--config.method=lbcl")
  return workdir


def _check_run(r, joint=False):
  m = r["accuracy_matrix"]
  assert r["config"]["model"]["family"] == "gemma2" and r["config"]["eval"]["mode"] == "generate"
  assert len(m) == (1 if joint else 2) and all(len(row) == 2 for row in m)
  assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in m[-1])
  assert all(np.isfinite(v) for curve in r["losses"].values() for _, v in curve)


def test_main_runs_lbcl_on_a_saved_gemma2(lbcl_run):
  r = json.loads((lbcl_run / "results.json").read_text())
  _check_run(r)
  assert r["config"]["model"]["random_init"] is False  # the saved weights were loaded
  assert r["sensitivity"]  # LB-CL's sensitivity pass ran on the second task


# lbcl runs through `main` above; SeqFT (which trains the base, not adapters) here. Every other
# method of `methods.METHODS` passes too, but all of them took 150 s on 2 busy cores, over this
# file's budget: `sorted(set(methods.METHODS) - {"lbcl"})` runs them all.
DRIVER_METHODS = ("seqft",)


@pytest.mark.parametrize("name", DRIVER_METHODS)
def test_method_through_the_driver(tmp, name):
  """Another method on two tasks, in process (lbcl: test_main_runs_lbcl_on_a_saved_gemma2)."""
  assert name in methods.METHODS
  overrides = [*du.FAST, *tiny_gemma2(tmp), "--config.optim.max_steps_per_task=1",
               "--config.eval.max_new_tokens=3", "--config.checkpoint.every_steps=0",
               "--config.plots=False", "--config.data.max_test_examples=8"]
  r = train.train_and_evaluate(du.make_config(*overrides, f"--config.method={name}"),
                               str(tmp / f"method_{name}"))
  _check_run(r, joint=BATTERY[name].joint)
  assert bool(r["sensitivity"]) == BATTERY[name].injects


def _export_inputs():
  rng = np.random.RandomState(0)
  ids = rng.randint(3, 400, (2, 13))
  mask = np.ones_like(ids)
  mask[1, :4] = 0  # left padding
  return ids, mask


def _theirs(torch, model):
  ids, mask = _export_inputs()
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(hf_positions(mask))).logits.float().numpy()


def _ours(run):
  ids, mask = _export_inputs()
  return np.asarray(run.backbone.model.apply({"params": run.merged_params()}, ids, mask)), mask


def test_export_merged_and_peft_load_in_transformers(lbcl_run, tmp, torch, transformers):
  from lbcl_jax import export  # pylint: disable=g-import-not-at-top
  run = export.load_run(lbcl_run)
  expected, mask = _ours(run)
  merged = export.export_run(lbcl_run, tmp / "merged")
  ref = transformers.Gemma2ForCausalLM.from_pretrained(str(merged),
                                                       attn_implementation="eager").eval()
  assert rel_diff(expected, _theirs(torch, ref), mask) < 1e-5
  run.adapters = None  # the adapters changed the model, so the match says something of them
  assert rel_diff(_ours(run)[0], expected, mask) > 1e-4
  peft = pytest.importorskip("peft")
  out = export.export_run(lbcl_run, tmp / "peft", fmt="peft")
  base = transformers.Gemma2ForCausalLM.from_pretrained(str(out / "base"),
                                                        attn_implementation="eager")
  model = peft.PeftModel.from_pretrained(base, str(out / "stage_1"), adapter_name="stage_1")
  model.load_adapter(str(out / "stage_2"), adapter_name="stage_2")
  model.base_model.set_adapter(["stage_1", "stage_2"])
  model.eval()
  assert rel_diff(expected, _theirs(torch, model), mask) < 1e-5


def test_every_parameter_is_sharded_on_8_devices(tmp):
  """On 8 fake devices (data 2 x fsdp 2 x tensor 2), every Gemma 2 parameter gets a sharding
  from its logical spec that splits it over at least one mesh axis."""
  tiny_gemma2(tmp)
  code = f"""
import json, jax
from lbcl_jax import sharding
from lbcl_jax.models import gemma2
import driver_utils as du
config = du.make_config("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")
cfg = json.loads(open({str(tmp / 'tiny_gemma2' / 'config.json')!r}).read())
model = gemma2.make_model(gemma2.config_from_hf(cfg))
mesh = sharding.make_mesh(config.mesh)
assert mesh.devices.size == 8
shardings = sharding.logical_to_sharding(gemma2.param_logical_specs(model),
                                         gemma2.abstract_params(model), mesh,
                                         config.mesh.logical_axis_rules)
out = {{jax.tree_util.keystr(path): [a for a in s.spec if a is not None]
       for path, s in jax.tree_util.tree_leaves_with_path(shardings)}}
print("SPECS=" + json.dumps(out))
"""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"),
                                       env.get("PYTHONPATH", "")])
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("SPECS=")][-1]
  specs = json.loads(line[len("SPECS="):])
  config = gemma2.config_from_hf(TINY_GEMMA2)
  # Embedding, final norm, and per layer 4 attention kernels, 3 MLP kernels and 4 norms.
  assert len(specs) == 2 + config.num_hidden_layers * 11
  assert not [p for p, axes in specs.items() if not axes], specs


def test_sharded_losses_equal_single_device(tmp):
  """Two lbcl tasks on a mesh splitting all three axes (2 x 2 x 2) train as on one device: the
  activation constraints (soft-capped scores and logits, four norms a layer) are consistent."""
  args = [*du.FAST, *tiny_gemma2(tmp), "--config.optim.max_steps_per_task=2",
          "--config.plots=False", "--config.checkpoint.every_steps=0", "--config.eval.mode=rank",
          "--config.data.max_source_length=16", "--config.optim.num_epochs=2"]
  ref = du.run_losses_subprocess(tmp / "one", args, {"one": ["--config.mesh.data=1"]}, 1)["one"]
  assert sum(len(v) for v in ref.values()) == 4
  mixed = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
  got = du.run_losses_subprocess(tmp / "eight", args, {"mixed": mixed}, 8)["mixed"]
  assert got.keys() == ref.keys()
  for task in ref:
    # Sharded reductions sum in another order: equal up to f32 rounding.
    np.testing.assert_allclose(np.asarray(got[task])[:, 1], np.asarray(ref[task])[:, 1],
                               rtol=2e-6, atol=1e-6, err_msg=f"task {task}")
