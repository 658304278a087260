"""Supervised fine-tuning (all parameters) on chat data.

    python -m llm_jax.main --config=configs/sft.py --workdir=/tmp/sft
    python -m llm_jax.main --config=configs/sft.py:hf_dir=/ckpt/SmolLM2-135M-Instruct \\
        --config.data.sft_files=/data/train.jsonl --workdir=/runs/sft

Without `hf_dir`: the tiny model learns to write Python docstrings, a task built from the
embedded stdlib corpus (offline, minutes on a CPU); add --config.train.init_from=<a pretraining
workdir> to start from a pretrained tiny model. With `hf_dir`: the model, tokenizer and chat
template of that Hugging Face directory, whose weights are the starting point. The data keys
(`config.data.sft_*`, `chat_template`) are described in llm_jax/config_sections.py.
"""

import ml_collections

from llm_jax import config_sections


def get_config(arg=None) -> ml_collections.ConfigDict:
  """`arg`: 'hf_dir=PATH' to fine-tune a Hugging Face model instead of the tiny one."""
  args = config_sections.parse_arg(arg, hf_dir='')
  return config_sections.finetuning_config(args.hf_dir, lora_rank=0)
