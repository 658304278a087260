"""llm_jax: Llama-family language models in JAX/Flax."""

from llm_jax.convert.hf import load_hf, save_hf
from llm_jax.inference.decode import generate
from llm_jax.model import ModelConfig, PRESETS, Transformer, get_preset, init_cache, unbox

__all__ = ['ModelConfig', 'PRESETS', 'Transformer', 'generate', 'get_preset', 'init_cache',
           'load_hf', 'save_hf', 'unbox']
