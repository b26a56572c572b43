"""The LoRA family: IncLoRA (a new LoRA per task), O-LoRA (plus its orthogonality loss) and
SeqLoRA (one LoRA trained on every task in turn).

LoRA-style methods keep sigma frozen at 1, so the adapter is exactly `B A` (B = U, A = V).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax

from lbcl_jax import olora as olora_lib
from lbcl_jax.methods.base import CONTINUED_ADAPTER, Method, MethodSettings, NewAdapter

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LoRAFamily(Method):
  """A new LoRA per task, old ones frozen; O-LoRA adds `lambda1 sum |A_old A_new^T| +
  lambda2 |new|` to the loss once there are old adapters.

  The scaling and dropout defaults are official O-LoRA's (`src/run_uie_lora.py`:
  `LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1)`): scaling 32 / r (4 at r = 8) and
  dropout 0.1 on the adapter input; `config.adapters.scaling` / `.dropout` override them.

  Attributes:
    olora: add O-LoRA's orthogonality (+ L2) loss.
    olora_lambda1: the orthogonality weight.
    olora_lambda2: the L2 weight.
  """

  name: str = "inclora"
  description: str = "a new LoRA per task, old ones frozen, no constraint"
  adapter_init: str = "lora"
  train_sigma: bool = False
  lora_alpha: Optional[float] = 32.0
  adapter_dropout: float = 0.1
  olora: bool = False
  olora_lambda1: float = 0.5
  olora_lambda2: float = 0.0

  def regularizer(self, new: PyTree, old: Optional[PyTree],
                  state: Optional[PyTree] = None) -> Optional[jax.Array]:
    del state
    if not (self.olora and old):
      return None
    return olora_lib.olora_penalty({"old": old, "new": new}, self.olora_lambda1,
                                   self.olora_lambda2)

  def configured(self, settings: MethodSettings) -> "LoRAFamily":
    return dataclasses.replace(self, olora_lambda1=settings.olora_lambda1,
                               olora_lambda2=settings.olora_lambda2)


@dataclasses.dataclass(frozen=True)
class SeqLoRA(LoRAFamily):
  """One LoRA trained on each task in turn (the O-LoRA paper's SeqLoRA baseline), with O-LoRA's
  LoRA settings; what EWC over adapters anchors (`config.ewc.over=seqlora`)."""

  name: str = "seqlora"
  description: str = "one LoRA trained on every task in turn"

  @property
  def trainable(self) -> NewAdapter:
    return CONTINUED_ADAPTER
