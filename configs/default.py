"""Default config: the tiny Llama trained on the embedded Python-stdlib corpus, on a CPU.

    python -m llm_jax.main --config=configs/default.py --workdir=/tmp/run

Every key and its default is listed in `llm_jax/config_sections.py:default_config`; override any
of them on the command line (--config.optim.learning_rate=1e-3). `arg` names another model
preset: --config=configs/default.py:llama-150m.
"""

import ml_collections

from llm_jax import config_sections


def get_config(arg=None) -> ml_collections.ConfigDict:
  return config_sections.default_config(arg)
