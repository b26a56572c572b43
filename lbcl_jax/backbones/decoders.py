"""Qwen2, Qwen3 and Mistral decoders: the causal-LM backbone on their model modules.

Each is `generative.CausalLMBackbone` (O-LoRA's prompt continued with `" " + label` and EOS,
greedy generation or rank classification) with only its model type and module: the models are
`llama.LlamaForCausalLM` with the family's switches (q/k/v biases, qk_norm, sliding window).
None has a default checkpoint: `config.model.path` must name a directory or hub id.
"""

from __future__ import annotations

from lbcl_jax.backbones import generative
from lbcl_jax.models import mistral as mistral_lib
from lbcl_jax.models import qwen2 as qwen2_lib
from lbcl_jax.models import qwen3 as qwen3_lib


class Qwen2Backbone(generative.CausalLMBackbone):
  """Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`)."""

  model_type = "qwen2"
  model_module = qwen2_lib


class Qwen3Backbone(generative.CausalLMBackbone):
  """Qwen3 (`Qwen3ForCausalLM`)."""

  model_type = "qwen3"
  model_module = qwen3_lib


class MistralBackbone(generative.CausalLMBackbone):
  """Mistral (`MistralForCausalLM`)."""

  model_type = "mistral"
  model_module = mistral_lib
