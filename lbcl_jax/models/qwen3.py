"""Qwen3 decoders (HF's `Qwen3ForCausalLM`) on the Llama module's switches.

The same network as `llama.LlamaForCausalLM` with what
`transformers/models/qwen3/modeling_qwen3.py` changes:

* an RMSNorm over head_dim on every query and key head, before the rotary embedding
  (`self_attn.q_norm` / `self_attn.k_norm`, one `head_dim` scale each: `qk_norm`);
* no q/k/v bias (unless `attention_bias`, which then, as in HF, covers o_proj too);
* an explicit `head_dim` (128 by default, not `hidden_size // num_attention_heads`);
* the sliding-window fields of Qwen2 (`qwen2.sliding_from_hf`), off in released checkpoints.
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
from lbcl_jax.models import qwen2
from lbcl_jax.models.llama import (  # noqa: F401  pylint: disable=unused-import
    ADAPTER_TARGETS, ALL_LINEAR_TARGETS, BLOCK_PATTERN, LlamaConfig, abstract_params,
    causal_lm_loss, columns, decode_step, greedy_generate, init_params, param_logical_specs,
    prefill)

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM",)

# `Qwen3Config`'s defaults of the fields a config.json may omit.
HF_DEFAULTS = {**qwen2.HF_DEFAULTS, "head_dim": 128}


class Qwen3ForCausalLM(llama.LlamaForCausalLM):
  """`llama.LlamaForCausalLM` built from a Qwen3 config (`qk_norm` set)."""


def make_model(config: LlamaConfig) -> Qwen3ForCausalLM:
  return Qwen3ForCausalLM(config)


def config_from_hf(cfg: Mapping[str, Any], *, dtype: Any = jnp.float32,
                   param_dtype: Any = jnp.float32) -> LlamaConfig:
  """`LlamaConfig` from a Qwen3 `config.json` dict (missing keys take `Qwen3Config`'s
  defaults)."""
  llama_hf.check_model_type(cfg, "qwen3")
  kwargs = llama_hf.config_kwargs(cfg, HF_DEFAULTS)
  kwargs.update(qwen2.sliding_from_hf(cfg, kwargs["num_hidden_layers"]))
  bias = bool(cfg.get("attention_bias", False))
  return LlamaConfig(attention_bias=bias, attention_out_bias=bias, mlp_bias=False,
                     qk_norm=True, dtype=dtype, param_dtype=param_dtype, **kwargs)


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
  """A `config.json` dict that transformers loads as `Qwen3ForCausalLM`."""
  if not config.qk_norm or config.mlp_bias or config.attention_out_bias != config.attention_bias:
    raise ValueError("a Qwen3 config has qk_norm, no MLP bias and one attention_bias for "
                     "q/k/v/o")
  return {"architectures": list(SUPPORTED_ARCHITECTURES), "model_type": "qwen3",
          **llama_hf.common_to_hf(config), "attention_bias": config.attention_bias,
          **qwen2.sliding_to_hf(config)}


def params_from_hf(tensors: Mapping[str, np.ndarray], config: LlamaConfig, *,
                   source: str) -> dict[str, Any]:
  """Our params from a HF `Qwen3ForCausalLM` state dict (q_norm/k_norm included)."""
  return llama_hf.params_from_hf(tensors, config, source=source, family="Qwen3")


params_to_hf = llama_hf.params_to_hf

# `hf.from_pretrained` imports this module on demand for model_type 'qwen3'.
FAMILY = hf.Family.of_module("qwen3", sys.modules[__name__], Qwen3ForCausalLM)
hf.register_family("qwen3", FAMILY)
