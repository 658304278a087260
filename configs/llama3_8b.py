"""Llama 3 8B pretraining.

Published: 8192-token context, a 128,256-entry tiktoken-style BPE (tokenizer.json), AdamW with
b1 0.9, b2 0.95, weight decay 0.1, clipping 1.0, ~4M-token batches, ~15T tokens. Meta publishes
the full schedule only for 405B (Dubey et al. 2024, sec. 3.4.1: linear warmup, cosine decay to
1% of the peak); for 8B the peak lr of 3e-4 from the model card is used with that shape.

    python -m llm_jax.main --config=configs/llama3_8b.py --workdir=gs://bucket/run \\
        --config.data.tokenizer_path=/path/tokenizer.json
"""

from llm_jax import config_sections as common


def get_config(arg=None):
  """Returns the config; it takes no argument (override keys with --config.a.b=v instead)."""
  common.parse_arg(arg)
  return common.pretraining_config(
      'llama3-8b', seq_len=8192, global_batch_size=512, num_steps=3_600_000, learning_rate=3e-4,
      warmup_steps=8000, end_lr_ratio=0.01, tokenizer='huggingface', tokenizer_path='')
