"""Beam search with Hugging Face `transformers` semantics, as one compiled `lax.while_loop`.

It follows transformers' vectorised beam search step for step, so `num_beams`,
`length_penalty` and `early_stopping` (True, False or 'never') give the same sequences:
  * every step keeps the best `max(2, 1 + #stop ids) * W` continuations of all W beams
    (W = num_beams), so W unfinished beams survive even if the best ones all stop;
  * a continuation that emits a stop token, or reaches `max_new_tokens`, is a finished
    hypothesis scored `sum of log-probs / generated_length ** length_penalty`, kept only if it is
    among the W best continuations of the step and the W best hypotheses so far;
  * an item stops collecting hypotheses once its best running beam cannot beat its worst
    finished one (the heuristic chosen by `early_stopping`); the loop ends when no item can
    improve, or, with early_stopping=True, when every item has W hypotheses.
The module knows nothing of the model: it receives a `forward` function that feeds one token per
beam at the given positions and returns the next logits and the updated cache.
"""

from typing import Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp

from llm_jax.inference import sampling

_NEG = -1.0e9  # "impossible" score, as in transformers (not -inf: it must survive arithmetic)

Forward = Callable[[jax.Array, jax.Array, dict], tuple[jax.Array, dict]]


@flax.struct.dataclass
class BeamState:
  """Carried through the loop. B items, W beams each, M = room for new tokens."""
  step: jax.Array  # [] tokens generated so far
  cache: dict  # {'k', 'v'} [L, B * W, S, K, H], rows in beam order
  running_seqs: jax.Array  # [B, W, M] new tokens of the live beams
  running_scores: jax.Array  # [B, W] their summed log-probs, best first
  finished_seqs: jax.Array  # [B, W, M] best finished hypotheses
  finished_scores: jax.Array  # [B, W] their length-penalised scores, best first
  finished_lens: jax.Array  # [B, W] their number of new tokens (stop token included)
  is_finished: jax.Array  # [B, W] whether each finished slot holds a hypothesis
  improvable: jax.Array  # [B] whether the item may still gain a better hypothesis
  all_stopped: jax.Array  # [B] every kept continuation of the item's last step stopped
  seen: Optional[jax.Array]  # [B * W, V] tokens in each beam (repetition penalty only)


def _gather(x, indices):
  """x [B, C, ...] -> x[b, indices[b, j], ...] for indices [B, J]."""
  indices = indices.reshape(indices.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, indices, axis=1)


def init_state(cache: dict, batch: int, num_beams: int, max_len: int,
               seen: Optional[jax.Array]) -> BeamState:
  """State before the first step; `cache` and `seen` already hold B * W rows."""
  seqs = jnp.zeros((batch, num_beams, max_len), jnp.int32)
  # Only beam 0 is live at first, so the W copies of the prompt do not pick the same tokens.
  running_scores = jnp.full((batch, num_beams), _NEG, jnp.float32).at[:, 0].set(0.0)
  return BeamState(
      step=jnp.zeros((), jnp.int32), cache=cache, running_seqs=seqs,
      running_scores=running_scores, finished_seqs=seqs,
      finished_scores=jnp.full((batch, num_beams), _NEG, jnp.float32),
      finished_lens=jnp.zeros((batch, num_beams), jnp.int32),
      is_finished=jnp.zeros((batch, num_beams), bool), improvable=jnp.ones((batch,), bool),
      all_stopped=jnp.zeros((batch,), bool), seen=seen)


def _update_finished(state: BeamState, topk_seqs, topk_scores, stopped, *, num_beams,
                     length_penalty, early_stopping):
  """Merges this step's finished continuations into the W best hypotheses."""
  keep = topk_scores.shape[1]
  # Only the W best continuations may finish; the others exist to keep W beams alive.
  just_finished = stopped & (jnp.arange(keep) < num_beams)[None, :]
  scores = topk_scores / (state.step + 1).astype(jnp.float32) ** length_penalty
  all_full = jnp.all(state.is_finished, axis=-1, keepdims=True)
  scores += (all_full & (early_stopping == 1)) * _NEG
  scores += (~state.improvable)[:, None] * _NEG
  scores += (~just_finished) * _NEG
  merged_scores = jnp.concatenate([state.finished_scores, scores], axis=1)
  merged_seqs = jnp.concatenate([state.finished_seqs, topk_seqs], axis=1)
  merged_lens = jnp.concatenate(
      [state.finished_lens, jnp.broadcast_to(state.step + 1, scores.shape)], axis=1)
  merged_finished = jnp.concatenate([state.is_finished, just_finished], axis=1)
  best = jax.lax.top_k(merged_scores, num_beams)[1]
  return state.replace(finished_seqs=_gather(merged_seqs, best),
                       finished_scores=_gather(merged_scores, best),
                       finished_lens=_gather(merged_lens, best),
                       is_finished=_gather(merged_finished, best))


def _still_improvable(state: BeamState, max_new, *, length_penalty, early_stopping):
  """transformers' early-stop heuristic, evaluated after `step` was advanced."""
  best_len = jnp.where((early_stopping == 2) & (length_penalty > 0.0), max_new, state.step)
  best_running = state.running_scores[:, :1] / best_len.astype(jnp.float32) ** length_penalty
  worst_finished = jnp.where(state.is_finished,
                             jnp.min(state.finished_scores, axis=1, keepdims=True), _NEG)
  return state.improvable & jnp.any(best_running > worst_finished, axis=-1)


def beam_step(state: BeamState, logits: jax.Array, *, num_beams: int, stop_ids: jax.Array,
              max_new: jax.Array, length_penalty: jax.Array,
              early_stopping: jax.Array, num_tokens: jax.Array,
              repetition_penalty=None) -> tuple[BeamState, jax.Array, jax.Array]:
  """Extends every beam by one token given its next-token logits [B * W, V].

  Returns the new state and, per beam row [B * W], the index of the row it continues (the
  caller reorders its cache with it) and the token it appended.
  """
  batch = state.running_scores.shape[0]
  vocab = logits.shape[-1]
  logits = sampling.limit_vocabulary(logits.astype(jnp.float32), num_tokens)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  if repetition_penalty is not None:
    log_probs = sampling.apply_repetition_penalty(log_probs, state.seen, repetition_penalty)
  log_probs = log_probs.reshape(batch, num_beams, vocab) + state.running_scores[:, :, None]
  keep = max(2, 1 + stop_ids.shape[0]) * num_beams
  topk_scores, topk_index = jax.lax.top_k(log_probs.reshape(batch, num_beams * vocab), keep)
  parent, tokens = topk_index // vocab, (topk_index % vocab).astype(jnp.int32)
  topk_seqs = _gather(state.running_seqs, parent)
  max_len = topk_seqs.shape[-1]
  topk_seqs = jnp.where(jnp.arange(max_len) == state.step, tokens[..., None], topk_seqs)
  stopped = jnp.any(tokens[..., None] == stop_ids, axis=-1) | (state.step + 1 >= max_new)

  live_scores = topk_scores + stopped * _NEG
  live = jax.lax.top_k(live_scores, num_beams)[1]
  new = _update_finished(state, topk_seqs, topk_scores, stopped, num_beams=num_beams,
                         length_penalty=length_penalty, early_stopping=early_stopping)
  new = new.replace(running_seqs=_gather(topk_seqs, live),
                    running_scores=_gather(live_scores, live),
                    step=state.step + 1, all_stopped=jnp.all(stopped, axis=-1))
  new = new.replace(improvable=_still_improvable(new, max_new, length_penalty=length_penalty,
                                                 early_stopping=early_stopping))
  source_rows = (jnp.arange(batch)[:, None] * num_beams + _gather(parent, live)).reshape(-1)
  return new, source_rows, _gather(tokens, live).reshape(-1)


def keep_going(state: BeamState, valid: jax.Array, early_stopping: jax.Array):
  """transformers' loop condition; rows that are batch padding (valid False) never count."""
  improvable = jnp.any(state.improvable & valid)
  all_full = jnp.all(state.is_finished | ~valid[:, None])
  all_stopped = jnp.all(state.all_stopped | ~valid)
  return improvable & ~(all_full & (early_stopping == 1)) & ~all_stopped


def search(forward: Forward, first_logits: jax.Array, cache: dict, prompt_lengths: jax.Array,
           valid: jax.Array, *, num_beams: int, max_len: int, max_new: jax.Array,
           stop_ids: jax.Array, length_penalty: jax.Array, early_stopping: jax.Array,
           num_tokens: jax.Array,
           seen: Optional[jax.Array] = None, repetition_penalty=None,
           constrain: Callable[[dict], dict] = lambda c: c):
  """Runs beam search after the prompts were prefilled.

  Args:
    forward: (tokens [R], positions [R], cache) -> (logits [R, V], cache) for R = B * W rows.
    first_logits: [B, V] next-token logits at the end of each prompt.
    cache: the prefilled cache with B rows; it is repeated to B * W rows here.
    prompt_lengths: [B] prompt lengths (the position of the first new token).
    valid: [B] False for batch-padding rows, which are ignored by the stopping rule.
    num_beams: W.
    max_len: M, the static room for new tokens (>= max_new).
    max_new: [] the number of new tokens wanted.
    stop_ids: [E] tokens that end a hypothesis.
    length_penalty: [] exponent of the generated length in the final score.
    num_tokens: [] only ids below it are considered.
    early_stopping: [] int32 code (`sampling.early_stopping_code`) of True, False, 'never'.
    seen: [B, V] tokens in each prompt (repetition penalty only).
    repetition_penalty: [] HF repetition penalty, or None for none.
    constrain: applied to the cache after each reordering (sharding constraints).

  Returns:
    (tokens [B, M], lengths [B], scores [B]) of the best finished hypothesis of each item.
  """
  batch = first_logits.shape[0]
  expand = lambda x: jnp.repeat(x, num_beams, axis=0)
  cache = constrain(jax.tree.map(lambda c: jnp.repeat(c, num_beams, axis=1), cache))
  state = init_state(cache, batch, num_beams, max_len, None if seen is None else expand(seen))
  positions = expand(prompt_lengths)
  step_kwargs = dict(num_beams=num_beams, stop_ids=stop_ids, max_new=max_new,
                     length_penalty=length_penalty, early_stopping=early_stopping,
                     num_tokens=num_tokens, repetition_penalty=repetition_penalty)

  def advance(state, logits):
    state, rows, tokens = beam_step(state, logits, **step_kwargs)
    seen = state.seen
    if seen is not None:
      seen = seen[rows].at[jnp.arange(rows.shape[0]), tokens].set(True)
    cache = constrain(jax.tree.map(lambda c: jnp.take(c, rows, axis=1), state.cache))
    return state.replace(cache=cache, seen=seen), tokens

  def body(carry):
    state, tokens = carry
    logits, cache = forward(tokens, positions + state.step - 1, state.cache)
    return advance(state.replace(cache=cache), logits)

  carry = advance(state, expand(first_logits))
  state, _ = jax.lax.while_loop(lambda c: keep_going(c[0], valid, early_stopping), body, carry)
  return state.finished_seqs[:, 0], state.finished_lens[:, 0], state.finished_scores[:, 0]
