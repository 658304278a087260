"""Llama 2 7B pretraining with the published recipe (Touvron et al. 2023, table 1 and sec. 2.2).

AdamW (b1 0.9, b2 0.95, eps 1e-5), peak lr 3e-4, 2000 warmup steps, cosine decay to 10% of the
peak, weight decay 0.1, clipping 1.0, 4096-token context, 4M-token global batches (1024 rows),
2T tokens (~500k steps). Tokenizer: Llama 2's SentencePiece model (pass its path).

    python -m llm_jax.main --config=configs/llama2_7b.py --workdir=gs://bucket/run \\
        --config.data.tokenizer_path=/path/tokenizer.model
"""

from llm_jax import config_sections as common


def get_config(arg=None):
  """Returns the config; it takes no argument (override keys with --config.a.b=v instead)."""
  common.parse_arg(arg)
  return common.pretraining_config(
      'llama2-7b', seq_len=4096, global_batch_size=1024, num_steps=500_000, learning_rate=3e-4,
      warmup_steps=2000, end_lr_ratio=0.1, tokenizer='sentencepiece', tokenizer_path='',
      adam_eps=1e-5)
