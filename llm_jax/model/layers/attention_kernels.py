"""Attention kernels behind one interface.

`dot_product_attention` takes queries [B, T, N, H], keys/values [B, S, K, H] (K divides N) and
the coordinates that define the mask: a key is visible to a query when its index is <= the
query's index (causal) and, when segment ids are given, both belong to the same segment (packed
documents never see each other). Softmax is always computed in float32.

Kernels (ModelConfig.attention_kernel):
  xla     einsum reference; any backend, any index (also used for decoding with a cache).
  blockwise  flash-attention algorithm in plain XLA ops (`blockwise_attention`): skips the
          masked upper triangle block by block and recomputes probabilities in the backward
          pass instead of storing them. Any backend; the fast kernel on CPUs.
  cudnn   cuDNN flash attention through `jax.nn.dot_product_attention` (NVIDIA GPUs,
          bfloat16/float16). Segment ids become a dense [B, 1, T, S] mask that cuDNN adds as a
          bias: correct, but it costs T*S memory per sequence and skips no masked blocks.
  splash  Pallas splash attention (TPU): causal and segment masking inside the kernel, run per
          shard under `shard_map` with specs from the active logical-axis rules. Lengths must
          be multiples of 128; sequences shorter than 128 use the einsum kernel.
The fused kernels assume q_index == kv_index == arange(T), i.e. self-attention over the whole
sequence without a cache, which is how `Attention` calls them.
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import NamedSharding, PartitionSpec

from llm_jax import sharding
from llm_jax.model.layers import blockwise_attention
from llm_jax.model.layers.attention_mask import make_attention_mask

KERNELS = ('xla', 'blockwise', 'cudnn', 'splash')
_SPLASH_MIN_LEN = 128  # TPU vector lanes: splash tiles are multiples of 128 positions
# Large negative instead of -inf so fully masked rows (padding) give finite values, not NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


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


def prefix_attention(q, k, v, positions, segment_ids, prefix_k, prefix_v, prefix_len):
  """New tokens attending to a read-only cached prefix and to each other (serving engine).

  Queries q [B, T, N, H] and the new keys/values k, v [B, T, K, H] are at `positions` [B, T].
  prefix_k/prefix_v [B, W, K, H] hold earlier tokens of each row at slots < prefix_len [B]
  (the rest is stale and never seen). A new token sees every prefix slot and every new token
  of its segment (segment_ids [B, T] or None) at a position <= its own. The cache is only
  read, so a caller may pass a window of a larger cache without copying it to write into.
  The two parts share one float32 softmax: the same attention as writing the new keys at
  their positions first and attending causally, as `xla_attention` does.
  """
  batch, q_len, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  q = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)

  def scores(keys):
    return jnp.einsum('BTKGH,BSKH->BKGTS', q, keys,
                      preferred_element_type=jnp.float32) * (head_dim ** -0.5)

  if q_len == 1:
    # One query per row (a decode step): products and sums that read the prefix where it
    # lies. As a dot, XLA on CPU first copies the prefix into a transposed layout.
    prefix_scores = jnp.sum(q[:, 0, None] * prefix_k[:, :, :, None, :], axis=-1,
                            dtype=jnp.float32) * (head_dim ** -0.5)  # [B, W, K, G]
    prefix_scores = jnp.transpose(prefix_scores, (0, 2, 3, 1))[:, :, :, None, :]
  else:
    prefix_scores = scores(prefix_k)
  seen_prefix = jnp.arange(prefix_k.shape[1])[None, :] < prefix_len[:, None]  # [B, W]
  prefix_logits = jnp.where(seen_prefix[:, None, None, None, :], prefix_scores, _MASK_VALUE)
  mask = make_attention_mask(positions, positions, segment_ids, segment_ids)  # [B, T, T]
  new_logits = jnp.where(mask[:, None, None, :, :], scores(k), _MASK_VALUE)
  top = jnp.maximum(jnp.max(prefix_logits, axis=-1, keepdims=True, initial=_MASK_VALUE),
                    jnp.max(new_logits, axis=-1, keepdims=True))
  prefix_weights, new_weights = jnp.exp(prefix_logits - top), jnp.exp(new_logits - top)
  total = (jnp.sum(prefix_weights, axis=-1, keepdims=True) +
           jnp.sum(new_weights, axis=-1, keepdims=True))
  prefix_probs = (prefix_weights / total).astype(v.dtype)
  if q_len == 1:
    weights = jnp.transpose(prefix_probs[:, :, :, 0, :], (0, 3, 1, 2))  # [B, W, K, G]
    prefix_out = jnp.sum(weights[..., None] * prefix_v[:, :, :, None, :], axis=1)[:, None]
  else:
    prefix_out = jnp.einsum('BKGTS,BSKH->BTKGH', prefix_probs, prefix_v)
  out = prefix_out + jnp.einsum('BKGTS,BSKH->BTKGH', (new_weights / total).astype(v.dtype), v)
  return out.reshape(batch, q_len, num_heads, head_dim)


def _head_specs(q, k):
  """(mesh, q spec, k/v spec) under the active mesh and logical-axis rules, or None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  rules = nn.get_logical_axis_rules()
  q_spec = sharding.logical_to_spec(('act_batch', None, 'act_heads', None), q.shape, mesh, rules)
  kv_spec = sharding.logical_to_spec(('act_batch', None, 'act_kv_heads', None), k.shape, mesh,
                                     rules)
  return mesh, q_spec, kv_spec


def _repeat_kv_heads(q, k, v):
  """Repeats k/v [B, S, K, H] to N heads, keeping each query head's group."""
  group = q.shape[2] // k.shape[2]
  return jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)


def cudnn_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None,
                    implementation: str = 'cudnn'):
  """cuDNN flash attention via `jax.nn.dot_product_attention`; causal, segments as a mask.

  cuDNN's partitioner needs q, k and v sharded alike, so key/value heads that the tensor axis
  cannot split (while it splits the query heads) are repeated to N heads first.
  `implementation='xla'` runs the very same call through XLA, which is how the CPU tests check
  the arguments this function builds.
  """
  if implementation == 'cudnn' and q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention_kernel='cudnn' needs dtype bfloat16 or float16 activations, "
                     f'got {q.dtype}; set the model dtype or use attention_kernel=\'xla\'')
  specs = _head_specs(q, k)
  if specs is not None and specs[1][2] != specs[2][2]:
    k, v = _repeat_kv_heads(q, k, v)
    k, v = (jax.lax.with_sharding_constraint(x, NamedSharding(specs[0], specs[1])) for x in (k, v))
  mask = None
  if q_segment_ids is not None:
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]  # [B, 1, T, S]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                      implementation=implementation)


def _splash_block_sizes(q_len: int, kv_len: int) -> splash.BlockSizes:
  """Largest of 512/256/128 dividing each length; TPU lanes need multiples of 128."""
  if q_len % _SPLASH_MIN_LEN or kv_len % _SPLASH_MIN_LEN:
    raise ValueError(f'splash attention needs sequence lengths that are multiples of 128; got '
                     f'{q_len} queries and {kv_len} keys (use attention_kernel=\'xla\')')
  block_q = next(b for b in (512, 256, 128) if q_len % b == 0)
  block_kv = next(b for b in (512, 256, 128) if kv_len % b == 0)
  return splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                           block_q_dkv=block_q, block_kv_dkv=block_kv,
                           block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                           block_kv_dq=block_kv)


def _splash_local(q, k, v, q_segment_ids, kv_segment_ids, interpret: bool):
  """Splash attention on one shard: q [B, T, N, H], k/v [B, S, K, H] -> [B, T, N, H]."""
  _, q_len, num_heads, head_dim = q.shape
  kv_len = k.shape[1]
  mask = splash.MultiHeadMask([splash.CausalMask((q_len, kv_len))] * num_heads)
  kernel = splash.make_splash_mha(mask, block_sizes=_splash_block_sizes(q_len, kv_len),
                                  head_shards=1, q_seq_shards=1, interpret=interpret)
  # The kernel wants heads before positions and does not scale the scores itself.
  q = jnp.swapaxes(q * jnp.asarray(head_dim ** -0.5, q.dtype), 1, 2)  # [B, N, T, H]
  k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, S, H]
  segment_ids = None
  if q_segment_ids is not None:
    segment_ids = splash.SegmentIds(q=q_segment_ids, kv=kv_segment_ids)
  out = jax.vmap(kernel)(q, k, v, segment_ids=segment_ids)
  return jnp.swapaxes(out, 1, 2)


def splash_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, interpret: bool = False):
  """Pallas splash attention, sharded over batch and heads by the active logical-axis rules.

  Pallas kernels cannot be partitioned by XLA, so under a mesh the kernel runs inside
  `shard_map`; batch follows 'act_batch' and heads 'act_heads'. When the key/value heads cannot
  be split like the query heads (K not divisible by the tensor axis), keys and values are
  repeated to N heads first so that every shard keeps its query heads' groups.
  `interpret=True` runs the kernel in the Pallas interpreter (CPU tests).
  """
  segments = () if q_segment_ids is None else (q_segment_ids, kv_segment_ids)

  def local(q, k, v, *segments):
    return _splash_local(q, k, v, *(segments or (None, None)), interpret=interpret)

  specs = _head_specs(q, k)
  if specs is None:
    return local(q, k, v, *segments)
  mesh, q_spec, kv_spec = specs
  if kv_spec[2] != q_spec[2]:
    k, v = _repeat_kv_heads(q, k, v)
    kv_spec = q_spec
  segment_specs = (PartitionSpec(q_spec[0], None),) * len(segments)
  sharded = jax.shard_map(local, mesh=mesh, out_specs=q_spec, check_vma=False,
                          in_specs=(q_spec, kv_spec, kv_spec) + segment_specs)
  return sharded(q, k, v, *segments)


def dot_product_attention(q, k, v, q_index, kv_index, q_segment_ids: Optional[jax.Array] = None,
                          kv_segment_ids: Optional[jax.Array] = None, kernel: str = 'xla'):
  """Dispatches to the attention kernel named by the model config (see the module docstring).

  Only `xla` reads q_index/kv_index: the fused kernels assume self-attention with indices
  arange(T), and `blockwise` uses the query segment ids for both sides.
  """
  if kernel == 'xla':
    return xla_attention(q, k, v, q_index, kv_index, q_segment_ids, kv_segment_ids)
  if kernel == 'blockwise':
    return blockwise_attention.blockwise_attention(q, k, v, q_segment_ids)
  if kernel == 'cudnn':
    return cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids)
  if kernel == 'splash':
    if q.shape[1] < _SPLASH_MIN_LEN:
      # Shorter than one kernel tile (e.g. the 8-token trace that builds parameter shapes):
      # the einsum kernel is exact and cheap there.
      return xla_attention(q, k, v, q_index, kv_index, q_segment_ids, kv_segment_ids)
    return splash_attention(q, k, v, q_segment_ids, kv_segment_ids)
  raise ValueError(f'attention kernel {kernel!r} is not available; expected one of {KERNELS}')
