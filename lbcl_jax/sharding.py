"""Device mesh and logical-axis sharding (MaxText / flax lm1b style).

Parameters and activations carry logical axis names ('embed', 'mlp', 'activation_batch', ...);
the config maps them to the mesh axes ('data', 'fsdp', 'tensor'). A mesh axis that does not divide
an array's dimension is dropped for that array, so a small model (MiniLM's 12 heads, a tiny test
T5) still shards what it can instead of failing.
"""

from __future__ import annotations

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
  rules = tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in rules)

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
