"""SeqFT: sequential full fine-tuning of the base model, the lower bound the paper starts from."""

from __future__ import annotations

import dataclasses

from lbcl_jax.methods.base import TRAINED_BASE, Method, NewAdapter


@dataclasses.dataclass(frozen=True)
class SeqFT(Method):
  """Fine-tunes every base weight on each task in turn; no adapters."""

  name: str = "seqft"
  description: str = "sequential full fine-tuning of the base model"
  adapter_init: str = "lora"  # unused: no adapter is ever created

  @property
  def trainable(self) -> NewAdapter:
    return TRAINED_BASE
