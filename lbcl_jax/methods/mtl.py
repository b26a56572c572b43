"""MTL: one LoRA trained on every task at once, the multi-task upper bound."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from lbcl_jax.methods.base import Method


@dataclasses.dataclass(frozen=True)
class MTL(Method):
  """One stage training one LoRA on the union of all tasks (mixed per-task batches), with
  O-LoRA's LoRA settings (scaling 32 / r, dropout 0.1), as the LoRA family."""

  name: str = "mtl"
  description: str = "one LoRA trained on all tasks jointly (upper bound)"
  adapter_init: str = "lora"
  train_sigma: bool = False
  lora_alpha: Optional[float] = 32.0
  adapter_dropout: float = 0.1

  def stages(self, tasks: Sequence[str]) -> list[list[str]]:
    return [list(tasks)]
