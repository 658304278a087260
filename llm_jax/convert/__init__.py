"""Import and export of checkpoints: Hugging Face transformers Llama <-> llm_jax parameters.

Command line: `python -m llm_jax.convert hf-to-orbax ...` / `orbax-to-hf ...`.
"""

from llm_jax.convert.hf import config_from_hf, config_to_hf, load_hf, save_hf
