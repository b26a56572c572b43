"""Flax (linen) T5 encoder-decoder that computes what Hugging Face's PyTorch T5 computes.

Covers T5 v1.0 (ReLU feed-forward, LM head tied to the shared embedding and the decoder
output scaled by ``d_model**-0.5``) and T5 v1.1 / flan-t5 (gated-GELU with the tanh
approximation, "gelu_new", and an untied ``lm_head``). Relative position buckets are
bidirectional in the encoder and causal in the decoder; as in HF only block 0 of each stack
owns the ``relative_attention_bias`` table and the bias it computes is reused by the other
blocks. RMS layer norm is computed in float32 whatever the compute dtype.

Module paths mirror Hugging Face's parameter names so that adapter regexes read the same in
both (adapters intercept ``nn.Dense`` calls by module path)::

  shared                                              nn.Embed, param `embedding`
  encoder/block_{i}/layer_0/SelfAttention/{q,k,v,o}   nn.Dense(use_bias=False)
  encoder/block_0/layer_0/SelfAttention/relative_attention_bias   nn.Embed
  encoder/block_{i}/layer_0/layer_norm                param `scale`
  encoder/block_{i}/layer_1/DenseReluDense/{wi,wo}    (v1.1: {wi_0,wi_1,wo})
  encoder/block_{i}/layer_1/layer_norm
  encoder/final_layer_norm
  decoder/block_{i}/layer_0/SelfAttention/{q,k,v,o}
  decoder/block_{i}/layer_1/EncDecAttention/{q,k,v,o}
  decoder/block_{i}/layer_2/DenseReluDense/...
  decoder/final_layer_norm
  lm_head                                             v1.1 only (untied), kernel (d_model, vocab)

Dense kernels use Flax's ``(d_in, d_out)`` layout, i.e. the transpose of HF's ``weight``.

Logical axis names.
  Parameters (``nn.with_logical_partitioning``):
    'vocab'           vocabulary rows of `shared/embedding`, columns of `lm_head/kernel`
    'embed'           the model dimension d_model (also layer-norm scales)
    'joined_kv'       num_heads * d_kv, the joined head dimension of q/k/v/o kernels
    'mlp'             the feed-forward hidden dimension d_ff
    'relpos_buckets'  rows of the relative attention bias table
    'heads'           columns of the relative attention bias table
    'kv'              reserved for per-head d_kv when a kernel is split by head (unused by
                      the plain Dense kernels here, listed so sharding rules can name it)
  Activations (``nn.with_logical_constraint``; no-ops without a mesh and rules):
    'activation_batch', 'activation_length', 'activation_embed' for hidden states,
    'activation_heads', 'activation_kv' for per-head queries/keys/values,
    'activation_mlp' for the feed-forward hidden layer,
    'activation_vocab' for logits.

Decoding uses a fixed-shape KV cache in the flax ``'cache'`` collection: see
``T5.init_cache``, ``init_decode_cache``, ``decode_step`` and ``greedy_generate`` (pure; the
caller jits it).

Hugging Face conversion (``config_from_hf``, ``params_from_hf``, ``params_to_hf``, ...) lives
at the bottom, where the module registers ``FAMILY`` with ``hf.register_family('t5', ...)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import sys
from collections.abc import Mapping
from typing import Any, Optional

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lbcl_jax.models import hf
from lbcl_jax.models import ops

Array = jax.Array
Dtype = Any

# A layer path's transformer block (`injection.TopBlocks`): `{encoder,decoder}/block_{i}`.
BLOCK_PATTERN = r"(?P<stack>encoder|decoder)/block_(?P<index>\d+)/"
# Default adapter targets: q and v of every attention (self and cross).
ADAPTER_TARGETS = r"(^|.*/)(SelfAttention|EncDecAttention)/(q|v)$"
# Every linear layer of the blocks: attention q/k/v/o and the feed-forward matrices.
ALL_LINEAR_TARGETS = (
    r"(^|.*/)((SelfAttention|EncDecAttention)/(q|k|v|o)"
    r"|DenseReluDense/(wi|wi_0|wi_1|wo))$"
)

@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of a T5 model; field names and defaults follow HF's `T5Config`.

  Attributes:
    tie_word_embeddings: True for T5 v1.0 (logits = (h * d_model**-0.5) @ shared^T);
      False for v1.1/flan (a separate `lm_head`, no rescaling).
    dtype: compute dtype (activations, matmuls). Softmax, layer norm and the loss run in f32.
    param_dtype: dtype the parameters are created/stored in.
    remat: what each block keeps for the backward pass, a key of `ops.REMAT_POLICIES`
      ("none", "weights", "full"); not a Hugging Face field.
    dot_dtype: operand dtype of the Dense layers' matmuls, a key of `ops.DOT_DTYPES` ("": the
      compute dtype; "bfloat16": bf16 operands, f32 accumulation); not a Hugging Face field.
  """

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: Optional[int] = None
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"
  tie_word_embeddings: bool = True
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = "none"
  dot_dtype: str = ""

  def __post_init__(self):
    if self.remat not in ops.REMAT_POLICIES:
      raise ValueError(f"remat {self.remat!r} is not one of {sorted(ops.REMAT_POLICIES)}")
    if self.dot_dtype not in ops.DOT_DTYPES:
      raise ValueError(f"dot_dtype {self.dot_dtype!r} is not one of {ops.DOT_DTYPES}")
    if self.num_decoder_layers is None:
      # HF's default: a symmetric decoder.
      object.__setattr__(self, "num_decoder_layers", self.num_layers)
    parts = self.feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise ValueError(
          f"feed_forward_proj={self.feed_forward_proj!r} must be 'ACT' or 'gated-ACT'")
    if self.dense_act_fn not in ops.ACTIVATIONS:
      raise ValueError(
          f"feed_forward_proj={self.feed_forward_proj!r}: activation {self.dense_act_fn!r} is "
          f"not supported (one of {sorted(ops.ACTIVATIONS)})")

  @property
  def is_gated_act(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def dense_act_fn(self) -> str:
    # HF maps "gated-gelu" to the tanh approximation (T5 v1.1 was trained with it).
    if self.feed_forward_proj == "gated-gelu":
      return "gelu_new"
    return self.feed_forward_proj.split("-")[-1]

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv


def _normal(stddev: float, names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


def _constrain(x: Array, names: tuple[str, ...]) -> Array:
  return nn.with_logical_constraint(x, names)


_HIDDEN = ("activation_batch", "activation_length", "activation_embed")
_HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_kv")


def relative_position_bucket(relative_position: Array, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> Array:
  """Maps `memory_position - query_position` to a bucket, exactly as HF/Mesh TF.

  Half the buckets hold exact small distances, the other half log-spaced larger ones up to
  `max_distance`; bidirectional splits the buckets between past and future.
  """
  relative_position = relative_position.astype(jnp.int32)
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
    relative_position = jnp.abs(relative_position)
  else:
    relative_position = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = relative_position < max_exact
  # log(0) is masked out by is_small; max(., 1) keeps the unused branch finite. The f32
  # arithmetic and truncation mirror HF's `.float()` / `.to(torch.long)`.
  large = max_exact + (
      jnp.log(jnp.maximum(relative_position, 1).astype(jnp.float32) / max_exact)
      / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, relative_position, large)


class T5LayerNorm(nn.Module):
  """RMS norm without mean subtraction or bias; statistics in f32 like HF."""

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    return ops.rms_norm(x, scale, self.epsilon, True, self.dtype)


class T5Attention(nn.Module):
  """Multi-head attention without query scaling (T5 folds it into the init).

  Self-attention when `kv` is None, cross-attention over `kv` otherwise. In decode mode the
  keys/values live in the 'cache' collection: self-attention writes the new tokens at
  `cache_index` into fixed-size buffers; cross-attention projects the encoder outputs once,
  when the cache is created, and reuses them afterwards.
  """

  config: T5Config
  causal: bool = False
  has_relative_attention_bias: bool = False

  @nn.compact
  def __call__(self, x: Array, kv: Optional[Array] = None, mask: Optional[Array] = None,
               position_bias: Optional[Array] = None, deterministic: bool = True,
               decode: bool = False,
               max_decode_length: Optional[int] = None) -> tuple[Array, Optional[Array]]:
    cfg = self.config
    n_heads, d_kv, d_model = cfg.num_heads, cfg.d_kv, cfg.d_model
    dense = functools.partial(nn.Dense, use_bias=False, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype,
                              dot_general=ops.dense_dot_general(cfg.dot_dtype))
    # HF's init scales; the q scale stands in for the 1/sqrt(d_kv) T5 never applies.
    q_proj = dense(cfg.inner_dim, kernel_init=_normal((d_model * d_kv)**-0.5,
                                                      ("embed", "joined_kv")), name="q")
    k_proj = dense(cfg.inner_dim, kernel_init=_normal(d_model**-0.5, ("embed", "joined_kv")),
                   name="k")
    v_proj = dense(cfg.inner_dim, kernel_init=_normal(d_model**-0.5, ("embed", "joined_kv")),
                   name="v")
    o_proj = dense(d_model, kernel_init=_normal(cfg.inner_dim**-0.5, ("joined_kv", "embed")),
                   name="o")

    def split_heads(t):
      return _constrain(t.reshape(t.shape[:2] + (n_heads, d_kv)), _HEADS)

    batch, q_len = x.shape[:2]
    query = split_heads(q_proj(x))
    q_offset = 0
    if kv is not None:  # Cross-attention.
      if decode and self.has_variable("cache", "cached_key"):
        key = self.get_variable("cache", "cached_key")
        value = self.get_variable("cache", "cached_value")
      else:
        key, value = split_heads(k_proj(kv)), split_heads(v_proj(kv))
        if decode:
          self.put_variable("cache", "cached_key", key)
          self.put_variable("cache", "cached_value", value)
    else:  # Self-attention.
      key, value = split_heads(k_proj(x)), split_heads(v_proj(x))
      if decode and self.has_variable("cache", "cached_key"):
        index = self.get_variable("cache", "cache_index")
        cached_key = self.get_variable("cache", "cached_key")
        cached_value = self.get_variable("cache", "cached_value")
        cache_len = cached_key.shape[1]
        key = lax.dynamic_update_slice(cached_key, key.astype(cached_key.dtype),
                                       (0, index, 0, 0))
        value = lax.dynamic_update_slice(cached_value, value.astype(cached_value.dtype),
                                         (0, index, 0, 0))
        self.put_variable("cache", "cached_key", key)
        self.put_variable("cache", "cached_value", value)
        self.put_variable("cache", "cache_index", index + q_len)
        q_offset = index
        # Queries see the filled prefix of the fixed-size buffer and nothing after them.
        q_pos = index + jnp.arange(q_len)
        mask = (jnp.arange(cache_len)[None, :] <= q_pos[:, None])[None, None]
      elif decode:
        # Creating the cache: fixed-size zero buffers; this call computes as if not decoding.
        if max_decode_length is None:
          raise ValueError("creating the decode cache needs max_decode_length")
        shape = (batch, max_decode_length, n_heads, d_kv)
        self.put_variable("cache", "cached_key", jnp.zeros(shape, cfg.dtype))
        self.put_variable("cache", "cached_value", jnp.zeros(shape, cfg.dtype))
        self.put_variable("cache", "cache_index", jnp.array(0, jnp.int32))

    if position_bias is None and self.has_relative_attention_bias:
      table = nn.Embed(
          cfg.relative_attention_num_buckets, n_heads, dtype=jnp.float32,
          param_dtype=cfg.param_dtype,
          embedding_init=_normal(d_model**-0.5, ("relpos_buckets", "heads")),
          name="relative_attention_bias")
      rel = jnp.arange(key.shape[1])[None, :] - (q_offset + jnp.arange(q_len))[:, None]
      buckets = relative_position_bucket(
          rel, bidirectional=not self.causal, num_buckets=cfg.relative_attention_num_buckets,
          max_distance=cfg.relative_attention_max_distance)
      position_bias = jnp.transpose(table(buckets), (2, 0, 1))[None]  # [1, H, Lq, Lk]

    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32)
    if position_bias is not None:
      scores = scores + position_bias.astype(jnp.float32)
    weights = ops.softmax(scores, mask).astype(cfg.dtype)
    weights = nn.Dropout(cfg.dropout_rate)(weights, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, value.astype(cfg.dtype))
    out = _constrain(out, _HEADS).reshape(batch, q_len, cfg.inner_dim)
    return o_proj(out), position_bias


class T5DenseActDense(nn.Module):
  """v1.0 feed-forward: wo(act(wi(x)))."""

  config: T5Config

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    cfg = self.config
    dense = functools.partial(nn.Dense, use_bias=False, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype,
                              dot_general=ops.dense_dot_general(cfg.dot_dtype))
    h = dense(cfg.d_ff, kernel_init=_normal(cfg.d_model**-0.5, ("embed", "mlp")), name="wi")(x)
    h = ops.ACTIVATIONS[cfg.dense_act_fn](h)
    h = _constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return dense(cfg.d_model, kernel_init=_normal(cfg.d_ff**-0.5, ("mlp", "embed")),
                 name="wo")(h)


class T5DenseGatedActDense(nn.Module):
  """v1.1 feed-forward: wo(act(wi_0(x)) * wi_1(x))."""

  config: T5Config

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    cfg = self.config
    dense = functools.partial(nn.Dense, use_bias=False, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype,
                              dot_general=ops.dense_dot_general(cfg.dot_dtype))
    wi_init = _normal(cfg.d_model**-0.5, ("embed", "mlp"))
    h = ops.gated(cfg.dense_act_fn, dense(cfg.d_ff, kernel_init=wi_init, name="wi_0")(x),
                  dense(cfg.d_ff, kernel_init=wi_init, name="wi_1")(x))
    h = _constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return dense(cfg.d_model, kernel_init=_normal(cfg.d_ff**-0.5, ("mlp", "embed")),
                 name="wo")(h)


class T5LayerSelfAttention(nn.Module):
  config: T5Config
  causal: bool = False
  has_relative_attention_bias: bool = False

  @nn.compact
  def __call__(self, x, mask, position_bias, deterministic, decode, max_decode_length):
    cfg = self.config
    h = T5LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype, name="layer_norm")(x)
    h, position_bias = T5Attention(
        cfg, causal=self.causal, has_relative_attention_bias=self.has_relative_attention_bias,
        name="SelfAttention")(h, None, mask, position_bias, deterministic, decode,
                              max_decode_length)
    x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return x, position_bias


class T5LayerCrossAttention(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x, encoder_outputs, mask, deterministic, decode):
    cfg = self.config
    h = T5LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype, name="layer_norm")(x)
    # HF's cross-attention bias is all zeros, so no bias at all here.
    h, _ = T5Attention(cfg, name="EncDecAttention")(h, encoder_outputs, mask, None,
                                                    deterministic, decode)
    return x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)


class T5LayerFF(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x, deterministic):
    cfg = self.config
    h = T5LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype, name="layer_norm")(x)
    ff = T5DenseGatedActDense if cfg.is_gated_act else T5DenseActDense
    h = ff(cfg, name="DenseReluDense")(h, deterministic)
    return x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)


class T5Block(nn.Module):
  config: T5Config
  is_decoder: bool = False
  has_relative_attention_bias: bool = False

  @nn.compact
  def __call__(self, x, mask, position_bias, encoder_outputs, encoder_mask, deterministic,
               decode, max_decode_length):
    cfg = self.config
    x, position_bias = T5LayerSelfAttention(
        cfg, causal=self.is_decoder,
        has_relative_attention_bias=self.has_relative_attention_bias,
        name="layer_0")(x, mask, position_bias, deterministic, decode, max_decode_length)
    if self.is_decoder:
      x = T5LayerCrossAttention(cfg, name="layer_1")(x, encoder_outputs, encoder_mask,
                                                     deterministic, decode)
    x = T5LayerFF(cfg, name="layer_2" if self.is_decoder else "layer_1")(x, deterministic)
    return _constrain(x, _HIDDEN), position_bias


class T5Stack(nn.Module):
  """The encoder or the decoder stack (without the token embedding)."""

  config: T5Config
  is_decoder: bool = False

  @nn.compact
  def __call__(self, x, mask=None, encoder_outputs=None, encoder_mask=None,
               deterministic=True, decode=False, max_decode_length=None):
    cfg = self.config
    n_blocks = cfg.num_decoder_layers if self.is_decoder else cfg.num_layers
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    position_bias = None
    block = T5Block
    if cfg.remat != "none":
      # deterministic, decode and max_decode_length are Python values (argument 0 is the
      # module).
      block = nn.remat(block, policy=ops.REMAT_POLICIES[cfg.remat], static_argnums=(6, 7, 8))
    for i in range(n_blocks):
      # Block 0 computes the relative position bias; the others reuse it (as HF).
      x, position_bias = block(cfg, is_decoder=self.is_decoder,
                               has_relative_attention_bias=(i == 0), name=f"block_{i}")(
                                   x, mask, position_bias, encoder_outputs, encoder_mask,
                                   deterministic, decode, max_decode_length)
    x = T5LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype,
                    name="final_layer_norm")(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


def _key_mask(mask: Optional[Array]) -> Optional[Array]:
  """[B, L] 0/1 padding mask -> boolean [B, 1, 1, L] over keys (None stays None)."""
  if mask is None:
    return None
  return mask.astype(bool)[:, None, None, :]


class T5(nn.Module):
  """T5 encoder-decoder with a language-modelling head (HF's T5ForConditionalGeneration)."""

  config: T5Config

  def setup(self):
    cfg = self.config
    self.shared = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype,
                           embedding_init=_normal(1.0, ("vocab", "embed")))
    self.encoder = T5Stack(cfg, is_decoder=False)
    self.decoder = T5Stack(cfg, is_decoder=True)
    if not cfg.tie_word_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype,
                              dot_general=ops.dense_dot_general(cfg.dot_dtype),
                              kernel_init=_normal(1.0, ("embed", "vocab")))

  def encode(self, input_ids: Array, attention_mask: Optional[Array] = None,
             deterministic: bool = True) -> Array:
    """Encoder outputs [B, S, d_model] (after the final layer norm)."""
    x = _constrain(self.shared(input_ids), _HIDDEN)
    return self.encoder(x, _key_mask(attention_mask), deterministic=deterministic)

  def decode(self, decoder_input_ids: Array, encoder_outputs: Array,
             encoder_attention_mask: Optional[Array] = None,
             decoder_attention_mask: Optional[Array] = None, deterministic: bool = True,
             decode: bool = False, max_decode_length: Optional[int] = None) -> Array:
    """Decoder logits [B, T, vocab] for `decoder_input_ids` attending to `encoder_outputs`.

    With `decode=True` the call reads and writes the 'cache' collection (apply with
    `mutable=['cache']`): the T tokens are placed after the ones already cached, and
    `decoder_attention_mask` is ignored (the cache holds no padding). If the cache does not
    exist yet it is created with `max_decode_length` slots (see `init_cache`).
    """
    cfg = self.config
    x = _constrain(self.shared(decoder_input_ids), _HIDDEN)
    length = decoder_input_ids.shape[1]
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if decoder_attention_mask is not None and not decode:
      mask = mask & _key_mask(decoder_attention_mask)
    h = self.decoder(x, mask, encoder_outputs, _key_mask(encoder_attention_mask),
                     deterministic=deterministic, decode=decode,
                     max_decode_length=max_decode_length)
    if cfg.tie_word_embeddings:
      # v1.0 rescales before the tied projection.
      logits = self.shared.attend(h * (cfg.d_model**-0.5))
    else:
      logits = self.lm_head(h)
    return _constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))

  def init_cache(self, encoder_outputs: Array, encoder_attention_mask: Optional[Array],
                 max_decode_length: int) -> Array:
    """Creates the decode cache: empty self-attention buffers and projected encoder K/V.

    Apply with `mutable=['cache']` on a model whose 'cache' collection is empty; returns
    throw-away logits of a dummy step (the cache index stays 0).
    """
    batch = encoder_outputs.shape[0]
    dummy = jnp.full((batch, 1), self.config.decoder_start_token_id, jnp.int32)
    return self.decode(dummy, encoder_outputs, encoder_attention_mask, decode=True,
                       max_decode_length=max_decode_length)

  def __call__(self, input_ids: Array, attention_mask: Optional[Array],
               decoder_input_ids: Array, decoder_attention_mask: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """Teacher-forced logits [B, T, vocab] (HF's `T5ForConditionalGeneration(...).logits`)."""
    encoder_outputs = self.encode(input_ids, attention_mask, deterministic=deterministic)
    return self.decode(decoder_input_ids, encoder_outputs, attention_mask,
                       decoder_attention_mask, deterministic=deterministic)


# ----------------------------------------------------------------------------- functions


def _dummy_inputs(batch: int, src_len: int, tgt_len: int):
  ids = jnp.ones((batch, src_len), jnp.int32)
  return ids, jnp.ones((batch, src_len), jnp.int32), jnp.ones((batch, tgt_len), jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def _init_variables(model: T5, rng: Array, batch: int, src_len: int, tgt_len: int) -> dict:
  # Module-level so repeated calls reuse the compiled init (a fresh jax.jit(model.init)
  # would retrace and recompile every time).
  return model.init(rng, *_dummy_inputs(batch, src_len, tgt_len))


def init_params(model: T5, rng: Array, batch: int = 1, src_len: int = 8,
                tgt_len: int = 8) -> dict:
  """Random (HF-style init) parameters, unboxed: the nested dict below 'params'."""
  return nn.meta.unbox(_init_variables(model, rng, batch, src_len, tgt_len)["params"])


def abstract_params(model: T5) -> dict:
  """Unboxed `jax.ShapeDtypeStruct` tree of the parameters, without allocating them."""
  boxed = jax.eval_shape(model.init, jax.random.key(0), *_dummy_inputs(1, 2, 2))
  return nn.meta.unbox(boxed["params"])


def param_logical_specs(model: T5) -> dict:
  """Logical `PartitionSpec` per parameter (same tree as the params)."""
  boxed = jax.eval_shape(model.init, jax.random.key(0), *_dummy_inputs(1, 2, 2))
  return nn.get_partition_spec(boxed)["params"]


def shift_right(labels: Array, decoder_start_token_id: int, pad_token_id: int) -> Array:
  """Decoder inputs from labels: start token first, labels shifted by one, -100 -> pad."""
  labels = jnp.asarray(labels)
  start = jnp.full(labels.shape[:-1] + (1,), decoder_start_token_id, labels.dtype)
  shifted = jnp.concatenate([start, labels[..., :-1]], axis=-1)
  return jnp.where(shifted == -100, pad_token_id, shifted)


def seq2seq_loss(logits: Array, labels: Array, label_mask: Array) -> Array:
  """Mean token cross-entropy over positions where `label_mask` is set (f32 log-softmax).

  Labels at masked positions may hold anything (e.g. -100); they are never gathered. A batch
  with no real token gives 0 rather than NaN.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  mask = label_mask.astype(jnp.float32)
  safe_labels = jnp.where(label_mask.astype(bool), labels, 0)
  nll = -jnp.take_along_axis(logp, safe_labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def init_decode_cache(model: T5, params: dict, encoder_outputs: Array,
                      encoder_attention_mask: Optional[Array], max_decode_length: int) -> dict:
  """The 'cache' collection for `max_decode_length` decoder steps over these encoder outputs."""
  _, mutated = model.apply({"params": params}, encoder_outputs, encoder_attention_mask,
                           max_decode_length, method=T5.init_cache, mutable=["cache"])
  return mutated["cache"]


def decode_step(model: T5, params: dict, cache: dict, decoder_input_ids: Array,
                encoder_outputs: Array,
                encoder_attention_mask: Optional[Array]) -> tuple[Array, dict]:
  """Logits of `decoder_input_ids` [B, T] placed after the cached tokens, and the new cache."""
  logits, mutated = model.apply({"params": params, "cache": cache}, decoder_input_ids,
                                encoder_outputs, encoder_attention_mask, decode=True,
                                method=T5.decode, mutable=["cache"])
  return logits, mutated["cache"]


def greedy_generate(model: T5, params: dict, input_ids: Array,
                    attention_mask: Optional[Array], max_new_tokens: int) -> Array:
  """Greedy decoding with the KV cache: int32 [B, max_new_tokens], like HF's generate.

  Matches `hf_model.generate(do_sample=False, num_beams=1, max_new_tokens=N)[:, 1:]` padded
  to N with `pad_token_id` (HF's output starts with the decoder start token and stops early
  when every row has produced EOS; after its EOS a row holds padding).

  A pure function: shapes are fixed and the loop is a `lax.while_loop`, so it traces under
  `jax.jit`, inside `nn.intercept_methods` or both; `params` is a plain argument (merged
  params work). It does not compile itself: the caller jits it, e.g.
  `jax.jit(greedy_generate, static_argnums=(0, 4))`. With adapters applied by interception,
  jit a function that enters `nn.intercept_methods` and then calls this, so the interceptor
  is traced in (jit's trace cache does not see interceptors active outside the jitted
  function).
  """
  cfg = model.config
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, jnp.int32)
  batch = input_ids.shape[0]
  encoder_outputs = model.apply({"params": params}, input_ids, attention_mask,
                                method=T5.encode)
  cache = init_decode_cache(model, params, encoder_outputs, attention_mask, max_new_tokens)

  def cond(state):
    step, _, _, _, done = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, token, cache, out, done = state
    # Tied to this step's token, the weights are no loop invariant: XLA then gathers each
    # fsdp-split weight inside the loop, block by block, instead of hoisting every gather out
    # of the loop and holding the whole model on every device (benchmarks/scale_plan.py).
    step_params, token = lax.optimization_barrier((params, token))
    logits, cache = decode_step(model, step_params, cache, token, encoder_outputs,
                                attention_mask)
    next_token = jnp.argmax(logits[:, -1, :].astype(jnp.float32), axis=-1).astype(jnp.int32)
    # Finished rows emit padding, as HF's generate does.
    next_token = jnp.where(done, cfg.pad_token_id, next_token)
    out = lax.dynamic_update_slice(out, next_token[:, None], (0, step))
    done = done | (next_token == cfg.eos_token_id)
    return step + 1, next_token[:, None], cache, out, done

  state = (jnp.array(0, jnp.int32),
           jnp.full((batch, 1), cfg.decoder_start_token_id, jnp.int32), cache,
           jnp.full((batch, max_new_tokens), cfg.pad_token_id, jnp.int32),
           jnp.zeros((batch,), bool))
  return lax.while_loop(cond, body, state)[3]


# ----------------------------------------------------------------------------- HF conversion

SUPPORTED_ARCHITECTURES = ("T5ForConditionalGeneration", "T5WithLMHeadModel")
# Present in some HF checkpoints and ignored by HF when loading (a leftover table).
_IGNORED_KEYS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
# HF aliases of `shared.weight` (tied input embeddings of both stacks).
_EMBED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_INT_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
               "relative_attention_num_buckets", "relative_attention_max_distance",
               "pad_token_id")


def config_from_hf(cfg: Mapping[str, Any], *, dtype: Dtype = jnp.float32,
                   param_dtype: Dtype = jnp.float32) -> T5Config:
  """Our T5Config from a config.json dict (transformers 4 or 5 layout)."""
  defaults = T5Config()
  kwargs = {}
  for name in _INT_FIELDS:
    value = cfg.get(name, getattr(defaults, name))
    if not isinstance(value, int) or isinstance(value, bool):
      raise ValueError(f"field {name!r} must be an integer, got {value!r}")
    kwargs[name] = value
  num_decoder_layers = cfg.get("num_decoder_layers")
  kwargs["num_decoder_layers"] = (kwargs["num_layers"] if num_decoder_layers is None
                                  else int(num_decoder_layers))
  eos = cfg.get("eos_token_id", defaults.eos_token_id)
  if isinstance(eos, (list, tuple)):
    if len(eos) != 1:
      raise ValueError(f"field 'eos_token_id': only one EOS id is supported, got {eos!r}")
    eos = eos[0]
  kwargs["eos_token_id"] = int(eos)
  start = cfg.get("decoder_start_token_id")
  kwargs["decoder_start_token_id"] = kwargs["pad_token_id"] if start is None else int(start)
  kwargs["dropout_rate"] = float(cfg.get("dropout_rate", defaults.dropout_rate))
  kwargs["layer_norm_epsilon"] = float(cfg.get("layer_norm_epsilon",
                                               defaults.layer_norm_epsilon))
  kwargs["feed_forward_proj"] = str(cfg.get("feed_forward_proj", defaults.feed_forward_proj))
  # transformers 5 always writes tie_word_embeddings=true for T5 and keeps the v1.0/v1.1
  # distinction in scale_decoder_outputs; transformers 4 configs only have the former.
  if "scale_decoder_outputs" in cfg:
    tied = cfg["scale_decoder_outputs"]
  else:
    tied = cfg.get("tie_word_embeddings", True)
  kwargs["tie_word_embeddings"] = bool(tied)
  return T5Config(dtype=dtype, param_dtype=param_dtype, **kwargs)


def config_to_hf(config: T5Config) -> dict:
  """A config.json dict that transformers 4 and 5 load as `T5ForConditionalGeneration`."""
  return {
      "architectures": ["T5ForConditionalGeneration"],
      "model_type": "t5",
      "vocab_size": config.vocab_size,
      "d_model": config.d_model,
      "d_kv": config.d_kv,
      "d_ff": config.d_ff,
      "num_layers": config.num_layers,
      "num_decoder_layers": config.num_decoder_layers,
      "num_heads": config.num_heads,
      "relative_attention_num_buckets": config.relative_attention_num_buckets,
      "relative_attention_max_distance": config.relative_attention_max_distance,
      "dropout_rate": config.dropout_rate,
      "layer_norm_epsilon": config.layer_norm_epsilon,
      "initializer_factor": 1.0,
      "feed_forward_proj": config.feed_forward_proj,
      # transformers 5 reads a false here as "no output rescaling" and unties lm_head when
      # the checkpoint holds a distinct one; transformers 4 reads it literally.
      "tie_word_embeddings": config.tie_word_embeddings,
      "is_encoder_decoder": True,
      "use_cache": True,
      "pad_token_id": config.pad_token_id,
      "eos_token_id": config.eos_token_id,
      "decoder_start_token_id": config.decoder_start_token_id,
      "dtype": jnp.dtype(config.param_dtype).name,
  }


def _hf_key(path: tuple[str, ...]) -> tuple[str, bool]:
  """(HF tensor name, whether HF stores the transpose) of a Flax param path."""
  parts = []
  for part in path[:-1]:
    match = re.fullmatch(r"(block|layer)_(\d+)", part)
    parts.extend(match.groups() if match else (part,))
  leaf = path[-1]
  if leaf not in ("kernel", "scale", "embedding"):
    raise ValueError(f"unexpected T5 parameter {'/'.join(path)}")
  return ".".join(parts + ["weight"]), leaf == "kernel"


def make_model(config: T5Config) -> T5:
  return T5(config)


def params_from_hf(tensors: Mapping[str, np.ndarray], config: T5Config, *,
                   source: str) -> dict:
  """Flax params of `T5(config)` from HF tensors (np arrays keyed by HF names).

  Raises `hf.CheckpointError` naming `source` and the key for a missing, unexpected,
  misshaped or non-float tensor, or for an embedding alias that differs from `shared.weight`.
  """
  abstract = flax.traverse_util.flatten_dict(abstract_params(T5(config)))
  tensors = dict(tensors)
  used = set()

  # The shared embedding may only be stored under one of its aliases (old .bin files).
  shared_key = "shared.weight"
  if shared_key not in tensors:
    shared_key = next((k for k in _EMBED_ALIASES if k in tensors), shared_key)

  flat = {}
  for path, struct in abstract.items():
    key, transpose = _hf_key(path)
    if key == "shared.weight":
      key = shared_key
    elif key == "lm_head.weight" and key not in tensors:
      # transformers 5 ties lm_head to shared for every T5 and then omits lm_head.weight
      # from the files it saves; it loads such a checkpoint with shared as the head.
      key = shared_key
    flat[path] = hf.convert_tensor(tensors, key, struct.shape, config.param_dtype,
                                   source=source, transpose=transpose)
    used.add(key)

  # Aliases of the shared embedding (and, for v1.0, of the tied head) must hold the same
  # values: our model has one table, so a different one cannot be represented.
  aliases = list(_EMBED_ALIASES) + (["lm_head.weight"] if config.tie_word_embeddings else [])
  shared = np.asarray(tensors[shared_key])
  for key in aliases:
    if key in tensors and key not in used:
      other = np.asarray(tensors[key])
      if other.shape != shared.shape or not np.array_equal(other, shared):
        raise hf.CheckpointError(
            f"{source}: tensor {key!r} differs from {shared_key!r}; this config ties them "
            "(tie_word_embeddings) so they must be equal")
      used.add(key)
  used.update(k for k in _IGNORED_KEYS if k in tensors)
  unexpected = sorted(set(tensors) - used)
  if unexpected:
    raise hf.CheckpointError(
        f"{source}: unexpected tensor {unexpected[0]!r} for this T5 config"
        + (f" (and {len(unexpected) - 1} more: {unexpected[1:6]})" if len(unexpected) > 1
           else ""))
  return jax.tree_util.tree_map(jnp.asarray, flax.traverse_util.unflatten_dict(flat))


def params_to_hf(params: Mapping[str, Any], config: T5Config) -> dict:
  """HF tensors (HF names, (out, in) layout, C-contiguous numpy) of Flax T5 params."""
  del config  # The tree itself says whether there is an lm_head.
  out = {}
  for path, value in flax.traverse_util.flatten_dict(nn.meta.unbox(params)).items():
    key, transpose = _hf_key(path)
    # bf16 comes out as ml_dtypes.bfloat16.
    array = np.ascontiguousarray(np.asarray(jax.device_get(value)))
    out[key] = np.ascontiguousarray(array.T) if transpose else array
  return out


# ----------------------------------------------------------------------------- registry

# `hf.get_family('t5')` imports this module on demand, and a T5 model only exists once this
# module is imported, so `hf.family_of_model` always finds it (hf imports no family module at
# import time, so importing hf here makes no cycle).
FAMILY = hf.Family.of_module("t5", sys.modules[__name__], T5)
hf.register_family("t5", FAMILY)

__all__ = [
    "ADAPTER_TARGETS", "ALL_LINEAR_TARGETS", "FAMILY", "SUPPORTED_ARCHITECTURES", "T5",
    "T5Config", "abstract_params", "config_from_hf", "config_to_hf", "decode_step",
    "greedy_generate", "init_decode_cache", "init_params", "make_model", "param_logical_specs",
    "params_from_hf", "params_to_hf", "relative_position_bucket", "seq2seq_loss",
    "shift_right",
]
