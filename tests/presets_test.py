"""Model presets against published Llama figures, built abstractly (no parameter memory).

Expected parameter counts are the ones Meta and the Hugging Face model cards publish; the
published config.json values below are those of meta-llama's Hugging Face repositories.
"""

import pytest
import torch
import transformers

from llm_jax import model as model_lib
from llm_jax.convert import config_from_hf, config_to_hf

# Billions of parameters as published, to the precision they are published with.
PUBLISHED_BILLIONS = {
    'llama2-7b': 6.74,
    'llama2-13b': 13.0,
    'llama2-70b': 69.0,
    'llama3-8b': 8.03,
    'llama3-70b': 70.6,
    'llama3.1-8b': 8.03,
    'llama3.1-70b': 70.6,
    'llama3.1-405b': 405.9,
    'llama3.2-1b': 1.24,
    'llama3.2-3b': 3.21,
}
_LLAMA31_ROPE = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                 'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192}
_COMMON = {'model_type': 'llama', 'architectures': ['LlamaForCausalLM'], 'hidden_act': 'silu',
           'rms_norm_eps': 1e-05, 'torch_dtype': 'float32'}
PUBLISHED_CONFIGS = {
    'llama2-7b': dict(_COMMON, vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      max_position_embeddings=4096, rope_theta=10000.0, rope_scaling=None,
                      tie_word_embeddings=False),
    'llama3.1-8b': dict(_COMMON, vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        max_position_embeddings=131072, rope_theta=500000.0,
                        rope_scaling=_LLAMA31_ROPE, tie_word_embeddings=False),
    'llama3.2-1b': dict(_COMMON, vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
                        rope_scaling=dict(_LLAMA31_ROPE, factor=32.0), tie_word_embeddings=True),
}


@pytest.mark.parametrize('name', sorted(PUBLISHED_BILLIONS))
def test_parameter_count_matches_published_figure(name):
  count = model_lib.count_params(model_lib.abstract_params(model_lib.PRESETS[name]))
  assert count / 1e9 == pytest.approx(PUBLISHED_BILLIONS[name], rel=5e-3)


@pytest.mark.parametrize('name', sorted(model_lib.PRESETS))
def test_parameter_count_equals_transformers_model(name):
  """transformers builds the same architecture (on the meta device) with as many parameters."""
  preset = model_lib.PRESETS[name]
  with torch.device('meta'):
    reference = transformers.LlamaForCausalLM(
        transformers.LlamaConfig.from_dict(config_to_hf(preset)))
  expected = sum(p.numel() for p in reference.parameters())  # Tied weights count once.
  assert model_lib.count_params(model_lib.abstract_params(preset)) == expected


@pytest.mark.parametrize('name', sorted(PUBLISHED_CONFIGS))
def test_preset_equals_published_hf_config(name):
  assert config_from_hf(PUBLISHED_CONFIGS[name]) == model_lib.PRESETS[name]


@pytest.mark.parametrize('name', sorted(model_lib.PRESETS))
def test_preset_round_trips_through_hf_config(name):
  preset = model_lib.PRESETS[name]
  assert config_from_hf(config_to_hf(preset)) == preset
