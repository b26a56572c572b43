"""O-LoRA's regulariser (Wang et al., "Orthogonal Subspace Learning for Language Model
Continual Learning", EMNLP Findings 2023), as in its official trainer (`uie_trainer_lora.py`)::

    loss += lambda1 * sum_{layers} sum |A_old A_new^T|  +  lambda2 * sum_{new factors} ||P||_2

A is LoRA's `[r, d_in]` factor, i.e. our `V` (only the A side is constrained); `A_old`
stacks every earlier task's A (our `[K, r, d_in]` old V), so the first term sums the
absolute entries of all `K x r x r` cross products. The official L2 term adds the Frobenius
norm (`torch.norm(p, p=2)`, not squared) of each new factor (loranew_A and loranew_B, our V
and U); `l2='squared'` gives the sum of squares instead. O-LoRA's defaults are
lambda1 = 0.5, lambda2 = 0.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lbcl_jax import adapters as adapters_lib

PyTree = Any


def orthogonality_loss(adapters: Mapping[str, PyTree]) -> jax.Array:
  """`sum_{layers, k} sum |V_old_k V_new^T|` (0 when there is no old task)."""
  old = adapters_lib.flatten_layers(adapters.get("old", {}))
  new = adapters_lib.flatten_layers(adapters.get("new", {}))
  total = jnp.zeros((), jnp.float32)
  for path, leaf in new.items():
    if path not in old:
      continue
    v_old = jnp.asarray(old[path]["V"], jnp.float32)  # [K, r, d_in]
    v_new = jnp.asarray(leaf["V"], jnp.float32)  # [r, d_in]
    total = total + jnp.abs(jnp.einsum("kri,si->krs", v_old, v_new,
                                       precision=jax.lax.Precision.HIGHEST)).sum()
  return total


def l2_loss(new: PyTree, l2: str = "norm") -> jax.Array:
  """Sum over the new factors U and V of `||P||_F` ('norm', official) or `||P||_F^2`."""
  if l2 not in ("norm", "squared"):
    raise ValueError(f"l2 must be 'norm' or 'squared', got {l2!r}")
  total = jnp.zeros((), jnp.float32)
  for leaf in adapters_lib.flatten_layers(new).values():
    for name in ("U", "V"):
      sq = jnp.sum(jnp.square(jnp.asarray(leaf[name], jnp.float32)))
      # sqrt(0) has an infinite derivative; U starts at exactly 0 under the LoRA init.
      total = total + (sq if l2 == "squared" else jnp.sqrt(jnp.maximum(sq, 1e-30)))
  return total


def olora_penalty(
    adapters: Mapping[str, PyTree],
    lambda1: float = 0.5,
    lambda2: float = 0.0,
    *,
    l2: str = "norm",
) -> jax.Array:
  """O-LoRA's regulariser to add to the task loss.

  Args:
    adapters: the full adapter state `{'old', 'new'}` (differentiate w.r.t. 'new').
    lambda1: weight of the orthogonality term.
    lambda2: weight of the L2 term on the new factors (skipped when a static 0).
    l2: 'norm' (official: sum of Frobenius norms) or 'squared' (sum of squares).

  Returns:
    A float32 scalar.
  """
  out = lambda1 * orthogonality_loss(adapters)
  # Skip the L2 term only for a static zero; lambdas may also be traced (e.g. scheduled).
  if not (isinstance(lambda2, (int, float)) and lambda2 == 0):
    out = out + lambda2 * l2_loss(adapters.get("new", {}), l2)
  return out
