"""Gemma 2 decoders: the paper's protocol on a causal LM, as for Llama (`llama.py` here).

The model reads O-LoRA's prompt and is trained to continue it with `" " + label` and EOS;
evaluation is greedy generation scored by exact match, or rank classification, as
`BackboneConfig.eval_mode` says (`generative.CausalLMBackbone`). No task id reaches the model.
"""

from __future__ import annotations

from lbcl_jax.backbones import generative
from lbcl_jax.errors import InputError
from lbcl_jax.models import gemma2 as gemma2_lib


class Gemma2Backbone(generative.CausalLMBackbone):
  """Decoder-only Gemma 2."""

  model_type = "gemma2"
  model_module = gemma2_lib

  @classmethod
  def default_path(cls) -> str:
    # No Gemma 2 checkpoint ships with a wheel (its licence needs accepting on the Hub).
    raise InputError("config.model.path is empty and Gemma 2 has no default checkpoint: name a "
                     "Gemma 2 checkpoint directory (e.g. a download of google/gemma-2-2b) or "
                     "its Hub id")
