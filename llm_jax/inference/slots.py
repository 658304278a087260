"""Compiled programs of the continuous-batching engine, over a KV cache of B decode slots.

The engine's device state is the cache {'k', 'v'} [L, B, S, K, H] (laid out by the logical
rules 'cache_batch', 'cache_seq', 'cache_kv_heads', 'cache_head_dim', like `decode.generate`'s)
and `seen` [B, V], the tokens of each slot's sequence (for the repetition penalty). Four
programs work on it:

* `prefill_packed` prefills whole prompts packed one after another into one row of N tokens
  (each token sees its own prompt only), writes their keys/values into their slots' cache rows
  and draws each prompt's first token: short prompts share a pass over the weights without
  padding each to a chunk size.
* `prefill_rows` writes chunks of C prompt tokens of P requests (P rows, each a slot and a
  chunk) into their slots' cache rows at their positions, and draws each request's first new
  token from the logits after its prompt. Layer by layer, it gathers the rows' first W cache
  positions (W static, at least the chunk's start), which the chunk reads without writing, so
  each chunk attends through float32 scores [C, W + C] per head: a long prompt's scratch
  memory grows linearly with its length and never holds [T, T] scores. Only the new
  keys/values are scattered into the donated cache, in place. `prefill_chunk` is its one-row
  form over the whole cache.
* `decode_slots` feeds every slot its newest token and draws the next one, each slot with its
  own temperature, top-k, top-p, repetition penalty and seed. It runs the model layer by layer
  on a window of the cache (the first W positions, W static), read where it lies, and writes
  each new key/value into the donated cache in place, so its cost follows W rather than S. A
  free slot's token sits at position S, outside the cache, so its (discarded) key/value write
  is dropped and never lands in a row that is being prefilled.
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
from llm_jax.model.layers import attention
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
                num_tokens, live: jax.Array) -> tuple:
  """Picks each row's next token with its own sampling parameters.

  Args:
    logits: [B, V] float32 next-token logits.
    seen: [B, V] bool tokens already in each sequence.
    knobs: per-row parameters, see KNOBS; temperature 0 means greedy.
    counts: [B] tokens each row has drawn so far (folded into its seed).
    num_tokens: ids from this one on are never chosen (a padded vocabulary).
    live: [B] bool rows whose tokens are used (the others' knobs pick no branch).

  Returns:
    (tokens [B], their log-probabilities [B], top ids [B, TOP_LOGPROBS], top
    log-probabilities [B, TOP_LOGPROBS]).
  """
  # Log-probabilities as logits minus their log-sum-exp, taken only where needed: a whole
  # [B, V] log-softmax would be one more pass over the logits.
  log_total = jax.nn.logsumexp(logits, axis=-1)
  # The barrier keeps the first id's slice below from reaching the sort that XLA first makes
  # of top_k: a sort with slices of two sizes stays a whole sort of every row (on CPU, many
  # times slower than XLA's top-k).
  top_logits, top_ids = jax.lax.optimization_barrier(
      jax.lax.top_k(logits, min(TOP_LOGPROBS, logits.shape[-1])))
  raw = logits

  def processed():
    limited = sampling.limit_vocabulary(raw, num_tokens)
    return sampling.apply_repetition_penalty(limited, seen,
                                             knobs['repetition_penalty'][:, None])

  def sampled():
    logits = processed()
    return jnp.where(knobs['temperature'] > 0, _draw(logits, knobs, counts),
                     _first_max(logits))

  # Only the branch taken runs. The best raw logit (top_k's first: the lowest id among equal
  # ones) is the greedy choice unless a repetition penalty or the vocabulary limit changes the
  # logits; only then are the [B, V] logits processed (each pass over them is a sizeable part
  # of a small model's step), and only a sampling row needs the sort behind top-k/top-p.
  best = top_ids[:, 0].astype(jnp.int32)
  unchanged = jnp.all(~live | ((knobs['repetition_penalty'] == 1) & (best < num_tokens)))
  branch = jnp.where(jnp.any(live & (knobs['temperature'] > 0)), 2, jnp.where(unchanged, 0, 1))
  tokens = jax.lax.switch(branch, [lambda best: best, lambda _: _first_max(processed()),
                                   lambda _: sampled()], best)
  token_logprobs = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0] - log_total
  return (tokens, token_logprobs, top_ids.astype(jnp.int32),
          top_logits - log_total[:, None])


def _first_max(logits: jax.Array) -> jax.Array:
  """argmax over the last axis (the first of equal maxima), in two plain reductions: XLA's
  CPU argmax, a reduction over (value, index) pairs, takes three times as long."""
  ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  is_max = logits == jnp.max(logits, axis=-1, keepdims=True)
  return jnp.min(jnp.where(is_max, ids, logits.shape[-1] - 1), axis=-1)


def _mark_seen(seen: jax.Array, slots, ids: jax.Array, valid: jax.Array) -> jax.Array:
  """Marks ids [P, C] (where valid) as seen in rows slots [P] of seen [B, V].

  Out-of-range ids and slots (unused prefill rows) are dropped by the scatter.
  """
  ids = jnp.where(valid, ids, seen.shape[1])
  return seen.at[slots[:, None], ids].set(True, mode='drop')


def _embed(config: model_lib.ModelConfig, params, tokens):
  dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
  return Embedder(config.vocab_size, config.embed_dim, config.tie_embeddings, dtype,
                  param_dtype).apply({'params': params['embedder']}, tokens, method='encode')


def _final_norm(config: model_lib.ModelConfig, params, x):
  dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
  return RMSNorm(config.norm_eps, dtype, param_dtype).apply({'params': params['final_norm']}, x)


def _layer(config: model_lib.ModelConfig, params, i: int, x, positions, segment_ids, prefix,
           prefix_len):
  """Layer i on new tokens that see a read-only cache prefix; returns (x, new keys/values)."""
  return model_lib.DecoderLayer(config).apply(
      {'params': _layer_params(config, params, i)}, x, positions, segment_ids, prefix,
      prefix_len)


def _after(x, targets, out_of_range: int):
  """`targets` [R, T], made to depend on the layer output x [R, T, D] (a row whose output is
  not a number writes nothing), so that a cache write at them follows the layer's reads of
  the cache. Without that data dependency XLA may order the write first and, to keep the old
  values for the reads, copy the whole cache every layer (an optimization barrier does not
  survive to the pass that decides)."""
  return jnp.where(x[..., 0] == x[..., 0], targets, out_of_range)


def _prefill_layers(config: model_lib.ModelConfig, params, cache: dict, slots, tokens,
                    positions, starts, written, window: int) -> tuple:
  """The model on chunks tokens [P, C] of the slots [P], after the first starts [P] positions
  of their cache; returns (final-norm activations [P, C, D], cache).

  Each layer gathers the rows' first `window` (>= starts) cached keys/values, which the chunk
  reads without writing, and scatters the chunk's new keys/values into the donated cache at
  positions where `written` [P, C] (never an unused row's or a padding token's).
  """
  x = _embed(config, params, tokens)
  cache_len = cache['k'].shape[2]
  targets = jnp.where(written, positions, cache_len)  # out of range: dropped
  for i in range(config.num_layers):
    prefix = {name: c[i].at[slots, :window].get(mode='fill', fill_value=0)
              for name, c in cache.items()}
    x, new = _layer(config, params, i, x, positions, None, prefix, starts)
    at = _after(x, targets, cache_len)
    cache = {name: attention.store(c, (i, slots[:, None], at), new[name])
             for name, c in cache.items()}
  return _final_norm(config, params, x), cache


def prefill_rows(config: model_lib.ModelConfig, layout, params, state: dict, slots, tokens,
                 starts, lengths, knobs: dict, num_tokens, *, window: int) -> tuple:
  """Writes chunks of several prompts into their slots' cache rows; draws first tokens.

  Row p writes tokens[p] at positions starts[p].. of slot slots[p]. A row whose slot is B (out
  of range) is unused: it reads zeros and writes nothing. A slot appears at most once. Every
  row's result depends only on its own inputs, never on the other rows.

  Args:
    config: the run config (layers possibly unrolled).
    layout: the engine's mesh and rules (`decode._Layout`).
    params: placed parameters.
    state: {'cache': {'k', 'v'} [L, B, S, K, H], 'seen': [B, V]} (donated).
    slots: [P] slot of each row.
    tokens: [P, C] each row's chunk of its prompt (padded past the prompt's end).
    starts: [P] position of tokens[:, 0]; 0 starts a new sequence in the slot.
    lengths: [P] each whole prompt's length.
    knobs: each row's request parameters, each [P] (see KNOBS).
    num_tokens: [] ids from this one on are never chosen.
    window: static; cache positions each row's chunk reads (at least max(starts)).

  Returns:
    (state, (token, logprob, top ids, top logprobs) of each row's first new token, each with
    a leading [P]). A row's draw is meaningful, and recorded in `seen`, only when its chunk
    holds the prompt's last token.
  """
  num_slots, chunk = state['cache']['k'].shape[1], tokens.shape[1]
  used = slots < num_slots
  positions = starts[:, None] + jnp.arange(chunk)[None, :]
  in_prompt = (positions < lengths[:, None]) & used[:, None]
  hidden, cache = _prefill_layers(config, params, state['cache'], slots, tokens, positions,
                                  starts, in_prompt, window)
  last_index = jnp.clip(lengths - 1 - starts, 0, chunk - 1)
  last = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)  # [P, 1, D]
  logits = decode._project(config, params, last)[:, 0]  # pylint: disable=protected-access
  seen = state['seen']
  fresh = seen.at[slots].get(mode='fill', fill_value=False) & (starts != 0)[:, None]
  seen = seen.at[slots].set(fresh, mode='drop')
  seen = _mark_seen(seen, slots, tokens, in_prompt)
  row_seen = seen.at[slots].get(mode='fill', fill_value=False)
  first = select_rows(logits, row_seen, knobs, jnp.zeros_like(starts), num_tokens, used)
  is_last = used & (starts + chunk >= lengths)
  seen = _mark_seen(seen, slots, first[0][:, None], is_last[:, None])
  return {'cache': layout.constrain_cache(cache), 'seen': seen}, first


def prefill_packed(config: model_lib.ModelConfig, layout, params, state: dict, tokens,
                   token_slots, positions, segments, piece_slots, piece_ends, knobs: dict,
                   num_tokens) -> tuple:
  """Prefills whole prompts packed one after another into one row of N tokens; draws first
  tokens.

  Short prompts are most of what a server sees, and each call reads all the weights: packed,
  several prompts share a call with no padding between them, where one row per prompt would
  pad each to the call's chunk size. A token sees the earlier tokens of its own prompt only
  (its segment), and nothing of the cache, which its prompt starts anew.

  Args:
    config, layout, params, state: as in `prefill_rows`.
    tokens, token_slots, positions, segments: [N] each token, the slot its prompt goes to
      (B for padding: nothing is written), its position in the prompt, and its prompt's index.
    piece_slots: [P] each prompt's slot (B for unused pieces).
    piece_ends: [P] index in the row of each prompt's last token.
    knobs: each prompt's request parameters, each [P].
    num_tokens: [] ids from this one on are never chosen.

  Returns:
    (state, (token, logprob, top ids, top logprobs) of each prompt's first new token, each
    with a leading [P]).
  """
  cache = state['cache']
  num_slots, cache_len = cache['k'].shape[1], cache['k'].shape[2]
  x = _embed(config, params, tokens[None])
  no_prefix = {name: jnp.zeros((1, 0) + c.shape[3:], c.dtype) for name, c in cache.items()}
  targets = jnp.where(token_slots < num_slots, positions, cache_len)[None]
  for i in range(config.num_layers):
    x, new = _layer(config, params, i, x, positions[None], segments[None], no_prefix,
                    jnp.zeros((1,), jnp.int32))
    at = _after(x, targets, cache_len)[0]
    cache = {name: attention.store(c, (i, token_slots, at), new[name][0])
             for name, c in cache.items()}
  last = _final_norm(config, params, x)[0, piece_ends]  # [P, D]
  logits = decode._project(config, params, last[:, None])[:, 0]  # pylint: disable=protected-access
  seen = state['seen'].at[piece_slots].set(False, mode='drop')  # every prompt starts anew
  seen = seen.at[token_slots, tokens].set(True, mode='drop')
  first = select_rows(logits, seen.at[piece_slots].get(mode='fill', fill_value=False), knobs,
                      jnp.zeros_like(piece_slots), num_tokens, piece_slots < num_slots)
  seen = _mark_seen(seen, piece_slots, first[0][:, None], (piece_slots < num_slots)[:, None])
  return {'cache': layout.constrain_cache(cache), 'seen': seen}, first


def prefill_chunk(config: model_lib.ModelConfig, layout, params, state: dict, slot, tokens,
                  start, length, knobs: dict, num_tokens) -> tuple:
  """`prefill_rows` for one row attending to the whole cache: tokens [C] at positions start..
  of slot `slot` ([] scalars start, length; knobs each [1]); results with a leading [1]."""
  return prefill_rows(config, layout, params, state, jnp.reshape(slot, (1,)), tokens[None],
                      jnp.reshape(start, (1,)), jnp.reshape(length, (1,)), knobs, num_tokens,
                      window=state['cache']['k'].shape[2])


def _layer_params(config: model_lib.ModelConfig, params, i: int):
  if config.scan_layers:  # accelerators read the layer's slice of the stacked arrays in place
    return jax.tree.map(lambda p: p[i], params['layers'])
  return params[f'layers_{i}']


def _decode_layers(config: model_lib.ModelConfig, params, cache: dict, last, positions,
                   window: int) -> tuple:
  """The model on one token for each of the first R slots (last, positions: [R]), attending
  to the first `window` cache positions only.

  Each layer reads the slice [B, window, K, H] of its keys/values without writing to it (the
  attention's work and the copies XLA makes of its operands scale with the window, not with
  S), and the new key/value of each slot is written straight into the donated
  [L, B, S, K, H] cache, which is never sliced or stacked whole. Positions >= window (free
  slots, at S) write nothing.
  """
  x = _embed(config, params, last[:, None])  # [B, 1, D]
  rows, cache_len = jnp.arange(last.shape[0]), cache['k'].shape[2]
  for i in range(config.num_layers):
    prefix = {name: c[i, :last.shape[0], :window] for name, c in cache.items()}
    x, new = _layer(config, params, i, x, positions[:, None], None, prefix, positions)
    at = _after(x, positions[:, None], cache_len)[:, 0]
    cache = {name: attention.store(c, (i, rows, at), new[name][:, 0])
             for name, c in cache.items()}
  x = _final_norm(config, params, x)
  return decode._project(config, params, x)[:, 0], cache  # pylint: disable=protected-access


def decode_slots(config: model_lib.ModelConfig, layout, params, state: dict, previous, last,
                 fresh, positions, active, knobs: dict, counts, num_tokens, *,
                 window: int, rows: int) -> tuple:
  """One step of the first `rows` slots (static; the others are free): feeds each its newest
  token and draws the next one. The engine fills the lowest free slots first, so a few
  requests cost a step over a few rows, not over all B.

  A slot's newest token is `previous` [B] (the tokens the previous step drew, still on the
  device: the host need not have read them) or, where `fresh` [B], `last` [B] (the first token
  of a request just prefilled). Tokens are fed at positions [B], all below `window` (static:
  one program per window size). Free slots (active False) are fed at position S, beyond the
  cache, so nothing is written.
  Returns (state, (tokens [B], logprobs [B], top ids [B, 5], top logprobs [B, 5])), zeros
  from slot `rows` on.
  """
  num_slots, cache_len = last.shape[0], state['cache']['k'].shape[2]
  positions = jnp.where(active, positions, cache_len)[:rows]
  last = jnp.where(fresh, last, previous)[:rows]
  logits, cache = _decode_layers(config, params, state['cache'], last, positions, window)
  drawn = select_rows(logits, state['seen'][:rows], {n: v[:rows] for n, v in knobs.items()},
                      counts[:rows], num_tokens, active[:rows])
  seen = state['seen'].at[jnp.arange(rows), drawn[0]].max(active[:rows])
  drawn = tuple(jnp.pad(x, [(0, num_slots - rows)] + [(0, 0)] * (x.ndim - 1)) for x in drawn)
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


def compiled_programs(config: model_lib.ModelConfig, layout, state_shardings, prefill_shapes,
                      decode_shapes):
  """({(chunk, window): one-row prefill_rows}, prefill_packed, {(window, rows):
  decode_slots}) jitted for one run config and layout, state donated: one program per static
  window and slot count (prefill_packed compiles once per row length it is called with).

  Not cached across engines: each engine compiles its own (the state shardings are dicts).
  """
  params = decode._param_shardings(config, layout)  # pylint: disable=protected-access
  replicated = layout.replicated

  def jit(function, num_args):
    return jax.jit(function, in_shardings=(params, state_shardings) + (replicated,) * num_args,
                   out_shardings=(state_shardings, replicated), donate_argnums=1)

  prefills = {(chunk, window): jit(
      functools.partial(prefill_rows, config, layout, window=window), 6)
              for chunk, window in prefill_shapes}
  # Packed prompts read no cache: on CPU their attention goes through the blockwise kernel,
  # which skips the blocks above the causal diagonal of a long row. (It masks by index within
  # the row, which is position order within each packed prompt.)
  if layout.mesh.devices.flat[0].platform == 'cpu':
    packed_config = config.replace(attention_kernel='blockwise')
  else:
    packed_config = config
  packed = jit(functools.partial(prefill_packed, packed_config, layout), 8)
  steps = {(window, rows): jit(functools.partial(decode_slots, config, layout, window=window,
                                                 rows=rows), 8)
           for window, rows in decode_shapes}
  return prefills, packed, steps


@functools.lru_cache(maxsize=16)
def compiled_scorer(config: model_lib.ModelConfig, layout):
  """`score_tokens` jitted for one config (with its kernel) and layout."""
  params = decode._param_shardings(config, layout)  # pylint: disable=protected-access
  return jax.jit(functools.partial(score_tokens, config),
                 in_shardings=(params, layout.replicated, layout.replicated),
                 out_shardings=layout.replicated)
