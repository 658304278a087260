"""The model's own consistency: KV-cache decoding, dtype policy, layouts and sharded execution.

Parity with transformers' Llama lives in convert_test.py; here the full-sequence forward pass is
the reference the cached, bfloat16 and sharded paths must reproduce.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import model as model_lib
from llm_jax import sharding

CONFIG = model_lib.ModelConfig(vocab_size=128, embed_dim=64, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=16, mlp_dim=96, max_seq_len=64)


@pytest.fixture(scope='module')
def params():
  """Random weights scaled so activations stay O(1) and attention is far from uniform."""
  rng = np.random.RandomState(0)

  def sample(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'scale' in name:
      return (1.0 + 0.3 * rng.standard_normal(leaf.shape)).astype(np.float32)
    std = 1.0 if 'embedding' in name else 0.2
    return (std * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(sample, nn.unbox(model_lib.abstract_params(CONFIG)))


def random_tokens(batch, length, seed=0):
  return np.random.RandomState(seed).randint(0, CONFIG.vocab_size, (batch, length)).astype(np.int32)


@jax.jit
def forward(params, tokens):
  return model_lib.Transformer(CONFIG).apply({'params': params}, tokens)


@jax.jit
def cached_forward(params, tokens, positions, cache):
  return model_lib.Transformer(CONFIG).apply({'params': params}, tokens, positions=positions,
                                             cache=cache)


def decode_step_by_step(params, tokens, prompt_lengths, cache_len):
  """Prefills right-padded prompts, then feeds the remaining tokens one at a time.

  Returns the logits each sequence produced at each position after its prompt: [B, steps, V].
  """
  batch, width = len(prompt_lengths), max(prompt_lengths)
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), (batch, width))
  prompt = np.where(positions < np.array(prompt_lengths)[:, None], tokens[:, :width], 0)
  cache = model_lib.init_cache(CONFIG, batch, cache_len)
  logits, cache = cached_forward(params, prompt, positions, cache)
  rows = np.arange(batch)
  outputs = [np.asarray(logits)[rows, np.array(prompt_lengths) - 1]]
  for step in range(tokens.shape[1] - width):
    step_positions = np.array(prompt_lengths, np.int32)[:, None] + step
    step_tokens = np.take_along_axis(tokens, step_positions, axis=1)
    logits, cache = cached_forward(params, step_tokens, step_positions, cache)
    outputs.append(np.asarray(logits)[:, 0])
  return np.stack(outputs, axis=1)


def test_cached_decoding_matches_full_forward(params):
  tokens = random_tokens(2, 16)
  expected = np.asarray(forward(params, tokens))
  decoded = decode_step_by_step(params, tokens, [9, 9], cache_len=16)
  np.testing.assert_allclose(decoded, expected[:, 8:16], atol=1e-5, rtol=0)


def test_cached_decoding_with_ragged_prompts(params):
  """Right-padded prefill of prompts of lengths 4 and 9, then per-sequence positions."""
  lengths = [4, 9]
  tokens = random_tokens(2, 16, seed=1)
  expected = np.asarray(forward(params, tokens))
  decoded = decode_step_by_step(params, tokens, lengths, cache_len=16)
  steps = decoded.shape[1]
  for row, length in enumerate(lengths):
    np.testing.assert_allclose(decoded[row], expected[row, length - 1:length - 1 + steps],
                               atol=1e-5, rtol=0)


def test_bfloat16_compute_returns_float32_logits_close_to_float32(params):
  tokens = random_tokens(2, 16)
  config = CONFIG.replace(dtype='bfloat16')
  logits = jax.jit(model_lib.Transformer(config).apply)({'params': params}, tokens)
  expected = np.asarray(forward(params, tokens))
  assert logits.dtype == jnp.float32
  error = np.abs(np.asarray(logits) - expected)
  assert 0 < error.max() < 0.05 * np.abs(expected).max()
  # The predictions a user sees barely move.
  assert (np.argmax(logits, -1) == np.argmax(expected, -1)).mean() > 0.9


def test_remat_and_unscanned_layers_do_not_change_logits(params):
  tokens = random_tokens(2, 16)
  expected = np.asarray(forward(params, tokens))
  remat = model_lib.Transformer(CONFIG.replace(remat_policy='full'))
  np.testing.assert_allclose(jax.jit(remat.apply)({'params': params}, tokens), expected,
                             atol=1e-5)
  unscanned = {k: v for k, v in params.items() if k != 'layers'}
  for i in range(CONFIG.num_layers):
    unscanned[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], params['layers'])
  flat = model_lib.Transformer(CONFIG.replace(scan_layers=False))
  np.testing.assert_allclose(jax.jit(flat.apply)({'params': unscanned}, tokens), expected,
                             atol=1e-5)


@pytest.mark.parametrize('mesh_shape', [(2, 2, 2), (1, 2, 4)])
def test_sharded_forward_matches_single_device(params, mesh_shape):
  mesh = sharding.create_mesh(mesh_shape)
  rules = sharding.DEFAULT_RULES
  abstract = model_lib.abstract_params(CONFIG)
  shardings = sharding.tree_shardings(abstract, mesh, rules)
  tokens = random_tokens(4, 16)
  with sharding.activate(mesh, rules):
    sharded_params = jax.device_put(params, shardings)
    logits = jax.jit(lambda p, t: model_lib.Transformer(CONFIG).apply({'params': p}, t))(
        sharded_params, tokens)
  # The sharding rules really split the weights across devices.
  assert len(sharded_params['layers']['mlp']['up_proj'].sharding.device_set) == 8
  # Split contractions sum in another order: float32 rounding, relative to the logit size.
  np.testing.assert_allclose(logits, forward(params, tokens), rtol=1e-5, atol=1e-5)
