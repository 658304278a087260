"""Token embedding table, also usable as the output projection when embeddings are tied."""

import flax.linen as nn
import jax.numpy as jnp

from llm_jax.model.layers.projection import project


class Embedder(nn.Module):
  """Maps token ids to vectors, and (tied case) vectors back to vocabulary logits."""
  vocab_size: int
  embed_dim: int
  tied: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    # Tied: std D^-1/2 keeps the output logits O(1) at init (std 1 would give std sqrt(D)).
    # Untied: std 1, as in flax's lm1b; the first RMSNorm rescales the input anyway.
    init = nn.initializers.normal(stddev=self.embed_dim ** -0.5 if self.tied else 1.0)
    self.embedding = self.param(
        'embedding', nn.with_logical_partitioning(init, ('vocab', 'embed')),
        (self.vocab_size, self.embed_dim), self.param_dtype)

  def encode(self, tokens):  # tokens: [B, T] -> [B, T, D]
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def decode(self, x):  # x: [B, T, D] -> float32 logits [B, T, V]
    return project(x.astype(self.dtype), self.embedding.astype(self.dtype),
                   kernel_transposed=True, preferred_element_type=jnp.float32)
