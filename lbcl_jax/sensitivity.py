"""Parameter sensitivity and triplet scores ("learn more": which old knowledge to inject).

The sensitivity of a parameter w on one sample is AdaLoRA's importance `s(w) = |w * dL/dw|`,
a first-order estimate of the loss change when w is zeroed. Before training task t, LB-CL
scores every old triplet `(u_i, sigma_i, v_i)` of every earlier task k on a few seed samples
of task t:

    S_i = s(sigma_i) + mean_j s(U_ji) + mean_j s(V_ij)

(AdaLoRA's `_combine_ipt`). Per-sample gradients come from `jax.vmap(jax.grad(loss))`,
evaluated in chunks with `lax.map` so the seed samples fit in memory on large models.

References:
  Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (AdaLoRA),
  ICLR 2023: RankAllocator's smoothed importance x uncertainty.
  Qiao & Mahdavi, "Learn More, But Bother Less: Parameter-Efficient Continual Learning for
  Large Language Models", NeurIPS 2024.
"""

from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from lbcl_jax import adapters as adapters_lib

PyTree = Any
AGGREGATIONS = ("mean", "adalora", "fisher")


def _num_samples(samples: PyTree) -> int:
  leaves = jax.tree_util.tree_leaves(samples)
  if not leaves:
    raise ValueError("samples is an empty pytree")
  n = leaves[0].shape[0]
  for leaf in leaves:
    if leaf.shape[0] != n:
      raise ValueError(f"samples disagree on the leading (sample) axis: {n} vs {leaf.shape[0]}")
  return n


def per_sample_grads(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    wrt: PyTree,
    samples: PyTree,
    chunk_size: Optional[int] = None,
) -> PyTree:
  """Gradients of `loss_fn(wrt, sample)` for every sample.

  Args:
    loss_fn: `loss_fn(wrt, sample) -> scalar`; `sample` is one sample (no batch axis; add a
      batch axis of 1 inside if the model needs one).
    wrt: the pytree to differentiate.
    samples: pytree whose leaves share a leading sample axis N.
    chunk_size: samples per `vmap` call (`lax.map(..., batch_size=chunk_size)`); None or
      >= N vmaps all samples at once. Smaller chunks trade speed for memory.

  Returns:
    A pytree like `wrt` with a leading axis N.
  """
  n = _num_samples(samples)
  grad_fn = jax.grad(loss_fn)
  if chunk_size is None or chunk_size >= n:
    return jax.vmap(grad_fn, in_axes=(None, 0))(wrt, samples)
  return jax.lax.map(lambda s: grad_fn(wrt, s), samples, batch_size=chunk_size)


def _importance(w, g):
  return jnp.abs(w.astype(jnp.float32) * g.astype(jnp.float32))


def parameter_sensitivity(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    wrt: PyTree,
    samples: PyTree,
    aggregation: str = "mean",
    beta1: float = 0.85,
    beta2: float = 0.85,
    chunk_size: Optional[int] = None,
) -> PyTree:
  """Element-wise sensitivity of `wrt` aggregated over samples.

  Aggregations (I_n = |w * g_n| is the importance on sample n):

  * 'mean': `mean_n I_n` (default; LB-CL's score).
  * 'adalora': AdaLoRA's RankAllocator run over the samples in order, from zeros:
    `I_bar = b1 I_bar + (1 - b1) I_n`, then `U_bar = b2 U_bar + (1 - b2) |I_n - I_bar|`;
    the score is `I_bar * U_bar`.
  * 'fisher': empirical Fisher diagonal `mean_n g_n^2` (ignores w).

  Samples are processed chunk by chunk (`lax.scan` over chunks of `chunk_size`, vmapped
  gradients inside), so only one chunk of per-sample gradients is alive at a time.

  Args:
    loss_fn: `loss_fn(wrt, sample) -> scalar` on one sample.
    wrt: pytree of parameters to score.
    samples: pytree with a leading sample axis N.
    aggregation: 'mean' | 'adalora' | 'fisher'.
    beta1: AdaLoRA's importance EMA coefficient.
    beta2: AdaLoRA's uncertainty EMA coefficient.
    chunk_size: samples per vmapped gradient call; None = all at once.

  Returns:
    A float32 pytree like `wrt`.
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
  n = _num_samples(samples)
  c = n if chunk_size is None else max(1, min(int(chunk_size), n))
  grad_fn = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))
  zeros = jax.tree_util.tree_map(lambda w: jnp.zeros(jnp.shape(w), jnp.float32), wrt)

  if aggregation == "adalora":
    init = (zeros, zeros)

    def fold_one(carry, g):
      i_bar, u_bar = carry
      imp = jax.tree_util.tree_map(_importance, wrt, g)
      i_bar = jax.tree_util.tree_map(lambda a, i: beta1 * a + (1 - beta1) * i, i_bar, imp)
      u_bar = jax.tree_util.tree_map(
          lambda a, i, m: beta2 * a + (1 - beta2) * jnp.abs(i - m), u_bar, imp, i_bar)
      return (i_bar, u_bar), None

    def fold(carry, grads):  # samples of a chunk in order, as AdaLoRA sees its steps
      return jax.lax.scan(fold_one, carry, grads)[0]
  else:
    init = zeros

    def fold(carry, grads):
      if aggregation == "mean":
        term = jax.tree_util.tree_map(lambda w, g: _importance(w[None], g).sum(0), wrt, grads)
      else:
        term = jax.tree_util.tree_map(lambda g: jnp.square(g.astype(jnp.float32)).sum(0), grads)
      return jax.tree_util.tree_map(jnp.add, carry, term)

  n_full = n // c
  main = jax.tree_util.tree_map(lambda x: x[: n_full * c].reshape((n_full, c) + x.shape[1:]),
                                samples)

  def body(carry, chunk):
    return fold(carry, grad_fn(wrt, chunk)), None

  carry = jax.lax.scan(body, init, main)[0]
  if n_full * c < n:  # the ragged tail, one more (smaller) vmapped call
    tail = jax.tree_util.tree_map(lambda x: x[n_full * c:], samples)
    carry = fold(carry, grad_fn(wrt, tail))

  if aggregation == "adalora":
    i_bar, u_bar = carry
    return jax.tree_util.tree_map(jnp.multiply, i_bar, u_bar)
  return jax.tree_util.tree_map(lambda a: a / n, carry)


def triplet_scores(
    sens_tree: PyTree, layers: Union[None, str, Sequence[str]] = None
) -> dict[str, jax.Array]:
  """Per-triplet scores `S = s(sigma) + mean_j s(U_j.) + mean_j s(V_.j)` of every layer.

  Args:
    sens_tree: sensitivities shaped like a stack tree (nested or flat by path), leaves
      `{'U': [K, d_out, r], 'sigma': [K, r], 'V': [K, r, d_in]}` (unstacked leaves give [r]).
    layers: None/'all', a regex (fullmatch on the path) or a list of paths.

  Returns:
    A plain dict `{path: [K, r] float32}` (kept for plots / logs).
  """
  flat = adapters_lib.flatten_layers(sens_tree)
  out = {}
  for path in adapters_lib.select_layers(list(flat), layers):
    leaf = flat[path]
    s_u = jnp.asarray(leaf["U"], jnp.float32).mean(axis=-2)  # mean over d_out
    s_v = jnp.asarray(leaf["V"], jnp.float32).mean(axis=-1)  # mean over d_in
    out[path] = jnp.asarray(leaf["sigma"], jnp.float32) + s_u + s_v
  return out


def score_old_triplets(
    loss_of_stack: Callable[[PyTree, PyTree], jax.Array],
    old_stack: PyTree,
    samples: PyTree,
    *,
    layers: Union[None, str, Sequence[str]] = None,
    aggregation: str = "mean",
    beta1: float = 0.85,
    beta2: float = 0.85,
    chunk_size: Optional[int] = None,
    jit: bool = True,
) -> dict[str, jax.Array]:
  """Scores every old triplet on seed samples of the new task.

  Args:
    loss_of_stack: `loss_of_stack(stack_tree, sample) -> scalar`, the model loss on one
      sample with the (nested) old stack applied, e.g. via `adapters.intercept`.
    old_stack: `adapters['old']`, K >= 1.
    samples: seed samples of the new task (leading axis N, default N = 8 in LB-CL).
    layers: restrict to these layers (None/'all', regex or list of paths); the others are
      passed as constants, so they are not differentiated.
    aggregation: see `parameter_sensitivity`.
    beta1: AdaLoRA importance EMA coefficient.
    beta2: AdaLoRA uncertainty EMA coefficient.
    chunk_size: samples per vmapped gradient call.
    jit: compile the whole scoring once.

  Returns:
    `{path: [K, r] float32}` for the selected layers.
  """
  flat = adapters_lib.flatten_layers(old_stack)
  if not flat:
    raise ValueError("score_old_triplets needs at least one old task (old_stack is empty)")
  chosen = adapters_lib.select_layers(list(flat), layers)
  wrt = {p: dict(flat[p]) for p in chosen}
  const = {p: flat[p] for p in flat if p not in wrt}

  def run(wrt, const, samples):
    def loss(w, sample):
      return loss_of_stack(adapters_lib.unflatten_layers({**const, **w}), sample)

    sens = parameter_sensitivity(loss, wrt, samples, aggregation, beta1, beta2, chunk_size)
    return triplet_scores(sens)

  if jit:
    run = jax.jit(run)
  scores = run(wrt, const, samples)
  return {p: scores[p] for p in chosen}
