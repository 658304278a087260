"""Mesh construction and the mapping from logical axes to mesh axes."""

import jax
import pytest
from jax.sharding import PartitionSpec

from llm_jax import config_sections as common
from configs import default
from llm_jax import sharding


def test_minus_one_fills_the_devices():
  assert sharding.resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
  mesh = sharding.create_mesh((1, -1, 2))
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 4, 'tensor': 2}


@pytest.mark.parametrize('shape', [(3, -1, 1), (-1, -1, 1), (2, 2, 1), (0, 8, 1)])
def test_bad_mesh_shapes_are_refused_with_the_shape_named(shape):
  with pytest.raises(ValueError, match='mesh shape'):
    sharding.resolve_mesh_shape(shape, 8)


def test_several_slices_need_devices_that_know_their_slice():
  with pytest.raises(ValueError, match='slice'):
    sharding.create_mesh((-1, 1, 1), num_slices=2)


def test_rules_map_logical_axes_and_skip_axes_that_do_not_divide():
  mesh = sharding.create_mesh((2, 2, 2))
  rules = sharding.DEFAULT_RULES
  assert sharding.logical_to_spec(('embed', 'mlp'), (64, 128), mesh, rules) == PartitionSpec(
      'fsdp', 'tensor')
  assert sharding.logical_to_spec(('act_batch', 'act_seq'), (8, 16), mesh, rules) == (
      PartitionSpec(('data', 'fsdp'), None))
  # 3 is not divisible by the 2-way tensor axis: that dimension is replicated.
  assert sharding.logical_to_spec(('embed', 'kv_heads'), (64, 3), mesh, rules) == PartitionSpec(
      'fsdp', None)


def test_config_rules_round_trip_through_the_config():
  config = default.get_config()
  assert tuple(tuple(r) for r in config.mesh.rules) == tuple(sharding.DEFAULT_RULES)
  assert common.parse_arg('llama3-8b', preset='tiny').preset == 'llama3-8b'
  with pytest.raises(ValueError, match='unknown config argument'):
    common.parse_arg('size=3', preset='tiny')
  assert len(jax.devices()) == 8
