"""Shared pieces of the config files: sections with their defaults and preset parsing."""

import ml_collections

from llm_jax import model as model_lib
from llm_jax import sharding


def parse_arg(arg, **defaults):
  """Parses 'key=value,key2=value2' (or a bare preset name) into a ConfigDict of defaults."""
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      key, value = 'preset', key
    if key not in result:
      raise ValueError(f'unknown config argument {key!r}; expected one of {sorted(result)}')
    result[key] = type(result[key])(value) if result[key] is not None else value
  return result


def model_section(preset: str, **overrides) -> ml_collections.ConfigDict:
  """The `model` section: every ModelConfig field, starting from a preset."""
  values = model_lib.to_config_dict(model_lib.get_preset(preset, **overrides))
  values['preset'] = preset
  return ml_collections.ConfigDict(values)


def mesh_section(shape=(-1, 1, 1)) -> ml_collections.ConfigDict:
  mesh = ml_collections.ConfigDict()
  mesh.axes = sharding.MESH_AXES
  mesh.shape = tuple(shape)  # -1 fills the remaining devices
  mesh.num_slices = 1  # > 1: slices joined over DCN along the data axis
  mesh.rules = tuple(sharding.DEFAULT_RULES)
  return mesh
