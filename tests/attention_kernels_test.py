"""Attention kernels against jax.nn.dot_product_attention and a float64 numpy reference.

The cuDNN kernel is checked by running its exact `jax.nn.dot_product_attention` call with
implementation='xla' (no GPU here); splash attention runs in the Pallas interpreter on CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from llm_jax import sharding
from llm_jax.model.layers import attention_kernels as ak
from llm_jax.model.layers import blockwise_attention


def numpy_attention(q, k, v, q_index, kv_index, q_segments=None, kv_segments=None):
  """Grouped-query attention one (batch, head, query) at a time, in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, q_len, num_heads, head_dim = q.shape
  group = num_heads // k.shape[2]
  out = np.zeros_like(q)
  for b in range(batch):
    for n in range(num_heads):
      for t in range(q_len):
        visible = kv_index[b] <= q_index[b, t]
        if q_segments is not None:
          visible &= kv_segments[b] == q_segments[b, t]
        scores = k[b, :, n // group] @ q[b, t, n] / np.sqrt(head_dim)
        scores = np.where(visible, scores, -np.inf)
        weights = np.exp(scores - scores.max())
        out[b, t, n] = (weights / weights.sum()) @ v[b, :, n // group]
  return out


def _inputs(batch=2, q_len=16, kv_len=16, num_heads=4, num_kv_heads=2, head_dim=8, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, q_len, num_heads, head_dim)).astype(np.float32)
  k = rng.normal(size=(batch, kv_len, num_kv_heads, head_dim)).astype(np.float32)
  v = rng.normal(size=(batch, kv_len, num_kv_heads, head_dim)).astype(np.float32)
  # Packed rows: sorted segment ids 1..3, so every query sees at least itself.
  segments = np.sort(rng.integers(1, 4, size=(batch, kv_len)), axis=1).astype(np.int32)
  return q, k, v, segments


def _arange(batch, length):
  return np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))


def test_xla_matches_jax_nn_causal_gqa():
  q, k, v, _ = _inputs()
  index = _arange(2, 16)
  ours = ak.xla_attention(q, k, v, index, index)
  theirs = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='xla')
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_xla_matches_numpy_with_segments_and_offset_queries():
  q, k, v, kv_segments = _inputs(q_len=4, kv_len=16)
  q_index = np.array([[5, 6, 7, 8], [12, 13, 14, 15]], np.int32)  # a decode-like chunk
  q_segments = np.take_along_axis(kv_segments, q_index, axis=1)
  kv_index = _arange(2, 16)
  ours = ak.xla_attention(q, k, v, q_index, kv_index, q_segments, kv_segments)
  expected = numpy_attention(q, k, v, q_index, kv_index, q_segments, kv_segments)
  np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_cudnn_call_arguments_mask_segments():
  q, k, v, segments = _inputs()
  index = _arange(2, 16)
  ours = ak.cudnn_attention(q, k, v, segments, segments, implementation='xla')
  expected = numpy_attention(q, k, v, index, index, segments, segments)
  np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_cudnn_call_under_mesh_repeats_kv_heads_that_do_not_split():
  q, k, v, segments = _inputs()
  mesh = sharding.create_mesh((2, 1, 4))  # tensor=4 splits 4 query heads, not 2 kv heads
  with sharding.activate(mesh, sharding.DEFAULT_RULES):
    out = jax.jit(lambda q, k, v, s: ak.cudnn_attention(q, k, v, s, s, implementation='xla'))(
        q, k, v, segments)
  index = _arange(2, 16)
  np.testing.assert_allclose(out, numpy_attention(q, k, v, index, index, segments, segments),
                             atol=1e-5)


def test_cudnn_refuses_float32_with_clear_error():
  q, k, v, _ = _inputs()
  with pytest.raises(ValueError, match="attention_kernel='cudnn' needs dtype bfloat16"):
    ak.dot_product_attention(q, k, v, _arange(2, 16), _arange(2, 16), kernel='cudnn')


def test_splash_matches_numpy_and_gradients_match_xla():
  q, k, v, segments = _inputs(batch=1, q_len=128, kv_len=128, num_heads=2, num_kv_heads=1)
  index = _arange(1, 128)
  out = jax.jit(lambda q, k, v: ak.splash_attention(q, k, v, segments, segments,
                                                     interpret=True))(q, k, v)
  np.testing.assert_allclose(out, numpy_attention(q, k, v, index, index, segments, segments),
                             atol=1e-5)

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

  splash_grads = jax.jit(jax.grad(loss(lambda q, k, v: ak.splash_attention(
      q, k, v, segments, segments, interpret=True)), argnums=(0, 1, 2)))(q, k, v)
  xla_grads = jax.grad(loss(lambda q, k, v: ak.xla_attention(
      q, k, v, index, index, segments, segments)), argnums=(0, 1, 2))(q, k, v)
  for ours, reference in zip(splash_grads, xla_grads):
    np.testing.assert_allclose(ours, reference, atol=2e-5)


def test_splash_sharded_over_mesh_repeats_kv_heads_that_do_not_split():
  # tensor=4 splits the 4 query heads but not the 2 key/value heads.
  q, k, v, segments = _inputs(batch=2, q_len=128, kv_len=128, num_heads=4, num_kv_heads=2)
  mesh = sharding.create_mesh((2, 1, 4))
  with sharding.activate(mesh, sharding.DEFAULT_RULES):
    out = jax.jit(lambda q, k, v, s: ak.splash_attention(q, k, v, s, s, interpret=True))(
        q, k, v, segments)
  index = _arange(2, 128)
  np.testing.assert_allclose(out, numpy_attention(q, k, v, index, index, segments, segments),
                             atol=1e-5)


def test_splash_length_rules():
  q, k, v, segments = _inputs(q_len=8, kv_len=8)
  index = _arange(2, 8)
  short = ak.dot_product_attention(q, k, v, index, index, segments, segments, kernel='splash')
  np.testing.assert_allclose(short, numpy_attention(q, k, v, index, index, segments, segments),
                             atol=1e-5)
  q, k, v, _ = _inputs(q_len=192, kv_len=192)
  with pytest.raises(ValueError, match='multiples of 128; got 192'):
    ak.dot_product_attention(q, k, v, _arange(2, 192), _arange(2, 192), kernel='splash')


@pytest.mark.parametrize('q_len,block_size', [(16, 4), (19, 8), (16, 16), (24, None)])
def test_blockwise_matches_numpy_with_packed_segments(q_len, block_size):
  # Ragged last blocks (19 = 8 + 8 + 3) and a single block must be exact too.
  q, k, v, segments = _inputs(q_len=q_len, kv_len=q_len)
  index = _arange(2, q_len)
  out = jax.jit(lambda q, k, v, s: blockwise_attention.blockwise_attention(
      q, k, v, s, block_size=block_size))(q, k, v, segments)
  np.testing.assert_allclose(out, numpy_attention(q, k, v, index, index, segments, segments),
                             atol=1e-5)


@pytest.mark.parametrize('num_kv_heads', [1, 2])
def test_blockwise_gradients_match_jax_nn_attention(num_kv_heads):
  # 19 positions in blocks of 8 (8 + 8 + 3): dk and dv accumulate over three query blocks;
  # 4 query heads share 1 or 2 key/value heads; rows hold two or three packed documents.
  q, k, v, segments = _inputs(q_len=19, kv_len=19, num_kv_heads=num_kv_heads)
  same_segment = (segments[:, :, None] == segments[:, None, :])[:, None]  # [B, 1, T, S]
  weights = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)

  def loss(attention):
    return lambda q, k, v: jnp.sum(attention(q, k, v) * weights)

  ours = jax.jit(jax.value_and_grad(loss(lambda q, k, v: blockwise_attention.blockwise_attention(
      q, k, v, segments, block_size=8)), argnums=(0, 1, 2)))(q, k, v)
  theirs = jax.value_and_grad(loss(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=same_segment, is_causal=True, implementation='xla')), argnums=(0, 1, 2))(
          q, k, v)
  np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5)
  for name, mine, reference in zip('qkv', ours[1], theirs[1]):
    np.testing.assert_allclose(mine, reference, atol=2e-5, err_msg=f'd{name}')


def test_blockwise_without_segments_and_in_bfloat16():
  q, k, v, _ = _inputs(q_len=32, kv_len=32)
  index = _arange(2, 32)
  expected = numpy_attention(q, k, v, index, index)
  out = blockwise_attention.blockwise_attention(q, k, v, block_size=8)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  low = blockwise_attention.blockwise_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)),
                                                block_size=8)
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(low.astype(np.float32), expected, atol=5e-2)


@pytest.mark.parametrize('mesh_shape', [(2, 2, 2), (2, 1, 4)])
def test_blockwise_sharded_over_mesh_matches_numpy(mesh_shape):
  # (2, 1, 4): the tensor axis splits the 4 query heads but not the 2 key/value heads.
  q, k, v, segments = _inputs(batch=2, q_len=40, kv_len=40, num_heads=4, num_kv_heads=2)
  mesh = sharding.create_mesh(mesh_shape)
  rules = sharding.DEFAULT_RULES
  with sharding.activate(mesh, rules):
    _, q_spec, kv_spec = ak._head_specs(q, k)
    q = jax.device_put(q, NamedSharding(mesh, q_spec))
    k, v = (jax.device_put(x, NamedSharding(mesh, kv_spec)) for x in (k, v))
    out = jax.jit(lambda q, k, v, s: blockwise_attention.blockwise_attention(
        q, k, v, s, block_size=16))(q, k, v, segments)
  assert len(q.sharding.device_set) == 8
  index = _arange(2, 40)
  np.testing.assert_allclose(out, numpy_attention(q, k, v, index, index, segments, segments),
                             atol=1e-5)


def test_blockwise_refuses_cross_attention_lengths():
  q, k, v, _ = _inputs(q_len=4, kv_len=16)
  with pytest.raises(ValueError, match='got 4 queries and 16 keys'):
    blockwise_attention.blockwise_attention(q, k, v)
  q, k, v, _ = _inputs(q_len=16, kv_len=16)
  with pytest.raises(ValueError, match='block_size must be positive, got 0'):
    blockwise_attention.blockwise_attention(q, k, v, block_size=0)
  with pytest.raises(ValueError, match='4 query heads are not a multiple of 3'):
    blockwise_attention.blockwise_attention(q, k[:, :, :1].repeat(3, axis=2),
                                            v[:, :, :1].repeat(3, axis=2))


@pytest.mark.parametrize('prefix_len, q_len', [((0, 3, 8), 1), ((5, 2), 4)])
def test_prefix_attention_matches_numpy_with_the_new_keys_written_first(prefix_len, q_len):
  """New tokens at positions prefix_len.. see their row's first prefix_len cached slots (the
  rest is stale and hidden) and the new tokens before them."""
  batch, window = len(prefix_len), 8
  rng = np.random.default_rng(1)
  q, k, v = _inputs(batch=batch, q_len=q_len, kv_len=q_len, seed=2)[:3]
  prefix_k = rng.normal(size=(batch, window) + k.shape[2:]).astype(np.float32)
  prefix_v = rng.normal(size=(batch, window) + k.shape[2:]).astype(np.float32)
  lengths = np.array(prefix_len, np.int32)
  positions = lengths[:, None] + np.arange(q_len, dtype=np.int32)[None, :]
  got = ak.prefix_attention(q, k, v, positions, None, prefix_k, prefix_v, lengths)
  # The cache with the new keys at their positions, stale slots made never visible.
  slots = np.arange(window)[None, :]
  kv_index = np.concatenate([np.where(slots < lengths[:, None], slots, 10**6), positions], 1)
  expected = numpy_attention(q, np.concatenate([prefix_k, k], 1),
                             np.concatenate([prefix_v, v], 1), positions, kv_index)
  np.testing.assert_allclose(got, expected, atol=2e-5)


def test_prefix_attention_of_packed_prompts_sees_each_prompt_only():
  segments = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2, -1]], np.int32)
  positions = np.array([[0, 1, 2, 0, 1, 2, 3, 0, 1, 0]], np.int32)
  q, k, v = _inputs(batch=1, q_len=10, kv_len=10, seed=3)[:3]
  empty = np.zeros((1, 0) + k.shape[2:], np.float32)
  got = ak.prefix_attention(q, k, v, positions, segments, empty, empty, np.zeros((1,), np.int32))
  expected = numpy_attention(q, k, v, positions, positions, segments, segments)
  np.testing.assert_allclose(got, expected, atol=2e-5)
