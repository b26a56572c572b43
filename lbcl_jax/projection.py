"""Orthogonal gradient projection ("bother less") as an optax transform.

While task t trains, the gradients of its factors are projected onto the orthogonal
complement of the old tasks' subspaces, per adapted layer:

* `U^t` (`[d_out, r]`): remove the component in span{old U columns}: `g - Q_u (Q_u^T g)`;
* `V^t` (`[r, d_in]`): remove the component in span{old V rows}: `g - (g Q_v) Q_v^T`;

with `Q_u: [d_out, K*r]`, `Q_v: [d_in, K*r]` orthonormal bases of the stacked old factors.
The bases are built once (in `init`, by SVD or QR with a relative rank tolerance) and kept in
the state with fixed shapes: columns past the numerical rank are zero, so the transform is
jit-safe and its state can be sharded like any array. When the old subspaces are mutually
orthogonal, `I - Q Q^T` equals the paper's `I - sum_k Q_k Q_k^T`; in general it is the exact
projector onto the complement of their sum, which the per-task sum is not.

sigma and every other leaf pass through untouched; if the updates are a full adapter state
`{'old', 'new'}`, the old leaves get zero updates.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lbcl_jax import adapters as adapters_lib

PyTree = Any
METHODS = ("svd", "qr")


class OrthogonalProjectionState(NamedTuple):
  """State of `orthogonal_projection`.

  Attributes:
    bases: `{layer_path: {'U': [d_out, m_u], 'V': [d_in, m_v]}}` float32 orthonormal
      columns (zero columns past the numerical rank), `m = min(d, K*r)`.
  """

  bases: dict


def orthonormal_basis(m: jax.Array, rtol: float = 1e-6, method: str = "svd") -> jax.Array:
  """Orthonormal basis of span(columns of `m`) with fixed shape `[d, min(d, n)]`.

  Args:
    m: `[d, n]` matrix.
    rtol: columns whose singular value (SVD) or |R_ii| (QR) is <= rtol * the largest are
      dropped (zeroed), so numerically dependent directions are not projected out.
    method: 'svd' (rank-revealing, robust) or 'qr' (cheaper; reliable only when the stacked
      factors have full column rank, which trained adapters do in practice).

  Returns:
    float32 `[d, min(d, n)]` with orthonormal non-zero columns.
  """
  m = jnp.asarray(m, jnp.float32)
  if method == "svd":
    q, s, _ = jnp.linalg.svd(m, full_matrices=False)
    keep = s > rtol * jnp.max(s, initial=0.0)
  elif method == "qr":
    q, r = jnp.linalg.qr(m, mode="reduced")
    diag = jnp.abs(jnp.diagonal(r))
    keep = diag > rtol * jnp.max(diag, initial=0.0)
  else:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  return q * keep[None, :].astype(q.dtype)


def build_bases(old_stack: PyTree, rtol: float = 1e-6, method: str = "svd") -> dict:
  """Per-layer orthonormal bases of the old U columns and old V rows.

  Args:
    old_stack: `adapters['old']` (nested or flat), leaves `U: [K, d_out, r]`, `V: [K, r, d_in]`.
    rtol: relative rank tolerance, see `orthonormal_basis`.
    method: 'svd' | 'qr'.

  Returns:
    `{path: {'U': [d_out, min(d_out, K*r)], 'V': [d_in, min(d_in, K*r)]}}`.
  """
  bases = {}
  for path, leaf in adapters_lib.flatten_layers(old_stack).items():
    u = jnp.asarray(leaf["U"])
    v = jnp.asarray(leaf["V"])
    k, d_out, r = u.shape
    cols_u = jnp.transpose(u, (1, 0, 2)).reshape(d_out, k * r)  # [d_out, K*r]
    rows_v = v.reshape(k * r, v.shape[-1])  # [K*r, d_in]
    bases[path] = {
        "U": orthonormal_basis(cols_u, rtol, method),
        "V": orthonormal_basis(rows_v.T, rtol, method),
    }
  return bases


def project_columns(g: jax.Array, q: jax.Array) -> jax.Array:
  """`g - Q (Q^T g)` for `g: [d, r]`, in f32, returned in g's dtype."""
  g32 = g.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  out = g32 - jnp.matmul(q, jnp.matmul(q.T, g32, precision=hi), precision=hi)
  return out.astype(g.dtype)


def project_rows(g: jax.Array, q: jax.Array) -> jax.Array:
  """`g - (g Q) Q^T` for `g: [r, d]`, in f32, returned in g's dtype."""
  g32 = g.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  out = g32 - jnp.matmul(jnp.matmul(g32, q, precision=hi), q.T, precision=hi)
  return out.astype(g.dtype)


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _project_tree(tree: PyTree, bases: Mapping[str, Any]) -> PyTree:
  """Projects every U/V leaf whose layer path has a basis; other leaves unchanged."""

  def fn(path, g):
    keys = [_key_name(e) for e in path]
    if len(keys) < 2 or keys[-1] not in ("U", "V"):
      return g
    layer = bases.get("/".join(keys[:-1]))
    if layer is None:
      return g
    if keys[-1] == "U":
      return project_columns(g, layer["U"])
    return project_rows(g, layer["V"])

  return jax.tree_util.tree_map_with_path(fn, tree)


def _is_full_state(tree: PyTree) -> bool:
  return isinstance(tree, Mapping) and set(tree) == {"old", "new"}


def project_updates(updates: PyTree, bases: Mapping[str, Any]) -> PyTree:
  """Applies the projection to a 'new' tree or a full `{'old', 'new'}` state (old -> 0)."""
  if _is_full_state(updates):
    return {
        "old": jax.tree_util.tree_map(jnp.zeros_like, updates["old"]),
        "new": _project_tree(updates["new"], bases),
    }
  return _project_tree(updates, bases)


def from_bases(bases: Mapping[str, Any]) -> optax.GradientTransformation:
  """Orthogonal projection with precomputed bases (see `build_bases`).

  Args:
    bases: `{path: {'U': [d_out, m], 'V': [d_in, m]}}` with orthonormal (or zero) columns.

  Returns:
    An `optax.GradientTransformation` whose state is `OrthogonalProjectionState(bases)`.
  """
  bases = {p: {"U": jnp.asarray(b["U"], jnp.float32), "V": jnp.asarray(b["V"], jnp.float32)}
           for p, b in bases.items()}

  def init_fn(params):
    del params
    return OrthogonalProjectionState(bases=bases)

  def update_fn(updates, state, params=None):
    del params
    return project_updates(updates, state.bases), state

  return optax.GradientTransformation(init_fn, update_fn)


def orthogonal_projection(
    old_stack: PyTree, *, rtol: float = 1e-6, method: str = "svd"
) -> optax.GradientTransformation:
  """Projects the new adapter's U/V gradients onto the complement of the old subspaces.

  For every layer of `old_stack`, the U gradient (`[d_out, r]`) loses its component in
  span{old U columns} and the V gradient (`[r, d_in]`) its component in span{old V rows}.
  sigma and all other leaves pass through; in a full `{'old', 'new'}` updates tree the old
  leaves get zero updates. Works on the 'new' tree alone (layers matched by path) or the
  full state; layers absent from `old_stack` (or `old_stack == {}`) pass through. The math
  is done in float32 and the result keeps each update's dtype.

  Args:
    old_stack: `adapters['old']`, leaves `U: [K, d_out, r]`, `V: [K, r, d_in]`.
    rtol: relative rank tolerance for the bases (see `orthonormal_basis`).
    method: 'svd' (default, rank-revealing) or 'qr'.

  Returns:
    An `optax.GradientTransformation`; the bases are computed once in `init` and held in
    its `OrthogonalProjectionState`, so `update` is two thin matmuls per factor.

  References:
    Qiao & Mahdavi, "Learn More, But Bother Less: Parameter-Efficient Continual Learning
    for Large Language Models", NeurIPS 2024.

  Example:
    >>> tx = optax.chain(orthogonal_projection(adapters['old']), optax.adamw(1e-3))
    >>> opt_state = tx.init(adapters['new'])
    >>> grads = jax.grad(loss)(adapters['new'])
    >>> updates, opt_state = tx.update(grads, opt_state, adapters['new'])
    >>> new = optax.apply_updates(adapters['new'], updates)
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")

  def init_fn(params):
    del params
    return OrthogonalProjectionState(bases=build_bases(old_stack, rtol, method))

  def update_fn(updates, state, params=None):
    del params
    return project_updates(updates, state.bases), state

  return optax.GradientTransformation(init_fn, update_fn)


# optax-contrib style alias (`scale_by_*` names a transform that rescales updates).
scale_by_orthogonal_projection = orthogonal_projection
