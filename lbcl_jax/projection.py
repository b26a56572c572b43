"""Orthogonal gradient projection ("bother less") as an optax transform.

While task t trains, the gradients of its factors are projected onto the orthogonal
complement of the old tasks' subspaces, per adapted layer:

* `U^t` (`[d_out, r]`): remove the component in span{old U columns}: `g - Q_u (Q_u^T g)`;
* `V^t` (`[r, d_in]`): remove the component in span{old V rows}: `g - (g Q_v) Q_v^T`;

with `Q_u`, `Q_v` orthonormal bases of the stacked old factors (`[d_out, K*r]` columns and
`[K*r, d_in]` rows). When the old subspaces are mutually orthogonal, `I - Q Q^T` equals the
paper's `I - sum_k Q_k Q_k^T`; in general it is the exact projector onto the complement of
their sum, which the per-task sum is not.

The bases are built once, when the transform is created from concrete old adapters (or in
`init` when they are traced), and live in the optimizer state:

* concrete old adapters (the normal case): float64 SVD (or QR) with a relative rank
  tolerance; of the numerical span (rank p) and its complement (d - p) the smaller one is
  stored, `{'span': Q [d, p]}` or `{'complement': C [d, d - p]}` (then `P g = C C^T g`).
  The state therefore never exceeds `d^2 / 2` floats per factor, however many tasks there
  are (at K*r >= d the U span is full and the complement is empty: U is frozen).
* traced old adapters: a fixed-shape `{'span': Q [d, min(d, K*r)]}` whose columns past the
  numerical rank are zero.

Either way the shapes are static, so `update` is jit-safe and the state can be sharded like
any array. sigma and every other leaf pass through untouched; if the updates are a full
adapter state `{'old', 'new'}`, the old leaves get zero updates.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lbcl_jax import adapters as adapters_lib

PyTree = Any
METHODS = ("svd", "qr")


class OrthogonalProjectionState(NamedTuple):
  """State of `orthogonal_projection`.

  Attributes:
    bases: `{layer_path: {'U': basis, 'V': basis}}` where a basis is `{'span': Q}` (project
      out span(Q)) or `{'complement': C}` (keep only span(C)); Q and C are float32 with
      orthonormal (or zero) columns, `[d_out, .]` for U and `[d_in, .]` for V.
  """

  bases: dict


def orthonormal_basis(m: jax.Array, rtol: float = 1e-6, method: str = "svd") -> jax.Array:
  """Orthonormal basis of span(columns of `m`) with fixed shape `[d, min(d, n)]` (traceable).

  Args:
    m: `[d, n]` matrix.
    rtol: directions whose singular value (SVD) or |R_ii| (QR) is <= rtol * the largest are
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


def compact_basis(m: Any, rtol: float = 1e-6, method: str = "svd") -> dict:
  """The smaller of span(m) and its complement, from a concrete `[d, n]` matrix.

  Computed in float64 NumPy. With method 'qr' a rank-deficient `m` falls back to SVD (QR
  without pivoting cannot tell which directions are dependent).

  Args:
    m: concrete `[d, n]` matrix.
    rtol: relative rank tolerance (singular values or |R_ii| <= rtol * max are dropped).
    method: 'svd' | 'qr'.

  Returns:
    `{'span': float32 [d, p]}` if p <= d - p else `{'complement': float32 [d, d - p]}`,
    p the numerical rank.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  m = np.asarray(m, np.float64)
  d, n = m.shape
  q = None
  if method == "qr":
    q, r = np.linalg.qr(m, mode="complete")
    diag = np.abs(np.diagonal(r))
    rank = int(np.sum(diag > rtol * diag.max(initial=0.0)))
    if rank < min(d, n):
      q = None  # rank-deficient: let the SVD decide which directions are real
  if q is None:
    q, s, _ = np.linalg.svd(m, full_matrices=True)
    rank = int(np.sum(s > rtol * s.max(initial=0.0)))
  if rank <= d - rank:
    return {"span": jnp.asarray(q[:, :rank], jnp.float32)}
  return {"complement": jnp.asarray(q[:, rank:], jnp.float32)}


def _stacked_factors(leaf):
  u = leaf["U"]
  v = leaf["V"]
  k, d_out, r = u.shape
  cols_u = jnp.transpose(jnp.asarray(u), (1, 0, 2)).reshape(d_out, k * r)  # [d_out, K*r]
  rows_v = jnp.asarray(v).reshape(k * r, v.shape[-1])  # [K*r, d_in]
  return cols_u, rows_v.T


def build_bases(old_stack: PyTree, rtol: float = 1e-6, method: str = "svd",
                compact: bool = True) -> dict:
  """Per-layer orthonormal bases of the old U columns and old V rows.

  Args:
    old_stack: `adapters['old']` (nested or flat), leaves `U: [K, d_out, r]`, `V: [K, r, d_in]`.
    rtol: relative rank tolerance, see `orthonormal_basis`.
    method: 'svd' | 'qr'.
    compact: with concrete inputs, store the smaller of span / complement (`compact_basis`);
      False (or traced inputs) gives the fixed-shape `{'span': [d, min(d, K*r)]}`.

  Returns:
    `{path: {'U': basis, 'V': basis}}`, see `OrthogonalProjectionState`.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  flat = adapters_lib.flatten_layers(old_stack)
  traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(flat))
  bases = {}
  for path, leaf in flat.items():
    cols_u, cols_v = _stacked_factors(leaf)
    if compact and not traced:
      bases[path] = {"U": compact_basis(cols_u, rtol, method),
                     "V": compact_basis(cols_v, rtol, method)}
    else:
      bases[path] = {"U": {"span": orthonormal_basis(cols_u, rtol, method)},
                     "V": {"span": orthonormal_basis(cols_v, rtol, method)}}
  return bases


def _as_basis(basis) -> dict:
  return basis if isinstance(basis, Mapping) else {"span": basis}


def project_columns(g: jax.Array, basis) -> jax.Array:
  """Removes from `g: [d, r]` its component in the old column space (f32 math, g's dtype).

  Args:
    g: gradient of a U factor.
    basis: `{'span': Q}`, `{'complement': C}` or a bare Q (span).

  Returns:
    `g - Q (Q^T g)` or `C (C^T g)`.
  """
  basis = _as_basis(basis)
  g32 = g.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  if "span" in basis:
    q = basis["span"]
    out = g32 - jnp.matmul(q, jnp.matmul(q.T, g32, precision=hi), precision=hi)
  else:
    c = basis["complement"]
    out = jnp.matmul(c, jnp.matmul(c.T, g32, precision=hi), precision=hi)
  return out.astype(g.dtype)


def project_rows(g: jax.Array, basis) -> jax.Array:
  """Removes from `g: [r, d]` its component in the old row space (f32 math, g's dtype).

  Args:
    g: gradient of a V factor.
    basis: `{'span': Q}`, `{'complement': C}` or a bare Q (span).

  Returns:
    `g - (g Q) Q^T` or `(g C) C^T`.
  """
  basis = _as_basis(basis)
  g32 = g.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  if "span" in basis:
    q = basis["span"]
    out = g32 - jnp.matmul(jnp.matmul(g32, q, precision=hi), q.T, precision=hi)
  else:
    c = basis["complement"]
    out = jnp.matmul(jnp.matmul(g32, c, precision=hi), c.T, precision=hi)
  return out.astype(g.dtype)


def _project_tree(tree: PyTree, bases: Mapping[str, Any]) -> PyTree:
  """Projects every U/V leaf whose layer path has a basis; other leaves unchanged."""

  def fn(path, g):
    keys = [adapters_lib.key_name(e) for e in path]
    if len(keys) < 2 or keys[-1] not in ("U", "V"):
      return g
    layer = bases.get("/".join(keys[:-1]))
    if layer is None:
      return g
    if keys[-1] == "U":
      return project_columns(g, layer["U"])
    return project_rows(g, layer["V"])

  return jax.tree_util.tree_map_with_path(fn, tree)


def project_updates(updates: PyTree, bases: Mapping[str, Any]) -> PyTree:
  """Applies the projection to a 'new' tree or a full `{'old', 'new'}` state (old -> 0)."""
  if adapters_lib.is_full_state(updates):
    return {
        "old": jax.tree_util.tree_map(jnp.zeros_like, updates["old"]),
        "new": _project_tree(updates["new"], bases),
    }
  return _project_tree(updates, bases)


def from_bases(bases: Mapping[str, Any]) -> optax.GradientTransformation:
  """Orthogonal projection with precomputed bases (see `build_bases`).

  Args:
    bases: `{path: {'U': basis, 'V': basis}}`; a basis is `{'span': Q}`,
      `{'complement': C}` or a bare Q (span), with orthonormal (or zero) columns.

  Returns:
    An `optax.GradientTransformation` whose state is `OrthogonalProjectionState(bases)`.
  """
  bases = {p: {f: {kind: jnp.asarray(a, jnp.float32) for kind, a in _as_basis(b[f]).items()}
               for f in ("U", "V")}
           for p, b in bases.items()}

  def init_fn(params):
    del params
    return OrthogonalProjectionState(bases=bases)

  def update_fn(updates, state, params=None):
    del params
    return project_updates(updates, state.bases), state

  return optax.GradientTransformation(init_fn, update_fn)


def orthogonal_projection(
    old_stack: PyTree, *, rtol: float = 1e-6, method: str = "svd", compact: bool = True
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
    compact: store the smaller of span / complement (concrete `old_stack` only), see the
      module docstring.

  Returns:
    An `optax.GradientTransformation`. The bases are computed once (here when `old_stack`
    is concrete, else in `init`) and held in its `OrthogonalProjectionState`, so `update`
    is two thin matmuls per factor.

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
  leaves = jax.tree_util.tree_leaves(old_stack)
  if not any(isinstance(x, jax.core.Tracer) for x in leaves):
    return from_bases(build_bases(old_stack, rtol, method, compact))

  def init_fn(params):
    del params
    return OrthogonalProjectionState(bases=build_bases(old_stack, rtol, method, compact))

  def update_fn(updates, state, params=None):
    del params
    return project_updates(updates, state.bases), state

  return optax.GradientTransformation(init_fn, update_fn)


# optax-contrib style alias (`scale_by_*` names a transform that rescales updates).
scale_by_orthogonal_projection = orthogonal_projection
