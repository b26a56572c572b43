"""The method registry: every continual-learning method the driver can run.

| name    | class       | trains                        | init    | inject | project | O-LoRA loss |
| ------- | ----------- | ----------------------------- | ------- | ------ | ------- | ----------- |
| seqft   | SeqFT       | all base params, sequentially | -       | -      | -       | -           |
| inclora | LoRAFamily  | a new LoRA per task           | lora    | -      | -       | -           |
| olora   | LoRAFamily  | a new LoRA per task           | lora    | -      | -       | yes         |
| nlnbcl  | SVDFamily   | a new SVD adapter per task    | adalora | -      | -       | -           |
| lcl     | SVDFamily   | a new SVD adapter per task    | adalora | yes    | -       | -           |
| bcl     | SVDFamily   | a new SVD adapter per task    | adalora | -      | yes     | -           |
| lbcl    | SVDFamily   | a new SVD adapter per task    | adalora | yes    | yes     | -           |
| mtl     | MTL         | one LoRA on all tasks jointly | lora    | -      | -       | -           |

Adding a method: one module with a `Method` subclass overriding the hooks it changes
(`lbcl_jax.methods.base`), one row below, and one row in `tests/test_method_battery.py`.
"""

import dataclasses

from lbcl_jax.errors import InputError
from lbcl_jax.methods.base import Method
from lbcl_jax.methods.base import MethodSettings
from lbcl_jax.methods.base import NewAdapter
from lbcl_jax.methods.base import OptimizerSettings
from lbcl_jax.methods.base import TrainedBase
from lbcl_jax.methods.base import build_optimizer
from lbcl_jax.methods.base import param_labels
from lbcl_jax.methods.lora import LoRAFamily
from lbcl_jax.methods.mtl import MTL
from lbcl_jax.methods.seqft import SeqFT
from lbcl_jax.methods.svd import SVDFamily

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        SeqFT(),
        LoRAFamily("inclora"),
        LoRAFamily("olora", "IncLoRA + O-LoRA orthogonality loss", olora=True),
        SVDFamily("nlnbcl"),
        SVDFamily("lcl", "SVD adapters + knowledge injection", inject=True),
        SVDFamily("bcl", "SVD adapters + gradient projection", project=True),
        SVDFamily("lbcl", "LB-CL: SVD adapters + injection + projection", inject=True,
                  project=True),
        MTL(),
    )
}


def get_method(name: str, settings: MethodSettings | None = None, **overrides) -> Method:
  """The registered method `name`, configured with `settings`, with fields replaced.

  Raises:
    InputError: for an unknown name (the message lists the valid ones).
  """
  if name not in METHODS:
    raise InputError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
  method = METHODS[name]
  if settings is not None:
    method = method.configured(settings)
  return dataclasses.replace(method, **overrides) if overrides else method


__all__ = [
    "LoRAFamily", "METHODS", "MTL", "Method", "MethodSettings", "NewAdapter", "OptimizerSettings",
    "SVDFamily", "SeqFT", "TrainedBase", "build_optimizer", "get_method", "param_labels",
]
