"""Orthogonal gradient projection ("bother less") as an optax transform.

While task t trains, the gradients of its factors are projected onto the orthogonal
complement of the old tasks' subspaces, per adapted layer and per factor. A factor is a
matrix whose vectors live in one side of the layer (its input or its output space); a
*layout* names the factors and says which axis of each holds those vectors:

* `'svd'` (this project's adapters, `y = x W0 + x V^T diag(sigma) U^T`): per layer
  `U: [d_out, r]` (columns), `V: [r, d_in]` (rows); `sigma` passes through.
* `'nnx_lora'` (`flax.nnx.LoRA` / `nnx.LoRALinear`, `y = x W0 + x lora_a lora_b`):
  `lora_a: [in, r]` (columns), `lora_b: [r, out]` (rows).
* `'peft_lora'` (Hugging Face PEFT's checkpoints, `delta W = lora_B lora_A` with
  `W: [out, in]`): `lora_A: [r, in]` (rows), `lora_B: [out, r]` (columns).
* any other naming: a mapping `{factor name: 'columns' | 'rows'}`, e.g. lorax-style
  factors `b: [in, r]`, `a: [r, out]` are `{'b': 'columns', 'a': 'rows'}`.

The old tasks' factors of each layer are the same names stacked on a leading task axis:
`[K, d, r]` for columns factors, `[K, r, d]` for rows factors.

A *columns* factor `g: [d, r]` loses its component in the span of the old factors'
columns, `g - Q (Q^T g)`; a *rows* factor `g: [r, d]` loses its component in the span
of the old factors' rows, `g - (g Q) Q^T`; `Q` is an orthonormal basis of the K old
factors of the same name at the same layer, stacked (`[d, K*r]`). So input-side factors
are projected off the old input spans and output-side factors off the old output spans.
When the old subspaces are mutually orthogonal, `I - Q Q^T` equals the paper's
`I - sum_k Q_k Q_k^T`; in general it is the exact projector onto the complement of their
sum, which the per-task sum is not.

The bases are built once, when the transform is created from concrete old adapters (or in
`init` when they are traced), and live in the optimizer state:

* concrete old adapters (the normal case): float64 SVD (or QR) with a relative rank
  tolerance; of the numerical span (rank p) and its complement (d - p) the smaller one is
  stored, `{'span': Q [d, p]}` or `{'complement': C [d, d - p]}` (then
  `P g = C C^T g`). The state therefore never exceeds `d^2 / 2` floats per factor,
  however many tasks there are (at K*r >= d the span is full and the complement is empty:
  that factor is frozen).
* `compact=False`, or traced old adapters: a fixed-shape `{'span': Q [d, min(d, K*r)]}`
  whose columns past the numerical rank are zero (from concrete adapters, the same float64
  factorisation). Its shape depends only on K, so for a stack padded with zero adapters to
  a run's most tasks every stage's state has one shape, and a jitted train step taking
  the state compiles once a run (the driver does this).

Either way the shapes are static, so `update` is jit-safe and the state can be sharded
like any array. Every leaf that is not a factor of the layout (`sigma`, biases, a frozen
kernel) passes through untouched; with the `svd` layout, if the updates are a full
adapter state `{'old', 'new'}`, the old leaves get zero updates.

Leaves are matched to factors by their pytree key path: the last key naming a factor is the
factor, the keys before it the layer (`'/'`-joined). Trailing attribute keys, such as
the `.value` of a `flax.nnx.Variable`, are skipped, so `nnx.State` trees with or
without `Variable` leaves work as they are.

This module imports only jax, optax and numpy.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
METHODS = ("svd", "qr")
ORIENTATIONS = ("columns", "rows")

LAYOUTS: dict[str, dict[str, str]] = {
    # This project's SVD adapters: U [d_out, r], V [r, d_in] (sigma passes through).
    "svd": {"U": "columns", "V": "rows"},
    # flax.nnx.LoRA / nnx.LoRALinear: y = x @ lora_a @ lora_b.
    "nnx_lora": {"lora_a": "columns", "lora_b": "rows"},
    # Hugging Face PEFT: delta W = lora_B @ lora_A with W [out, in].
    "peft_lora": {"lora_A": "rows", "lora_B": "columns"},
}
"""The named layouts: `{factor name: 'columns' | 'rows'}` (see the module docstring)."""

Layout = Union[str, Mapping[str, str]]


def resolve_layout(layout: Layout) -> dict[str, str]:
  """The `{factor name: orientation}` of a layout name or mapping.

  Args:
    layout: a key of `LAYOUTS` (`'svd'`, `'nnx_lora'`, `'peft_lora'`) or a mapping
      from factor name to `'columns'` (the factor is `[d, r]`) or `'rows'`
      (`[r, d]`).

  Returns:
    A new dict from factor name to orientation.

  Raises:
    ValueError: an unknown layout name, an empty mapping or an unknown orientation.
  """
  if isinstance(layout, str):
    if layout not in LAYOUTS:
      raise ValueError(f"layout must be one of {tuple(LAYOUTS)} or a mapping "
                       f"{{factor: 'columns' | 'rows'}}, got {layout!r}")
    return dict(LAYOUTS[layout])
  if not isinstance(layout, Mapping) or not layout:
    raise ValueError(f"layout must be a name or a non-empty mapping, got {layout!r}")
  for name, orientation in layout.items():
    if orientation not in ORIENTATIONS:
      raise ValueError(f"layout factor {name!r}: orientation must be one of {ORIENTATIONS}, "
                       f"got {orientation!r}")
  return {str(k): v for k, v in layout.items()}


class OrthogonalProjectionState(NamedTuple):
  """State of `orthogonal_projection`.

  Attributes:
    bases: `{layer_path: {factor: basis}}` (`{'U': ., 'V': .}` for the svd layout) where a
      basis is `{'span': Q}` (project out span(Q)) or `{'complement': C}` (keep only
      span(C)); Q and C are float32 with orthonormal (or zero) columns, `[d, .]` with d the
      factor's input or output dimension.
  """

  bases: dict


def orthonormal_basis(m: jax.Array, rtol: float = 1e-6, method: str = "svd") -> jax.Array:
  """Orthonormal basis of span(columns of `m`) with fixed shape `[d, min(d, n)]` (traceable).

  Args:
    m: `[d, n]` matrix.
    rtol: directions whose singular value (SVD) or `|R_ii|` (QR) is <= rtol * the largest are
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


def _span_float64(m: Any, rtol: float, method: str) -> tuple[np.ndarray, int]:
  """`(q, rank)` of a concrete `[d, n]` matrix in float64: the first `rank` columns of `q`
  are an orthonormal basis of its numerical span. With method 'qr' a rank-deficient `m` falls
  back to SVD (QR without pivoting cannot tell which directions are dependent)."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  m = np.asarray(m, np.float64)
  if method == "qr":
    q, r = np.linalg.qr(m, mode="complete")
    diag = np.abs(np.diagonal(r))
    rank = int(np.sum(diag > rtol * diag.max(initial=0.0)))
    if rank == min(m.shape):
      return q, rank
  # The thin SVD: O(d n^2), where the full one forms all d columns, O(d^2 n) (on SmolLM2 with
  # 13 old tasks, 120 full SVDs of [576, 104] were most of a stage's set-up). Its columns are
  # the full one's first n (equal to 1e-16 in float64; the bases are float32).
  q, s, _ = np.linalg.svd(m, full_matrices=False)
  return q, int(np.sum(s > rtol * s.max(initial=0.0)))


def compact_basis(m: Any, rtol: float = 1e-6, method: str = "svd") -> dict:
  """The smaller of span(m) and its complement, from a concrete `[d, n]` matrix.

  Computed in float64 NumPy. With method 'qr' a rank-deficient `m` falls back to SVD (QR
  without pivoting cannot tell which directions are dependent).

  Args:
    m: concrete `[d, n]` matrix.
    rtol: relative rank tolerance (singular values or `|R_ii|` <= rtol * max are dropped).
    method: 'svd' | 'qr'.

  Returns:
    `{'span': float32 [d, p]}` if p <= d - p else `{'complement': float32 [d, d - p]}`,
    p the numerical rank.
  """
  q, rank = _span_float64(m, rtol, method)
  d = q.shape[0]
  if rank <= d - rank:
    return {"span": jnp.asarray(q[:, :rank], jnp.float32)}
  if q.shape[1] < d:  # only a complement needs the full factorisation
    q = np.linalg.svd(np.asarray(m, np.float64), full_matrices=True)[0]
  return {"complement": jnp.asarray(q[:, rank:], jnp.float32)}


def fixed_basis(m: Any, rtol: float = 1e-6, method: str = "svd") -> dict:
  """`{'span': float32 [d, min(d, n)]}` of a concrete `[d, n]` matrix: an orthonormal basis of
  its numerical span (float64, as `compact_basis`) in the first columns, zeros after. The shape
  is `m`'s alone, not its rank: what `orthonormal_basis` gives traced, more precisely."""
  q, rank = _span_float64(m, rtol, method)
  d, n = np.shape(m)
  out = np.zeros((d, min(d, n)), np.float32)
  out[:, :rank] = q[:, :rank]
  return {"span": jnp.asarray(out)}


def _key_name(entry) -> str:
  """The name of one step of a pytree key path (dict key, attribute or sequence index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _locate(path, names: Mapping[str, str]) -> Optional[tuple[str, str]]:
  """`(layer, factor)` of a leaf's key path, or None when the leaf is no factor of the layout.

  Trailing attribute keys that name no factor (a `flax.nnx.Variable`'s `.value`) are skipped;
  the last remaining key must name a factor, and the keys before it are the layer.
  """
  entries = list(path)
  while (entries and isinstance(entries[-1], jax.tree_util.GetAttrKey)
         and entries[-1].name not in names):
    entries.pop()
  if not entries or _key_name(entries[-1]) not in names:
    return None
  return "/".join(_key_name(e) for e in entries[:-1]), _key_name(entries[-1])


def _old_vectors(stack, orientation: str, where: str) -> jax.Array:
  """The K stacked old factors as one `[d, K*r]` matrix of vectors of the layer's side."""
  if jnp.ndim(stack) != 3:
    want = "[K, d, r]" if orientation == "columns" else "[K, r, d]"
    raise ValueError(f"old factor {where!r} must be stacked on a leading task axis ({want}), "
                     f"got shape {tuple(jnp.shape(stack))}")
  stack = jnp.asarray(stack)
  k, a, b = stack.shape
  if orientation == "columns":
    return jnp.transpose(stack, (1, 0, 2)).reshape(a, k * b)  # [d, K*r]
  return stack.reshape(k * a, b).T  # [d, K*r]


def build_bases(old_stack: PyTree, rtol: float = 1e-6, method: str = "svd",
                compact: bool = True, layout: Layout = "svd") -> dict:
  """Per-layer orthonormal bases of the old factors' vectors.

  Args:
    old_stack: the old tasks' factors, stacked on a leading task axis, at their layer paths
      (nested or '/'-joined flat); for the svd layout `adapters['old']`, leaves
      `U: [K, d_out, r]`, `V: [K, r, d_in]`.
    rtol: relative rank tolerance, see `orthonormal_basis`.
    method: 'svd' | 'qr'.
    compact: with concrete inputs, store the smaller of span / complement (`compact_basis`);
      False (or traced inputs) gives the fixed-shape `{'span': [d, min(d, K*r)]}`
      (`fixed_basis`; traced: `orthonormal_basis`).
    layout: see `resolve_layout`.

  Returns:
    `{path: {factor: basis}}`, see `OrthogonalProjectionState`.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  names = resolve_layout(layout)
  leaves = jax.tree_util.tree_flatten_with_path(old_stack)[0]
  traced = any(isinstance(x, jax.core.Tracer) for _, x in leaves)
  bases = {}
  for path, leaf in leaves:
    where = _locate(path, names)
    if where is None:
      continue
    layer, factor = where
    vectors = _old_vectors(leaf, names[factor], "/".join(where))
    if traced:
      basis = {"span": orthonormal_basis(vectors, rtol, method)}
    else:
      basis = (compact_basis if compact else fixed_basis)(vectors, rtol, method)
    bases.setdefault(layer, {})[factor] = basis
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


def _basis_dim(basis) -> int:
  return next(iter(_as_basis(basis).values())).shape[0]


def _project_tree(tree: PyTree, bases: Mapping[str, Any], names: Mapping[str, str]) -> PyTree:
  """Projects every factor leaf whose layer path has a basis; other leaves unchanged."""

  def fn(path, g):
    where = _locate(path, names)
    if where is None:
      return g
    layer, factor = where
    basis = bases.get(layer, {}).get(factor)
    if basis is None:
      return g
    orientation = names[factor]
    d = _basis_dim(basis)
    if jnp.ndim(g) != 2 or g.shape[0 if orientation == "columns" else 1] != d:
      want = f"[{d}, r]" if orientation == "columns" else f"[r, {d}]"
      raise ValueError(f"{'/'.join(where)!r}: the old factors give a {orientation} factor "
                       f"{want}, got shape {tuple(jnp.shape(g))}")
    if orientation == "columns":
      return project_columns(g, basis)
    return project_rows(g, basis)

  return jax.tree_util.tree_map_with_path(fn, tree)


def _is_full_state(tree) -> bool:
  """This project's full adapter state `{'old', 'new'}` (as opposed to a 'new' tree)."""
  return isinstance(tree, Mapping) and set(tree) == {"old", "new"}


def project_updates(updates: PyTree, bases: Mapping[str, Any], layout: Layout = "svd") -> PyTree:
  """Applies the projection to a tree of factors.

  Args:
    updates: gradients or updates, factors at their layer paths. With the svd layout also a
      full `{'old', 'new'}` adapter state, whose old leaves get zero updates.
    bases: `{path: {factor: basis}}`, see `build_bases`.
    layout: see `resolve_layout`.

  Returns:
    `updates` with every factor that has a basis projected; other leaves unchanged.
  """
  names = resolve_layout(layout)
  if names == LAYOUTS["svd"] and _is_full_state(updates):
    return {
        "old": jax.tree_util.tree_map(jnp.zeros_like, updates["old"]),
        "new": _project_tree(updates["new"], bases, names),
    }
  return _project_tree(updates, bases, names)


def from_bases(bases: Mapping[str, Any], layout: Layout = "svd") -> optax.GradientTransformation:
  """Orthogonal projection with precomputed bases (see `build_bases`).

  Args:
    bases: `{path: {factor: basis}}`; a basis is `{'span': Q}`, `{'complement': C}` or a
      bare Q (span), with orthonormal (or zero) columns.
    layout: the layout the factor names belong to, see `resolve_layout`.

  Returns:
    An `optax.GradientTransformation` whose state is `OrthogonalProjectionState(bases)`.
  """
  names = resolve_layout(layout)
  for path, layer in bases.items():
    unknown = sorted(set(layer) - set(names))
    if unknown:
      raise ValueError(f"bases[{path!r}] has factors {unknown} that layout {layout!r} "
                       f"does not name ({sorted(names)})")
  bases = {p: {f: {kind: jnp.asarray(a, jnp.float32) for kind, a in _as_basis(b).items()}
               for f, b in layer.items()}
           for p, layer in bases.items()}

  def init_fn(params):
    del params
    return OrthogonalProjectionState(bases=bases)

  def update_fn(updates, state, params=None):
    del params
    return project_updates(updates, state.bases, names), state

  return optax.GradientTransformation(init_fn, update_fn)


def orthogonal_projection(
    old_stack: PyTree, *, layout: Layout = "svd", rtol: float = 1e-6, method: str = "svd",
    compact: bool = True
) -> optax.GradientTransformation:
  """Projects the new adapter's factor gradients onto the complement of the old subspaces.

  For every layer of `old_stack` and every factor of `layout`, the new factor's gradient
  loses its component in the span of the old tasks' factors of the same name: input-side
  factors are projected off the old input spans, output-side factors off the old output
  spans (for the svd layout: the U gradient `[d_out, r]` off span{old U columns}, the V
  gradient `[r, d_in]` off span{old V rows}). Every other leaf passes through (sigma, a
  frozen kernel, a bias); with the svd layout, in a full `{'old', 'new'}` updates tree the
  old leaves get zero updates. Layers are matched by key path (see the module docstring),
  so the updates may be the new factors alone or the whole trainable tree; layers absent
  from `old_stack` (or `old_stack == {}`) pass through. The math is done in float32 and the
  result keeps each update's dtype.

  Args:
    old_stack: the old tasks' factors at the layer paths of the new ones, stacked on a
      leading task axis: `adapters['old']` (`U: [K, d_out, r]`, `V: [K, r, d_in]`) for the
      svd layout, `lora_a: [K, in, r]`, `lora_b: [K, r, out]` for nnx_lora,
      `lora_A: [K, r, in]`, `lora_B: [K, out, r]` for peft_lora. Leaves may be arrays or
      `flax.nnx.Variable` objects (an `nnx.State`).
    layout: `'svd'` (default), `'nnx_lora'`, `'peft_lora'`, or a mapping
      `{factor name: 'columns' | 'rows'}`, see `resolve_layout`.
    rtol: relative rank tolerance for the bases (see `orthonormal_basis`).
    method: 'svd' (default, rank-revealing) or 'qr'.
    compact: store the smaller of span / complement (concrete `old_stack` only); False:
      a span of fixed shape `[d, min(d, K*r)]`, see the module docstring.

  Returns:
    An `optax.GradientTransformation`. The bases are computed once (here when `old_stack`
    is concrete, else in `init`) and held in its `OrthogonalProjectionState`, so `update`
    is two thin matmuls per factor.

  Raises:
    ValueError: an unknown layout or method, an old factor that is not stacked `[K, ., .]`,
      or (in `update`) a factor whose side does not match its old factors' dimension.

  References:
    Qiao & Mahdavi, "Learn More, But Bother Less: Parameter-Efficient Continual Learning
    for Large Language Models", NeurIPS 2024.

  Examples:
    This project's SVD adapters: two old tasks of rank 2 at layer `q` (6 outputs, 5 inputs).
    The projected U gradient has no component left in the old U columns.

    >>> import jax, jax.numpy as jnp, optax
    >>> from lbcl_jax import orthogonal_projection
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> old = {'q': {'U': jax.random.normal(k1, (2, 6, 2)), 'sigma': jnp.ones((2, 2)),
    ...              'V': jax.random.normal(k2, (2, 2, 5))}}
    >>> new = {'q': {'U': jnp.zeros((6, 2)), 'sigma': jnp.ones(2), 'V': jnp.zeros((2, 5))}}
    >>> grads = jax.tree.map(jnp.ones_like, new)
    >>> project = orthogonal_projection(old)
    >>> proj, _ = project.update(grads, project.init(grads))
    >>> old_u = old['q']['U'].transpose(1, 0, 2).reshape(6, 4)  # [d_out, K*r]
    >>> float(jnp.abs(old_u.T @ proj['q']['U']).max()) < 1e-5
    True

    In training it is the first transform of a chain:

    >>> tx = optax.chain(orthogonal_projection(old), optax.adamw(1e-3))
    >>> opt_state = tx.init(new)
    >>> updates, opt_state = tx.update(grads, opt_state, new)
    >>> new = optax.apply_updates(new, updates)

    `flax.nnx.LoRA` factors (`lora_a: [in, r]`, `lora_b: [r, out]`), one old task: the
    input factor is projected off the old `lora_a` columns, the output factor off the old
    `lora_b` rows.

    >>> old = {'dense': {'lora_a': jax.random.normal(k1, (1, 5, 2)),   # [K, in, r]
    ...                  'lora_b': jax.random.normal(k2, (1, 2, 6))}}  # [K, r, out]
    >>> tx = orthogonal_projection(old, layout='nnx_lora')
    >>> g = {'dense': {'lora_a': jnp.ones((5, 2)), 'lora_b': jnp.ones((2, 6)),
    ...                'bias': jnp.ones(6)}}
    >>> p, _ = tx.update(g, tx.init(g))
    >>> a_old, b_old = old['dense']['lora_a'][0], old['dense']['lora_b'][0]
    >>> float(jnp.abs(a_old.T @ p['dense']['lora_a']).max()) < 1e-5
    True
    >>> float(jnp.abs(p['dense']['lora_b'] @ b_old.T).max()) < 1e-5
    True
    >>> p['dense']['bias'].tolist()  # not a factor: untouched
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]

    PEFT's layout (`lora_A: [r, in]`, `lora_B: [out, r]`), stacked the same way:

    >>> old = {'q_proj': {'lora_A': jax.random.normal(k1, (1, 2, 5)),   # [K, r, in]
    ...                   'lora_B': jax.random.normal(k2, (1, 6, 2))}}  # [K, out, r]
    >>> tx = orthogonal_projection(old, layout='peft_lora')
    >>> g = {'q_proj': {'lora_A': jnp.ones((2, 5)), 'lora_B': jnp.ones((6, 2))}}
    >>> p, _ = tx.update(g, tx.init(g))
    >>> a_old, b_old = old['q_proj']['lora_A'][0], old['q_proj']['lora_B'][0]
    >>> float(jnp.abs(p['q_proj']['lora_A'] @ a_old.T).max()) < 1e-5
    True
    >>> float(jnp.abs(b_old.T @ p['q_proj']['lora_B']).max()) < 1e-5
    True
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  names = resolve_layout(layout)
  leaves = jax.tree_util.tree_leaves(old_stack)
  if not any(isinstance(x, jax.core.Tracer) for x in leaves):
    return from_bases(build_bases(old_stack, rtol, method, compact, names), names)

  def init_fn(params):
    del params
    return OrthogonalProjectionState(
        bases=build_bases(old_stack, rtol, method, compact, names))

  def update_fn(updates, state, params=None):
    del params
    return project_updates(updates, state.bases, names), state

  return optax.GradientTransformation(init_fn, update_fn)


# optax-contrib style alias (`scale_by_*` names a transform that rescales updates).
scale_by_orthogonal_projection = orthogonal_projection
