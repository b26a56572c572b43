"""Knowledge injection ("learn more"): the new adapter starts from the old ones.

Given per-layer triplet scores `S^k_i` of every old task k (see `sensitivity`), LB-CL weights
the tasks per layer and triplet,

    alpha^k_i = S^k_i / sum_k' S^k'_i,

and initialises the new adapter as the alpha-weighted sum of the old triplets:

    U[:, i] = sum_k alpha^k_i U_k[:, i],  sigma_i = sum_k alpha^k_i sigma_k,i,
    V[i, :] = sum_k alpha^k_i V_k[i, :].

The "without sigma" variant injects only U and V and keeps the fresh sigma. Layers that are
not selected keep the fresh initialisation.

Which layers are injected (`layers`):

* 'all': every scored layer;
* `TopBlocks(n)`: every adapted layer of the top n transformer blocks by depth, decoder
  blocks before encoder blocks (`top_block_layers`). The paper's motivating experiment
  copies the *top* 4 or 9 layers and finds copying all of them catastrophic;
* an int n: the n adapted layers with the highest *total* score `sum_{k,i} S^k_i`;
* a regex (fullmatch on the path) or a list of paths.

`parse_layers` reads the run config's spelling of these.
"""

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from lbcl_jax import adapters as adapters_lib
from lbcl_jax.errors import InputError

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TopBlocks:
  """The adapted layers of the top `n` transformer blocks by depth (decoder side first)."""

  n: int


def parse_layers(spec: Any) -> Any:
  """`config.injection.layers` -> what `inject` and `SVDFamily.inject_layers` take.

  'all'; 'depth:N' -> `TopBlocks(N)`; 'score:N' or a bare 'N' -> the int N (top N layers by
  score); anything else is one regular expression over layer paths (fullmatch), commas
  included ('layer_(4|5)/.*', 'block_{10,11}/.*'): several paths are spelled 'a|b'.

  Raises:
    InputError: naming the field, for a negative N or a regex that does not compile.
  """
  text = str(spec).strip()
  if text == "all":
    return "all"
  m = re.fullmatch(r"(depth:|score:)?\s*(-?\d+)", text)
  if m:
    n = int(m.group(2))
    if n < 0:
      raise InputError(f"config.injection.layers={spec!r}: N must be >= 0")
    return TopBlocks(n) if m.group(1) == "depth:" else n
  try:
    re.compile(text)
  except re.error as e:
    raise InputError(f"config.injection.layers={spec!r}: expected 'all', 'depth:N', 'score:N' "
                     f"or a regular expression over layer paths ({e})") from None
  return text


def block_of(path: str, block_pattern: str) -> Optional[tuple[str, int]]:
  """(stack, block index) of a layer path, by the family's `BLOCK_PATTERN` (groups `stack`
  and `index`); None for a path outside every block."""
  m = re.search(block_pattern, path)
  return None if m is None else (m.group("stack") or "", int(m.group("index")))


def top_block_layers(paths: Sequence[str], n: int, block_pattern: str) -> tuple[str, ...]:
  """The paths in the top `n` blocks by depth: decoder blocks from the last down, then the
  other stacks' blocks from the last down (T5: the decoder's top blocks first; BERT and
  Llama: their single stack's top blocks). In `paths` order."""
  blocks = {b for b in (block_of(p, block_pattern) for p in paths) if b is not None}
  ranked = sorted(blocks, key=lambda b: (b[0] != "decoder", -b[1], b[0]))
  chosen = set(ranked[:max(int(n), 0)])
  return tuple(p for p in paths if block_of(p, block_pattern) in chosen)


def _flat_scores(scores: Mapping[str, Any]) -> dict[str, Any]:
  return adapters_lib.flatten_arrays(scores)


def alpha_weights(scores: Mapping[str, Any], task_mask: Optional[Any] = None
                  ) -> dict[str, Any]:
  """Normalises triplet scores over tasks: `alpha^k = S^k / sum_k S^k` per layer, triplet.

  A (layer, triplet) whose scores sum to zero over tasks (e.g. all sensitivities vanish)
  falls back to uniform weights 1/K, so the injected triplet is the plain task average
  rather than NaN or zero.

  Args:
    scores: `{path: [K, r]}` (flat or nested), non-negative.
    task_mask: `[K]` bool, the entries of the task axis that hold old tasks (None: all); the
      others (a stack padded by `adapters.pad_tasks`) get weight 0, also in the fallback.

  Returns:
    Same keys and shapes, float32, summing to 1 over the task axis.
  """
  out = {}
  for path, s in _flat_scores(scores).items():
    s = jnp.asarray(s, jnp.float32)
    total = s.sum(axis=0, keepdims=True)
    if task_mask is None:
      uniform = jnp.full_like(s, 1.0 / s.shape[0])
    else:
      mask = jnp.asarray(task_mask, jnp.float32)[:, None]
      uniform = jnp.broadcast_to(mask / mask.sum(), s.shape)
      s = s * mask
    safe = jnp.where(total > 0, total, 1.0)
    out[path] = jnp.where(total > 0, s / safe, uniform)
  return out


def _is_int(layers) -> bool:
  return isinstance(layers, (int, np.integer)) and not isinstance(layers, bool)


def top_n_mask(scores: Mapping[str, Any], n: int) -> dict[str, jax.Array]:
  """`{path: bool scalar}`: True for the n layers with the highest total score.

  The total of a layer is `sum_{k,i} S^k_i`; ties go to the earlier path. Works on traced
  scores (the selection is a mask, not a Python list), so `inject` can run under `jit`.
  """
  if n < 0:
    raise ValueError(f"layers must be >= 0, got {n}")
  flat = _flat_scores(scores)
  paths = list(flat)
  totals = jnp.stack([jnp.sum(jnp.asarray(flat[p], jnp.float32)) for p in paths])
  order = jnp.argsort(-totals, stable=True)  # stable: ties keep path order
  rank = jnp.zeros((len(paths),), jnp.int32).at[order].set(jnp.arange(len(paths)))
  return {p: rank[i] < n for i, p in enumerate(paths)}


def select_injected_layers(
    scores: Mapping[str, Any], layers: Union[str, int, Sequence[str]] = "all"
) -> list[str]:
  """Which layers get injected (concrete scores; see `top_n_mask` for the traced form).

  Args:
    scores: `{path: [K, r]}`.
    layers: 'all'; an int n (the n layers with the highest total score `sum_{k,i} S^k_i`,
      ties broken by path order); a regex string (fullmatch); or a list of paths.

  Returns:
    Paths in scores order.
  """
  paths = list(_flat_scores(scores))
  if _is_int(layers):
    mask = top_n_mask(scores, int(layers))
    return [p for p in paths if bool(mask[p])]
  return adapters_lib.select_layers(paths, layers)


def inject(
    old_stack: PyTree,
    scores: Mapping[str, Any],
    *,
    with_sigma: bool = True,
    layers: Union[str, int, Sequence[str]] = "all",
    fresh: Optional[PyTree] = None,
    task_mask: Optional[Any] = None,
) -> dict:
  """The injected initial adapter of the new task (jit-safe).

  Args:
    old_stack: `adapters['old']` with leaves `[K, ...]`.
    scores: `{path: [K, r]}` triplet scores (from `sensitivity.triplet_scores`); layers
      without scores are not injected.
    with_sigma: inject sigma too; False is the paper's "without sigma" variant (fresh sigma).
    layers: 'all' | int n (the n layers with the highest total score) | regex | list of
      paths. With an int the choice depends on the score values, so every scored layer is
      computed and the fresh one is kept where the (possibly traced) mask is False.
    fresh: a fresh 'new' tree (`adapters.init_new`); required unless every layer is injected
      with sigma. Its structure and dtype define the output's.
    task_mask: `[K]` bool, which entries of the task axis are old tasks (None: all), for an
      old stack and scores padded to a fixed number of tasks (`adapters.pad_tasks`): the
      padding gets no weight, so the result is the unpadded one's.

  Returns:
    The nested 'new' tree.

  Raises:
    ValueError: on missing `fresh` when needed or on scores / stack shape mismatch.
  """
  old = adapters_lib.flatten_layers(old_stack)
  flat_scores = _flat_scores(scores)
  unknown = [p for p in flat_scores if p not in old]
  if unknown:
    raise ValueError(f"scores name layers absent from old_stack: {unknown[:6]}")
  if _is_int(layers):
    candidates = list(flat_scores)
    masks = top_n_mask(flat_scores, int(layers))
    if int(layers) >= len(candidates):  # statically everything: no masking needed
      masks = None
  else:
    candidates = select_injected_layers(flat_scores, layers)
    masks = None
  fresh_flat = adapters_lib.flatten_layers(fresh) if fresh is not None else {}
  if fresh is None:
    if not with_sigma:
      raise ValueError("inject(with_sigma=False) needs fresh= for the new sigma")
    missing = [p for p in old if p not in candidates or masks is not None]
    if missing:
      raise ValueError(f"inject: layers {missing[:6]} may not be injected; pass fresh=")
  else:
    absent = [p for p in candidates if p not in fresh_flat]
    if absent:
      raise ValueError(f"inject: fresh has no adapter for injected layers {absent[:6]}")
  alphas = alpha_weights({p: flat_scores[p] for p in candidates}, task_mask)
  out = dict(fresh_flat)
  hi = jax.lax.Precision.HIGHEST  # exact f32 sums on TPU/GPU too
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  for path in candidates:
    leaf = old[path]
    a = alphas[path]
    k, r = leaf["sigma"].shape
    if a.shape != (k, r):
      raise ValueError(f"scores for {path!r} have shape {a.shape}, expected {(k, r)}")
    dtype = fresh_flat[path]["U"].dtype if path in fresh_flat else leaf["U"].dtype
    new = {
        "U": jnp.einsum("kr,kor->or", a, f32(leaf["U"]), precision=hi),
        "sigma": jnp.einsum("kr,kr->r", a, f32(leaf["sigma"]), precision=hi),
        "V": jnp.einsum("kr,kri->ri", a, f32(leaf["V"]), precision=hi),
    }
    if not with_sigma:
      new["sigma"] = fresh_flat[path]["sigma"]
    new = {name: jnp.asarray(new[name]).astype(dtype) for name in adapters_lib.LEAF_NAMES}
    if masks is not None:
      new = {name: jnp.where(masks[path], new[name], jnp.asarray(fresh_flat[path][name], dtype))
             for name in adapters_lib.LEAF_NAMES}
    out[path] = new
  # Keep the fresh tree's layer order so the result is structurally identical to it.
  order = list(fresh_flat) if fresh is not None else candidates
  return adapters_lib.unflatten_layers({p: out[p] for p in order})
