"""SVD-form adapters: state, targets, init, low-rank application and merging.

Every adapted `nn.Dense` (kernel `(d_in, d_out)`, the paper's `W0` transposed) gets one
adapter per task in SVD form `U diag(sigma) V` with `U: [d_out, r]`, `sigma: [r]`,
`V: [r, d_in]`. Adapters accumulate over tasks, so a layer computes

    y = x @ W0 + scaling * sum_k ((x @ V_k^T) * sigma_k) @ U_k^T.

The state (see ARCHITECTURE.md) is a pytree kept apart from the frozen base params::

    adapters = {
        'old': {<nested path>: {'U': [K, d_out, r], 'sigma': [K, r], 'V': [K, r, d_in]}},
        'new': {<nested path>: {'U': [d_out, r], 'sigma': [r], 'V': [r, d_in]}},
    }

A *stack tree* is the `'old'`-shaped tree (leading task axis `K`); `stacked` builds one from
old + new. All functions here are pure functions over these pytrees.

Scaling. `AdapterConfig.scaling` is a static multiplier, not a leaf. The default 1.0 is
AdaLoRA's choice for SVD adapters (its `lora_alpha / r` with `lora_alpha == r`); for LoRA-style
runs set it to `alpha / r` as PEFT and O-LoRA do.

Applying adapters. Two equivalent ways, chosen by `AdapterConfig.apply_mode`:

* ``'lowrank'`` (default): `intercept` wraps every targeted `nn.Dense.__call__` through
  `flax.linen.intercept_methods` and adds the low-rank products (one einsum over `k`).
* ``'merged'``: `merge` materialises `W0 + delta` for every targeted kernel each step.

Measured with `python benchmarks/core_overhead.py` (jax 0.10.2, CPU, 2 cores shared with
other jobs, f32): the driver's train step of flan-t5-small-shaped T5 (d_model 512, q/v
512 -> 384, 8 + 8 blocks, 48 adapted q/v layers, rank 8, batch 8 x 256 source / 16 target
tokens, AdamW on the new adapter):

    apply_mode   step median   paired vs lowrank   XLA flops vs lowrank   peak memory
    lowrank        4264 ms          --                   --               1169 MiB
    merged         5158 ms        +13.8%               +8.5%              1201 MiB

and on a stand-in of 6 blocks x {q, v} Dense layers of the same shapes (forward + backward
only), lowrank 213 ms vs merged 266 ms with one adapter per layer; with 16 unfolded adapters
per layer lowrank 300 ms vs merged 320 ms, and 242 ms with the 15 old ones folded into W0.
Hence `apply_mode='lowrank'` is the default.

The merged path is slower for training because back-propagating into `W0 + delta` forms the
full `(d_in, d_out)` kernel gradient `x^T dy` (as costly as the forward matmul) before
reducing it to the factors, while the low-rank path only needs rank-sized products. Merging
stays the right choice for inference/evaluation (no extra work per token; `merge` once).
For many old tasks the driver can also fold the frozen old adapters into the base once per
task (`merge(params, adapters['old'], scaling)`) and intercept only the new one.
"""

import contextlib
import dataclasses
import functools
import math
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lbcl_jax.errors import InputError

PyTree = Any

# Default target regexes for T5 (the family module's ADAPTER_TARGETS / ALL_LINEAR_TARGETS
# should agree; these are the fallback when no family is given).
T5_QV_TARGETS = r"(^|.*/)(SelfAttention|EncDecAttention)/(q|v)$"
T5_ALL_LINEAR_TARGETS = (
    r"(^|.*/)((SelfAttention|EncDecAttention)/(q|k|v|o)|DenseReluDense/(wi|wi_0|wi_1|wo))$"
)
PRESETS = {"qv": T5_QV_TARGETS, "all_linear": T5_ALL_LINEAR_TARGETS}

LEAF_NAMES = ("U", "sigma", "V")
APPLY_MODES = ("lowrank", "merged")
INITS = ("adalora", "lora")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Static description of the adapters of a run.

  Attributes:
    targets: regex over '/'-joined Dense module paths (matched with `re.fullmatch`), or a
      preset name: 'qv' (q and v of every attention) or 'all_linear'.
    rank: rank r of each task's adapter (checked against the adapted layers by `check_rank`).
    scaling: static multiplier of the adapter term (1.0 = AdaLoRA; `alpha / r` for
      LoRA-style scaling).
    dropout: dropout on the new adapter's input while training (PEFT's `lora_dropout`;
      'lowrank' only: merged kernels have no adapter input).
    init: 'adalora' (sigma = 0, U, V ~ N(0, init_std^2); delta starts at 0 while U and V get
      gradients) or 'lora' (U = 0, V ~ kaiming-uniform bound 1/sqrt(d_in) as PEFT, sigma = 1).
    init_std: std of the 'adalora' normal init (AdaLoRA uses 0.02).
    dtype: dtype of the adapter leaves.
    apply_mode: 'lowrank' (intercept, faster to train; see module docstring) or 'merged'.
  """

  targets: str = "qv"
  rank: int = 8
  scaling: float = 1.0
  dropout: float = 0.0
  init: str = "adalora"
  init_std: float = 0.02
  dtype: Any = jnp.float32
  apply_mode: str = "lowrank"

  def __post_init__(self):
    if self.init not in INITS:
      raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
    if self.apply_mode not in APPLY_MODES:
      raise ValueError(f"apply_mode must be one of {APPLY_MODES}, got {self.apply_mode!r}")
    if self.dropout and self.apply_mode == "merged":
      raise InputError(f"config.adapters.dropout={self.dropout} needs apply_mode 'lowrank' "
                       "(dropout acts on the adapter's input, which merged kernels do not "
                       "have); set --config.adapters.apply_mode=lowrank or "
                       "--config.adapters.dropout=0")


# ----------------------------------------------------------------------------------------
# Tree helpers.
# ----------------------------------------------------------------------------------------


def _unbox(x):
  return x.unbox() if isinstance(x, nn.meta.AxisMetadata) else x


def _is_layer(node) -> bool:
  """An adapter layer node: a mapping whose 'U' entry is an array (not a subtree)."""
  return isinstance(node, Mapping) and "U" in node and not isinstance(node["U"], Mapping)


def flatten_layers(tree: PyTree) -> dict[str, Any]:
  """Flattens a nested adapter (or stack) tree to `{'a/b/q': {'U', 'sigma', 'V'}}`.

  Already-flat dicts keyed by '/'-joined paths pass through unchanged, so every function
  here accepts either form.

  Args:
    tree: nested dict whose layer nodes hold 'U' (and usually 'sigma', 'V').

  Returns:
    A dict from '/'-joined module path to the layer node, in traversal order.
  """
  out = {}

  def walk(node, prefix):
    if _is_layer(node):
      out["/".join(prefix)] = node
      return
    if isinstance(node, Mapping):
      for key, child in node.items():
        walk(child, prefix + (str(key),))

  walk(tree, ())
  return out


def unflatten_layers(flat: Mapping[str, Any]) -> dict:
  """Inverse of `flatten_layers`: `{'a/b': leaf}` -> `{'a': {'b': leaf}}`."""
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    keys = path.split("/")
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = dict(leaf) if isinstance(leaf, Mapping) else leaf
  return out


def flatten_arrays(tree: PyTree) -> dict[str, Any]:
  """Flattens a nested dict of arrays (e.g. triplet scores) to `{'a/b/q': array}`."""
  out = {}

  def walk(node, prefix):
    if isinstance(node, Mapping):
      for key, child in node.items():
        walk(child, prefix + (str(key),))
    else:
      out["/".join(prefix)] = node

  walk(tree, ())
  return out


def _iter_dense(params: PyTree, prefix=()) -> Iterator[tuple[str, Any]]:
  """Yields (path, kernel) for every module node that holds a 2-D 'kernel' leaf."""
  if not isinstance(params, Mapping):
    return
  kernel = params.get("kernel")
  if kernel is not None and not isinstance(kernel, Mapping) and np.ndim(_unbox(kernel)) == 2:
    yield "/".join(prefix), _unbox(kernel)
  for key, child in params.items():
    if isinstance(child, Mapping):
      yield from _iter_dense(child, prefix + (str(key),))


def get_kernel(params: PyTree, path: str):
  """The (unboxed) `(d_in, d_out)` kernel of the Dense module at `path`."""
  node = params
  for key in path.split("/"):
    if not isinstance(node, Mapping) or key not in node:
      raise KeyError(f"no module {path!r} in params (missing {key!r})")
    node = node[key]
  if not isinstance(node, Mapping) or "kernel" not in node:
    raise KeyError(f"module {path!r} has no 'kernel'")
  return _unbox(node["kernel"])


def resolve_targets(targets: str, family: Any = None) -> str:
  """Turns a preset name ('qv', 'all_linear') into a regex; other strings pass through.

  Args:
    targets: preset name or regex.
    family: optional model-family module/object with `ADAPTER_TARGETS` and
      `ALL_LINEAR_TARGETS` (e.g. `lbcl_jax.models.t5`); defaults to the T5 regexes.

  Returns:
    The regex string.
  """
  if family is not None:
    presets = {"qv": family.ADAPTER_TARGETS, "all_linear": family.ALL_LINEAR_TARGETS}
  else:
    presets = PRESETS
  return presets.get(targets, targets)


def find_targets(params: PyTree, targets: str, *, family: Any = None) -> list[str]:
  """Paths of the Dense modules an adapter targets.

  A candidate is any module node with a 2-D 'kernel' leaf; its path is the '/'-joined keys
  from the root of `params` (the tree below 'params'), e.g.
  'decoder/block_3/layer_1/EncDecAttention/q'. A candidate is selected when
  `re.fullmatch(regex, path)` matches (so anchor nothing, but spell out prefixes, e.g.
  `.*/SelfAttention/q`).

  Args:
    params: the model params (below 'params'), raw or boxed.
    targets: regex or preset name ('qv', 'all_linear'), see `resolve_targets`.
    family: optional family module for the presets.

  Returns:
    The matching paths, in params traversal order.

  Raises:
    ValueError: if nothing matches.
  """
  regex = resolve_targets(targets, family)
  pattern = re.compile(regex)
  candidates = [path for path, _ in _iter_dense(params)]
  paths = [p for p in candidates if pattern.fullmatch(p)]
  if not paths:
    hint = ""
    if isinstance(params, Mapping) and set(params) == {"params"}:
      hint = " (params has a top-level 'params' key: pass variables['params'])"
    raise InputError(
        f"adapter targets {regex!r} match no Dense module{hint}; candidates are e.g. "
        f"{candidates[:6]}"
    )
  return paths


def select_layers(paths: Sequence[str], layers: Union[None, str, Sequence[str]]) -> list[str]:
  """Subset of `paths`: None/'all' -> all; a str -> regex (fullmatch); a list -> exact paths.

  Raises:
    ValueError: if a listed path is unknown or a regex matches nothing.
  """
  paths = list(paths)
  if layers is None or (isinstance(layers, str) and layers == "all"):
    return paths
  if isinstance(layers, str):
    pattern = re.compile(layers)
    chosen = [p for p in paths if pattern.fullmatch(p)]
    if not chosen:
      raise InputError(f"layers regex {layers!r} matches none of {paths[:6]}...")
    return chosen
  unknown = [p for p in layers if p not in paths]
  if unknown:
    raise InputError(f"unknown adapter layers {unknown}; known: {paths[:6]}...")
  wanted = set(layers)
  return [p for p in paths if p in wanted]


def _path_seed(path: str) -> int:
  # crc32 is stable across processes (python's hash() is salted), so inits are reproducible.
  return zlib.crc32(path.encode("utf-8")) & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------
# State construction.
# ----------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def init_layer(rng: jax.Array, d_in: int, d_out: int, config: AdapterConfig) -> dict:
  """One task's adapter for a `(d_in, d_out)` kernel, see `AdapterConfig.init`."""
  r = config.rank
  ku, kv = jax.random.split(rng)
  if config.init == "adalora":
    u = config.init_std * jax.random.normal(ku, (d_out, r), jnp.float32)
    v = config.init_std * jax.random.normal(kv, (r, d_in), jnp.float32)
    sigma = jnp.zeros((r,), jnp.float32)
  else:
    bound = 1.0 / np.sqrt(d_in)
    u = jnp.zeros((d_out, r), jnp.float32)
    v = jax.random.uniform(kv, (r, d_in), jnp.float32, -bound, bound)
    sigma = jnp.ones((r,), jnp.float32)
  return {"U": u.astype(config.dtype), "sigma": sigma.astype(config.dtype),
          "V": v.astype(config.dtype)}


def init_new(
    rng: jax.Array,
    params: PyTree,
    config: AdapterConfig,
    paths: Optional[Sequence[str]] = None,
    *,
    family: Any = None,
) -> dict:
  """A fresh (trainable) adapter tree for one task.

  Args:
    rng: PRNG key; each layer uses `fold_in(rng, crc32(path))`, so adding or removing a
      target does not change the other layers' init.
    params: base params (below 'params'); only kernel shapes are read.
    config: the adapter config.
    paths: layer paths; default `find_targets(params, config.targets, family=family)`.
    family: optional family module for the target presets.

  Returns:
    The nested 'new' tree `{path...: {'U': [d_out, r], 'sigma': [r], 'V': [r, d_in]}}`.

  Raises:
    ValueError: if `config.rank` is below 1 or above `min(d_in, d_out)` for some layer (named
      in the message), see `check_rank`.
  """
  if paths is None:
    paths = find_targets(params, config.targets, family=family)
  check_rank(params, paths, config.rank)
  # Equally-shaped layers are drawn by one vmapped init over their keys (the same values as
  # one call per layer): a model's 60 adapted layers are 2 random programs, not 60, which
  # took SmolLM2's init 5.7 s of XLA:CPU compile (10 s for AdaLoRA's) on a loaded 2-core VM.
  groups: dict[tuple[int, int], list[str]] = {}
  for path in paths:
    groups.setdefault(tuple(get_kernel(params, path).shape), []).append(path)
  flat = {}
  for (d_in, d_out), group in groups.items():
    seeds = jnp.asarray([_path_seed(path) for path in group], jnp.uint32)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, seeds)
    drawn = jax.vmap(lambda k, d_in=d_in, d_out=d_out: init_layer(k, d_in, d_out, config))(keys)
    for i, path in enumerate(group):
      flat[path] = jax.tree.map(lambda x, i=i: x[i], drawn)
  return unflatten_layers(flat)


def check_rank(params: PyTree, paths: Sequence[str], rank: int) -> None:
  """The one check of an adapter rank: raises `InputError` for a rank below 1, or naming the
  first layer whose min(d_in, d_out) is below `rank`."""
  if rank < 1:
    raise InputError(f"adapter rank {rank} (config.adapters.rank): must be >= 1")
  for path in paths:
    d_in, d_out = get_kernel(params, path).shape
    if rank > min(d_in, d_out):
      raise InputError(
          f"adapter rank {rank} exceeds min(d_in, d_out) = {min(d_in, d_out)} "
          f"of layer {path!r} (kernel {d_in}x{d_out})")


def empty_state() -> dict:
  """The adapter state before the first task: `{'old': {}, 'new': {}}`."""
  return {"old": {}, "new": {}}


def is_full_state(tree) -> bool:
  """A full adapter state `{'old', 'new'}` (as opposed to a stack or 'new' tree)."""
  return isinstance(tree, Mapping) and set(tree) == {"old", "new"}


def key_name(entry) -> str:
  """The name of one step of a pytree key path (dict key, attribute or sequence index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _check_same_layers(a: Mapping[str, Any], b: Mapping[str, Any], what: str):
  if set(a) != set(b):
    missing = sorted(set(a) ^ set(b))
    raise ValueError(f"{what}: old and new adapters cover different layers: {missing[:6]}")


def _stack_layer(old_leaf: Optional[Mapping], new_leaf: Optional[Mapping], append, first
                 ) -> dict:
  if old_leaf is None:
    return {k: first(jnp.asarray(new_leaf[k])) for k in LEAF_NAMES}
  if new_leaf is None:
    return {k: old_leaf[k] for k in LEAF_NAMES}
  return {k: append(old_leaf[k], jnp.asarray(new_leaf[k])) for k in LEAF_NAMES}


def stacked(adapters: Mapping[str, PyTree], include_new: bool = True) -> dict:
  """Old (+ new) adapters as one nested stack tree with leading task axis.

  Args:
    adapters: the adapter state `{'old', 'new'}`.
    include_new: append the new adapter as the last task.

  Returns:
    Nested `{path...: {'U': [K', d_out, r], 'sigma': [K', r], 'V': [K', r, d_in]}}`;
    `{}` when there is nothing.
  """
  old = flatten_layers(adapters.get("old", {}))
  new = flatten_layers(adapters.get("new", {})) if include_new else {}
  if old and new:
    _check_same_layers(old, new, "stacked")
  paths = list(old) or list(new)
  # Jits made for this call (`_fresh`): the stack's size is new at every stage.
  append = _fresh(lambda o, n: jnp.concatenate([o, n.astype(o.dtype)[None]]))
  first = _fresh(lambda n: n[None])
  return unflatten_layers({p: _stack_layer(old.get(p), new.get(p), append, first)
                           for p in paths})


def append_task(adapters: Mapping[str, PyTree]) -> dict:
  """Ends a task: stacks 'new' onto 'old' (K grows by one) and empties 'new'.

  Raises:
    ValueError: if 'new' is empty or covers other layers than 'old'.
  """
  if not flatten_layers(adapters.get("new", {})):
    raise ValueError("append_task: adapters['new'] is empty")
  return {"old": stacked(adapters, include_new=True), "new": {}}


def num_tasks(stack_tree: PyTree) -> int:
  """K, the number of stacked tasks (0 for an empty tree)."""
  flat = flatten_layers(stack_tree)
  if not flat:
    return 0
  return int(next(iter(flat.values()))["U"].shape[0])


def pad_tasks(tree: PyTree, capacity: int, pad: Optional[Callable[..., Any]] = None) -> PyTree:
  """`tree` (leaves stacked on a leading task axis: an old stack, or its `[K, r]` scores) with
  zeros appended on that axis up to `capacity` tasks; unchanged when it holds that many.

  A zero triplet adds nothing to a merge or an adapted layer's output, scores zero, and gets
  no injection weight (`injection.inject`'s `task_mask`), so programs over an old stack padded
  to a run's most old tasks see one shape all run long and compile once, not once a stage.

  `pad`: `jax.jit(pad_leaf, static_argnums=1)` kept by a caller that pads stacks of one size
  again and again (`Stage.padded`); by default a jit made for this call (`_fresh`).
  """
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves or capacity <= leaves[0].shape[0]:
    return tree
  pad = pad or _fresh(pad_leaf, static_argnums=1)
  return jax.tree.map(lambda x: pad(x, capacity), tree)


def pad_leaf(x: jax.Array, capacity: int) -> jax.Array:
  """One leaf of `pad_tasks`: zeros appended on the leading axis up to `capacity`."""
  return jnp.pad(x, [(0, capacity - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def first_tasks(tree: PyTree, k: int) -> PyTree:
  """`tree` (leaves stacked on a leading task axis) cut to its first `k` tasks: what
  `pad_tasks` padded, unpadded."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves or k >= leaves[0].shape[0]:
    return tree
  cut = _fresh(lambda x: x[:k])
  return jax.tree.map(cut, tree)


def _fresh(fn: Callable[..., Any], **jit_kwargs) -> Callable[..., Any]:
  """`jax.jit(fn)` for one call's leaves: its programs (one per leaf shape) are freed with it.

  The old stack grows by a task a stage, so an eager `jnp` op on it (a pad, a concatenation,
  a slice) meets new shapes every stage, and JAX keeps the program compiled for each eager
  op and shape as long as the process lives: on SmolLM2, 9 small programs and about 15 MB of
  RSS a stage. A jit compiles the same small programs (an op on one leaf at a time, as an
  eager op runs, so its outputs are laid out as the eager op's) and they die with it. JAX
  caches a jit's programs by the Python function it wraps, so the jit wraps a new one.
  """
  return jax.jit(lambda *args: fn(*args), **jit_kwargs)


def adapter_param_count(tree: PyTree) -> int:
  """Number of scalars in an adapter tree (new, old, stack, or a full state)."""
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


# ----------------------------------------------------------------------------------------
# Application.
# ----------------------------------------------------------------------------------------


def _as_stack(leaf: Mapping[str, Any]) -> tuple[jax.Array, jax.Array, jax.Array]:
  u, s, v = leaf["U"], leaf["sigma"], leaf["V"]
  if jnp.ndim(u) == 2:  # a single task's (unstacked) adapter
    u, s, v = u[None], s[None], v[None]
  return u, s, v


def delta(stack_leaf: Mapping[str, Any], scaling: float = 1.0) -> jax.Array:
  """The kernel delta `scaling * sum_k (U_k diag(sigma_k) V_k)^T`, shape `(d_in, d_out)`.

  Computed in f32 (at least) with HIGHEST precision; accepts stacked or single leaves.
  """
  u, s, v = _as_stack(stack_leaf)
  dt = jnp.promote_types(u.dtype, jnp.float32)
  return scaling * jnp.einsum(
      "kor,kr,kri->io", u.astype(dt), s.astype(dt), v.astype(dt),
      precision=jax.lax.Precision.HIGHEST,
  )


def _replace_kernel(params: PyTree, keys: Sequence[str], fn: Callable) -> PyTree:
  """Copy of `params` with `fn` applied to the kernel under `keys` (copy along the path)."""
  if not keys:
    kernel = params["kernel"]
    if isinstance(kernel, nn.meta.AxisMetadata):
      new_kernel = kernel.replace_boxed(fn(kernel.unbox()))
    else:
      new_kernel = fn(kernel)
    out = dict(params)
    out["kernel"] = new_kernel
    return type(params)(out) if not isinstance(params, dict) else out
  out = dict(params)
  out[keys[0]] = _replace_kernel(params[keys[0]], keys[1:], fn)
  return type(params)(out) if not isinstance(params, dict) else out


def merge(params: PyTree, stack_tree: PyTree, scaling: float = 1.0) -> PyTree:
  """Folds adapters into the base kernels: `kernel + delta(leaf)` for every layer.

  Args:
    params: base params (below 'params'); kernels raw or boxed (`nn.Partitioned`, kept boxed).
    stack_tree: nested or flat stack tree (e.g. `adapters['old']` or `stacked(adapters)`);
      single-task ('new'-shaped) leaves and a full `{'old', 'new'}` state work too.
    scaling: the static adapter scaling.

  Returns:
    params with the same structure and kernel dtypes (the sum is done in f32).
  """
  if is_full_state(stack_tree):
    stack_tree = stacked(stack_tree)
  for path, leaf in flatten_layers(stack_tree).items():
    d = delta(leaf, scaling)

    def add(kernel, d=d):
      return (kernel.astype(d.dtype) + d).astype(kernel.dtype)

    params = _replace_kernel(params, path.split("/"), add)
  return params


def _layer_terms(tree: Mapping[str, PyTree]) -> dict[str, list[tuple]]:
  """`{path: [(U, sigma, V), ...]}` stacks from a stack tree, a 'new' tree or a full state.

  A full state gives two stacks per layer, old and new, kept apart (not concatenated) so
  that back-propagation to the new factors never forms the cotangent of the frozen old ones.
  """
  if is_full_state(tree):
    old = flatten_layers(tree["old"])
    new = flatten_layers(tree["new"])
    out = {}
    for path in list(old) + [p for p in new if p not in old]:
      out[path] = [_as_stack(x) for x in (old.get(path), new.get(path)) if x is not None]
    return out
  return {p: [_as_stack(leaf)] for p, leaf in flatten_layers(tree).items()}


def lowrank_term(x: jax.Array, u, s, v, scaling: float = 1.0, *, dtype=None,
                 precision=None) -> jax.Array:
  """`scaling * sum_k ((x @ V_k^T) * sigma_k) @ U_k^T` for stacked `u, s, v`.

  Args:
    x: inputs `[..., d_in]`.
    u, s, v: `[K, d_out, r]`, `[K, r]`, `[K, r, d_in]`.
    scaling: static multiplier.
    dtype: computation dtype (the Dense's `dtype`); default: promote x and the factors.
    precision: einsum precision (the Dense's `precision`).

  Returns:
    `[..., d_out]` in the computation dtype.
  """
  if dtype is None:
    dtype = jnp.promote_types(x.dtype, u.dtype)
  x, u, s, v = (a.astype(dtype) for a in (x, u, s, v))
  h = jnp.einsum("...i,kri->...kr", x, v, precision=precision) * s
  return scaling * jnp.einsum("...kr,kor->...o", h, u, precision=precision)


def dropout_keep_mask(key: jax.Array, shape: tuple[int, ...],
                      rate: float) -> tuple[jax.Array, float]:
  """A boolean keep-mask of `shape` for dropout at `rate`, and its exact keep probability.

  Each entry compares 16 random bits with `round(rate * 2**16)`, so one 32-bit threefry word
  serves two entries: half the random-number work of `jax.random.bernoulli` (which spends a
  word per entry): 141 -> 79 ms a step for SmolLM2's 60 adapted layers on 8 x 136 tokens. The
  rate is rounded to a multiple of 2^-16 (0.1 -> 0.100006); dividing the kept entries by the
  returned probability keeps the expectation exact.
  """
  n = math.prod(shape)
  words = jax.random.bits(key, ((n + 1) // 2,), jnp.uint32)
  halves = jnp.concatenate([words >> 16, words & 0xFFFF])[:n].reshape(shape)
  threshold = round(rate * 65536)
  return halves >= jnp.uint32(threshold), 1.0 - threshold / 65536


@contextlib.contextmanager
def intercept(adapters: PyTree, scaling: float = 1.0, *, dropout: float = 0.0,
              rng: Optional[jax.Array] = None):
  """Context manager adding the low-rank adapter terms to targeted `nn.Dense` calls.

  Inside `model.apply`, a Dense module's `module.path` is its params path without the
  'params' collection (checked with flax 0.12: `('block_0', 'SelfAttention', 'q')` for
  params `['block_0']['SelfAttention']['q']`), so its '/'-join keys the adapter tree directly.
  Enter the context *inside* the function you jit/grad/vmap and pass the adapters as that
  function's argument, so the factors are traced values and gradients flow to them. Do not
  call an already-jitted model function inside the context: jit's trace cache does not see
  interceptors, so a cached trace made without them would silently skip the adapters.

  Args:
    adapters: a stack tree (`[K, ...]` leaves), a single-task 'new' tree, or a full adapter
      state `{'old', 'new'}` (old and new applied as two einsum chains).
    scaling: the static adapter scaling.
    dropout: LoRA dropout (PEFT's `lora_dropout`, O-LoRA uses 0.1): the adapter path sees
      `dropout(x)` while `x @ W0` sees `x`. Only with `rng`; 0 or no `rng` turns it off.
    rng: the dropout key; every adapted call draws its own mask (folded from the key by the
      layer's path and the call's order in the trace, so the same trace draws the same masks).

  Yields:
    Nothing; model calls inside the block see `x @ W0 + b + scaling * sum_k ...`.
  """
  terms = _layer_terms(adapters)
  drop = rng is not None and dropout > 0.0
  if drop and not 0.0 < dropout < 1.0:
    raise ValueError(f"dropout must be in [0, 1), got {dropout}")
  calls = [0]  # adapted calls traced so far: each gets its own mask

  def dropped(x, path):
    calls[0] += 1
    key = jax.random.fold_in(jax.random.fold_in(rng, _path_seed(path)), calls[0])
    keep, keep_prob = dropout_keep_mask(key, x.shape, dropout)
    return jnp.where(keep, x / keep_prob, jnp.zeros((), x.dtype)).astype(x.dtype)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.Dense):
      return next_fun(*args, **kwargs)
    entry = terms.get("/".join(module.path))
    if entry is None:
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    if drop:
      x = dropped(x, "/".join(module.path))
    for u, s, v in entry:  # at most two stacks (old, new); each is one einsum over k
      extra = lowrank_term(x, u, s, v, scaling, dtype=module.dtype, precision=module.precision)
      y = y + extra.astype(y.dtype)
    return y

  if not terms:
    yield
    return
  with nn.intercept_methods(interceptor):
    yield


def input_grams(fn: Callable[[], Any], paths: Sequence[str],
                masks: Sequence[jax.Array] = ()) -> dict[str, jax.Array]:
  """{path: sum over rows of `x x^T`} of the inputs `x` of the Dense layers at `paths`, while
  `fn()` (a model call) runs: what InfLoRA and GPM build a layer's input subspace from.

  A row is one token: `x` is flattened to `[rows, d_in]`; rows whose mask is 0 (the first of
  `masks` whose shape is `x`'s leading shape: the attention mask, the target mask) are left
  out, so padding adds nothing. Call it inside the traced function, as `intercept`; the blocks
  must not be rematerialised (`config.model.remat="none"`): an input recorded inside a
  checkpointed block would leak out of it.

  Returns:
    float32 `[d_in, d_in]` per path the model called (a layer called twice sums both).
  """
  wanted, grams = set(paths), {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, nn.Dense):
      path = "/".join(module.path)
      if path in wanted:
        x = args[0] if args else kwargs["inputs"]
        rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        mask = next((m for m in masks if tuple(m.shape) == tuple(x.shape[:-1])), None)
        if mask is not None:
          rows = rows * mask.reshape(-1, 1).astype(jnp.float32)
        gram = jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST)
        grams[path] = grams[path] + gram if path in grams else gram
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    fn()
  return grams


def apply(model_apply: Callable, adapters: PyTree, scaling: float = 1.0, *,
          mode: str = "lowrank") -> Callable:
  """Wraps `model_apply(variables, *args, **kw)` so it runs with the adapters applied.

  Args:
    model_apply: e.g. `model.apply`; its first argument holds `{'params': ...}`.
    adapters: full state, stack tree or 'new' tree (see `intercept`).
    scaling: the static adapter scaling.
    mode: 'lowrank' (intercept) or 'merged' (materialise kernels on every call).

  Returns:
    A function with `model_apply`'s signature.
  """
  if mode not in APPLY_MODES:
    raise ValueError(f"mode must be one of {APPLY_MODES}, got {mode!r}")

  def wrapped(variables, *args, **kwargs):
    if mode == "merged":
      variables = dict(variables)
      variables["params"] = merge(variables["params"], adapters, scaling)
      return model_apply(variables, *args, **kwargs)
    with intercept(adapters, scaling):
      return model_apply(variables, *args, **kwargs)

  return wrapped


def to_lora_factors(stack_leaf: Mapping[str, Any], scaling: float = 1.0):
  """PEFT-style factors of a stacked leaf: `delta^T = B @ A` with rank K*r.

  Returns:
    `(A, B)` with `A = (sigma * V)` stacked over tasks `[K*r, d_in]` and
    `B = scaling * U` concatenated `[d_out, K*r]`.
  """
  u, s, v = _as_stack(stack_leaf)
  k, r, d_in = v.shape
  a = (s[..., None] * v).reshape(k * r, d_in)
  b = scaling * jnp.transpose(u, (1, 0, 2)).reshape(u.shape[1], k * r)
  return a, b
