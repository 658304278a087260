"""The Llama decoder-only Transformer (shape letters: see llm_jax/model/config.py)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.model.config import ModelConfig, REMAT_POLICIES
from llm_jax.model.layers.attention import Attention
from llm_jax.model.layers.embed import Embedder
from llm_jax.model.layers.mlp import Mlp
from llm_jax.model.layers.norms import RMSNorm
from llm_jax.model.layers.projection import project

CACHE_AXES = ('layers', 'cache_batch', 'cache_seq', 'cache_kv_heads', 'cache_head_dim')


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attention(norm(x)), then + mlp(norm(x))."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, segment_ids, cache, prefix_len=None):
    """One layer; `cache` and `prefix_len` as in `Attention`: with prefix_len the second
    result is the new keys/values, not the updated cache."""
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    x = nn.with_logical_constraint(x, ('act_batch', 'act_seq', 'act_embed'))
    normed = RMSNorm(cfg.norm_eps, dtype, param_dtype, name='attention_norm')(x)
    attended, new_cache = Attention(
        cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
        cfg.attention_kernel, dtype, param_dtype, name='attention')(
            normed, positions, segment_ids, cache, prefix_len)
    x = x + attended
    normed = RMSNorm(cfg.norm_eps, dtype, param_dtype, name='mlp_norm')(x)
    x = x + Mlp(cfg.mlp_dim, dtype, param_dtype, name='mlp')(normed)
    return nn.with_logical_constraint(x, ('act_batch', 'act_seq', 'act_embed')), new_cache


class Transformer(nn.Module):
  """Llama decoder. `apply({'params': p}, tokens)` returns float32 logits [B, T, V].

  Keyword arguments: `positions` [B, T] (default 0..T-1), `segment_ids` [B, T] (tokens attend
  only within their segment), and `cache` (from `init_cache`), in which case the call returns
  `(logits, new_cache)` and the new keys/values are stored at slot == position.
  """
  config: ModelConfig

  def _layer_class(self):
    policy = REMAT_POLICIES[self.config.remat_policy]
    if self.config.remat_policy == 'none':
      return DecoderLayer
    return nn.remat(DecoderLayer, policy=policy, prevent_cse=not self.config.scan_layers)

  def _run_layers(self, x, positions, segment_ids, cache):
    cfg = self.config
    layer_class = self._layer_class()
    if cfg.scan_layers:
      scanned = nn.scan(layer_class, variable_axes={'params': 0}, split_rngs={'params': True},
                        in_axes=(nn.broadcast, nn.broadcast, 0), length=cfg.num_layers,
                        metadata_params={nn.PARTITION_NAME: 'layers'})
      return scanned(cfg, name='layers')(x, positions, segment_ids, cache)
    new_caches = []
    for i in range(cfg.num_layers):
      layer_cache = None if cache is None else jax.tree.map(lambda c, i=i: c[i], cache)
      x, layer_cache = layer_class(cfg, name=f'layers_{i}')(x, positions, segment_ids,
                                                            layer_cache)
      new_caches.append(layer_cache)
    if cache is None:
      return x, None
    return x, jax.tree.map(lambda *cs: jnp.stack(cs), *new_caches)

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, cache=None):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    embedder = Embedder(cfg.vocab_size, cfg.embed_dim, cfg.tie_embeddings, dtype, param_dtype,
                        name='embedder')
    x = embedder.encode(tokens)  # [B, T, D]
    x, new_cache = self._run_layers(x, positions, segment_ids, cache)
    x = RMSNorm(cfg.norm_eps, dtype, param_dtype, name='final_norm')(x)
    if cfg.tie_embeddings:
      logits = embedder.decode(x)
    else:
      kernel = self.param('lm_head', nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), ('embed', 'vocab')), (cfg.embed_dim, cfg.vocab_size),
                          param_dtype)
      logits = project(x, kernel.astype(dtype), preferred_element_type=jnp.float32)
    logits = nn.with_logical_constraint(logits, ('act_batch', 'act_seq', 'act_vocab'))
    return logits if cache is None else (logits, new_cache)


def init_cache(config: ModelConfig, batch_size: int, max_len: int,
               dtype: Any = None) -> dict:
  """Zeroed KV cache {'k', 'v'} of shape [L, B, S, K, H] (logical axes: CACHE_AXES)."""
  shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
  dtype = jnp.dtype(dtype or config.dtype)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}


def abstract_params(config: ModelConfig, batch_size: int = 1, seq_len: int = 8):
  """Parameter shapes (boxed with their logical axes) without allocating memory."""
  tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
  return jax.eval_shape(lambda t: Transformer(config).init(jax.random.key(0), t), tokens)['params']


def count_params(params) -> int:
  """Number of scalars in a (possibly boxed or abstract) parameter tree."""
  leaves = jax.tree.leaves(nn.unbox(params))
  return int(sum(leaf.size for leaf in leaves))




def unbox(tree):
  """Strips logical-partitioning boxes, leaving plain arrays (or ShapeDtypeStructs)."""
  return nn.unbox(tree)
