"""Qwen2 / Qwen2.5 decoders (HF's `Qwen2ForCausalLM`) on the Llama module's switches.

The same network as `llama.LlamaForCausalLM` (module paths, adapter targets, KV cache and
`greedy_generate` included) with what `transformers/models/qwen2/modeling_qwen2.py` changes:

* q_proj, k_proj and v_proj always have a bias and o_proj never (`attention_bias` is not read);
  the SwiGLU has none.
* config.json's `sliding_window` applies only when `use_sliding_window` is true, and then only
  to the layers `layer_types` marks "sliding_attention" (by default, as `Qwen2Config` derives
  it, the layers from `max_window_layers` on). Released Qwen2.5 checkpoints set
  `use_sliding_window: false`, so their attention is fully causal.
* HF's defaults differ (vocabulary 151936, no BOS/EOS, ...); RoPE theta is 1e6 in the released
  checkpoints' config.json. Small sizes tie the lm_head to the embedding.

This module maps the config and registers the family; the params are the Llama layout's
(`llama_hf`).
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
# The model functions are Llama's (the backbone and tests call them through this module).
from lbcl_jax.models.llama import (  # noqa: F401  pylint: disable=unused-import
    ADAPTER_TARGETS, ALL_LINEAR_TARGETS, BLOCK_PATTERN, LlamaConfig, abstract_params,
    causal_lm_loss, columns, decode_step, greedy_generate, init_params, param_logical_specs,
    prefill)

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)

# `Qwen2Config`'s defaults of the fields a config.json may omit.
HF_DEFAULTS = {**llama.HF_DEFAULTS, "vocab_size": 151936, "intermediate_size": 22016,
               "num_key_value_heads": 32,
               "max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None}


class Qwen2ForCausalLM(llama.LlamaForCausalLM):
  """`llama.LlamaForCausalLM` built from a Qwen2 config (its own class so that
  `save_pretrained` finds the qwen2 family)."""


def make_model(config: LlamaConfig) -> Qwen2ForCausalLM:
  return Qwen2ForCausalLM(config)


def sliding_from_hf(cfg: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
  """`sliding_window` and `layer_types` as `Qwen2Config`/`Qwen3Config` derive them."""
  if not cfg.get("use_sliding_window", False):
    return {"sliding_window": None, "layer_types": ("full_attention",) * num_layers}
  window = llama_hf.optional_int(cfg, "sliding_window", 4096)
  types = cfg.get("layer_types")
  if types is None:
    first = llama_hf.optional_int(cfg, "max_window_layers", 28)
    types = ["sliding_attention" if window is not None and i >= first else "full_attention"
             for i in range(num_layers)]
  return {"sliding_window": window, "layer_types": tuple(types)}


def sliding_to_hf(config: LlamaConfig) -> dict[str, Any]:
  """The config.json fields of `sliding_from_hf` (`layer_types` written out, so that
  `max_window_layers` need not describe the pattern)."""
  windowed = [i for i, w in enumerate(config.layer_windows) if w is not None]
  return {"use_sliding_window": bool(windowed), "sliding_window": config.sliding_window,
          "max_window_layers": windowed[0] if windowed else config.num_hidden_layers,
          "layer_types": list(config.layer_types)}


def config_from_hf(cfg: Mapping[str, Any], *, dtype: Any = jnp.float32,
                   param_dtype: Any = jnp.float32) -> LlamaConfig:
  """`LlamaConfig` from a Qwen2 `config.json` dict (missing keys take `Qwen2Config`'s
  defaults)."""
  llama_hf.check_model_type(cfg, "qwen2")
  kwargs = llama_hf.config_kwargs(cfg, HF_DEFAULTS)
  kwargs.update(sliding_from_hf(cfg, kwargs["num_hidden_layers"]))
  return LlamaConfig(attention_bias=True, attention_out_bias=False, mlp_bias=False,
                     dtype=dtype, param_dtype=param_dtype, **kwargs)


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
  """A `config.json` dict that transformers loads as `Qwen2ForCausalLM`."""
  if (not config.attention_bias or config.attention_out_bias or config.mlp_bias
      or config.qk_norm):
    raise ValueError("a Qwen2 config has q/k/v biases, no o_proj or MLP bias and no qk_norm")
  return {"architectures": list(SUPPORTED_ARCHITECTURES), "model_type": "qwen2",
          **llama_hf.common_to_hf(config), **sliding_to_hf(config)}


def params_from_hf(tensors: Mapping[str, np.ndarray], config: LlamaConfig, *,
                   source: str) -> dict[str, Any]:
  """Our params from a HF `Qwen2ForCausalLM` state dict (see `llama_hf.params_from_hf`)."""
  return llama_hf.params_from_hf(tensors, config, source=source, family="Qwen2")


params_to_hf = llama_hf.params_to_hf

# `hf.from_pretrained` imports this module on demand for model_type 'qwen2'.
FAMILY = hf.Family.of_module("qwen2", sys.modules[__name__], Qwen2ForCausalLM)
hf.register_family("qwen2", FAMILY)
