"""Llama 3.2 1B-shaped pretraining from scratch.

Llama 3.2 1B was pruned and distilled from Llama 3.1 8B; Meta does not publish a from-scratch
recipe, so this uses the Llama 3 family's settings (AdamW b1 0.9, b2 0.95, weight decay 0.1,
clipping 1.0, cosine decay to 1% of the peak) with peak lr 3e-4 and a 4096-token context,
~2M-token batches (512 rows). Tokenizer: the Llama 3 tokenizer.json.

    python -m llm_jax.main --config=configs/llama3_2_1b.py --workdir=gs://bucket/run \\
        --config.data.tokenizer_path=/path/tokenizer.json
"""

from llm_jax import config_sections as common


def get_config(arg=None):
  """Returns the config; it takes no argument (override keys with --config.a.b=v instead)."""
  common.parse_arg(arg)
  return common.pretraining_config(
      'llama3.2-1b', seq_len=4096, global_batch_size=512, num_steps=1_000_000,
      learning_rate=3e-4, warmup_steps=2000, end_lr_ratio=0.01, tokenizer='huggingface',
      tokenizer_path='')
