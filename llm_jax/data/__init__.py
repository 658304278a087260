"""Input pipeline: TFDS builders, tokenizers, packing, and the batches the training loop reads."""

from llm_jax.data.pipeline import get_tokenizer
from llm_jax.data.pipeline import make_eval_batches
from llm_jax.data.pipeline import make_train_iterator
from llm_jax.data.pipeline import to_global_batch
from llm_jax.data.tokenizer import load_tokenizer
from llm_jax.data.tokenizer import Tokenizer
