"""LoRA supervised fine-tuning: adapters trained on a frozen base model.

    python -m llm_jax.main --config=configs/lora.py:hf_dir=/ckpt/SmolLM2-135M-Instruct \\
        --config.data.sft_files=/data/train.jsonl --workdir=/runs/lora
    python -m llm_jax.main --config=configs/lora.py --config.train.init_from=/tmp/llm_jax_run \\
        --workdir=/tmp/lora

With `hf_dir` the base, its tokenizer and its chat template come from that Hugging Face
directory (the base may be bfloat16: --config.model.param_dtype=bfloat16). Without it the base is
the tiny model, pretrained by a default run named with train.init_from (a fresh random base
otherwise, a smoke test only), on the docstring task built from the embedded stdlib corpus.
Checkpoints hold the adapters; llm_jax.convert.peft exports them as a PEFT directory.
"""

import ml_collections

from llm_jax import config_sections


def get_config(arg=None) -> ml_collections.ConfigDict:
  """`arg`: 'hf_dir=PATH', 'rank=N' (default 8)."""
  args = config_sections.parse_arg(arg, hf_dir='', rank=8)
  return config_sections.finetuning_config(args.hf_dir, lora_rank=args.rank)
