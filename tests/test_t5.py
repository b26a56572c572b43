"""Parity of lbcl_jax's Flax T5 with Hugging Face's PyTorch T5 (CPU, f32), decoding, dtypes."""

import dataclasses
import functools
import json
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_shared
from lbcl_jax.models import hf
from lbcl_jax.models import t5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Padded batch: rows of different lengths, EOS-terminated, pad id 0.
SRC = np.array([[5, 6, 7, 8, 9, 10, 11, 1],
                [12, 13, 14, 1, 0, 0, 0, 0],
                [20, 21, 22, 23, 24, 1, 0, 0]], np.int64)
DEC = np.array([[0, 3, 4, 5, 6],
                [0, 7, 8, 0, 0],
                [0, 9, 10, 11, 0]], np.int64)
MAX_NEW = 12

# greedy_generate is pure; jitted here (once per model / length / shapes) as callers do.
generate = jax.jit(t5.greedy_generate, static_argnums=(0, 4))

# name -> (HF T5Config kwargs, seed, gain of the block weights, EOS-row scale). The seeds
# and scales were picked so greedy generations are varied and some rows stop at EOS.
VARIANTS = {
    "v1_0": (dict(feed_forward_proj="relu", tie_word_embeddings=True), 0, 2.0, 1.5),
    "v1_1": (dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False), 3, 1.0, 1.5),
    # Deeper decoder than encoder; HF's generate cannot cache that, so logits only.
    "v1_1_asym": (dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                       num_decoder_layers=3), 1, 1.0, 1.0),
}


def randomize_hf_t5(model, seed, gain=1.0, eos_scale=1.0, rel_std=1.0, head_std=1.0):
  """Random weights with enough spread that generations are not constant or EOS at once.

  transformers 5 ties lm_head to shared even for tie_word_embeddings=False: a fresh
  Parameter unties it (and it is then saved as a separate tensor).
  """
  torch.manual_seed(seed)
  if not model.config.scale_decoder_outputs:
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("layer_norm.weight"):
        p.uniform_(0.5, 1.5)
      elif "relative_attention_bias" in name:
        p.normal_(0.0, rel_std)
      elif name == "shared.weight":
        p.normal_(0.0, 1.0)
      elif name == "lm_head.weight":
        p.normal_(0.0, head_std)
      else:
        p.normal_(0.0, gain * p.shape[1]**-0.5)
    head = model.shared.weight if model.config.scale_decoder_outputs else model.lm_head.weight
    head[1] *= eos_scale  # More EOS.
  return model.eval()


def build_hf_t5(config):
  """HF model with uninitialised weights (HF's own init is slow and replaced anyway)."""
  with torch.device("meta"):
    model = transformers.T5ForConditionalGeneration(config)
  model = model.to_empty(device="cpu")
  model.tie_weights()  # to_empty() breaks the sharing of shared/embed_tokens.
  return model


def tiny_hf_t5(seed=0, gain=1.0, eos_scale=1.0, **overrides):
  kwargs = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=16,
                decoder_start_token_id=0)
  kwargs.update(overrides)
  return randomize_hf_t5(build_hf_t5(transformers.T5Config(**kwargs)), seed, gain, eos_scale)


def hf_forward(hf_model, src, dec, dec_mask=None):
  with torch.no_grad():
    out = hf_model(input_ids=torch.tensor(src), attention_mask=torch.tensor(src > 0).long(),
                   decoder_input_ids=torch.tensor(dec),
                   decoder_attention_mask=None if dec_mask is None else torch.tensor(dec_mask))
  return out.encoder_last_hidden_state.numpy(), out.logits.numpy()


def hf_generate(hf_model, src, max_new_tokens, pad_id=0):
  """HF greedy ids without the start token, padded to max_new_tokens like ours."""
  with torch.no_grad():
    ids = hf_model.generate(input_ids=torch.tensor(src),
                            attention_mask=torch.tensor(src > 0).long(), do_sample=False,
                            num_beams=1, max_new_tokens=max_new_tokens).numpy()[:, 1:]
  return np.pad(ids, ((0, 0), (0, max_new_tokens - ids.shape[1])), constant_values=pad_id)


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, src, src_mask, dec, dec_mask):
  """(encoder outputs, logits), compiled once per model config and shapes."""
  def run(module):
    enc = module.encode(src, src_mask)
    return enc, module.decode(dec, enc, src_mask, dec_mask)
  return model.apply({"params": params}, method=run)


_LOADED = {}


def load_variant(name, tmp_path_factory):
  """(name, HF model, our model, our params), built once per module run."""
  if name not in _LOADED:
    overrides, seed, gain, eos_scale = VARIANTS[name]
    hf_model = tiny_hf_t5(seed, gain, eos_scale, **overrides)
    path = tmp_path_factory.mktemp(name)
    hf_model.save_pretrained(path)
    _LOADED[name] = (name, hf_model) + hf.from_pretrained(path)
  return _LOADED[name]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
  return load_variant(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def v1_1(tmp_path_factory):
  return load_variant("v1_1", tmp_path_factory)


def test_matches_hf_encoder_logits_and_generation(variant):
  name, hf_model, model, params = variant
  cfg = model.config
  assert cfg.tie_word_embeddings == (name == "v1_0")
  assert ("lm_head" in params) == (name != "v1_0")
  dec_mask = (DEC > 0) | (np.arange(DEC.shape[1]) == 0)
  want_enc, want_logits = hf_forward(hf_model, SRC, DEC, dec_mask.astype(np.int64))
  src, src_mask = jnp.asarray(SRC), jnp.asarray(SRC > 0)
  enc, logits = forward(model, params, src, src_mask, jnp.asarray(DEC), jnp.asarray(dec_mask))
  np.testing.assert_allclose(np.asarray(enc), want_enc, atol=1e-4, rtol=0)
  # Positions a padded decoder row never uses are not compared.
  real = np.broadcast_to(dec_mask[..., None], want_logits.shape)
  assert np.abs(np.asarray(logits) - want_logits)[real].max() <= 1e-4
  assert np.abs(want_logits).max() > 1.0  # Not a degenerate model.

  if name.endswith("asym"):
    return
  want_ids = hf_generate(hf_model, SRC, MAX_NEW)
  got_ids = np.asarray(generate(model, params, src, src_mask, MAX_NEW))
  assert got_ids.dtype == np.int32 and got_ids.shape == (SRC.shape[0], MAX_NEW)
  np.testing.assert_array_equal(got_ids, want_ids)
  # Non-trivial: varied tokens, an EOS after the first step, padding after it, and a row
  # that runs to the end.
  assert len(set(got_ids.ravel().tolist())) > 4
  eos_rows = [r for r in got_ids if cfg.eos_token_id in r.tolist()]
  assert eos_rows and all(r.tolist().index(cfg.eos_token_id) > 0 for r in eos_rows)
  for r in eos_rows:
    assert set(r[r.tolist().index(cfg.eos_token_id) + 1:].tolist()) <= {cfg.pad_token_id}
  assert any(cfg.eos_token_id not in r.tolist() for r in got_ids)


def test_loss_and_shift_right_match_hf(variant):
  _, hf_model, model, params = variant
  cfg = model.config
  labels = np.array([[3, 4, 5, 6, 1], [7, 1, -100, -100, -100], [9, 10, 11, 1, -100]],
                    np.int64)
  with torch.no_grad():
    want = hf_model(input_ids=torch.tensor(SRC), attention_mask=torch.tensor(SRC > 0).long(),
                    labels=torch.tensor(labels))
  dec = t5.shift_right(jnp.asarray(labels), cfg.decoder_start_token_id, cfg.pad_token_id)
  np.testing.assert_array_equal(np.asarray(dec),
                                hf_model._shift_right(torch.tensor(labels)).numpy())
  _, logits = forward(model, params, jnp.asarray(SRC), jnp.asarray(SRC > 0), dec,
                      jnp.ones(dec.shape, bool))
  loss = t5.seq2seq_loss(logits, jnp.asarray(labels), jnp.asarray(labels != -100))
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), want.loss.item(), rtol=1e-5)


def test_decode_cache_matches_teacher_forcing(variant):
  _, _, model, params = variant
  src, src_mask, dec = jnp.asarray(SRC), jnp.asarray(SRC > 0), jnp.asarray(DEC)
  enc, full = forward(model, params, src, src_mask, dec, jnp.ones(dec.shape, bool))
  cache = jax.jit(t5.init_decode_cache, static_argnums=(0, 4))(model, params, enc, src_mask, 8)
  step = jax.jit(lambda c, tok: t5.decode_step(model, params, c, tok, enc, src_mask))
  # A 2-token prefill, then one token at a time.
  logits, cache = step(cache, dec[:, :2])
  pieces = [logits]
  for i in range(2, dec.shape[1]):
    logits, cache = step(cache, dec[:, i:i + 1])
    pieces.append(logits)
  cached = jnp.concatenate(pieces, axis=1)
  np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=1e-4, rtol=0)
  flat = flax.traverse_util.flatten_dict(cache)
  index = [v for k, v in flat.items() if k[-1] == "cache_index"]
  assert index and all(int(i) == dec.shape[1] for i in index)
  assert all(v.shape[1] == 8 for k, v in flat.items()
             if k[-1] == "cached_key" and "SelfAttention" in k)


def test_generate_inside_jit_and_intercept_methods(v1_1):
  """An interceptor adding low-rank deltas gives what the merged kernels give."""
  _, _, model, params = v1_1
  src, src_mask = jnp.asarray(SRC), jnp.asarray(SRC > 0)

  flat = flax.traverse_util.flatten_dict(params)
  rng = np.random.default_rng(0)
  deltas = {}
  for path, kernel in flat.items():
    name = "/".join(path[:-1])
    if re.match(t5.ADAPTER_TARGETS, name):
      deltas[name] = jnp.asarray(rng.normal(0, 0.5, kernel.shape), jnp.float32)
  assert len(deltas) == 2 * 2 + 2 * 2 * 2  # Encoder self q,v; decoder self+cross q,v.
  merged = flax.traverse_util.unflatten_dict(
      {p: v + deltas.get("/".join(p[:-1]), 0.0) for p, v in flat.items()})

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    name = "/".join(context.module.path)
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__" and (
        name in deltas):
      out = out + args[0] @ deltas[name]
    return out

  # Compiled (and cached) by the parity test already.
  base = generate(model, params, src, src_mask, MAX_NEW)
  want = generate(model, merged, src, src_mask, MAX_NEW)
  assert not np.array_equal(np.asarray(base), np.asarray(want))

  # The interceptor is entered inside the jitted function, so it is traced in.
  @jax.jit
  def generate_with_adapters(p, ids, mask):
    with nn.intercept_methods(interceptor):
      return t5.greedy_generate(model, p, ids, mask, MAX_NEW)

  np.testing.assert_array_equal(np.asarray(generate_with_adapters(params, src, src_mask)),
                                np.asarray(want))


def test_bf16_compute_close_to_f32(v1_1):
  _, _, model, params = v1_1
  model16 = t5.T5(dataclasses.replace(model.config, dtype=jnp.bfloat16))
  src, src_mask, dec = jnp.asarray(SRC), jnp.asarray(SRC > 0), jnp.asarray(DEC)
  ones = jnp.ones(dec.shape, bool)
  ref_enc, ref = (np.asarray(x) for x in forward(model, params, src, src_mask, dec, ones))
  enc, out = forward(model16, params, src, src_mask, dec, ones)
  assert out.dtype == jnp.bfloat16 and enc.dtype == jnp.bfloat16
  for got, want in ((enc, ref_enc), (out, ref)):
    got = np.asarray(got, np.float32)
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.999


def test_param_paths_specs_and_targets():
  config = t5.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=24, num_layers=2,
                       num_decoder_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
                       tie_word_embeddings=False)
  model = t5.T5(config)
  params = t5.abstract_params(model)
  names = {"/".join(p) for p in flax.traverse_util.flatten_dict(params)}
  for must in ("shared/embedding", "lm_head/kernel", "encoder/final_layer_norm/scale",
               "encoder/block_0/layer_0/SelfAttention/relative_attention_bias/embedding",
               "encoder/block_1/layer_1/DenseReluDense/wi_0/kernel",
               "decoder/block_0/layer_1/EncDecAttention/q/kernel",
               "decoder/block_0/layer_2/DenseReluDense/wo/kernel"):
    assert must in names
  assert not any("block_1/layer_0/SelfAttention/relative_attention_bias" in n for n in names)
  modules = {n.rsplit("/", 1)[0] for n in names if n.endswith("/kernel")}
  assert len([m for m in modules if re.match(t5.ADAPTER_TARGETS, m)]) == 2 * 2 + 4
  linear = [m for m in modules if re.match(t5.ALL_LINEAR_TARGETS, m)]
  assert len(linear) == 2 * (4 + 3) + (8 + 3)
  assert "lm_head" not in linear
  specs = flax.traverse_util.flatten_dict(
      t5.param_logical_specs(model),
      is_leaf=lambda _, x: isinstance(x, jax.sharding.PartitionSpec))
  allowed = {"vocab", "embed", "joined_kv", "heads", "kv", "mlp", "relpos_buckets"}
  assert set(specs) == set(flax.traverse_util.flatten_dict(params))
  for path, spec in specs.items():
    leaf = flax.traverse_util.flatten_dict(params)[path]
    assert len(spec) == leaf.ndim and set(spec) <= allowed, (path, spec)
  assert tuple(specs[("encoder", "block_0", "layer_0", "SelfAttention", "q", "kernel")]) == (
      "embed", "joined_kv")



def test_init_params():
  config = t5.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=2)
  model = t5.T5(config)
  # rbg keys: with threefry XLA-CPU compiles every random draw slowly.
  params = t5.init_params(model, jax.random.key(0, impl="rbg"), batch=2, src_len=4, tgt_len=3)
  is_boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)
  assert not any(is_boxed(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_boxed))
  assert "lm_head" not in params
  shapes = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), params)
  assert shapes == jax.tree_util.tree_map(lambda x: (x.shape, x.dtype),
                                          t5.abstract_params(model))
  emb = np.asarray(params["shared"]["embedding"])
  assert abs(emb.std() - 1.0) < 0.1  # HF's init scale for the shared table.


def test_dropout_only_when_not_deterministic(v1_1):
  _, _, model, params = v1_1
  src, src_mask, dec = jnp.asarray(SRC), jnp.asarray(SRC > 0), jnp.asarray(DEC)
  _, det = forward(model, params, src, src_mask, dec, jnp.ones(dec.shape, bool))
  drop = jax.jit(lambda p, rng: model.apply({"params": p}, src, src_mask, dec,
                                            deterministic=False, rngs={"dropout": rng}))
  a, b = drop(params, jax.random.key(1, impl="rbg")), drop(params, jax.random.key(2, impl="rbg"))
  assert not np.allclose(np.asarray(a), np.asarray(det))
  assert not np.allclose(np.asarray(a), np.asarray(b))


def test_flan_t5_small_shape_matches_hf(tmp_path):
  cfg = json.loads(require_shared("t5_tokenizer", "flan-t5-small", "config.json").read_text())
  # Milder weights than the tiny models: 8 random layers are otherwise so ill-conditioned
  # that HF's own f32 result is 1e-4 away from its f64 result.
  hf_model = randomize_hf_t5(
      build_hf_t5(transformers.T5Config(**cfg)), seed=0, gain=0.5,
      rel_std=0.2, head_std=cfg["d_model"]**-0.5)
  hf_model.save_pretrained(tmp_path)
  model, params = hf.from_pretrained(tmp_path)
  assert model.config.d_model == 512 and model.config.num_layers == 8
  assert model.config.vocab_size == 32128 and not model.config.tie_word_embeddings
  src = np.array([[13959, 1566, 12, 2968, 10, 37, 629, 1], [37, 629, 19, 1627, 5, 1, 0, 0]])
  dec = np.array([[0, 644, 4598], [0, 229, 0]])
  want_enc, want_logits = hf_forward(hf_model, src, dec)
  enc, logits = forward(model, params, jnp.asarray(src), jnp.asarray(src > 0),
                        jnp.asarray(dec), None)
  np.testing.assert_allclose(np.asarray(enc), want_enc, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(logits), want_logits, atol=1e-4, rtol=0)
  got = generate(model, params, jnp.asarray(src), jnp.asarray(src > 0), 3)
  np.testing.assert_array_equal(np.asarray(got), hf_generate(hf_model, src, 3))
