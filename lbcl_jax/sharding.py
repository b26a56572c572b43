"""Device mesh and logical-axis sharding (MaxText / flax lm1b style).

Parameters and activations carry logical axis names ('embed', 'mlp', 'activation_batch', ...);
the config maps them to the mesh axes ('data', 'fsdp', 'tensor'). A mesh axis that does not divide
an array's dimension is dropped for that array, so a small model (MiniLM's 12 heads, a tiny test
T5) still shards what it can instead of failing.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lbcl_jax.errors import InputError

MESH_AXES = ("data", "fsdp", "tensor")
# Batch dimension of every input array is split over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """Resolves the config's mesh sizes (one of them may be -1) against the device count."""
  dims = [int(sizes[a]) for a in MESH_AXES]
  unknown = [i for i, d in enumerate(dims) if d == -1]
  if len(unknown) > 1:
    raise InputError(f"config.mesh: at most one of {MESH_AXES} may be -1, got {dict(zip(MESH_AXES, dims))}")
  if any(d == 0 or d < -1 for d in dims):
    raise InputError(f"config.mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, dims))}")
  known = math.prod(d for d in dims if d != -1)
  if unknown:
    if num_devices % known:
      raise InputError(f"config.mesh: {dict(zip(MESH_AXES, dims))} does not divide {num_devices} devices")
    dims[unknown[0]] = num_devices // known
  if math.prod(dims) != num_devices:
    raise ValueError(
        f"config.mesh: data x fsdp x tensor = {math.prod(dims)} but there are {num_devices} devices")
  return tuple(dims)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def normalized_rules(rules: Sequence[tuple[str, Any]]) -> tuple:
  """The config's rules as flax reads them: (name, mesh axis | tuple of axes | None) pairs."""
  return tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in rules)


@contextlib.contextmanager
def on_mesh(mesh: Mesh, rules: Sequence[tuple[str, Any]]):
  """Runs the enclosed code on `mesh` with the logical axis `rules`, so that the models'
  activation constraints (`nn.with_logical_constraint`) take effect in what is traced here.

  Both are needed: with jax 0.10 / flax 0.12 a constraint is put into the program only under
  `jax.set_mesh` (a bare `with mesh:` leaves it out) and with rules that name its axes.
  Without them activations are split only where XLA's propagation happens to carry the
  batch's sharding, and a large model's hidden states and logits can be held whole on every
  device (benchmarks/scale_plan.py measures it).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(normalized_rules(rules)):
    yield


@contextlib.contextmanager
def per_sample_rules(rules: Sequence[tuple[str, Any]]):
  """`rules` with 'activation_batch' left unsplit, for a per-sample function that is vmapped
  with `spmd_axis_name=BATCH_AXES` (the sensitivity pass): the samples take the batch axes,
  and each sample's batch of one is not split again."""
  with nn.logical_axis_rules(tuple((name, None if name == "activation_batch" else axes)
                                   for name, axes in normalized_rules(rules))):
    yield


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def _fit(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes that do not divide the dimension they would split."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    kept, size = [], 1
    for name in names:
      if dim % (size * mesh.shape[name]) == 0:
        kept.append(name)
        size *= mesh.shape[name]
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


def logical_to_sharding(logical_specs: Any, shapes: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """Maps a tree of logical PartitionSpecs (and matching shapes) to NamedShardings."""
  rules = normalized_rules(rules)

  def one(spec, shape):
    mesh_spec = nn.logical_to_mesh_axes(spec if spec is not None else P(), rules)
    return NamedSharding(mesh, _fit(mesh_spec, shape.shape, mesh))

  return jax.tree.map(one, logical_specs, shapes, is_leaf=lambda x: isinstance(x, P) or x is None)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh,
                 replicated_keys: Sequence[str] = ()) -> dict[str, jax.Array]:
  """Assembles this process's slice of a batch into global arrays split over the batch axes.

  Arrays named in `replicated_keys` (the backbone's) with no batch axis (a task's
  2-D options) are replicated; every process holds the same copy.
  """
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    if k in replicated_keys and v.ndim == 2:
      out[k] = jax.make_array_from_process_local_data(replicated(mesh), v, v.shape)
    else:
      out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
  return out


# The axis of an adapter factor that holds its vectors, from the end: U [..., d_out, r],
# V [..., r, d_in].
_VECTOR_AXIS = {"U": -2, "V": -1}


def _axes(entry: Any) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def adapter_shardings(stack_shapes: Any, kernel_specs: Mapping[str, P], mesh: Mesh,
                      rules: Sequence[tuple[str, Any]]) -> Any:
  """Shardings of an adapter tree, stacked or not: `adapter_logical_specs` under `rules`, and
  a factor's vectors split over `fsdp` as well where its kernel's axis does not use it.

  q and v's output axis ('joined_kv') goes to `tensor` only, so by the rules alone every U (and
  its Adam moments, and the old tasks' stack of them) would be whole on every device of an fsdp
  mesh: at 64 devices that is as many bytes as the device's share of an 8B base
  (benchmarks/scale_plan.py). A U of [d_out, r] is a few hundred KiB, so gathering it per
  layer costs nothing next to the base's kernels, which fsdp gathers anyway.
  """
  from flax import traverse_util

  specs = traverse_util.flatten_dict(adapter_logical_specs(stack_shapes, kernel_specs), sep="/")
  shapes = traverse_util.flatten_dict(stack_shapes, sep="/")
  rules = normalized_rules(rules)
  out = {}
  for key, spec in specs.items():
    shape = tuple(shapes[key].shape)
    mesh_spec = list(nn.logical_to_mesh_axes(spec, rules))
    mesh_spec += [None] * (len(shape) - len(mesh_spec))
    axis = _VECTOR_AXIS.get(key.rsplit("/", 1)[1])
    used = {a for entry in mesh_spec for a in _axes(entry)}
    if axis is not None and "fsdp" not in used:
      mesh_spec[axis] = _axes(mesh_spec[axis]) + ("fsdp",)
    out[key] = NamedSharding(mesh, _fit(P(*mesh_spec), shape, mesh))
  return traverse_util.unflatten_dict(out, sep="/")


def _key_names(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def optimizer_state_shardings(state: Any, trainable_shardings: Any, mesh: Mesh) -> Any:
  """Where the driver keeps an optimizer state (`state`: arrays or shapes).

  A leaf that mirrors a trainable leaf (Adam's moments: the same key path at the end, the same
  rank) takes that leaf's sharding. A projection basis (`projection.OrthogonalProjectionState`:
  `bases[layer][factor][kind]`, `[d, m]`) is split along d as its factor's vectors are (U's
  d_out, V's d_in), so that 14 old tasks' bases of every layer are not whole on every device.
  Everything else (step counts) is replicated.
  """
  is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
  by_path = {_key_names(p): s for p, s in
             jax.tree_util.tree_flatten_with_path(trainable_shardings, is_leaf=is_sharding)[0]}
  rep = replicated(mesh)

  def one(path, leaf):
    keys, shape = _key_names(path), tuple(leaf.shape)
    for n in range(len(keys), 0, -1):
      s = by_path.get(keys[-n:])
      if s is not None and len(s.spec) <= len(shape):
        return s
    if "bases" in keys:
      i = keys.index("bases")
      if len(keys) > i + 2 and isinstance(keys[i + 1], str) and len(shape) == 2:
        factor = keys[i + 2]
        s = by_path.get(tuple(keys[i + 1].split("/")) + (factor,))
        if s is not None and factor in _VECTOR_AXIS:
          spec = tuple(s.spec) + (None,) * (2 - len(s.spec))
          return NamedSharding(mesh, _fit(P(spec[_VECTOR_AXIS[factor]], None), shape, mesh))
    return rep

  return jax.tree_util.tree_map_with_path(one, state)


def adapter_logical_specs(stack_shapes: Any, kernel_specs: Mapping[str, P]) -> Any:
  """Logical specs of an adapter tree: U follows the kernel's output axis, V its input axis.

  Args:
    stack_shapes: {'U', 'sigma', 'V'} leaves per layer, nested like the params; stacked
      (leading task axis) or not.
    kernel_specs: '/'-joined module path -> the base kernel's logical spec (d_in, d_out).

  Returns:
    A tree of PartitionSpecs matching `stack_shapes`.
  """
  from flax import traverse_util

  flat = traverse_util.flatten_dict(stack_shapes, sep="/")
  out = {}
  for key, leaf in flat.items():
    layer, name = key.rsplit("/", 1)
    d_in, d_out = tuple(kernel_specs[layer])[:2] if layer in kernel_specs else (None, None)
    base = {"U": (d_out, "rank"), "sigma": ("rank",), "V": ("rank", d_in)}[name]
    lead = ("tasks",) * (leaf.ndim - len(base))
    out[key] = P(*lead, *base)
  return traverse_util.unflatten_dict(out, sep="/")
