"""Mistral decoders (HF's `MistralForCausalLM`) on the Llama module's switches.

The same network as `llama.LlamaForCausalLM` with what
`transformers/models/mistral/modeling_mistral.py` changes: every layer attends within
`sliding_window` (a query at slot q sees slots `q - sliding_window < k <= q`, HF's
`sliding_window_overlay`; null means fully causal), no biases anywhere, and `MistralConfig`'s
defaults (sliding_window 4096, 8 key/value heads, ...). The KV cache keeps every slot, so
cached greedy decoding applies the same window through its mask.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lbcl_jax.models import hf
from lbcl_jax.models import llama
from lbcl_jax.models import llama_hf
from lbcl_jax.models.llama import (  # noqa: F401  pylint: disable=unused-import
    ADAPTER_TARGETS, ALL_LINEAR_TARGETS, BLOCK_PATTERN, LlamaConfig, abstract_params,
    causal_lm_loss, columns, decode_step, greedy_generate, init_params, param_logical_specs,
    prefill)

SUPPORTED_ARCHITECTURES = ("MistralForCausalLM",)

# `MistralConfig`'s defaults of the fields a config.json may omit.
HF_DEFAULTS = {**llama.HF_DEFAULTS, "intermediate_size": 14336,
               "num_key_value_heads": 8, "max_position_embeddings": 131072}


class MistralForCausalLM(llama.LlamaForCausalLM):
  """`llama.LlamaForCausalLM` built from a Mistral config (`sliding_window` on every layer)."""


def make_model(config: LlamaConfig) -> MistralForCausalLM:
  return MistralForCausalLM(config)


def config_from_hf(cfg: Mapping[str, Any], *, dtype: Any = jnp.float32,
                   param_dtype: Any = jnp.float32) -> LlamaConfig:
  """`LlamaConfig` from a Mistral `config.json` dict (missing keys take `MistralConfig`'s
  defaults; `layer_types`, which HF's Mistral ignores, is ignored too)."""
  llama_hf.check_model_type(cfg, "mistral")
  kwargs = llama_hf.config_kwargs(cfg, HF_DEFAULTS)
  window = llama_hf.optional_int(cfg, "sliding_window", 4096)
  return LlamaConfig(sliding_window=window, dtype=dtype, param_dtype=param_dtype, **kwargs)


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
  """A `config.json` dict that transformers loads as `MistralForCausalLM`."""
  if (config.attention_bias or config.attention_out_bias or config.mlp_bias or config.qk_norm
      or any(w != config.sliding_window for w in config.layer_windows)):
    raise ValueError("a Mistral config has no biases, no qk_norm and one sliding_window (or "
                     "none) for every layer")
  return {"architectures": list(SUPPORTED_ARCHITECTURES), "model_type": "mistral",
          **llama_hf.common_to_hf(config), "sliding_window": config.sliding_window}


def params_from_hf(tensors: Mapping[str, np.ndarray], config: LlamaConfig, *,
                   source: str) -> dict[str, Any]:
  """Our params from a HF `MistralForCausalLM` state dict (see `llama_hf.params_from_hf`)."""
  return llama_hf.params_from_hf(tensors, config, source=source, family="Mistral")


params_to_hf = llama_hf.params_to_hf

# `hf.from_pretrained` imports this module on demand for model_type 'mistral'.
FAMILY = hf.Family.of_module("mistral", sys.modules[__name__], MistralForCausalLM)
hf.register_family("mistral", FAMILY)
