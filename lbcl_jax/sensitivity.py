"""Parameter sensitivity and triplet scores ("learn more": which old knowledge to inject).

The importance of a parameter w on one sample n is AdaLoRA's sensitivity::

    I_n(w) = |w * dL_n/dw|,

a first-order estimate of the loss change when w is zeroed. LB-CL's score s(w) is this
importance averaged over a few seed samples of the new task (aggregation 'mean', the
default). Before training task t, LB-CL scores every old triplet `(u_i, sigma_i, v_i)` of
every earlier task k on those seed samples:

    S_i = s(sigma_i) + mean_j s(U_ji) + mean_j s(V_ij)

(the form of AdaLoRA's `_combine_ipt`). Aggregations of the per-sample I_n and g_n = dL_n/dw
(see `parameter_sensitivity`):

* 'mean'    (LB-CL, default): `mean_n I_n`.
* 'adalora': AdaLoRA's final "sensitivity x uncertainty" score `I_bar * U_bar`, with
  RankAllocator's EMAs over *training steps* replaced by plain averages over the
  (exchangeable, unordered) seed samples: `I_bar = mean_n I_n`,
  `U_bar = mean_n |I_n - I_bar|`. This is order-independent; it is not AdaLoRA's
  step-by-step EMA, which has no meaning across a set of seed samples.
* 'fisher':  empirical Fisher diagonal `mean_n g_n^2` (ignores w).

Per-sample gradients come from `jax.vmap(jax.grad(loss))`, evaluated chunk by chunk so the
seed samples fit in memory on large models.

References:
  Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (AdaLoRA),
  ICLR 2023: importance `|w * grad|`, and RankAllocator's smoothed importance x uncertainty.
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


def _chunked_sum(
    term_fn: Callable[[PyTree], PyTree],
    grad_fn: Callable[[PyTree, PyTree], PyTree],
    wrt: PyTree,
    samples: PyTree,
    n: int,
    c: int,
) -> PyTree:
  """`sum_n term_fn(grads)` over all samples, `c` samples per vmapped gradient call.

  `term_fn` maps a chunk of per-sample gradients (leading axis = chunk) to a float32 pytree
  like `wrt` (already summed over the chunk). Full chunks go through `lax.scan`; the ragged
  tail is one more, smaller call. Only one chunk of per-sample gradients is alive at a time.
  """
  zeros = jax.tree_util.tree_map(lambda w: jnp.zeros(jnp.shape(w), jnp.float32), wrt)
  n_full = n // c
  main = jax.tree_util.tree_map(lambda x: x[: n_full * c].reshape((n_full, c) + x.shape[1:]),
                                samples)

  def body(carry, chunk):
    return jax.tree_util.tree_map(jnp.add, carry, term_fn(grad_fn(wrt, chunk))), None

  total = jax.lax.scan(body, zeros, main)[0]
  if n_full * c < n:  # the ragged tail
    tail = jax.tree_util.tree_map(lambda x: x[n_full * c:], samples)
    total = jax.tree_util.tree_map(jnp.add, total, term_fn(grad_fn(wrt, tail)))
  return total


def parameter_sensitivity(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    wrt: PyTree,
    samples: PyTree,
    aggregation: str = "mean",
    chunk_size: Optional[int] = None,
    spmd_axis_name: Any = None,
) -> PyTree:
  """Element-wise sensitivity of `wrt` aggregated over samples.

  With g_n = dL_n/dw and the per-sample importance `I_n = |w * g_n|` (AdaLoRA's sensitivity):

  * 'mean' (default; LB-CL's score s(w)): `mean_n I_n`.
  * 'adalora': AdaLoRA's "sensitivity x uncertainty" score with the EMAs over training
    steps replaced by averages over the (exchangeable) samples, so it does not depend on
    their order: `I_bar = mean_n I_n`, `U_bar = mean_n |I_n - I_bar|`, score
    `I_bar * U_bar`. Needs two passes over the samples (the mean, then the mean absolute
    deviation); per-sample gradients are recomputed in the second pass rather than stored.
  * 'fisher': empirical Fisher diagonal `mean_n g_n^2` (ignores w).

  Samples are processed chunk by chunk (`lax.scan` over chunks of `chunk_size`, vmapped
  gradients inside, plus a ragged tail), so only one chunk of per-sample gradients is alive
  at a time.

  Args:
    loss_fn: `loss_fn(wrt, sample) -> scalar` on one sample.
    wrt: pytree of parameters to score.
    samples: pytree with a leading sample axis N.
    aggregation: 'mean' | 'adalora' | 'fisher'.
    chunk_size: samples per vmapped gradient call; None = all at once.
    spmd_axis_name: mesh axes (a name or a tuple) the samples of a chunk are split over
      (`jax.vmap`'s): under a mesh, each device then runs its own samples' gradients, and the
      sharding constraints inside `loss_fn` gain the sample axis.

  Returns:
    A float32 pytree like `wrt`.
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
  n = _num_samples(samples)
  c = n if chunk_size is None else max(1, min(int(chunk_size), n))
  grad_fn = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0), spmd_axis_name=spmd_axis_name)

  def importance_sum(grads):
    return jax.tree_util.tree_map(lambda w, g: _importance(w[None], g).sum(0), wrt, grads)

  if aggregation == "fisher":
    total = _chunked_sum(
        lambda grads: jax.tree_util.tree_map(
            lambda g: jnp.square(g.astype(jnp.float32)).sum(0), grads),
        grad_fn, wrt, samples, n, c)
    return jax.tree_util.tree_map(lambda a: a / n, total)

  i_bar = jax.tree_util.tree_map(
      lambda a: a / n, _chunked_sum(importance_sum, grad_fn, wrt, samples, n, c))
  if aggregation == "mean":
    return i_bar

  # 'adalora': second pass, mean absolute deviation of I_n around I_bar.
  def deviation_sum(grads):
    return jax.tree_util.tree_map(
        lambda w, g, m: jnp.abs(_importance(w[None], g) - m[None]).sum(0), wrt, grads, i_bar)

  u_bar = jax.tree_util.tree_map(
      lambda a: a / n, _chunked_sum(deviation_sum, grad_fn, wrt, samples, n, c))
  return jax.tree_util.tree_map(jnp.multiply, i_bar, u_bar)


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
    chunk_size: Optional[int] = None,
    jit: bool = True,
    spmd_axis_name: Any = None,
) -> dict[str, jax.Array]:
  """Scores every old triplet on seed samples of the new task.

  Args:
    loss_of_stack: `loss_of_stack(stack_tree, sample) -> scalar`, the model loss on one
      sample with the (nested) old stack applied, e.g. via `adapters.intercept`.
    old_stack: `adapters['old']`, K >= 1.
    samples: seed samples of the new task (leading axis N, default N = 8 in LB-CL).
    layers: restrict to these layers (None/'all', regex or list of paths); the others are
      passed as constants, so they are not differentiated.
    aggregation: 'mean' (LB-CL, default) | 'adalora' | 'fisher'; see
      `parameter_sensitivity`.
    chunk_size: samples per vmapped gradient call.
    jit: compile the whole scoring once.
    spmd_axis_name: mesh axes the seed samples are split over (see `parameter_sensitivity`).

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

    sens = parameter_sensitivity(loss, wrt, samples, aggregation, chunk_size, spmd_axis_name)
    return triplet_scores(sens)

  if jit:
    run = jax.jit(run)
  scores = run(wrt, const, samples)
  return {p: scores[p] for p in chosen}
