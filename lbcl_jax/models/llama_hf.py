"""Hugging Face I/O of the decoders built on `llama.LlamaForCausalLM`: config fields and tensors.

Llama, Qwen2, Qwen3 and Mistral checkpoints share HF's Llama state-dict layout
(`model.layers.{i}.self_attn.q_proj.weight`, ...); they differ in which biases exist, Qwen3's
per-head `q_norm`/`k_norm`, and config.json fields (defaults, sliding windows). This module holds
what they share: the common config.json fields (`config_kwargs`, `common_to_hf`), the tensor
layout of a `LlamaConfig` (`layout`) and the state-dict conversion both ways (`params_from_hf`,
`params_to_hf`). Each family module (`llama.py`, `qwen2.py`, `qwen3.py`, `mistral.py`) adds its
own fields on top and registers its `hf.Family`.

It reads configs by attribute only, so it imports no family module (they import it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lbcl_jax.models import hf

INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "max_position_embeddings")
OPTIONAL_INT_FIELDS = ("num_key_value_heads", "head_dim", "bos_token_id", "pad_token_id")


def check_model_type(cfg: Mapping[str, Any], expected: str) -> None:
  model_type = cfg.get("model_type", expected)
  if model_type != expected:
    raise ValueError(f"field 'model_type' is {model_type!r}, expected {expected!r}")


def rope_theta(cfg: Mapping[str, Any], default: float) -> float:
  """rope_theta from a transformers 5 (`rope_parameters`) or 4 (`rope_theta`) config."""
  params = cfg.get("rope_parameters")
  if isinstance(params, Mapping):
    rope_type = params.get("rope_type", params.get("type"))
    theta, field = params.get("rope_theta", cfg.get("rope_theta")), "rope_parameters"
  else:
    scaling = cfg.get("rope_scaling")
    rope_type = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    theta, field = cfg.get("rope_theta"), "rope_scaling"
  if rope_type not in (None, "default"):
    raise ValueError(f"field {field!r}: rope type {rope_type!r} is not supported (only the "
                     "default rotary embedding)")
  return float(default) if theta is None else float(theta)


def optional_int(cfg: Mapping[str, Any], name: str, default: Any) -> Any:
  value = cfg.get(name, default)
  if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
    raise ValueError(f"field {name!r} must be an integer or null, got {value!r}")
  return value


def config_kwargs(cfg: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
  """`LlamaConfig` keyword arguments of the fields every family shares, from a config.json
  dict; a missing key takes `defaults[key]` (the family's HF config class default), so
  `defaults` names every field read here (INT_FIELDS, OPTIONAL_INT_FIELDS, eos_token_id,
  rms_norm_eps, attention_dropout, initializer_range, tie_word_embeddings, hidden_act,
  rope_theta)."""
  kwargs: dict[str, Any] = {}
  for name in INT_FIELDS + OPTIONAL_INT_FIELDS:
    value = cfg.get(name, defaults[name])
    if value is None and name in OPTIONAL_INT_FIELDS:
      kwargs[name] = None
      continue
    if not isinstance(value, int) or isinstance(value, bool):
      raise ValueError(f"field {name!r} must be an integer, got {value!r}")
    kwargs[name] = value
  eos = cfg.get("eos_token_id", defaults["eos_token_id"])
  if isinstance(eos, (list, tuple)):
    eos = tuple(int(e) for e in eos)
  elif eos is not None:
    eos = int(eos)
  kwargs["eos_token_id"] = eos
  for name in ("rms_norm_eps", "attention_dropout", "initializer_range"):
    kwargs[name] = float(cfg.get(name, defaults[name]))
  kwargs["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings",
                                               defaults["tie_word_embeddings"]))
  kwargs["hidden_act"] = str(cfg.get("hidden_act", defaults["hidden_act"]))
  kwargs["rope_theta"] = rope_theta(cfg, defaults["rope_theta"])
  if cfg.get("pretraining_tp", 1) not in (1, None):
    raise ValueError(f"field 'pretraining_tp' is {cfg['pretraining_tp']!r}; only 1 is "
                     "supported")
  return kwargs


def common_to_hf(config: Any) -> dict[str, Any]:
  """The config.json fields every family writes (the family adds architectures, model_type
  and its own fields)."""
  eos = config.eos_token_id
  return {
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_hidden_layers,
      "num_attention_heads": config.num_attention_heads,
      "num_key_value_heads": config.num_key_value_heads,
      "head_dim": config.head_dim,
      "hidden_act": config.hidden_act,
      "max_position_embeddings": config.max_position_embeddings,
      "rms_norm_eps": config.rms_norm_eps,
      # transformers 4 reads rope_theta/rope_scaling, transformers 5 rope_parameters.
      "rope_theta": config.rope_theta,
      "rope_scaling": None,
      "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
      "attention_dropout": config.attention_dropout,
      "tie_word_embeddings": config.tie_word_embeddings,
      "initializer_range": config.initializer_range,
      "bos_token_id": config.bos_token_id,
      "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
      "pad_token_id": config.pad_token_id,
      "use_cache": True,
      "dtype": jnp.dtype(config.param_dtype).name,
  }


def layout(config: Any) -> list[hf.LayoutTensor]:
  """Every tensor of the HF state dict of `config` (a `LlamaConfig`) and where it lives in our
  params."""
  tensor = hf.LayoutTensor
  h, d_q = config.hidden_size, config.num_attention_heads * config.head_dim
  d_kv, ff = config.num_key_value_heads * config.head_dim, config.intermediate_size
  out = [tensor("model.embed_tokens.weight", ("model", "embed_tokens", "embedding"),
                (config.vocab_size, h))]

  def linear(hf_name, path, d_in, d_out, bias):
    out.append(tensor(f"{hf_name}.weight", (*path, "kernel"), (d_out, d_in), transpose=True))
    if bias:
      out.append(tensor(f"{hf_name}.bias", (*path, "bias"), (d_out,)))

  for i in range(config.num_hidden_layers):
    hf_layer, ours = f"model.layers.{i}", ("model", f"layers_{i}")
    attn, hf_attn = (*ours, "self_attn"), f"{hf_layer}.self_attn"
    for name, d_in, d_out, bias in (
        ("q_proj", h, d_q, config.attention_bias), ("k_proj", h, d_kv, config.attention_bias),
        ("v_proj", h, d_kv, config.attention_bias),
        ("o_proj", d_q, h, config.attention_out_bias)):
      linear(f"{hf_attn}.{name}", (*attn, name), d_in, d_out, bias)
    if config.qk_norm:
      for name in ("q_norm", "k_norm"):
        out.append(tensor(f"{hf_attn}.{name}.weight", (*attn, name, "scale"),
                          (config.head_dim,)))
    for name, d_in, d_out in (("gate_proj", h, ff), ("up_proj", h, ff), ("down_proj", ff, h)):
      linear(f"{hf_layer}.mlp.{name}", (*ours, "mlp", name), d_in, d_out, config.mlp_bias)
    for name in ("input_layernorm", "post_attention_layernorm"):
      out.append(tensor(f"{hf_layer}.{name}.weight", (*ours, name, "scale"), (h,)))
  out.append(tensor("model.norm.weight", ("model", "norm", "scale"), (h,)))
  if not config.tie_word_embeddings:
    linear("lm_head", ("lm_head",), h, config.vocab_size, False)
  return out


def _is_ignored(key: str) -> bool:
  # Rotary inverse-frequency buffers some older checkpoints saved; they are recomputed.
  return key.endswith("rotary_emb.inv_freq")


def params_from_hf(tensors: Mapping[str, np.ndarray], config: Any, *, source: str,
                   family: str = "Llama") -> dict[str, Any]:
  """Our params from a HF state dict of this layout (HF names, `(out, in)` weights).

  A tied config accepts an `lm_head.weight` only if it equals the embedding (our model has one
  table). Raises `hf.CheckpointError` naming `source` and the key for a missing, unexpected,
  misshaped or non-float tensor.
  """
  params: dict[str, Any] = {}
  used = set()
  for t in layout(config):
    expected = tuple(reversed(t.shape)) if t.transpose else t.shape
    array = hf.convert_tensor(tensors, t.hf_name, expected, config.param_dtype, source=source,
                              transpose=t.transpose)
    used.add(t.hf_name)
    node = params
    for part in t.path[:-1]:
      node = node.setdefault(part, {})
    node[t.path[-1]] = jnp.asarray(array)
  if config.tie_word_embeddings and "lm_head.weight" in tensors:
    head, embed = np.asarray(tensors["lm_head.weight"]), np.asarray(
        tensors["model.embed_tokens.weight"])
    if head.shape != embed.shape or not np.array_equal(head, embed):
      raise hf.CheckpointError(
          f"{source}: tensor 'lm_head.weight' differs from 'model.embed_tokens.weight'; this "
          "config ties them (tie_word_embeddings) so they must be equal")
    used.add("lm_head.weight")
  unexpected = sorted(k for k in set(tensors) - used if not _is_ignored(k))
  if unexpected:
    raise hf.CheckpointError(
        f"{source}: unexpected tensor {unexpected[0]!r} for this {family} config"
        + (f" (and {len(unexpected) - 1} more: {unexpected[1:6]})" if len(unexpected) > 1
           else ""))
  return params


def params_to_hf(params: Mapping[str, Any], config: Any) -> dict[str, np.ndarray]:
  """HF state dict (`(out, in)` weights) from our params.

  A tied config writes no `lm_head.weight` (as transformers saves tied models). Arrays keep
  their dtype and are C-contiguous (as safetensors needs).
  """
  return hf.tensors_by_layout(params, layout(config))
