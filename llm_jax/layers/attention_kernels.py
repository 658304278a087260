"""Attention kernels behind one interface.

`dot_product_attention` takes queries [B, T, N, H], keys/values [B, S, K, H] (K divides N) and
the coordinates that define the mask: a key is visible to a query when its index is <= the
query's index (causal) and, when segment ids are given, both belong to the same segment (packed
documents never see each other). Softmax is always computed in float32.
"""

from typing import Optional

import jax
import jax.numpy as jnp

KERNELS = ('xla',)
# Large negative instead of -inf so fully masked rows (padding) give finite values, not NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def make_attention_mask(q_index, kv_index, q_segment_ids=None, kv_segment_ids=None):
  """Boolean mask [B, T, S]: causal by index, and same-segment when segment ids are given."""
  mask = kv_index[:, None, :] <= q_index[:, :, None]
  if q_segment_ids is not None:
    mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  return mask


def xla_attention(q, k, v, q_index, kv_index, q_segment_ids=None, kv_segment_ids=None):
  """Reference grouped-query attention written with einsums; XLA fuses it on any backend."""
  batch, q_len, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  group = num_heads // num_kv_heads
  q = q.reshape(batch, q_len, num_kv_heads, group, head_dim)
  logits = jnp.einsum('BTKGH,BSKH->BKGTS', q, k, preferred_element_type=jnp.float32)
  logits = logits * (head_dim ** -0.5)
  mask = make_attention_mask(q_index, kv_index, q_segment_ids, kv_segment_ids)
  logits = jnp.where(mask[:, None, None, :, :], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('BKGTS,BSKH->BTKGH', probs, v)
  return out.reshape(batch, q_len, num_heads, head_dim)


def dot_product_attention(q, k, v, q_index, kv_index, q_segment_ids: Optional[jax.Array] = None,
                          kv_segment_ids: Optional[jax.Array] = None, kernel: str = 'xla'):
  """Dispatches to the attention kernel named by the model config."""
  if kernel == 'xla':
    return xla_attention(q, k, v, q_index, kv_index, q_segment_ids, kv_segment_ids)
  raise ValueError(f'attention kernel {kernel!r} is not available; expected one of {KERNELS}')
