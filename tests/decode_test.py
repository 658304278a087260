"""Generation: cached decoding, greedy parity with transformers, batching, streaming, errors.

The reference for greedy decoding is `transformers.LlamaForCausalLM.generate` on random weights
saved with `save_pretrained` and read back with `llm_jax.convert.load_hf`.
"""

import jax
import numpy as np
import pytest
import torch
import transformers

from llm_jax.inference import decode
from llm_jax import model as model_lib
from llm_jax.convert import load_hf

PROMPT_LENGTHS = (5, 12, 1, 9)


def make_hf_model(directory, seed=0):
  """A small random-weight transformers Llama, saved to `directory`."""
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
      vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      # Large weights make the next-token distribution sharp, so float32 rounding differences
      # between two implementations cannot flip an argmax.
      initializer_range=0.2)
  model = transformers.LlamaForCausalLM(config).eval()
  model.save_pretrained(directory)
  return model


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('hf_llama'))
  model = make_hf_model(directory)
  config, params = load_hf(directory)
  return model, config, params


def make_prompts(lengths=PROMPT_LENGTHS, vocab=256, seed=1):
  rng = np.random.RandomState(seed)
  return [rng.randint(0, vocab, n).tolist() for n in lengths]


def hf_greedy(model, prompt, max_new_tokens, eos_id, **kwargs):
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id,
                         pad_token_id=0, **kwargs)
  return out[0, len(prompt):].tolist()


def test_cached_decoding_matches_full_forward():
  config = model_lib.ModelConfig(vocab_size=128, embed_dim=64, num_layers=2, num_heads=4,
                                 num_kv_heads=2, head_dim=16, mlp_dim=96, max_seq_len=64,
                                 tie_embeddings=True)
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32),
                        model_lib.unbox(model_lib.abstract_params(config)))
  lengths = np.array([3, 8, 5], np.int32)
  steps, width = 6, 8
  tokens = rng.randint(0, 128, (3, width + steps)).astype(np.int32)
  full = jax.jit(model_lib.Transformer(config).apply)({'params': params}, tokens)  # [B, T, V]
  prompts = np.where(np.arange(width)[None] < lengths[:, None], tokens[:, :width], 0)
  cache = model_lib.init_cache(config, 3, 32)
  logits, cache = jax.jit(decode.prefill, static_argnums=0)(config, params, prompts, lengths,
                                                            cache)
  rows = np.arange(3)
  np.testing.assert_allclose(logits, full[rows, lengths - 1], atol=1e-4, rtol=0)
  step = jax.jit(decode.decode_step, static_argnums=0)
  for i in range(steps):
    positions = lengths + i
    logits, cache = step(config, params, tokens[rows, positions], positions, cache)
    np.testing.assert_allclose(logits, full[rows, positions], atol=1e-4, rtol=0,
                               err_msg=f'step {i}')


def test_greedy_matches_transformers(checkpoint):
  model, config, params = checkpoint
  prompts = make_prompts()
  free = decode.generate(config, params, prompts, max_new_tokens=12)
  # Stop on a token one continuation emits midway, so stopping is exercised too.
  eos_id = free[1][4]
  ours = decode.generate(config, params, prompts, max_new_tokens=12, eos_id=eos_id)
  assert len(ours[1]) == 5 and ours[1][-1] == eos_id
  for prompt, tokens in zip(prompts, ours):
    assert tokens == hf_greedy(model, prompt, 12, eos_id)


def test_repetition_penalty_matches_transformers(checkpoint):
  """Also checks that prompt padding never counts as a seen token."""
  model, config, params = checkpoint
  prompts = make_prompts()
  ours = decode.generate(config, params, prompts, max_new_tokens=12, repetition_penalty=1.3)
  assert ours != decode.generate(config, params, prompts, max_new_tokens=12)
  for prompt, tokens in zip(prompts, ours):
    assert tokens == hf_greedy(model, prompt, 12, None, repetition_penalty=1.3)


def test_batched_prompts_match_one_by_one(checkpoint):
  _, config, params = checkpoint
  prompts = make_prompts()
  batched = decode.generate(config, params, prompts, max_new_tokens=12)
  alone = [decode.generate(config, params, [p], max_new_tokens=12)[0] for p in prompts]
  assert batched == alone


def test_several_stop_ids_and_per_sequence_stopping(checkpoint):
  _, config, params = checkpoint
  prompts = make_prompts()
  free = decode.generate(config, params, prompts, max_new_tokens=10)
  stops = [free[0][2], free[3][6]]
  ours = decode.generate(config, params, prompts, max_new_tokens=10, eos_id=stops)
  for tokens, unstopped in zip(ours, free):
    cut = next((i + 1 for i, t in enumerate(unstopped) if t in stops), len(unstopped))
    assert tokens == unstopped[:cut]


def test_stream_chunks_concatenate_to_generate(checkpoint):
  _, config, params = checkpoint
  prompts = make_prompts()
  expected = decode.generate(config, params, prompts, max_new_tokens=12)
  chunks = list(decode.stream(config, params, prompts, max_new_tokens=12, chunk_size=4))
  assert [len(c[0]) for c in chunks] == [1, 4, 4, 3]
  joined = [sum((chunk[i] for chunk in chunks), []) for i in range(len(prompts))]
  assert joined == expected


class _FakeTokenizer:
  """Maps characters to ids; enough to check the string interface."""
  bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 256

  def encode(self, text):
    return [ord(c) for c in text]

  def decode(self, ids):
    return ''.join(chr(i) for i in ids)


def test_string_prompts_with_tokenizer(checkpoint):
  _, config, params = checkpoint
  tokenizer = _FakeTokenizer()
  words = ['hello world', 'a', 'tokens', 'xyz']
  texts = decode.generate(config, params, words, max_new_tokens=12, tokenizer=tokenizer)
  ids = decode.generate(config, params, [[1] + [ord(c) for c in w] for w in words],
                        max_new_tokens=12, eos_id=2)
  assert texts == [''.join(chr(i) for i in row if i != 2) for row in ids]
  # A tokenizer smaller than the model's vocabulary never sees ids it cannot decode.
  tokenizer.vocab_size = 60
  texts = decode.generate(config, params, words, max_new_tokens=12, tokenizer=tokenizer)
  assert all(ord(c) < 60 for text in texts for c in text)
  assert max(ord(c) for text in texts for c in text) > 2


@pytest.mark.parametrize('prompts, kwargs, message', [
    ([[1] * 60], dict(max_new_tokens=8), 'max_seq_len'),
    ([[1, 2], []], dict(max_new_tokens=4), 'prompt 1 is empty'),
    ([[1, 256]], dict(max_new_tokens=4), 'token id 256 at position 1'),
    ([[1, -3]], dict(max_new_tokens=4), 'token id -3'),
    ([1, 2, 3], dict(max_new_tokens=4), 'flat list'),
    ([], dict(max_new_tokens=4), 'non-empty list'),
    ([[1]], dict(max_new_tokens=0), 'max_new_tokens'),
    ([[1]], dict(max_new_tokens=4, num_beams=2, temperature=0.7), 'num_beams=2'),
    ([[1]], dict(max_new_tokens=4, temperature=1.0, top_p=0.0), 'top_p'),
    ([[1]], dict(max_new_tokens=4, temperature=1.0, top_p=1.5), 'top_p'),
    ([[1]], dict(max_new_tokens=4, temperature=-1.0), 'temperature'),
    ([[1]], dict(max_new_tokens=4, top_k=-2), 'top_k'),
    ([[1]], dict(max_new_tokens=4, eos_id=[2, 999]), 'eos_id 999'),
    ([[1]], dict(max_new_tokens=4, num_beams=2, early_stopping='sometimes'), 'early_stopping'),
    ([[1]], dict(max_new_tokens=4, cache_dtype='int8'), 'cache_dtype'),
])
def test_bad_requests_raise_before_compiling(checkpoint, monkeypatch, prompts, kwargs, message):
  _, config, params = checkpoint

  def must_not_run(*args, **kwargs):
    raise AssertionError('reached the device before rejecting the request')

  monkeypatch.setattr(decode, '_place_params', must_not_run)
  with pytest.raises(ValueError, match=message):
    decode.generate(config, params, prompts, **kwargs)


def test_mismatched_params_are_named(checkpoint):
  _, config, params = checkpoint
  with pytest.raises(ValueError, match='lm_head'):
    decode.generate(config.replace(tie_embeddings=True), params, [[1, 2]], max_new_tokens=2)
