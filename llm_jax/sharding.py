"""Device mesh and logical-axis sharding rules.

The model names logical axes only (parameters: vocab, embed, mlp, heads, kv_heads, head_dim,
layers, norm; activations: act_batch, act_seq, act_embed, act_heads, act_kv_heads, act_mlp,
act_vocab; KV cache: cache_*). An ordered rule list maps them to the mesh axes data, fsdp and
tensor; the first rule whose mesh axes are still free wins, as in flax's logical partitioning.
"""

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
from absl import logging
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')
Rules = Sequence[tuple[str, Any]]

# Data parallel over `data`, FSDP (ZeRO-3) over `fsdp`, Megatron-style tensor parallel over
# `tensor`. Activations' batch is split over both data axes; parameters' embed dim over fsdp.
DEFAULT_RULES: Rules = (
    ('act_batch', ('data', 'fsdp')),
    ('act_seq', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    ('cache_batch', ('data', 'fsdp')),
    ('cache_seq', None),
    ('cache_kv_heads', 'tensor'),
    ('cache_head_dim', None),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('layers', None),
    ('norm', None),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces a single -1 by whatever fills the devices; checks the product."""
  shape = tuple(int(s) for s in shape)
  if shape.count(-1) > 1:
    raise ValueError(f'mesh shape {shape} has more than one -1')
  known = math.prod(s for s in shape if s != -1)
  if any(s == 0 or s < -1 for s in shape) or num_devices % known:
    raise ValueError(f'mesh shape {shape} does not divide the {num_devices} devices')
  shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f'mesh shape {shape} uses {math.prod(shape)} devices, '
                     f'but {num_devices} are available')
  return shape


def create_mesh(shape: Sequence[int], axes: Sequence[str] = MESH_AXES, num_slices: int = 1,
                devices=None) -> Mesh:
  """Builds the device mesh; several slices are joined over DCN along the first axis."""
  devices = jax.devices() if devices is None else devices
  if num_slices > 1:
    per_slice = resolve_mesh_shape(shape, len(devices) // num_slices)
    dcn_shape = (num_slices,) + (1,) * (len(per_slice) - 1)
    device_array = mesh_utils.create_hybrid_device_mesh(per_slice, dcn_shape, devices)
  else:
    shape = resolve_mesh_shape(shape, len(devices))
    if devices[0].platform == 'cpu':
      # Topology-aware placement only matters for TPU/GPU interconnects.
      device_array = np.asarray(devices).reshape(shape)
    else:
      try:
        device_array = mesh_utils.create_device_mesh(shape, devices)
      except NotImplementedError:
        # E.g. (1, 32, 2) on an 8x8 torus: legal, but an axis must span split physical axes.
        logging.warning('mesh %s does not align with the device topology; splitting physical '
                        'axes', shape)
        device_array = mesh_utils.create_device_mesh(shape, devices,
                                                     allow_split_physical_axes=True)
  return Mesh(device_array, tuple(axes))


def mesh_axes_size(mesh: Mesh, axes) -> int:
  """Number of devices along one mesh axis, a tuple of axes, or None (1)."""
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules) -> PartitionSpec:
  """Mesh PartitionSpec for an array; a dimension the mesh axes do not divide is replicated."""
  mesh_axes = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
  spec = []
  for dim, axes in zip(shape, mesh_axes):
    axes = None if axes is nn.spmd._unassigned_axis else axes  # pylint: disable=protected-access
    spec.append(axes if axes is not None and dim % mesh_axes_size(mesh, axes) == 0 else None)
  return PartitionSpec(*spec)


def tree_shardings(abstract_tree, mesh: Mesh, rules: Rules):
  """NamedShardings for a tree whose leaves may be boxed with logical axes (else replicated)."""

  def leaf_sharding(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, logical_to_spec(leaf.names, leaf.value.shape, mesh, rules))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(leaf_sharding, abstract_tree,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def logical_axis_size(logical_axis: str, mesh: Mesh, rules: Rules) -> int:
  """How many ways the rules split a logical axis over the mesh (e.g. the batch's shards)."""
  axes = nn.logical_to_mesh_axes((logical_axis,), rules)[0]
  return mesh_axes_size(mesh, None if axes is nn.spmd._unassigned_axis else axes)  # pylint: disable=protected-access


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the given shardings: a restore or AOT-compilation target."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)


def logical_sharding(logical_axes, shape, mesh: Mesh, rules: Rules) -> NamedSharding:
  """NamedSharding for one array from its logical axis names."""
  return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules):
  """Context in which the model's logical constraints resolve against `mesh` and `rules`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
