"""The Llama model: frozen config and presets (config.py), the linen Transformer, its layers."""

from llm_jax.model.config import from_config_dict, get_preset, ModelConfig, PRESETS
from llm_jax.model.config import REMAT_POLICIES, to_config_dict
from llm_jax.model.transformer import abstract_params, CACHE_AXES, count_params, DecoderLayer
from llm_jax.model.transformer import init_cache, Transformer, unbox
