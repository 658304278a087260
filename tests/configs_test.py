"""Every config file loads, converts to a ModelConfig, and builds its model abstractly."""

import glob
import importlib
import os

import pytest

from llm_jax import model as model_lib
from llm_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, 'configs',
                                                                               '*.py'))
                      if not os.path.basename(p).startswith(('_', 'common')))


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_config_file_builds(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  model_config = model_lib.from_config_dict(config.model)
  assert model_lib.get_preset(config.model.preset, dtype=model_config.dtype,
                              remat_policy=model_config.remat_policy,
                              scan_layers=model_config.scan_layers,
                              attention_kernel=model_config.attention_kernel) == model_config
  assert config.data.seq_len <= model_config.max_seq_len
  for section in ('model', 'data', 'optim', 'train', 'eval', 'checkpoint', 'mesh', 'decode'):
    assert section in config, section
  assert sharding.resolve_mesh_shape(config.mesh.shape, 8)
  logical = {name for name, _ in config.mesh.rules}
  assert {'act_batch', 'embed', 'mlp', 'heads', 'kv_heads', 'vocab'} <= logical


def test_unknown_model_key_is_named():
  config = importlib.import_module('configs.default').get_config()
  values = config.model.to_dict()
  values['num_experts'] = 8
  with pytest.raises(ValueError, match='num_experts'):
    model_lib.from_config_dict(values)
