"""Flax (linen) Llama decoder that computes what Hugging Face's PyTorch `LlamaForCausalLM` does.

Covers the Llama architecture as HF's `LlamaConfig` describes it: RMSNorm (statistics in f32),
rotary position embeddings with `rope_theta` (HF's "default" rope type, the rotate-half
layout), grouped-query attention (`num_key_value_heads` <= `num_attention_heads`, each key/value
head shared by consecutive query heads as HF's `repeat_kv`), a SwiGLU feed-forward
(`down(silu(gate(x)) * up(x))`) and an lm_head that is either its own matrix or the token
embedding (`tie_word_embeddings`). SmolLM2, TinyLlama and Llama 2 checkpoints are of this kind.

Three switches of `LlamaConfig` make the same module the Qwen2, Qwen3 and Mistral decoders
(`qwen2.py`, `qwen3.py`, `mistral.py` map their config.json to them): an o_proj bias unlike
q/k/v's (`attention_out_bias`), per-head RMSNorm on queries and keys (`qk_norm`), and a sliding
attention window on some or all layers (`sliding_window`, `layer_types`). The HF state-dict
conversion they share is `llama_hf`.

Module paths mirror Hugging Face's parameter names so that adapter regexes read the same in both
(adapters intercept `nn.Dense` calls by module path)::

  model/embed_tokens                                  nn.Embed, param `embedding` (vocab, hidden)
  model/layers_{i}/input_layernorm                    param `scale`
  model/layers_{i}/self_attn/{q_proj,k_proj,v_proj,o_proj}   nn.Dense (bias iff attention_bias;
                                                      o_proj's iff attention_out_bias)
  model/layers_{i}/self_attn/{q_norm,k_norm}          qk_norm only, param `scale` (head_dim)
  model/layers_{i}/post_attention_layernorm           param `scale`
  model/layers_{i}/mlp/{gate_proj,up_proj,down_proj}  nn.Dense (bias iff mlp_bias)
  model/norm                                          param `scale`
  lm_head                                             untied only, kernel (hidden, vocab)

Dense kernels use Flax's `(d_in, d_out)` layout, i.e. the transpose of HF's `weight`.

Logical axis names (the names the other families use, see `config_lib.logical_axis_rules`).
  Parameters: 'vocab' (embedding rows, lm_head columns), 'embed' (hidden size, norm scales),
  'joined_kv' (heads * head_dim of q/k/v/o), 'mlp' (intermediate size), 'kv' (head_dim of
  the q/k norm scales).
  Activations: 'activation_batch', 'activation_length', 'activation_embed' for hidden states,
  'activation_heads', 'activation_kv' for per-head queries/keys/values, 'activation_mlp' for
  the feed-forward hidden layer, 'activation_vocab' for logits.

Positions. Like HF's `generate`, positions are counted over real tokens only:
`cumsum(attention_mask) - 1` (0 at padding), so a left-padded row computes what the same row
unpadded does. (HF's plain forward uses `0..L-1` unless given `position_ids`; pass those to HF
to compare padded batches.)

Decoding uses a fixed-size KV cache in the flax 'cache' collection. `decode=True` appends the
given tokens to the cache (creating it on the first call, with `max_decode_length` slots), with
their own attention mask; positions continue from the number of real tokens cached so far. See
`prefill`, `decode_step` and `greedy_generate`. The cache keeps every slot, so a sliding window
is only a mask (over slots, as HF counts cache positions) in decoding as in the full forward.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lbcl_jax.models import hf
from lbcl_jax.models import llama_hf
from lbcl_jax.models import ops

Array = jax.Array
DType = Any

# A layer path's transformer block (`injection.TopBlocks`): the decoder's `layers_{i}`.
BLOCK_PATTERN = r"(?P<stack>model)/layers_(?P<index>\d+)/"
# q and v of every self-attention, the LoRA/O-LoRA default.
ADAPTER_TARGETS = r"(^|.*/)self_attn/(q_proj|v_proj)$"
# Every linear of the decoder layers (the lm_head excluded): attention q/k/v/o and the SwiGLU.
ALL_LINEAR_TARGETS = (
    r"(^|.*/)(self_attn/(q_proj|k_proj|v_proj|o_proj)|mlp/(gate_proj|up_proj|down_proj))$"
)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)

_HIDDEN = ("activation_batch", "activation_length", "activation_embed")
_HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_kv")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Llama hyper-parameters; names and defaults follow HF's `LlamaConfig`.

  Attributes:
    num_key_value_heads: None means `num_attention_heads` (plain multi-head attention).
    head_dim: None means `hidden_size // num_attention_heads`.
    eos_token_id: one id or a tuple of ids (any of them ends a generation).
    dtype: compute dtype (activations, matmuls); softmax and RMSNorm statistics run in f32
      and logits are returned in f32.
    param_dtype: dtype the parameters are created/stored in.
    remat: what each decoder layer keeps for the backward pass, a key of
      `ops.REMAT_POLICIES` ("none", "weights", "full"); not a Hugging Face field.
    dot_dtype: operand dtype of the Dense layers' matmuls, a key of `ops.DOT_DTYPES` ("": the
      compute dtype; "bfloat16": bf16 operands, f32 accumulation); not a Hugging Face field.

  Switches of the other decoders built on this module (Llama checkpoints leave them unset):
    attention_out_bias: whether o_proj has a bias; None means `attention_bias` (Qwen2 has
      q/k/v biases and none on o_proj).
    qk_norm: RMSNorm over head_dim of every query and key head before the rotary embedding
      (Qwen3's `q_norm`/`k_norm`, one scale of `head_dim` shared by the heads).
    sliding_window: a query at slot q sees keys at slots k with `q - sliding_window < k <= q`
      (HF's `sliding_window_overlay`: itself and the `sliding_window - 1` slots before it);
      slots count padding too, as HF's cache positions do. None: no window.
    layer_types: per layer "sliding_attention" (windowed, if `sliding_window` is set) or
      "full_attention"; None means every layer windowed when `sliding_window` is set (Mistral)
      and full otherwise. Qwen2/Qwen3 derive it from `max_window_layers`.
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: Optional[int] = None
  head_dim: Optional[int] = None
  hidden_act: str = "silu"
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  attention_bias: bool = False
  attention_dropout: float = 0.0
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02  # std of the normal init, as HF (random-weight models only)
  bos_token_id: Optional[int] = 1
  eos_token_id: Union[int, tuple[int, ...], None] = 2
  pad_token_id: Optional[int] = None
  attention_out_bias: Optional[bool] = None
  qk_norm: bool = False
  sliding_window: Optional[int] = None
  layer_types: Optional[tuple[str, ...]] = None
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  remat: str = "none"
  dot_dtype: str = ""

  def __post_init__(self):
    if self.attention_out_bias is None:
      object.__setattr__(self, "attention_out_bias", self.attention_bias)
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"sliding_window {self.sliding_window} must be positive (or None)")
    if self.layer_types is None:
      kind = "full_attention" if self.sliding_window is None else "sliding_attention"
      object.__setattr__(self, "layer_types", (kind,) * self.num_hidden_layers)
    object.__setattr__(self, "layer_types", tuple(self.layer_types))  # hashable
    if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= {
        "full_attention", "sliding_attention"}:
      raise ValueError(f"layer_types {self.layer_types} must give 'full_attention' or "
                       f"'sliding_attention' for each of the {self.num_hidden_layers} layers")
    if self.remat not in ops.REMAT_POLICIES:
      raise ValueError(f"remat {self.remat!r} is not one of {sorted(ops.REMAT_POLICIES)}")
    if self.dot_dtype not in ops.DOT_DTYPES:
      raise ValueError(f"dot_dtype {self.dot_dtype!r} is not one of {ops.DOT_DTYPES}")
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                         f"num_attention_heads {self.num_attention_heads}")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if isinstance(self.eos_token_id, list):  # keep the config hashable (jit static argument)
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads {self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
    if self.hidden_act not in ops.ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of "
                       f"{sorted(ops.ACTIVATIONS)}")

  @property
  def layer_windows(self) -> tuple[Optional[int], ...]:
    """Each layer's attention window (None: full causal attention)."""
    return tuple(self.sliding_window if t == "sliding_attention" else None
                 for t in self.layer_types)

  @property
  def num_groups(self) -> int:
    """Query heads per key/value head."""
    return self.num_attention_heads // self.num_key_value_heads

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    if isinstance(self.eos_token_id, int):
      return (self.eos_token_id,)
    return tuple(self.eos_token_id)


# ----------------------------------------------------------------------------- layers


def _normal(config: LlamaConfig, names: tuple[Optional[str], ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), names)


def _dense(config: LlamaConfig, features: int, names: tuple[str, str], use_bias: bool,
           name: str) -> nn.Dense:
  """A plain Dense (adapters intercept it by path) with logical axis names."""
  return nn.Dense(features, use_bias=use_bias, dtype=config.dtype,
                  param_dtype=config.param_dtype, kernel_init=_normal(config, names),
                  dot_general=ops.dense_dot_general(config.dot_dtype),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                         names[1:]),
                  name=name)


class LlamaRMSNorm(nn.Module):
  """`scale * x / sqrt(mean(x^2) + eps)`, statistics in f32 as HF's `LlamaRMSNorm`."""

  epsilon: float = 1e-6
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  axis_name: str = "embed"  # logical name of the normalised axis ('kv' for per-head norms)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale",
                       nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    # HF casts the normalised states back to the input dtype before scaling.
    return ops.rms_norm(x, scale, self.epsilon, False, self.dtype)


def rope_inv_freq(head_dim: int, theta: float) -> Array:
  """HF's default inverse frequencies `1 / theta^(2i / head_dim)`, f32 `[head_dim // 2]`."""
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (jnp.float32(theta) ** exponents)


def rotary_cos_sin(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """cos and sin `[B, L, head_dim]` (f32) of integer positions `[B, L]`, halves repeated."""
  freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates `x [B, L, H, D]` by the position angles (HF's rotate-half layout)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


class LlamaAttention(nn.Module):
  """Grouped-query self-attention with rotary positions and an optional KV cache.

  `mask` is boolean `[B, 1, Lq, Lk]` (True = may attend). In decode mode keys and values are
  written into fixed-size buffers at `cache_index` and the queries attend over the whole
  buffer (the mask hides unwritten and padded slots).
  """

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, mask: Array,
               deterministic: bool = True, decode: bool = False,
               cache_index: Optional[Array] = None) -> Array:
    cfg = self.config
    batch, length = x.shape[:2]
    n_heads, n_kv, d_head = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def project(n, name):
      y = _dense(cfg, n * d_head, ("embed", "joined_kv"), cfg.attention_bias, name)(x)
      return nn.with_logical_constraint(y.reshape(batch, length, n, d_head), _HEADS)

    def head_norm(y, name):
      # Qwen3: one RMSNorm over head_dim for every head, before the rotation.
      if not cfg.qk_norm:
        return y
      return LlamaRMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, axis_name="kv",
                          name=name)(y)

    query = apply_rotary(head_norm(project(n_heads, "q_proj"), "q_norm"), cos, sin)
    key = apply_rotary(head_norm(project(n_kv, "k_proj"), "k_norm"), cos, sin)
    value = project(n_kv, "v_proj")

    if decode:
      cache_len = mask.shape[-1]
      shape = (batch, cache_len, n_kv, d_head)
      cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, cfg.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, cfg.dtype)
      start = (0, cache_index, 0, 0)
      cached_key.value = lax.dynamic_update_slice(cached_key.value,
                                                  key.astype(cached_key.value.dtype), start)
      cached_value.value = lax.dynamic_update_slice(
          cached_value.value, value.astype(cached_value.value.dtype), start)
      key, value = cached_key.value, cached_value.value

    # Query head h uses key/value head h // num_groups, as HF's repeat_kv.
    query = query.reshape(batch, length, n_kv, cfg.num_groups, d_head)
    scores = self._scores(query, key.astype(cfg.dtype))
    # Masked keys get the lowest finite score (HF adds finfo.min): a padding query with no
    # visible key then attends uniformly instead of producing NaNs.
    probs = ops.softmax(scores, mask[:, :, None]).astype(cfg.dtype)
    probs = nn.Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, value.astype(cfg.dtype))
    out = nn.with_logical_constraint(out.reshape(batch, length, n_heads, d_head), _HEADS)
    out = out.reshape(batch, length, n_heads * d_head)
    return _dense(cfg, cfg.hidden_size, ("joined_kv", "embed"), cfg.attention_out_bias,
                  "o_proj")(out)

  def _scores(self, query: Array, key: Array) -> Array:
    """f32 attention logits `[B, kv heads, groups, Lq, Lk]` of grouped queries and keys before
    the mask (Gemma 2 overrides it: its own scaling and soft-capping)."""
    scores = jnp.einsum("bqkgd,bskd->bkgqs", query, key)
    return scores.astype(jnp.float32) * (self.config.head_dim ** -0.5)


class LlamaMLP(nn.Module):
  """SwiGLU feed-forward: `down_proj(act(gate_proj(x)) * up_proj(x))`."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    gate = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias, "gate_proj")(x)
    up = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias, "up_proj")(x)
    h = nn.with_logical_constraint(ops.gated(cfg.hidden_act, gate, up),
                                   ("activation_batch", "activation_length", "activation_mlp"))
    return _dense(cfg, cfg.hidden_size, ("mlp", "embed"), cfg.mlp_bias, "down_proj")(h)


class LlamaDecoderLayer(nn.Module):
  """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, deterministic=True, decode=False, cache_index=None):
    cfg = self.config

    def norm(name):
      return LlamaRMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)

    h = LlamaAttention(cfg, name="self_attn")(norm("input_layernorm")(x), cos, sin, mask,
                                              deterministic, decode, cache_index)
    x = nn.with_logical_constraint(x + h, _HIDDEN)
    h = LlamaMLP(cfg, name="mlp")(norm("post_attention_layernorm")(x))
    return nn.with_logical_constraint(x + h, _HIDDEN)


class LlamaModel(nn.Module):
  """Token embedding, the decoder layers and the final norm (HF's `LlamaModel`).

  Built in `setup` so that the parent can reuse `embed_tokens` as a tied lm_head; flax names
  the layer list `layers_0`, `layers_1`, ... as HF's `layers.{i}`.
  """

  config: LlamaConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype,
                                 embedding_init=_normal(cfg, ("vocab", "embed")))
    layer = LlamaDecoderLayer
    if cfg.remat != "none":
      # deterministic and decode are Python values (argument 0 is the module).
      layer = nn.remat(layer, policy=ops.REMAT_POLICIES[cfg.remat], static_argnums=(5, 6))
    self.layers = [layer(cfg) for _ in range(cfg.num_hidden_layers)]
    self.norm = LlamaRMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)

  def __call__(self, input_ids: Array, positions: Array, mask: Array, deterministic: bool = True,
               decode: bool = False, cache_index: Optional[Array] = None,
               window_mask: Optional[Array] = None) -> Array:
    """`window_mask`: the mask of the layers with a sliding window (`mask` for the others)."""
    cfg = self.config
    x = nn.with_logical_constraint(self.embed_tokens(input_ids), _HIDDEN)
    cos, sin = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    for layer, window in zip(self.layers, cfg.layer_windows):
      x = layer(x, cos, sin, mask if window is None else window_mask, deterministic, decode,
                cache_index)
    return self.norm(x)


def _positions_from_mask(mask: Array, offset: Optional[Array] = None) -> Array:
  """Positions counted over real tokens (HF's `cumsum(mask) - 1`, 0 at padding)."""
  positions = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1
  if offset is not None:
    positions = positions + offset[:, None]
  return jnp.where(mask, positions, 0)


class LlamaForCausalLM(nn.Module):
  """Llama with its language-modelling head; `__call__` returns f32 logits `[B, L, vocab]`.

  Call with `input_ids [B, L]`, optional `attention_mask [B, L]` (1 = real token; default all
  ones) and optional `position_ids [B, L]` (default: counted over real tokens, see the module
  docstring). Attention is causal and ignores padded keys.

  With `decode=True` (apply with `mutable=['cache']`) the tokens are appended to the KV cache:
  the first such call creates a cache of `max_decode_length` slots; `attention_mask` then
  covers only the new tokens, and default positions continue after the real tokens already
  cached. Appending more than `max_decode_length` tokens in total is not checked (the writes
  would be clamped by `dynamic_update_slice`).

  `logits_at [B, n]` (int positions) returns only those positions' logits `[B, n, vocab]`. The
  head is a quarter of SmolLM2's FLOPs per token, and training scores only the answer while
  generation needs only the prompt's last token, so the rest would be computed to be dropped.
  """

  config: LlamaConfig
  # The decoder body (embedding, layers, final norm); a family with its own body but this
  # bookkeeping and head (Gemma 2) replaces it.
  model_class = LlamaModel

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
               position_ids: Optional[Array] = None, *, deterministic: bool = True,
               decode: bool = False, max_decode_length: Optional[int] = None,
               logits_at: Optional[Array] = None) -> Array:
    cfg = self.config
    input_ids = jnp.asarray(input_ids)
    batch, length = input_ids.shape
    mask = (jnp.ones((batch, length), jnp.bool_) if attention_mask is None
            else jnp.asarray(attention_mask).astype(jnp.bool_))
    cache_index = None
    if decode:
      if not self.has_variable("cache", "cache_index") and max_decode_length is None:
        raise ValueError("the first decode=True call creates the cache and needs "
                         "max_decode_length")
      # Bookkeeping shared by all layers: next free slot, which slots hold real tokens, and
      # how many real tokens each row has cached (the next position).
      index_var = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      key_mask_var = self.variable("cache", "key_mask", jnp.zeros,
                                   (batch, max_decode_length or 0), jnp.bool_)
      count_var = self.variable("cache", "num_tokens", jnp.zeros, (batch,), jnp.int32)
      cache_index = index_var.value
      if position_ids is None:
        position_ids = _positions_from_mask(mask, count_var.value)
      key_mask = lax.dynamic_update_slice(key_mask_var.value, mask, (0, cache_index))
      cache_len = key_mask.shape[1]
      query_slots = cache_index + jnp.arange(length)
      key_slots = jnp.arange(cache_len)
      causal = key_slots[None, :] <= query_slots[:, None]  # [Lq, T]
      attn_mask = key_mask[:, None, None, :] & causal[None, None]
      index_var.value = cache_index + length
      key_mask_var.value = key_mask
      count_var.value = count_var.value + jnp.sum(mask, axis=-1, dtype=jnp.int32)
    else:
      if position_ids is None:
        position_ids = _positions_from_mask(mask)
      query_slots = key_slots = jnp.arange(length)
      causal = jnp.tril(jnp.ones((length, length), jnp.bool_))
      attn_mask = mask[:, None, None, :] & causal[None, None]
    window_mask = None
    if cfg.sliding_window is not None and any(w is not None for w in cfg.layer_windows):
      # HF's sliding_window_overlay on cache slots (padding included): k > q - window. The
      # cache keeps every slot, so decoding needs only this mask, no rolling buffer.
      recent = key_slots[None, :] > query_slots[:, None] - cfg.sliding_window
      window_mask = attn_mask & recent[None, None]

    model = self.model_class(cfg, name="model")
    hidden = model(input_ids, jnp.asarray(position_ids), attn_mask, deterministic, decode,
                   cache_index, window_mask)
    if logits_at is not None:
      hidden = jnp.take_along_axis(hidden, jnp.asarray(logits_at, jnp.int32)[..., None], axis=1)
    if cfg.tie_word_embeddings:
      logits = model.embed_tokens.attend(hidden)
    else:
      logits = _dense(cfg, cfg.vocab_size, ("embed", "vocab"), False, "lm_head")(hidden)
    logits = logits.astype(jnp.float32)
    return nn.with_logical_constraint(
        logits, ("activation_batch", "activation_length", "activation_vocab"))


def make_model(config: LlamaConfig) -> LlamaForCausalLM:
  return LlamaForCausalLM(config)


# ----------------------------------------------------------------------------- functions


def _dummy_inputs(batch: int = 1, length: int = 2):
  return jnp.ones((batch, length), jnp.int32), jnp.ones((batch, length), jnp.int32)


@functools.partial(jax.jit, static_argnums=(0,))
def _init_variables(model: LlamaForCausalLM, rng: Array) -> dict:
  # Module-level so repeated calls reuse the compiled init.
  return model.init(rng, *_dummy_inputs())


def init_params(model: LlamaForCausalLM, rng: Array) -> dict:
  """Random (HF-style init) parameters, unboxed: the nested dict below 'params'."""
  return nn.meta.unbox(_init_variables(model, rng)["params"])


def abstract_params(model: LlamaForCausalLM) -> dict:
  """Unboxed `jax.ShapeDtypeStruct` tree of the parameters, without allocating them."""
  boxed = jax.eval_shape(model.init, jax.random.key(0), *_dummy_inputs())
  return nn.meta.unbox(boxed["params"])


def param_logical_specs(model: LlamaForCausalLM) -> dict:
  """Logical `PartitionSpec` per parameter (same tree as the params)."""
  boxed = jax.eval_shape(model.init, jax.random.key(0), *_dummy_inputs())
  return nn.get_partition_spec(boxed)["params"]


def prefill(model: LlamaForCausalLM, params: Any, input_ids: Array, attention_mask: Array,
            max_decode_length: int, logits_at: Optional[Array] = None) -> tuple[Array, dict]:
  """Logits `[B, L, vocab]` of the prompt (`[B, n, vocab]` at `logits_at [B, n]`) and a new
  cache of `max_decode_length` slots."""
  logits, mutated = model.apply({"params": params}, input_ids, attention_mask, decode=True,
                                max_decode_length=max_decode_length, logits_at=logits_at,
                                mutable=["cache"])
  return logits, mutated["cache"]


def decode_step(model: LlamaForCausalLM, params: Any, cache: dict, input_ids: Array,
                attention_mask: Optional[Array] = None) -> tuple[Array, dict]:
  """Logits of `input_ids [B, T]` appended after the cached tokens, and the new cache."""
  logits, mutated = model.apply({"params": params, "cache": cache}, input_ids, attention_mask,
                                decode=True, mutable=["cache"])
  return logits, mutated["cache"]


def _as_ids(ids: Union[None, int, Sequence[int]]) -> tuple[int, ...]:
  if ids is None:
    return ()
  if isinstance(ids, (int, np.integer)):
    return (int(ids),)
  return tuple(int(i) for i in ids)


def greedy_generate(model: LlamaForCausalLM, params: Any, input_ids: Array,
                    attention_mask: Optional[Array], max_new_tokens: int,
                    eos_token_id: Union[None, int, Sequence[int]] = None,
                    pad_token_id: Optional[int] = None) -> Array:
  """Greedy decoding with the KV cache: the new tokens, int32 `[B, max_new_tokens]`.

  Matches `hf_model.generate(input_ids, attention_mask=..., do_sample=False,
  max_new_tokens=N)[:, L:]` padded to N with `pad_token_id`: the prompt is run once
  (prefill), then one token per step in a `lax.while_loop` that stops early when every row
  has produced an EOS; after its EOS a row holds `pad_token_id`. Prompts are usually
  left-padded (as HF requires); other padding works too since each row continues from its
  last real token and padded slots are masked out.

  Args:
    model: the Flax model.
    params: its params (plain argument; merged adapter params work).
    input_ids: `[B, L]` prompt ids.
    attention_mask: `[B, L]` 1 for real tokens; None means no padding.
    max_new_tokens: number of tokens to generate (static).
    eos_token_id: id or ids that end a row; None means the config's `eos_token_id` (static).
    pad_token_id: filler after EOS; None means the config's `pad_token_id`, else the first
      EOS id, else 0 (HF's fallback is the EOS id too) (static).

  A pure function: shapes are fixed, so it traces under `jax.jit`, inside
  `nn.intercept_methods` or both. It does not compile itself: the caller jits it, e.g.
  `jax.jit(greedy_generate, static_argnums=(0, 4), static_argnames=('eos_token_id',
  'pad_token_id'))` (pass EOS ids as a tuple then). With adapters applied by interception,
  jit a function that enters `nn.intercept_methods` and then calls this, so the interceptor
  is traced in (jit's trace cache does not see interceptors active outside the jitted
  function).
  """
  cfg = model.config
  eos_ids = _as_ids(cfg.eos_token_id if eos_token_id is None else eos_token_id)
  if pad_token_id is None:
    pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (
        eos_ids[0] if eos_ids else 0)
  pad_token_id, max_new_tokens = int(pad_token_id), int(max_new_tokens)
  input_ids = jnp.asarray(input_ids)
  batch, length = input_ids.shape
  if attention_mask is None:
    attention_mask = jnp.ones((batch, length), jnp.int32)
  attention_mask = jnp.asarray(attention_mask).astype(jnp.int32)
  if max_new_tokens == 0:
    return jnp.zeros((batch, 0), jnp.int32)
  # The next token follows each row's last real token (the last column under left padding).
  last = jnp.max(jnp.where(attention_mask > 0, jnp.arange(length), 0), axis=-1)
  logits, cache = prefill(model, params, input_ids, attention_mask, length + max_new_tokens,
                          logits_at=last[:, None])
  first_logits = logits[:, 0]
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

  def is_eos(token):
    return jnp.any(token[:, None] == eos[None, :], axis=-1)

  token = jnp.argmax(first_logits, axis=-1).astype(jnp.int32)
  out = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token)

  def cond(state):
    step, _, _, _, done = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, token, cache, out, done = state
    # Tied to this step's token, the weights are no loop invariant: XLA then gathers each
    # fsdp-split weight inside the loop, block by block, instead of hoisting every gather out
    # of the loop and holding the whole model on every device (benchmarks/scale_plan.py).
    step_params, token = lax.optimization_barrier((params, token))
    logits, cache = decode_step(model, step_params, cache, token[:, None])
    next_token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    # Finished rows emit padding, as HF's generate does.
    next_token = jnp.where(done, pad_token_id, next_token)
    out = lax.dynamic_update_slice(out, next_token[:, None], (0, step))
    return step + 1, next_token, cache, out, done | is_eos(next_token)

  state = (jnp.array(1, jnp.int32), token, cache, out, is_eos(token))
  return lax.while_loop(cond, body, state)[3]


def columns(start: int, stop: int, rows: int) -> Array:
  """`logits_at` for columns [start, stop) of every row: `[rows, stop - start]`."""
  return jnp.broadcast_to(jnp.arange(start, stop), (rows, stop - start))


def causal_lm_loss(logits: Array, labels: Array, label_mask: Array) -> Array:
  """Mean next-token cross-entropy: position t predicts `labels[:, t]` where `label_mask` is set.

  `logits [B, L, V]` and `labels [B, L]` are aligned (shift them before calling, e.g.
  `logits[:, :-1]` with `input_ids[:, 1:]`). A batch with no real label gives 0, not NaN.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  mask = label_mask.astype(jnp.float32)
  safe = jnp.where(label_mask.astype(bool), labels, 0).astype(jnp.int32)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# ----------------------------------------------------------------------------- HF conversion

# HF's `LlamaConfig` defaults of the fields a config.json may omit.
HF_DEFAULTS = {**{f.name: f.default for f in dataclasses.fields(LlamaConfig)},
                "num_key_value_heads": None}


def config_from_hf(cfg: Mapping[str, Any], *, dtype: DType = jnp.float32,
                   param_dtype: DType = jnp.float32) -> LlamaConfig:
  """`LlamaConfig` from a HF `config.json` dict (missing keys take HF's defaults)."""
  llama_hf.check_model_type(cfg, "llama")
  kwargs = llama_hf.config_kwargs(cfg, HF_DEFAULTS)
  for name in ("attention_bias", "mlp_bias"):
    kwargs[name] = bool(cfg.get(name, HF_DEFAULTS[name]))
  return LlamaConfig(dtype=dtype, param_dtype=param_dtype, **kwargs)


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
  """A `config.json` dict that transformers 4 and 5 load as `LlamaForCausalLM`."""
  if (config.qk_norm or config.sliding_window is not None
      or config.attention_out_bias != config.attention_bias):
    raise ValueError("this config has switches HF's LlamaConfig cannot express (qk_norm, "
                     "sliding_window or an o_proj bias unlike q/k/v's); save it with its own "
                     "family (qwen2, qwen3, mistral)")
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          **llama_hf.common_to_hf(config), "attention_bias": config.attention_bias,
          "mlp_bias": config.mlp_bias, "pretraining_tp": 1}


def params_from_hf(tensors: Mapping[str, np.ndarray], config: LlamaConfig, *,
                   source: str) -> dict[str, Any]:
  """Our params from a HF `LlamaForCausalLM` state dict (see `llama_hf.params_from_hf`)."""
  return llama_hf.params_from_hf(tensors, config, source=source, family="Llama")


params_to_hf = llama_hf.params_to_hf


# ----------------------------------------------------------------------------- registry

# `hf.from_pretrained` imports this module on demand for model_type 'llama'.
FAMILY = hf.Family.of_module("llama", sys.modules[__name__], LlamaForCausalLM)
hf.register_family("llama", FAMILY)

__all__ = [
    "ADAPTER_TARGETS", "ALL_LINEAR_TARGETS", "FAMILY", "LlamaConfig", "LlamaForCausalLM",
    "abstract_params", "causal_lm_loss", "config_from_hf", "config_to_hf", "decode_step",
    "greedy_generate", "init_params", "param_logical_specs", "params_from_hf", "params_to_hf",
    "prefill",
]
