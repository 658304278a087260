"""Token selection: parity of the logits processors with transformers, sampling properties, and
seeded sampling that gives the same tokens on any mesh.
"""

import jax
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from jax.sharding import PartitionSpec
from transformers.generation import logits_process

from llm_jax.inference import decode
from llm_jax import model as model_lib
from llm_jax.inference import sampling
from llm_jax import sharding

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def distributions(draw):
  """Logits at least 0.01 apart (ties would make 'the top k' ambiguous), top_k, top_p."""
  vocab = 24
  hundredths = draw(st.lists(st.integers(-800, 800), min_size=vocab, max_size=vocab,
                             unique=True))
  top_k = draw(st.sampled_from([0, 1, 5, vocab + 3]))
  top_p = draw(st.floats(0.05, 1.0))
  return np.asarray(hundredths, np.float32) / 100, top_k, top_p


# Jitted so each (top_k, use_top_p) compiles once instead of dispatching op by op.
filter_logits = jax.jit(sampling.filter_logits, static_argnames=('top_k', 'use_top_p'))
sample = jax.jit(sampling.sample, static_argnames=('top_k', 'use_top_p'))


def hf_allowed(logits, top_k, top_p):
  """The tokens transformers' TopKLogitsWarper then TopPLogitsWarper keep."""
  scores = torch.tensor(logits)[None]
  if top_k > 0:
    scores = logits_process.TopKLogitsWarper(top_k)(None, scores)
  if top_p < 1:
    scores = logits_process.TopPLogitsWarper(top_p)(None, scores)
  return torch.isfinite(scores)[0].numpy()


def far_from_nucleus_edge(logits, top_k, top_p, margin=1e-4):
  """True unless a token's cumulative probability is within rounding distance of top_p."""
  values = np.sort(logits.astype(np.float64))[::-1][:top_k or None]
  probs = np.exp(values - values.max())
  probs /= probs.sum()
  mass_before = np.cumsum(probs) - probs
  return top_p >= 1 or bool(np.all(np.abs(mass_before - top_p) > margin))


@SETTINGS
@given(distributions())
def test_filter_keeps_exactly_what_transformers_keeps(case):
  logits, top_k, top_p = case
  assume(far_from_nucleus_edge(logits, top_k, top_p))
  kept = np.isfinite(filter_logits(logits[None], top_k=top_k, top_p=top_p,
                                            use_top_p=top_p < 1))[0]
  np.testing.assert_array_equal(kept, hf_allowed(logits, top_k, top_p))


@SETTINGS
@given(distributions(), st.floats(0.25, 3.0), st.integers(0, 2**31 - 1))
def test_samples_never_leave_the_allowed_set(case, temperature, seed):
  logits, top_k, top_p = case
  scaled = (logits / np.float32(temperature)).astype(np.float32)
  assume(far_from_nucleus_edge(scaled, top_k, top_p))
  rows = 64
  keys = jax.random.split(jax.random.key(seed), rows)
  tokens = np.asarray(sample(np.broadcast_to(logits, (rows, logits.size)), keys,
                                      temperature=temperature, top_k=top_k, top_p=top_p,
                                      use_top_p=top_p < 1))
  allowed = np.flatnonzero(hf_allowed(scaled, top_k, top_p))
  assert set(tokens.tolist()) <= set(allowed.tolist())


def test_sample_frequencies_follow_the_tempered_distribution():
  logits = np.log(np.array([0.5, 0.25, 0.15, 0.1], np.float32))
  draws = 20000
  keys = jax.random.split(jax.random.key(0), draws)
  tokens = np.asarray(sampling.sample(np.broadcast_to(logits, (draws, 4)), keys,
                                      temperature=0.5, top_k=3, use_top_p=False))
  expected = np.array([0.5, 0.25, 0.15]) ** 2
  expected /= expected.sum()
  frequencies = np.bincount(tokens, minlength=4) / draws
  np.testing.assert_allclose(frequencies, np.append(expected, 0.0), atol=0.015)


def test_repetition_penalty_matches_transformers():
  rng = np.random.RandomState(0)
  logits = rng.standard_normal((3, 20)).astype(np.float32)
  history = rng.randint(0, 20, (3, 7))
  seen = np.zeros((3, 20), bool)
  seen[np.arange(3)[:, None], history] = True
  ours = sampling.apply_repetition_penalty(logits, seen, 1.7)
  theirs = logits_process.RepetitionPenaltyLogitsProcessor(1.7)(
      torch.tensor(history), torch.tensor(logits)).numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-6)


CONFIG = model_lib.ModelConfig(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=64)


@pytest.fixture(scope='module')
def params():
  rng = np.random.RandomState(0)
  return jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32),
                      model_lib.unbox(model_lib.abstract_params(CONFIG)))


def test_seeded_sampling_is_the_same_on_any_mesh(params):
  prompts = [np.random.RandomState(i).randint(0, 256, n).tolist()
             for i, n in enumerate((3, 9, 5, 1))]
  kwargs = dict(max_new_tokens=10, temperature=0.8, top_k=40, top_p=0.9, seed=11)
  one_device = sharding.create_mesh((1, 1, 1), devices=jax.devices()[:1])
  single = decode.generate(CONFIG, params, prompts, mesh=one_device, **kwargs)
  # The (2, 2, 2) mesh splits the batch over data x fsdp and the KV heads over tensor; it
  # also streams, so the random stream must continue across chunk boundaries, and keeps the
  # layers scanned (the accelerator default) where the single device unrolls them.
  mesh = sharding.create_mesh((2, 2, 2))
  chunks = list(decode.stream(CONFIG, params, prompts, mesh=mesh, chunk_size=3,
                              unroll_layers=False, **kwargs))
  sharded = [sum((chunk[i] for chunk in chunks), []) for i in range(len(prompts))]
  assert sharded == single
  assert single != decode.generate(CONFIG, params, prompts, mesh=one_device,
                                   **dict(kwargs, seed=12))


def test_cache_is_laid_out_by_the_logical_rules(params):
  mesh = sharding.create_mesh((2, 2, 2))
  options = sampling.GenerationOptions(max_new_tokens=10, temperature=0.8, top_k=40, top_p=0.9)
  # pylint: disable=protected-access
  job = decode._plan(CONFIG, [[1, 2, 3]] * 4, options, (), None, mesh, None)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  with sharding.activate(mesh, job.layout.rules):
    start, _ = decode._sampling_programs(CONFIG, job.spec, job.layout, job.bucket)
    state_shape = start.eval_shape(abstract, *job.inputs)
  expected = PartitionSpec(None, ('data', 'fsdp'), None, 'tensor', None)
  assert state_shape.cache['k'].sharding.spec == expected
  assert state_shape.cache['v'].sharding.spec == expected
