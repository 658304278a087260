"""Compiled programs of the continuous-batching engine, over a KV cache of B decode slots.

The engine's device state is the cache {'k', 'v'} [L, B, S, K, H] (laid out by the logical
rules 'cache_batch', 'cache_seq', 'cache_kv_heads', 'cache_head_dim', like `decode.generate`'s)
and `seen` [B, V], the tokens of each slot's sequence (for the repetition penalty). Three
programs work on it:

* `prefill_chunk` writes C prompt tokens of one request into its slot's cache row at their
  positions (a long prompt is C tokens at a time, C a small static size), and draws the first
  new token from the logits after the prompt. Each chunk attends to its slot's cache: float32
  scores [C, S] per head, so a prompt's scratch memory grows linearly with its length and never
  holds [T, T] scores. The slot's row is sliced out, updated and written back, and the state
  is donated, so the cache is updated in place.
* `decode_slots` feeds every slot its newest token and draws the next one, each slot with its
  own temperature, top-k, top-p, repetition penalty and seed. It runs the model layer by layer
  on a window of the cache (the first W positions, W static) and writes each new key/value
  into the donated cache in place, so its cost follows W rather than S. A free slot's token
  sits at position S, outside the cache, so its (discarded) key/value write is dropped and
  never lands in a row that is being prefilled.
* `score_tokens` returns the log-probability of every token of a sequence given the ones
  before it (OpenAI's `echo` with `logprobs`), through the model's memory-efficient attention
  kernel (`efficient_kernel`).

Log-probabilities are those of the model's distribution (log-softmax of the raw logits over
the whole embedding table), before the sampling processors and the vocabulary limit, as
OpenAI's API and transformers report them.
"""

import functools

import jax
import jax.numpy as jnp

from llm_jax import model as model_lib
from llm_jax.inference import decode
from llm_jax.inference import sampling
from llm_jax.model.layers.embed import Embedder
from llm_jax.model.layers.norms import RMSNorm

TOP_LOGPROBS = 5  # alternatives returned per token (OpenAI completions allow at most 5)
# Per-slot sampling parameters, each [B]: (name, dtype).
KNOBS = (('temperature', jnp.float32), ('top_k', jnp.int32), ('top_p', jnp.float32),
         ('repetition_penalty', jnp.float32), ('seed', jnp.int32))


def efficient_kernel(config: model_lib.ModelConfig, platform: str) -> str:
  """The fused attention kernel for cache-less passes on `platform`.

  blockwise on CPU, cuDNN on GPU (bfloat16/float16 only), splash on TPU; a kernel the config
  already names other than the einsum reference is kept.
  """
  if config.attention_kernel != 'xla':
    return config.attention_kernel
  if platform == 'tpu':
    return 'splash'
  if platform == 'gpu' and config.dtype in ('bfloat16', 'float16'):
    return 'cudnn'
  return 'blockwise'


def _top_p_cutoff(sorted_logits: jax.Array, top_p: jax.Array) -> jax.Array:
  """Smallest kept logit [B] of nucleus filtering, descending logits [B, V], top_p [B]."""
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  num_kept = jnp.maximum(jnp.sum(mass_before < top_p[:, None], axis=-1), 1)
  return jnp.take_along_axis(sorted_logits, (num_kept - 1)[:, None], axis=-1)[:, 0]


def _draw(logits: jax.Array, knobs: dict, counts: jax.Array) -> jax.Array:
  """Samples one token per row with that row's temperature, top-k, top-p and seed.

  The same processors as `sampling.filter_logits`, with per-row values: top-k keeps the k best
  (ties included), top-p the nucleus of what top-k kept. A row's draw depends only on its
  seed and on how many tokens it has drawn (`counts`), never on its slot or neighbours.
  """
  vocab = logits.shape[-1]
  scaled = logits / jnp.maximum(knobs['temperature'], 1e-6)[:, None]
  sorted_logits = -jnp.sort(-scaled, axis=-1)
  top_k = knobs['top_k']
  kth = jnp.take_along_axis(sorted_logits, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], -1)[:, 0]
  cutoff = jnp.where(top_k > 0, kth, -jnp.inf)
  nucleus = jnp.where(sorted_logits >= cutoff[:, None], sorted_logits, -jnp.inf)
  cutoff = jnp.where(knobs['top_p'] < 1, jnp.maximum(cutoff, _top_p_cutoff(nucleus,
                                                                            knobs['top_p'])),
                     cutoff)
  filtered = jnp.where(scaled >= cutoff[:, None], scaled, -jnp.inf)
  keys = jax.vmap(lambda seed, count: jax.random.fold_in(jax.random.key(seed), count))(
      knobs['seed'], counts)
  return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


def select_rows(logits: jax.Array, seen: jax.Array, knobs: dict, counts: jax.Array,
                num_tokens) -> tuple:
  """Picks each row's next token with its own sampling parameters.

  Args:
    logits: [B, V] float32 next-token logits.
    seen: [B, V] bool tokens already in each sequence.
    knobs: per-row parameters, see KNOBS; temperature 0 means greedy.
    counts: [B] tokens each row has drawn so far (folded into its seed).
    num_tokens: ids from this one on are never chosen (a padded vocabulary).

  Returns:
    (tokens [B], their log-probabilities [B], top ids [B, TOP_LOGPROBS], top
    log-probabilities [B, TOP_LOGPROBS]).
  """
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  logits = sampling.limit_vocabulary(logits, num_tokens)
  logits = sampling.apply_repetition_penalty(logits, seen,
                                             knobs['repetition_penalty'][:, None])
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  # The sort behind top-k/top-p costs more than the model step of a small model: skip it
  # when every row decodes greedily.
  drawn = jax.lax.cond(jnp.any(knobs['temperature'] > 0),
                       lambda: _draw(logits, knobs, counts), lambda: greedy)
  tokens = jnp.where(knobs['temperature'] > 0, drawn, greedy)
  token_logprobs = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
  top_logprobs, top_ids = jax.lax.top_k(logprobs, min(TOP_LOGPROBS, logits.shape[-1]))
  return tokens, token_logprobs, top_ids.astype(jnp.int32), top_logprobs


def _mark_seen(seen: jax.Array, slot, ids: jax.Array, valid: jax.Array) -> jax.Array:
  """Marks ids [C] (where valid) as seen in row `slot` of seen [B, V]."""
  ids = jnp.where(valid, ids, seen.shape[1])  # out of range: dropped by the scatter
  return seen.at[slot, ids].set(True, mode='drop')


def prefill_chunk(config: model_lib.ModelConfig, layout, params, state: dict, slot, tokens,
                  start, length, knobs: dict, num_tokens) -> tuple:
  """Writes prompt tokens [C] at positions start.. into slot `slot`; draws the first token.

  Args:
    config: the run config (layers possibly unrolled).
    layout: the engine's mesh and rules (`decode._Layout`).
    params: placed parameters.
    state: {'cache': {'k', 'v'} [L, B, S, K, H], 'seen': [B, V]} (donated).
    slot: [] the slot index.
    tokens: [C] this chunk of the prompt (padded past the prompt's end).
    start: [] position of tokens[0]; 0 starts a new sequence in the slot.
    length: [] the whole prompt's length.
    knobs: the request's parameters, each [1] (see KNOBS).
    num_tokens: [] ids from this one on are never chosen.

  Returns:
    (state, (token, logprob, top ids, top logprobs) of the first new token, each with a
    leading [1]). The draw is meaningful, and recorded in `seen`, only for the chunk holding
    the prompt's last token.
  """
  cache_row = jax.tree.map(lambda c: jax.lax.dynamic_slice_in_dim(c, slot, 1, axis=1),
                           state['cache'])
  last_index = jnp.clip(length - 1 - start, 0, tokens.shape[0] - 1)
  logits, cache_row = decode.prefill(config, params, tokens[None], (last_index + 1)[None],
                                     cache_row, offset=start)
  cache = jax.tree.map(lambda c, row: jax.lax.dynamic_update_slice_in_dim(c, row, slot, axis=1),
                       state['cache'], cache_row)
  seen = state['seen']
  seen = seen.at[slot].set(jnp.where(start == 0, False, seen[slot]))
  positions = start + jnp.arange(tokens.shape[0])
  seen = _mark_seen(seen, slot, tokens, positions < length)
  first = select_rows(logits, seen[slot][None], knobs, jnp.zeros((1,), jnp.int32), num_tokens)
  is_last = start + tokens.shape[0] >= length
  seen = _mark_seen(seen, slot, first[0], is_last[None])
  return {'cache': layout.constrain_cache(cache), 'seen': seen}, first


def _layer_params(config: model_lib.ModelConfig, params, i: int):
  if config.scan_layers:  # accelerators read the layer's slice of the stacked arrays in place
    return jax.tree.map(lambda p: p[i], params['layers'])
  return params[f'layers_{i}']


def _decode_layers(config: model_lib.ModelConfig, params, cache: dict, last, positions,
                   window: int) -> tuple:
  """The model on one token per slot, attending to the first `window` cache positions only.

  The model's own modules, called layer by layer on the cache in place: each layer gets the
  slice [B, window, K, H] of its keys/values (the attention's work and the copies XLA makes of
  its operands scale with the window, not with S), and the new key/value of each slot is
  written straight into the donated [L, B, S, K, H] cache, which is never sliced or stacked
  whole. Positions >= window (free slots, at S) write nothing.
  """
  dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
  x = Embedder(config.vocab_size, config.embed_dim, config.tie_embeddings, dtype,
               param_dtype).apply({'params': params['embedder']}, last[:, None],
                                  method='encode')  # [B, 1, D]
  rows = jnp.arange(last.shape[0])
  read = jnp.minimum(positions, window - 1)
  for i in range(config.num_layers):
    view = {name: c[i, :, :window] for name, c in cache.items()}
    x, view = model_lib.DecoderLayer(config).apply(
        {'params': _layer_params(config, params, i)}, x, positions[:, None], None, view)
    cache = {name: c.at[i, rows, positions].set(view[name][rows, read], mode='drop')
             for name, c in cache.items()}
  x = RMSNorm(config.norm_eps, dtype, param_dtype).apply({'params': params['final_norm']}, x)
  return decode._project(config, params, x)[:, 0], cache  # pylint: disable=protected-access


def decode_slots(config: model_lib.ModelConfig, layout, params, state: dict, previous, last,
                 fresh, positions, active, knobs: dict, counts, num_tokens, *,
                 window: int) -> tuple:
  """One step of every slot: feeds each slot its newest token; draws the next tokens.

  A slot's newest token is `previous` [B] (the tokens the previous step drew, still on the
  device: the host need not have read them) or, where `fresh` [B], `last` [B] (the first token
  of a request just prefilled). Tokens are fed at positions [B], all below `window` (static:
  one program per window size). Free slots (active False) are fed at position S, beyond the
  cache, so nothing is written.
  Returns (state, (tokens [B], logprobs [B], top ids [B, 5], top logprobs [B, 5])).
  """
  cache_len = state['cache']['k'].shape[2]
  positions = jnp.where(active, positions, cache_len)
  last = jnp.where(fresh, last, previous)
  logits, cache = _decode_layers(config, params, state['cache'], last, positions, window)
  drawn = select_rows(logits, state['seen'], knobs, counts, num_tokens)
  rows = jnp.arange(last.shape[0])
  seen = state['seen'].at[rows, drawn[0]].max(active)
  return {'cache': layout.constrain_cache(cache), 'seen': seen}, drawn


def score_tokens(config: model_lib.ModelConfig, params, tokens, num_tokens) -> tuple:
  """Log-probabilities of tokens [1, T] given their prefixes, through the config's kernel.

  Returns (logprob of tokens[t + 1] after tokens[:t + 1] [T - 1], top ids [T, 5], top
  logprobs [T, 5]), where row t of the tops is the distribution after tokens[:t + 1].
  """
  logits = model_lib.Transformer(config).apply({'params': params}, tokens)[0]  # [T, V]
  del num_tokens  # the model's own distribution, padded rows included, as transformers'
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  following = jnp.take_along_axis(logprobs[:-1], tokens[0, 1:, None], axis=-1)[:, 0]
  top_logprobs, top_ids = jax.lax.top_k(logprobs, min(TOP_LOGPROBS, logits.shape[-1]))
  return following, top_ids.astype(jnp.int32), top_logprobs


def compiled_programs(config: model_lib.ModelConfig, layout, state_shardings, windows):
  """(prefill_chunk, {window: decode_slots}) jitted for one run config and layout, state
  donated; one decode program per attention window.

  Not cached across engines: each engine compiles its own (the state shardings are dicts).
  """
  params = decode._param_shardings(config, layout)  # pylint: disable=protected-access
  replicated = layout.replicated
  prefill = jax.jit(functools.partial(prefill_chunk, config, layout),
                    in_shardings=(params, state_shardings) + (replicated,) * 6,
                    out_shardings=(state_shardings, replicated), donate_argnums=1)
  steps = {window: jax.jit(functools.partial(decode_slots, config, layout, window=window),
                           in_shardings=(params, state_shardings) + (replicated,) * 8,
                           out_shardings=(state_shardings, replicated), donate_argnums=1)
           for window in windows}
  return prefill, steps


@functools.lru_cache(maxsize=16)
def compiled_scorer(config: model_lib.ModelConfig, layout):
  """`score_tokens` jitted for one config (with its kernel) and layout."""
  params = decode._param_shardings(config, layout)  # pylint: disable=protected-access
  return jax.jit(functools.partial(score_tokens, config),
                 in_shardings=(params, layout.replicated, layout.replicated),
                 out_shardings=layout.replicated)
