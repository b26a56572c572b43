"""The model-family registry and the checkpoint errors: what every checkpoint reader shares.

A *family* (T5, BERT, Llama, ...) knows how to turn a `config.json` dict into its config, build
its Flax module and convert tensors between Hugging Face's names/layout and its Flax params.
Families are keyed by `config.json`'s `model_type`. Each family calls `register_family` at the
bottom of its own module (`t5.py`, `bert.py`, `llama.py`), which `get_family` imports on demand
for the model types listed in `_FAMILY_MODULES`. A model can only exist once its module has
been imported, so `family_of_model` always finds its family registered.

This module imports no other part of `lbcl_jax.models` (family modules only on demand, by
name): the readers (`hf` for checkpoint directories, `gguf` for llama.cpp files) both import
it, and `hf` imports `gguf` to dispatch `.gguf` paths while `gguf` never imports `hf`, so the
imports form no cycle. `hf` re-exports every public name here.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional

import flax.linen as nn

from lbcl_jax.errors import InputError


class CheckpointError(InputError):
  """A checkpoint directory, config or tensor is unusable; the message says which and why."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """The checkpoint directory, its config.json or its weights file does not exist."""


@dataclasses.dataclass(frozen=True)
class Family:
  """How one model family maps to and from Hugging Face checkpoints.

  Attributes:
    name: a short name, e.g. 't5'.
    config_from_hf: `(cfg_dict, *, dtype, param_dtype) -> config`; raise ValueError on bad
      fields.
    config_to_hf: `config -> dict`, a config.json that transformers loads (with
      'architectures' and 'model_type').
    make_model: `config -> nn.Module`.
    params_from_hf: `(tensors, config, *, source) -> params` (unboxed nested dict below
      'params'); raise ValueError naming `source` and the key for a missing, unexpected or
      misshaped tensor.
    params_to_hf: `(params, config) -> {hf_key: np.ndarray}` in HF's layout.
    supported_architectures: the HF `architectures` entries this family can load.
    model_class: the Flax module class `make_model` returns (lets `save_pretrained` find the
      family of a model); optional.
  """

  name: str
  config_from_hf: Callable[..., Any]
  config_to_hf: Callable[[Any], dict]
  make_model: Callable[[Any], nn.Module]
  params_from_hf: Callable[..., Any]
  params_to_hf: Callable[[Any, Any], dict]
  supported_architectures: tuple[str, ...] = ()
  model_class: Optional[type] = None

  @classmethod
  def of_module(cls, name: str, module: Any, model_class: type) -> "Family":
    """The family a model module defines under the standard names: `config_from_hf`,
    `config_to_hf`, `make_model`, `params_from_hf`, `params_to_hf` and
    `SUPPORTED_ARCHITECTURES` (call it at the bottom of the module with
    `sys.modules[__name__]`)."""
    return cls(name=name, config_from_hf=module.config_from_hf,
               config_to_hf=module.config_to_hf, make_model=module.make_model,
               params_from_hf=module.params_from_hf, params_to_hf=module.params_to_hf,
               supported_architectures=tuple(module.SUPPORTED_ARCHITECTURES),
               model_class=model_class)


_FAMILIES: dict[str, Family] = {}
# Modules that register a family when imported; imported lazily so this module does not depend
# on them (and they import it, through hf.py, to register).
_FAMILY_MODULES = {
    "bert": "lbcl_jax.models.bert",
    "gemma2": "lbcl_jax.models.gemma2",
    "llama": "lbcl_jax.models.llama",
    "mistral": "lbcl_jax.models.mistral",
    "qwen2": "lbcl_jax.models.qwen2",
    "qwen3": "lbcl_jax.models.qwen3",
    "t5": "lbcl_jax.models.t5",
}


def register_family(model_type: str, family: Family) -> None:
  """Registers (or replaces) the family for config.json's `model_type`."""
  _FAMILIES[model_type] = family


def get_family(model_type: str) -> Family:
  """The family registered for `model_type`, importing its module if known; KeyError if none."""
  if model_type not in _FAMILIES and model_type in _FAMILY_MODULES:
    try:
      importlib.import_module(_FAMILY_MODULES[model_type])
    except ImportError:
      pass  # Reported below as an unsupported model type.
  if model_type not in _FAMILIES:
    raise KeyError(model_type)
  return _FAMILIES[model_type]


def registered_model_types() -> tuple[str, ...]:
  return tuple(sorted(set(_FAMILIES) | set(_FAMILY_MODULES)))


def family_of_model(model: nn.Module) -> tuple[str, Family]:
  """(model_type, family) of a Flax model built by one of the registered families."""
  # The exact class first: Qwen2/Qwen3/Mistral models are subclasses of Llama's.
  for exact in (True, False):
    for model_type, family in _FAMILIES.items():
      cls = family.model_class
      if cls is not None and (type(model) is cls if exact else isinstance(model, cls)):
        return model_type, family
  raise ValueError(f"no registered family builds {type(model).__name__} models")
