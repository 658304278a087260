"""Grouped-query self-attention with rotary embeddings and an optional KV cache.

Multi-head attention (K == N) and multi-query attention (K == 1) are special cases. With a cache,
the keys/values of the new tokens are written at cache slot == their position, so a query at
position p attends to slots <= p; slots beyond p (stale padding) are never visible.
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llm_jax.model.layers import attention_kernels
from llm_jax.model.layers import rope
from llm_jax.model.layers.projection import project


def store(cache, index: tuple, update):
  """cache.at[index].set(update) in the cache's dtype, out-of-range indices dropped.

  A bfloat16 cache is written through its 16-bit patterns: XLA's CPU backend has no bfloat16
  scatter, and would convert the whole cache to float32 and back at every write.
  """
  update = update.astype(cache.dtype)
  if cache.dtype != jnp.bfloat16:
    return cache.at[index].set(update, mode='drop')
  bits = jax.lax.bitcast_convert_type(cache, jnp.uint16).at[index].set(
      jax.lax.bitcast_convert_type(update, jnp.uint16), mode='drop')
  return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)


def write_to_cache(cache, update, positions):
  """Writes update [B, T, K, H] into cache [B, S, K, H] at slots positions [B, T]."""
  # One scatter indexed by (row, slot) keeps the cache's layout (a vmapped per-row scatter
  # makes XLA transpose the whole cache); out-of-range slots are dropped, never wrapped.
  rows = jnp.arange(cache.shape[0])[:, None]
  return store(cache, (rows, positions), update)


class Attention(nn.Module):
  """Self-attention block: q/k/v projections, RoPE, attention kernel, output projection."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: Optional[rope.RopeScaling] = None
  kernel: str = 'xla'
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _kernel(self, name, shape, axes, fan_in_axes):
    fan_in_axes = (fan_in_axes,) if isinstance(fan_in_axes, int) else fan_in_axes
    fan_out_axes = tuple(i for i in range(len(shape)) if i not in fan_in_axes)
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal',
                                            in_axis=fan_in_axes, out_axis=fan_out_axes)
    return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                      self.param_dtype).astype(self.dtype)

  @nn.compact
  def __call__(self, x, positions, segment_ids=None, cache=None, prefix_len=None):
    """x: [B, T, D]; positions, segment_ids: [B, T]; cache: {'k','v'} [B, S, K, H] or None.

    Returns (output [B, T, D], the cache with the new keys/values written, or None). With
    prefix_len [B] the cache is a read-only prefix instead, of which each row's first
    prefix_len slots are seen (`attention_kernels.prefix_attention`), and the second result
    is the new keys/values {'k', 'v'} [B, T, K, H] alone, for the caller to store: the serving
    engine passes windows of its cache that way, and packed prompts an empty cache.
    """
    if prefix_len is not None:
      return self._attend(x, positions, segment_ids, cache, prefix_len)
    if cache is not None and segment_ids is not None:
      raise ValueError('segment_ids cannot be combined with a KV cache: cached decoding handles '
                       'one sequence per row (pad on the right instead of packing)')
    query, key, value = self._project_qkv(x, positions)
    if cache is None:
      index = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), positions.shape)
      out = attention_kernels.dot_product_attention(
          query, key, value, index, index, segment_ids, segment_ids, kernel=self.kernel)
      new_cache = None
    else:
      cache_k = write_to_cache(cache['k'], key, positions)
      cache_v = write_to_cache(cache['v'], value, positions)
      slots = jnp.broadcast_to(jnp.arange(cache_k.shape[1], dtype=jnp.int32),
                               (x.shape[0], cache_k.shape[1]))
      # Decoding always uses the reference kernel: one query row makes flash kernels moot.
      out = attention_kernels.xla_attention(query, cache_k.astype(self.dtype),
                                            cache_v.astype(self.dtype), positions, slots)
      new_cache = {'k': cache_k, 'v': cache_v}
    return self._project_out(out, x.shape[-1]), new_cache

  def _project_qkv(self, x, positions):
    """Query [B, T, N, H] and key [B, T, K, H] with RoPE at `positions`, and value."""
    embed_dim = x.shape[-1]
    n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
    wq = self._kernel('q_proj', (embed_dim, n, h), ('embed', 'heads', 'head_dim'), 0)
    wk = self._kernel('k_proj', (embed_dim, k, h), ('embed', 'kv_heads', 'head_dim'), 0)
    wv = self._kernel('v_proj', (embed_dim, k, h), ('embed', 'kv_heads', 'head_dim'), 0)
    x = x.astype(self.dtype)
    inv_freq = rope.inverse_frequencies(h, self.rope_theta, self.rope_scaling)
    query = rope.apply_rope(project(x, wq), positions, inv_freq)
    key = rope.apply_rope(project(x, wk), positions, inv_freq)
    value = project(x, wv)
    return (nn.with_logical_constraint(query, ('act_batch', 'act_seq', 'act_heads', None)),
            nn.with_logical_constraint(key, ('act_batch', 'act_seq', 'act_kv_heads', None)),
            nn.with_logical_constraint(value, ('act_batch', 'act_seq', 'act_kv_heads', None)))

  def _project_out(self, out, embed_dim: int):
    """Attention output [B, T, N, H] -> [B, T, D]."""
    wo = self._kernel('o_proj', (self.num_heads, self.head_dim, embed_dim),
                      ('heads', 'head_dim', 'embed'), (0, 1))
    out = checkpoint_name(out, 'attention_out')
    out = nn.with_logical_constraint(out, ('act_batch', 'act_seq', 'act_heads', None))
    return project(out, wo, contracting=2)

  def _attend(self, x, positions, segment_ids, prefix, prefix_len):
    """The read-only-prefix form of __call__ (see there)."""
    query, key, value = self._project_qkv(x, positions)
    # Through the cache's dtype, so that the new tokens see themselves exactly as a later
    # step will see them in the cache.
    key = key.astype(prefix['k'].dtype).astype(self.dtype)
    value = value.astype(prefix['v'].dtype).astype(self.dtype)
    if prefix['k'].shape[1] == 0 and self.kernel == 'blockwise':
      # No cache to read (packed whole prompts, each in position order): causal self-attention
      # within each segment, which the blockwise kernel computes without the blocks above
      # the diagonal.
      out = attention_kernels.dot_product_attention(query, key, value, None, None, segment_ids,
                                                    segment_ids, kernel='blockwise')
      return self._project_out(out, x.shape[-1]), {'k': key, 'v': value}
    out = attention_kernels.prefix_attention(
        query, key, value, positions, segment_ids, prefix['k'].astype(self.dtype),
        prefix['v'].astype(self.dtype), prefix_len)
    return self._project_out(out, x.shape[-1]), {'k': key, 'v': value}
