"""The backbone registry: model families by `config.json`'s model type.

| model type | class         | module                 | evaluation                                  |
| ---------- | ------------- | ---------------------- | ------------------------------------------- |
| t5         | T5Backbone    | lbcl_jax.backbones.t5   | greedy generation + exact match, or rank    |
| bert       | BertBackbone  | lbcl_jax.backbones.bert | label-name scoring, arg-max option          |
| llama      | LlamaBackbone | lbcl_jax.backbones.llama | greedy generation + exact match, or rank   |
| qwen2      | Qwen2Backbone | lbcl_jax.backbones.decoders | as llama (Llama module + switches)      |
| qwen3      | Qwen3Backbone | lbcl_jax.backbones.decoders | as llama                                |
| mistral    | MistralBackbone | lbcl_jax.backbones.decoders | as llama                              |
| gemma2     | Gemma2Backbone | lbcl_jax.backbones.gemma2 | greedy generation + exact match, or rank |

Adding a family: a Flax model with its Hugging Face conversion in `lbcl_jax/models/<name>.py`
(registering an `hf.Family`), a `Backbone` subclass in `lbcl_jax/backbones/<name>.py` (for a
generative family, of `generative.GenerativeBackbone`; for a Llama-like decoder,
`generative.CausalLMBackbone` with only `model_type` and `model_module`), and one row in
`_MODULES` below. See ARCHITECTURE.md.
"""

from __future__ import annotations

import importlib

from absl import logging

from lbcl_jax.backbones.base import Backbone
from lbcl_jax.backbones.base import BackboneConfig
from lbcl_jax.backbones.base import load_model
from lbcl_jax.backbones.base import model_dir
from lbcl_jax.errors import InputError
from lbcl_jax.models import hf

# Model type -> the module defining its Backbone subclass (imported when first asked for, so
# a run pays only for its own family).
_MODULES = {
    "t5": "lbcl_jax.backbones.t5",
    "bert": "lbcl_jax.backbones.bert",
    "llama": "lbcl_jax.backbones.llama",
    "gemma2": "lbcl_jax.backbones.gemma2",
    "mistral": "lbcl_jax.backbones.decoders",
    "qwen2": "lbcl_jax.backbones.decoders",
    "qwen3": "lbcl_jax.backbones.decoders",
}


def backbone_class(model_type: str) -> type[Backbone]:
  """The Backbone subclass registered for `model_type`."""
  if model_type not in _MODULES:
    raise InputError(f"no backbone for model family {model_type!r}; "
                     f"supported: {', '.join(sorted(_MODULES))}")
  module = importlib.import_module(_MODULES[model_type])
  classes = [c for c in vars(module).values() if isinstance(c, type)
             and issubclass(c, Backbone) and c.model_type == model_type]
  if len(classes) != 1:
    raise RuntimeError(f"{_MODULES[model_type]} defines {len(classes)} backbones for "
                       f"{model_type!r}, expected one")
  return classes[0]


def build(config: BackboneConfig) -> Backbone:
  """Loads (or builds with random weights) the model and tokenizer `config` names."""
  cls = backbone_class(config.family)
  path = model_dir(cls, config)
  model_type, model, params = load_model(config, path)
  if model_type != config.family:
    # A Qwen or Gemma directory under a config written for SmolLM2 (family "llama") is what
    # the user means when both families share an interface; a T5 checkpoint under a BERT
    # config is not.
    own = backbone_class(model_type) if model_type in _MODULES else None
    if own is None or not cls.interface or own.interface != cls.interface:
      raise InputError(f"config.model.family={config.family!r} but {path} holds a "
                       f"{model_type!r} model")
    logging.info("config.model.family=%r: %s holds a %r model, which runs as its own family",
                 config.family, path, model_type)
    cls = own
  tokenizer = hf.load_tokenizer(config.tokenizer or path)
  return cls(config, model, tokenizer, params)


__all__ = ["Backbone", "BackboneConfig", "backbone_class", "build"]
