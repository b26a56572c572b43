"""Flax (linen) Gemma 2 decoder that computes what Hugging Face's PyTorch `Gemma2ForCausalLM` does.

Gemma 2 is the Llama decoder of `llama.py` (rotary positions, grouped-query attention, a gated
feed-forward, a KV cache, positions counted over real tokens) with these differences, each
checked against transformers' `modeling_gemma2.py`:

* the token embedding is multiplied by `sqrt(hidden_size)`, rounded to the compute dtype (HF
  rounds it to the weights' dtype: 55.4256 becomes 55.5 in bfloat16); the tied lm_head reads
  the unscaled table;
* RMSNorm scales by `1 + w` with `w` zero-initialised, all in f32 before the cast back (Llama
  casts first, then multiplies by `w`);
* every layer norms around both sub-blocks (four norms a layer):
  `x + post_attention_layernorm(attn(input_layernorm(x)))`, then
  `x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))`;
* the feed-forward is GeGLU, `down(gelu_tanh(gate(x)) * up(x))` (`hidden_activation`);
* attention scores are scaled by `query_pre_attn_scalar ** -0.5` (not head_dim's) and
  soft-capped, `tanh(s / cap) * cap` (`attn_logit_softcapping`), before the mask;
* layers alternate between a sliding window of `sliding_window` slots (even layers: 0, 2, ...,
  HF's default `layer_types`) and full causal attention;
* the f32 logits are soft-capped too (`final_logit_softcapping`).

Everything else is Llama's, by inheritance rather than copy: `Gemma2Config` extends
`llama.LlamaConfig`, and `Gemma2ForCausalLM` extends `llama.LlamaForCausalLM` (the cache
bookkeeping, the padding, causal and sliding-window masks, `logits_at`, the tied head) with its
own decoder body (`model_class`) and the final soft-cap; `Gemma2Attention` extends
`llama.LlamaAttention` (projections, rotary, KV cache, grouped heads) with its own scores; the
MLP is `llama.LlamaMLP`. The sliding window follows HF's mask convention (`llama.LlamaConfig`'s
`sliding_window`: a query at slot q sees the keys at slots `q - sliding_window < k <= q`, so
itself and the `sliding_window - 1` slots before it), in the forward pass and in KV-cached
decoding alike.

Module paths mirror HF's parameter names (as `llama.py`'s, plus the two feed-forward norms)::

  model/embed_tokens                                  nn.Embed, param `embedding` (vocab, hidden)
  model/layers_{i}/{input,post_attention,pre_feedforward,post_feedforward}_layernorm
                                                      param `scale`: HF's zero-centred `weight`
  model/layers_{i}/self_attn/{q_proj,k_proj,v_proj,o_proj}   nn.Dense (bias iff attention_bias)
  model/layers_{i}/mlp/{gate_proj,up_proj,down_proj}  nn.Dense, no bias
  model/norm                                          param `scale`
  lm_head                                             untied only, kernel (hidden, vocab)

Logical axis names are llama.py's (see its module docstring), so `config.mesh.logical_axis_rules`
shards it as it shards Llama. The module-level API (`init_params`, `greedy_generate`, ...) is
llama.py's own functions, which take any model of this interface.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lbcl_jax.models import hf
from lbcl_jax.models import llama
from lbcl_jax.models import llama_hf
from lbcl_jax.models import ops

Array = jax.Array
DType = Any

# The module paths are Llama's, so are the block pattern and the adapter presets.
BLOCK_PATTERN = llama.BLOCK_PATTERN
ADAPTER_TARGETS = llama.ADAPTER_TARGETS
ALL_LINEAR_TARGETS = llama.ALL_LINEAR_TARGETS

SUPPORTED_ARCHITECTURES = ("Gemma2ForCausalLM",)

_HIDDEN = ("activation_batch", "activation_length", "activation_embed")
# The norms of a decoder layer, in the order the layer applies them.
_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")


@dataclasses.dataclass(frozen=True)
class Gemma2Config(llama.LlamaConfig):
  """Gemma 2 hyper-parameters; names and defaults follow HF's `Gemma2Config` (gemma-2-2b).

  The Llama fields mean what they mean in `llama.LlamaConfig`; `hidden_act` is HF's
  `hidden_activation`. Llama's other switches (`qk_norm`, `mlp_bias`, an o_proj bias unlike
  q/k/v's) do not exist in Gemma 2 and are refused.

  Attributes:
    query_pre_attn_scalar: attention scores are scaled by its inverse square root.
    attn_logit_softcapping: attention scores become `tanh(s / cap) * cap`; None: no cap.
    final_logit_softcapping: the same on the logits; None: no cap.
    layer_types: None means HF's default: even layers "sliding_attention", odd ones
      "full_attention".
  """

  vocab_size: int = 256000
  hidden_size: int = 2304
  intermediate_size: int = 9216
  num_hidden_layers: int = 26
  num_attention_heads: int = 8
  num_key_value_heads: Optional[int] = 4
  head_dim: Optional[int] = 256
  hidden_act: str = "gelu_pytorch_tanh"
  max_position_embeddings: int = 8192
  tie_word_embeddings: bool = True
  bos_token_id: Optional[int] = 2
  eos_token_id: Any = 1
  pad_token_id: Optional[int] = 0
  sliding_window: Optional[int] = 4096
  query_pre_attn_scalar: float = 256
  attn_logit_softcapping: Optional[float] = 50.0
  final_logit_softcapping: Optional[float] = 30.0

  def __post_init__(self):
    if self.layer_types is None:
      object.__setattr__(self, "layer_types", tuple(
          "sliding_attention" if i % 2 == 0 else "full_attention"
          for i in range(self.num_hidden_layers)))
    super().__post_init__()
    if self.qk_norm or self.mlp_bias or self.attention_out_bias != self.attention_bias:
      raise ValueError("Gemma 2 has no qk_norm, no MLP bias and the same bias on o_proj as on "
                       "q/k/v")
    if not self.query_pre_attn_scalar > 0:
      raise ValueError(f"query_pre_attn_scalar {self.query_pre_attn_scalar} must be positive")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
      cap = getattr(self, name)
      if cap is not None and not cap > 0:
        raise ValueError(f"{name} {cap} must be positive (or None)")


# ----------------------------------------------------------------------------- layers


class Gemma2RMSNorm(nn.Module):
  """`x / sqrt(mean(x^2) + eps) * (1 + w)` as HF's `Gemma2RMSNorm`: statistics, the `1 + w`
  and the product in f32, then cast to `dtype`. `w` (param `scale`) starts at zero."""

  epsilon: float = 1e-6
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w = self.param("scale", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                         ("embed",)),
                   (x.shape[-1],), self.param_dtype)
    # The gradient of `1 + w` is the identity: ops' backward still keeps only x.
    return ops.rms_norm(x, 1.0 + w.astype(jnp.float32), self.epsilon, True, self.dtype)


class Gemma2Attention(llama.LlamaAttention):
  """Llama's attention (projections, rotary, KV cache, grouped heads) with Gemma 2's scores."""

  def _scores(self, query: Array, key: Array) -> Array:
    cfg = self.config
    scores = jnp.einsum("bqkgd,bskd->bkgqs", query, key).astype(jnp.float32)
    scores = scores * (float(cfg.query_pre_attn_scalar) ** -0.5)
    if cfg.attn_logit_softcapping is not None:
      # Before the mask, as HF: masked scores are replaced after the cap.
      scores = ops.softcap(scores, float(cfg.attn_logit_softcapping))
    return scores


class Gemma2DecoderLayer(nn.Module):
  """Sandwich-norm block: `x + norm(attn(norm(x)))`, then `x + norm(mlp(norm(x)))`."""

  config: Gemma2Config

  @nn.compact
  def __call__(self, x, cos, sin, mask, deterministic=True, decode=False, cache_index=None):
    cfg = self.config
    norms = {name: Gemma2RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)
             for name in _LAYER_NORMS}
    h = Gemma2Attention(cfg, name="self_attn")(norms["input_layernorm"](x), cos, sin, mask,
                                               deterministic, decode, cache_index)
    x = nn.with_logical_constraint(x + norms["post_attention_layernorm"](h), _HIDDEN)
    h = llama.LlamaMLP(cfg, name="mlp")(norms["pre_feedforward_layernorm"](x))
    return nn.with_logical_constraint(x + norms["post_feedforward_layernorm"](h), _HIDDEN)


class Gemma2Model(nn.Module):
  """Scaled token embedding, the decoder layers and the final norm (HF's `Gemma2Model`); called
  as `llama.LlamaModel` is (`window_mask` for the sliding layers)."""

  config: Gemma2Config

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype,
                                 embedding_init=nn.with_logical_partitioning(
                                     nn.initializers.normal(cfg.initializer_range),
                                     ("vocab", "embed")))
    layer = Gemma2DecoderLayer
    if cfg.remat != "none":
      # deterministic and decode are Python values (argument 0 is the module).
      layer = nn.remat(layer, policy=ops.REMAT_POLICIES[cfg.remat], static_argnums=(5, 6))
    self.layers = [layer(cfg) for _ in range(cfg.num_hidden_layers)]
    self.norm = Gemma2RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)

  def __call__(self, input_ids: Array, positions: Array, mask: Array, deterministic: bool = True,
               decode: bool = False, cache_index: Optional[Array] = None,
               window_mask: Optional[Array] = None) -> Array:
    cfg = self.config
    # HF multiplies by the normaliser in the weights' dtype (bf16 turns sqrt(3072) into 55.5).
    normalizer = jnp.asarray(cfg.hidden_size ** 0.5, cfg.dtype)
    x = nn.with_logical_constraint(self.embed_tokens(input_ids) * normalizer, _HIDDEN)
    cos, sin = llama.rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    for layer, window in zip(self.layers, cfg.layer_windows):
      x = layer(x, cos, sin, mask if window is None else window_mask, deterministic, decode,
                cache_index)
    return self.norm(x)


class Gemma2ForCausalLM(llama.LlamaForCausalLM):
  """Gemma 2 with its language-modelling head: `llama.LlamaForCausalLM`'s interface (see its
  docstring: masks, positions, `decode`, `logits_at`), f32 logits soft-capped by
  `final_logit_softcapping`."""

  model_class = Gemma2Model

  def __call__(self, *args, **kwargs) -> Array:
    logits = super().__call__(*args, **kwargs)
    cap = self.config.final_logit_softcapping
    if cap is None:
      return logits
    # In f32 (HF caps in the model dtype; the same in f32, closer in bf16).
    return nn.with_logical_constraint(
        ops.softcap(logits, float(cap)),
        ("activation_batch", "activation_length", "activation_vocab"))


def make_model(config: Gemma2Config) -> Gemma2ForCausalLM:
  return Gemma2ForCausalLM(config)


# ----------------------------------------------------------------------------- functions

# The same computations as Llama's: they only call the model (and read the config's EOS, pad
# and vocabulary), so they are llama.py's own.
init_params = llama.init_params
abstract_params = llama.abstract_params
param_logical_specs = llama.param_logical_specs
prefill = llama.prefill
decode_step = llama.decode_step
greedy_generate = llama.greedy_generate
columns = llama.columns
causal_lm_loss = llama.causal_lm_loss


# ----------------------------------------------------------------------------- HF conversion

# HF's `Gemma2Config` defaults of the fields a config.json may omit.
_HF_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Gemma2Config)}


def _optional_float(cfg: Mapping[str, Any], name: str) -> Optional[float]:
  value = cfg.get(name, _HF_DEFAULTS[name])
  if value is None:
    return None
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    raise ValueError(f"field {name!r} must be a number or null, got {value!r}")
  return float(value)


def config_from_hf(cfg: Mapping[str, Any], *, dtype: DType = jnp.float32,
                   param_dtype: DType = jnp.float32) -> Gemma2Config:
  """`Gemma2Config` from a HF `config.json` dict (missing keys take HF's defaults)."""
  llama_hf.check_model_type(cfg, "gemma2")
  if cfg.get("use_bidirectional_attention"):
    raise ValueError("field 'use_bidirectional_attention' is set; only causal attention is "
                     "supported")
  kwargs = llama_hf.config_kwargs(cfg, _HF_DEFAULTS)
  # Gemma's MLP reads `hidden_activation` (transformers 4 configs also carry an unused
  # `hidden_act`).
  kwargs["hidden_act"] = str(cfg.get("hidden_activation") or _HF_DEFAULTS["hidden_act"])
  kwargs["attention_bias"] = bool(cfg.get("attention_bias", False))
  kwargs["sliding_window"] = llama_hf.optional_int(cfg, "sliding_window",
                                                   _HF_DEFAULTS["sliding_window"])
  layer_types = cfg.get("layer_types")
  kwargs["layer_types"] = None if layer_types is None else tuple(layer_types)
  scalar = cfg.get("query_pre_attn_scalar", _HF_DEFAULTS["query_pre_attn_scalar"])
  if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
    raise ValueError(f"field 'query_pre_attn_scalar' must be a number, got {scalar!r}")
  kwargs["query_pre_attn_scalar"] = scalar
  for name in ("attn_logit_softcapping", "final_logit_softcapping"):
    kwargs[name] = _optional_float(cfg, name)
  return Gemma2Config(dtype=dtype, param_dtype=param_dtype, **kwargs)


def config_to_hf(config: Gemma2Config) -> dict[str, Any]:
  """A `config.json` dict that transformers loads as `Gemma2ForCausalLM`."""
  scalar = config.query_pre_attn_scalar
  out = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
         **llama_hf.common_to_hf(config),
         "hidden_activation": config.hidden_act,
         "attention_bias": config.attention_bias,
         "sliding_window": config.sliding_window,
         "layer_types": list(config.layer_types),
         # HF types it as an integer (it is one in every Gemma 2 checkpoint).
         "query_pre_attn_scalar": int(scalar) if float(scalar).is_integer() else scalar,
         "attn_logit_softcapping": config.attn_logit_softcapping,
         "final_logit_softcapping": config.final_logit_softcapping}
  del out["hidden_act"]  # not a Gemma2Config field (Gemma's MLP reads hidden_activation)
  return out


def _feedforward_norms(config: Gemma2Config) -> list[hf.LayoutTensor]:
  """The two norms a Gemma 2 layer has beyond Llama's layout (`llama_hf.layout`)."""
  return [hf.LayoutTensor(f"model.layers.{i}.{name}.weight",
                          ("model", f"layers_{i}", name, "scale"), (config.hidden_size,))
          for i in range(config.num_hidden_layers)
          for name in ("pre_feedforward_layernorm", "post_feedforward_layernorm")]


def params_from_hf(tensors: Mapping[str, np.ndarray], config: Gemma2Config, *,
                   source: str) -> dict[str, Any]:
  """Our params from a HF `Gemma2ForCausalLM` state dict: Llama's layout
  (`llama_hf.params_from_hf`, with its checks) plus the feed-forward norms."""
  extra = _feedforward_norms(config)
  names = {t.hf_name for t in extra}
  params = llama_hf.params_from_hf({k: v for k, v in tensors.items() if k not in names}, config,
                                   source=source, family="Gemma 2")
  for t in extra:
    array = hf.convert_tensor(tensors, t.hf_name, t.shape, config.param_dtype, source=source)
    node = params
    for part in t.path[:-1]:
      node = node.setdefault(part, {})
    node[t.path[-1]] = jnp.asarray(array)
  return params


def params_to_hf(params: Mapping[str, Any], config: Gemma2Config) -> dict[str, np.ndarray]:
  """HF `Gemma2ForCausalLM` state dict (`(out, in)` weights, no `lm_head.weight` when tied)."""
  return hf.tensors_by_layout(params, llama_hf.layout(config) + _feedforward_norms(config))


# ----------------------------------------------------------------------------- registry

# `hf.from_pretrained` imports this module on demand for model_type 'gemma2'.
FAMILY = hf.Family.of_module("gemma2", sys.modules[__name__], Gemma2ForCausalLM)
hf.register_family("gemma2", FAMILY)

__all__ = [
    "ADAPTER_TARGETS", "ALL_LINEAR_TARGETS", "BLOCK_PATTERN", "FAMILY", "Gemma2Config",
    "Gemma2ForCausalLM", "abstract_params", "causal_lm_loss", "columns", "config_from_hf",
    "config_to_hf", "decode_step", "greedy_generate", "init_params", "param_logical_specs",
    "params_from_hf", "params_to_hf", "prefill",
]
