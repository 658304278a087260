"""The continuous-batching engine against one-by-one `llm_jax.generate` and the plain model.

A random tiny model; 16 slots serve 32 requests, so requests join and leave while others are
decoding, and the decode step runs over 8 slots when the live requests fit there, over 16
otherwise. Prompts of at most 16 tokens are prefilled packed together; 16-token chunks split
the longer ones.
"""

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llm_jax
from llm_jax import sharding
from llm_jax.inference import decode
from llm_jax.inference import engine as engine_lib
from llm_jax.inference import slots
from llm_jax.inference.engine import Engine, SamplingParams

CONFIG = llm_jax.ModelConfig(vocab_size=128, embed_dim=32, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=128)


@pytest.fixture(scope='module')
def params():
  init = llm_jax.Transformer(CONFIG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  # Larger weights than the default init give sharp logits: greedy choices then sit far from
  # ties that a different summation order could flip.
  return jax.tree.map(lambda x: x * 3.0, llm_jax.unbox(init['params']))


@pytest.fixture(scope='module')
def engine(params):
  engine = Engine(CONFIG, params, num_slots=16, chunk_size=16, max_queue=64).start()
  yield engine
  engine.shutdown()


def _mixed_requests(count: int, seed: int = 0):
  """Prompts of 9..64 tokens and 1..16 new tokens (few `generate` buckets: few compiles)."""
  rng = np.random.default_rng(seed)
  lengths = rng.choice([9, 12, 16, 33, 45, 60, 64], size=count)
  prompts = [rng.integers(1, CONFIG.vocab_size, size=int(n)).tolist() for n in lengths]
  news = [int(n) for n in rng.choice([1, 5, 8, 11, 16], size=count)]
  return prompts, news


def test_concurrent_greedy_requests_match_one_by_one_generate(engine, params):
  prompts, news = _mixed_requests(32)
  got = engine.generate(prompts, [SamplingParams(max_tokens=m) for m in news])
  expected = [llm_jax.generate(CONFIG, params, [p], max_new_tokens=m)[0]
              for p, m in zip(prompts, news)]
  assert got == expected


def test_repetition_penalty_and_stop_ids_match_generate(engine, params):
  prompts, _ = _mixed_requests(4, seed=1)
  got = engine.generate(prompts, [SamplingParams(max_tokens=12, repetition_penalty=1.8)] * 4)
  expected = [llm_jax.generate(CONFIG, params, [p], max_new_tokens=12,
                               repetition_penalty=1.8)[0] for p in prompts]
  assert got == expected
  # A stop id ends the request at its first occurrence (the stop token is reported).
  stop = got[0][3]
  stopped = engine.generate(prompts[:1], [SamplingParams(max_tokens=12, stop_ids=(stop,),
                                                         repetition_penalty=1.8)])
  assert stopped[0] == got[0][:got[0].index(stop) + 1]


def test_sampled_requests_do_not_depend_on_their_neighbours(engine):
  """Each request's draws depend on its own seed only: alone or among 31 others, in any slot."""
  prompts, news = _mixed_requests(32, seed=2)
  params = [SamplingParams(max_tokens=m, temperature=1.0, top_k=20, top_p=0.9, seed=i)
            for i, m in enumerate(news)]
  together = engine.generate(prompts, params)
  alone = [engine.generate([prompts[i]], [params[i]])[0] for i in (0, 7, 31)]
  assert alone == [together[i] for i in (0, 7, 31)]
  assert [len(t) for t in together] == news
  # Different seeds give different continuations (a request never gets another's tokens).
  same_prompt = engine.generate([prompts[0]] * 4, [
      SamplingParams(max_tokens=16, temperature=1.5, seed=s) for s in (1, 2, 3, 1)])
  assert same_prompt[0] == same_prompt[3]
  assert len({tuple(t) for t in same_prompt}) == 3


def _model_logprobs(params, ids):
  """log-softmax of the plain model's logits over a whole sequence [T, V] (no cache)."""
  logits = llm_jax.Transformer(CONFIG).apply({'params': params}, jnp.asarray([ids]))[0]
  return np.asarray(jax.nn.log_softmax(logits, axis=-1))


def test_top_k_top_p_and_logprobs(engine, params):
  prompt = list(range(5, 25))
  # top_k=3 at a high temperature: every token is among the model's 3 best at its step.
  sampled = engine.generate([prompt] * 8, [
      SamplingParams(max_tokens=6, temperature=5.0, top_k=3, seed=s) for s in range(8)])
  for tokens in sampled:
    reference = _model_logprobs(params, prompt + tokens)
    for step, token in enumerate(tokens):
      assert token in np.argsort(-reference[len(prompt) - 1 + step])[:3]
  # A tiny nucleus keeps only the best token: sampling becomes greedy.
  greedy = engine.generate([prompt], [SamplingParams(max_tokens=8)])[0]
  nucleus = engine.generate([prompt], [SamplingParams(max_tokens=8, temperature=1.0,
                                                      top_p=1e-6, seed=3)])[0]
  assert nucleus == greedy
  # Log-probabilities of the chosen tokens and their top alternatives, against the model.
  outputs, finished = [], threading.Event()

  def on_output(output):
    outputs.append(output)
    if output.finish_reason is not None:
      finished.set()

  engine.submit(prompt, SamplingParams(max_tokens=8, logprobs=3), on_output)
  finished.wait()
  tokens = [t for o in outputs for t in o.token_ids]
  reference = _model_logprobs(params, prompt + tokens)
  for step, output in enumerate(outputs):
    row = reference[len(prompt) - 1 + step]
    np.testing.assert_allclose(output.logprobs[0], row[tokens[step]], atol=1e-4)
    top_ids = [i for i, _ in output.top_logprobs[0]]
    assert top_ids == np.argsort(-row)[:3].tolist()


def test_prompt_longer_than_the_context_is_refused(engine):
  with pytest.raises(ValueError, match='context length 128'):
    engine.submit(list(range(1, 120)), SamplingParams(max_tokens=16), lambda _: None)


def _temp_bytes(program, *args) -> int:
  return program.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_prefill_memory_grows_linearly_with_the_prompt():
  """Compiled scratch memory of prefilling a T-token prompt (16-token chunks into a T-slot
  cache) grows linearly in T up to 4,096 and stays far below [T, T] float32 scores."""
  layout = decode._make_layout(None, None)  # pylint: disable=protected-access
  config = CONFIG.replace(max_seq_len=4096, scan_layers=False)
  abstract_params = decode._strip_boxes(  # pylint: disable=protected-access
      llm_jax.model.abstract_params(config))
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  knobs = {name: jax.ShapeDtypeStruct((1,), dtype) for name, dtype in slots.KNOBS}
  temps = {}
  with sharding.activate(layout.mesh, layout.rules):
    program = jax.jit(functools.partial(slots.prefill_chunk, config, layout), donate_argnums=1)
    for length in (512, 1024, 2048, 4096):
      cache = jax.ShapeDtypeStruct((2, 1, length, 2, 8), jnp.float32)
      state = {'cache': {'k': cache, 'v': cache},
               'seen': jax.ShapeDtypeStruct((1, config.vocab_size), bool)}
      temps[length] = _temp_bytes(program, abstract_params, state, scalar,
                                  jax.ShapeDtypeStruct((16,), jnp.int32), scalar, scalar,
                                  knobs, scalar)
    # The whole prompt at once through the cache path: [T, T] scores, for contrast.
    whole = jax.jit(functools.partial(decode.prefill, config))
    quadratic = {}
    for length in (512, 1024):
      cache = jax.ShapeDtypeStruct((2, 1, length, 2, 8), jnp.float32)
      quadratic[length] = _temp_bytes(whole, abstract_params,
                                      jax.ShapeDtypeStruct((1, length), jnp.int32),
                                      jax.ShapeDtypeStruct((1,), jnp.int32),
                                      {'k': cache, 'v': cache})
  steps = [temps[2 * n] - temps[n] for n in (512, 1024, 2048)]
  # Linear: doubling T adds twice what the previous doubling added (within 10%).
  np.testing.assert_allclose(steps[1], 2 * steps[0], rtol=0.1)
  np.testing.assert_allclose(steps[2], 2 * steps[1], rtol=0.1)
  assert temps[4096] < 4096 * 4096 * 4 * CONFIG.num_heads / 16
  # The measurement does see quadratic growth where there is some.
  assert quadratic[1024] > 3 * quadratic[512]


def test_aot_reports_the_prefill_step_for_a_tpu_topology():
  pytest.importorskip('libtpu', reason="needs libtpu: pip install '.[tpu]'")
  from configs import default  # pylint: disable=import-outside-toplevel
  from llm_jax.tools import aot  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.mesh.shape = (2, 1, 2)  # slots over data, KV heads over tensor
  devices = aot.topology_devices('v5e:2x2')
  with jax.default_matmul_precision('default'):
    (report,) = aot.compile_steps(config, devices, decode_batch_size=4, decode_cache_len=256,
                                  steps=('prefill',), prefill_chunk=128)
  assert report.name.startswith('prefill+insert step (128 tokens into 1 of 4 slots')
  assert report.fits and report.temporaries > 0 and report.flops > 0


def test_bfloat16_cache_matches_generate_with_a_bfloat16_cache(params):
  """The engine's bfloat16 cache writes (through 16-bit patterns on CPU) hold what
  `generate`'s bfloat16 cache holds: the same greedy tokens."""
  prompts, news = _mixed_requests(6, seed=3)
  engine = Engine(CONFIG, params, num_slots=8, chunk_size=16, cache_dtype='bfloat16').start()
  try:
    got = engine.generate(prompts, [SamplingParams(max_tokens=m) for m in news])
  finally:
    engine.shutdown()
  expected = [llm_jax.generate(CONFIG, params, [p], max_new_tokens=m, cache_dtype='bfloat16')[0]
              for p, m in zip(prompts, news)]
  assert got == expected


def test_several_prompts_packed_in_a_row_and_a_host_that_waits_match_generate(params):
  """64-token packed rows hold several whole prompts (each attending to itself only, through
  the blockwise kernel on CPU), and the host waits for each step before handing out its
  tokens (overlap_host=False): the same greedy tokens as one-by-one `generate`."""
  prompts, news = _mixed_requests(10, seed=4)
  engine = Engine(CONFIG, params, num_slots=8, chunk_size=64, overlap_host=False).start()
  try:
    got = engine.generate(prompts, [SamplingParams(max_tokens=m) for m in news])
  finally:
    engine.shutdown()
  expected = [llm_jax.generate(CONFIG, params, [p], max_new_tokens=m)[0]
              for p, m in zip(prompts, news)]
  assert got == expected


def test_static_sizes_are_powers_of_two_then_halfway_sizes():
  ladder = engine_lib._size_ladder  # pylint: disable=protected-access
  assert ladder(64, 1024, fine_from=128) == [64, 128, 192, 256, 384, 512, 768, 1024]
  assert ladder(16, 256, fine_from=64) == [16, 32, 64, 96, 128, 192, 256]
  # The top is always the limit itself, also when it is not on the ladder.
  assert ladder(64, 300, fine_from=128) == [64, 128, 192, 256, 300]
  assert ladder(64, 40, fine_from=128) == [40]
