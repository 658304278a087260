"""llm_jax: Llama-family language models in JAX/Flax."""

from llm_jax.model import ModelConfig, PRESETS, Transformer, get_preset, init_cache
from llm_jax.convert.hf import load_hf, save_hf
