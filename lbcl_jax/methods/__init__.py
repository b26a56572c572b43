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
| seqlora | SeqLoRA     | one LoRA, on each task in turn| lora    | -      | -       | -           |
| inflora | InfLoRA     | a new LoRA's U; V fixed off the old tasks' input subspace           |

Over another method (`config.<name>.over`, any of the above):

| name    | class   | adds                                                                       |
| ------- | ------- | -------------------------------------------------------------------------- |
| replay  | Replay  | a memory of each finished task, a share of every later batch (over seqft)  |
| ewc     | EWC     | a diagonal-Fisher penalty on the trained tree (over seqft or seqlora)      |

Adding a method: one module with a `Method` subclass overriding the hooks it changes
(`lbcl_jax.methods.base`), one row below, and one row in `tests/test_method_battery.py`.
"""

import dataclasses

from lbcl_jax.errors import InputError
from lbcl_jax.methods.base import ContinuedAdapter
from lbcl_jax.methods.base import Method
from lbcl_jax.methods.base import MethodSettings
from lbcl_jax.methods.base import NewAdapter
from lbcl_jax.methods.base import OptimizerSettings
from lbcl_jax.methods.base import Over
from lbcl_jax.methods.base import Probe
from lbcl_jax.methods.base import TrainedBase
from lbcl_jax.methods.base import build_optimizer
from lbcl_jax.methods.base import param_labels
from lbcl_jax.methods.ewc import EWC
from lbcl_jax.methods.inflora import InfLoRA
from lbcl_jax.methods.lora import LoRAFamily
from lbcl_jax.methods.lora import SeqLoRA
from lbcl_jax.methods.mtl import MTL
from lbcl_jax.methods.replay import Replay
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
        SeqLoRA(),
        InfLoRA(),
        Replay(),
        EWC(),
    )
}


def get_method(name: str, settings: MethodSettings | None = None, **overrides) -> Method:
  """The registered method `name`, configured with `settings`, with fields replaced.

  A method `Over` another (replay, EWC) is composed here: on top of the method its settings
  name (`config.<name>.over`, SeqFT by default), configured with the same settings.

  Raises:
    InputError: for an unknown name (the message lists the valid ones).
  """
  if name not in METHODS:
    raise InputError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
  method = METHODS[name]
  if settings is not None:
    method = method.configured(settings)
  if overrides:
    method = dataclasses.replace(method, **overrides)
  if isinstance(method, Over) and method.inner is None:
    if method.inner_name not in METHODS or isinstance(METHODS[method.inner_name], Over):
      valid = ", ".join(n for n, m in METHODS.items() if not isinstance(m, Over))
      raise InputError(f"config.{name}.over={method.inner_name!r}: {name} goes over one of "
                       f"{valid}")
    method = method.over(get_method(method.inner_name, settings))
  return method


__all__ = [
    "ContinuedAdapter", "EWC", "InfLoRA", "LoRAFamily", "METHODS", "MTL", "Method",
    "MethodSettings", "NewAdapter", "OptimizerSettings", "Over", "Probe", "Replay", "SVDFamily",
    "SeqFT", "SeqLoRA", "TrainedBase", "build_optimizer", "get_method", "param_labels",
]
