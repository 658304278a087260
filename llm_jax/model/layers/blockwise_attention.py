"""Causal attention computed block by block, with a backward pass that recomputes.

The einsum kernel (`attention_kernels.xla_attention`) materialises float32 scores and
probabilities [B, K, G, T, S] and the autodiff backward keeps them, so attention becomes a dozen
full passes over T*S floats per layer and head: on a CPU that dominates the step of a small
model. This kernel follows the flash-attention algorithm in plain XLA ops instead:

* queries are split into static blocks of `block_size` rows; block i only attends to the keys
  up to its own end, so the fully masked upper triangle is never computed (with n blocks it
  computes (n + 1) / 2n of the scores: 56% for T = 256 in 32-row blocks);
* the forward pass keeps only the output and the row log-sum-exp [B, K, G, T];
* a custom VJP recomputes each block's probabilities from q, k and the log-sum-exp, then forms
  dq, dk and dv from them, so no [T, S] tensor survives between the passes.

It honours segment ids (packed documents) inside every block and, like the other fused kernels,
assumes self-attention over the whole sequence (q_index == kv_index == arange(T)). It is pure
XLA, so it runs and is partitioned by XLA on any backend; it is the fast kernel on CPUs. When
the tensor axis splits the query heads but not the key/value heads, XLA gathers the heads
around it (correct, but slower than `splash`/`cudnn`, which repeat the key/value heads). The
custom VJP rules out forward-mode autodiff (`jax.jvp`, `jax.jacfwd`): use the `xla` kernel there.
"""

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from llm_jax.model.layers.attention_mask import make_attention_mask

_MIN_BLOCK = 32  # smaller blocks cost more in per-op overhead than they save in skipped work
_MAX_BLOCKS = 16  # bounds the unrolled ops (and compile time) for long sequences


def default_block_size(seq_len: int) -> int:
  """32-row blocks, growing for long sequences so that there are at most 16 of them."""
  return max(_MIN_BLOCK, math.ceil(seq_len / _MAX_BLOCKS))


def _block_mask(start: int, end: int, segment_ids):
  """Visible keys of query rows [start, end): [B or 1, 1, 1, C, end] booleans."""
  segments = (None, None)
  if segment_ids is not None:
    segments = (segment_ids[:, start:end], segment_ids[:, :end])
  mask = make_attention_mask(jnp.arange(start, end)[None], jnp.arange(end)[None], *segments)
  return mask[:, None, None]


def _block_scores(q, k, start: int, end: int):
  """Scaled float32 scores of query rows [start, end) against keys [0, end): [B, K, G, C, S]."""
  scale = q.shape[-1] ** -0.5
  return jnp.einsum('BKGCH,BKSH->BKGCS', q[..., start:end, :], k[..., :end, :],
                    preferred_element_type=jnp.float32) * scale


def _blocks(seq_len: int, block_size: int):
  return [(start, min(start + block_size, seq_len)) for start in range(0, seq_len, block_size)]


def _forward(q, k, v, segment_ids, block_size: int):
  """q [B, K, G, T, H], k/v [B, K, S, H] -> out [B, K, G, T, H], log-sum-exp [B, K, G, T]."""
  outs, lses = [], []
  for start, end in _blocks(q.shape[-2], block_size):
    # Every query sees itself (the diagonal is never masked), so no row is all -inf.
    scores = jnp.where(_block_mask(start, end, segment_ids),
                       _block_scores(q, k, start, end), -jnp.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    weights = jnp.exp(scores - row_max)  # in (0, 1]: safe to round to v's dtype
    row_sum = weights.sum(axis=-1, keepdims=True)
    # Normalising the [C, H] output instead of the [C, S] weights saves a pass over the scores.
    out = jnp.einsum('BKGCS,BKSH->BKGCH', weights.astype(v.dtype), v[..., :end, :],
                     preferred_element_type=jnp.float32)
    outs.append((out / row_sum).astype(v.dtype))
    lses.append((row_max + jnp.log(row_sum))[..., 0])
  return jnp.concatenate(outs, axis=-2), jnp.concatenate(lses, axis=-1)


def _backward(q, k, v, segment_ids, out, lse, dout, block_size: int):
  """Gradients of `_forward`'s output for q, k, v, from recomputed block probabilities."""
  scale = q.shape[-1] ** -0.5
  # sum_s p * dp = dout . out per row: the softmax Jacobian's correction term.
  delta = jnp.einsum('BKGTH,BKGTH->BKGT', out, dout, preferred_element_type=jnp.float32)
  dq_blocks = []
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for start, end in _blocks(q.shape[-2], block_size):
    q_block, dout_block = q[..., start:end, :], dout[..., start:end, :]
    probs = jnp.where(_block_mask(start, end, segment_ids),
                      jnp.exp(_block_scores(q, k, start, end) - lse[..., start:end, None]), 0.0)
    dv = dv.at[..., :end, :].add(jnp.einsum('BKGCS,BKGCH->BKSH', probs.astype(v.dtype),
                                            dout_block, preferred_element_type=jnp.float32))
    dprobs = jnp.einsum('BKGCH,BKSH->BKGCS', dout_block, v[..., :end, :],
                        preferred_element_type=jnp.float32)
    dscores = (probs * (dprobs - delta[..., start:end, None]) * scale).astype(q.dtype)
    dq_blocks.append(jnp.einsum('BKGCS,BKSH->BKGCH', dscores, k[..., :end, :],
                                preferred_element_type=jnp.float32))
    dk = dk.at[..., :end, :].add(jnp.einsum('BKGCS,BKGCH->BKSH', dscores, q_block,
                                            preferred_element_type=jnp.float32))
  dq = jnp.concatenate(dq_blocks, axis=-2)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segment_ids, block_size):
  return _forward(q, k, v, segment_ids, block_size)[0]


def _attention_fwd(q, k, v, segment_ids, block_size):
  out, lse = _forward(q, k, v, segment_ids, block_size)
  return out, (q, k, v, segment_ids, out, lse)


def _attention_bwd(block_size, residuals, dout):
  q, k, v, segment_ids, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, segment_ids, out, lse, dout, block_size)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(q, k, v, segment_ids: Optional[jax.Array] = None,
                        block_size: Optional[int] = None):
  """Causal grouped-query self-attention: q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H].

  `segment_ids` [B, T] restricts every query to keys of its own segment (packed documents).
  `block_size` defaults to `default_block_size(T)`.
  """
  batch, seq_len, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  if k.shape[1] != seq_len:
    raise ValueError(f'blockwise attention is self-attention over the whole sequence; got '
                     f'{seq_len} queries and {k.shape[1]} keys (use the xla kernel with a cache)')
  if num_heads % num_kv_heads:
    raise ValueError(f'blockwise attention: {num_heads} query heads are not a multiple of '
                     f'{num_kv_heads} key/value heads')
  block_size = default_block_size(seq_len) if block_size is None else block_size
  if block_size < 1:
    raise ValueError(f'blockwise attention: block_size must be positive, got {block_size}')
  # Heads before positions, so every einsum is a plain batched matmul over (B, K).
  q = q.reshape(batch, seq_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
  q = q.transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)
  out = _attention(q, k, v, segment_ids, block_size)
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq_len, num_heads, head_dim)
