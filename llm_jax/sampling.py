"""Next-token selection from logits: repetition penalty, temperature, top-k, top-p, sampling.

The processors follow the Hugging Face `transformers` semantics and order (repetition penalty,
then temperature, then top-k, then top-p), so settings carry over and results are comparable.
Every function works on a batch of float32 logits [B, V] and is traceable under `jit`: the
integer `top_k` is static, the float knobs may be traced scalars (changing them does not
recompile).
"""

import dataclasses
from typing import Union

import jax
import jax.numpy as jnp

Scalar = Union[float, jax.Array]


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
  """The static shape of a sampling program; the float knobs travel separately as arrays.

  Attributes:
    greedy: argmax decoding (temperature 0); top-k/top-p/temperature are then irrelevant.
    top_k: keep the k highest logits (0 = off). Static because it sets an array size.
    top_p: whether nucleus filtering runs at all (its threshold is a traced knob).
    repetition_penalty: whether the penalty runs at all (its value is a traced knob).
  """
  greedy: bool = True
  top_k: int = 0
  top_p: bool = False
  repetition_penalty: bool = False


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: Scalar) -> jax.Array:
  """HF repetition penalty: seen tokens' positive logits are divided, negative ones multiplied.

  Args:
    logits: [B, V] float scores.
    seen: [B, V] bool, True for every token already in the sequence (prompt included).
    penalty: > 1 discourages repeats, < 1 encourages them.

  Returns:
    The penalised logits [B, V].
  """
  penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
  return jnp.where(seen, penalised, logits)


def _top_p_cutoff(sorted_logits: jax.Array, top_p: Scalar) -> jax.Array:
  """Smallest logit [B] kept by nucleus filtering of descending-sorted logits [B, C]."""
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  # A token stays while the mass of strictly better tokens is below top_p; the best always stays.
  num_kept = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1), 1)
  return jnp.take_along_axis(sorted_logits, (num_kept - 1)[:, None], axis=-1)[:, 0]


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: Scalar = 1.0,
                  use_top_p: bool = True) -> jax.Array:
  """Sets logits outside the top-k / top-p sets to -inf (ties at a cutoff are kept, as in HF).

  Args:
    logits: [B, V] float32, already divided by the temperature.
    top_k: keep the k best tokens; 0 disables top-k.
    top_p: keep the smallest set of best tokens whose probability reaches top_p; 1 disables it.
    use_top_p: False skips the nucleus sort entirely (static); top_p must then be 1.

  Returns:
    The filtered logits [B, V].
  """
  vocab_size = logits.shape[-1]
  cutoff = jnp.full(logits.shape[:-1], -jnp.inf, logits.dtype)
  if top_k > 0:
    sorted_logits = jax.lax.top_k(logits, min(top_k, vocab_size))[0]
    cutoff = sorted_logits[:, -1]
  elif use_top_p:
    sorted_logits = -jnp.sort(-logits, axis=-1)
  if use_top_p:
    # After top-k the other tokens have probability 0, so the nucleus of the top-k values is
    # the nucleus of the whole distribution: no full-vocabulary sort is needed.
    p_cutoff = _top_p_cutoff(sorted_logits, top_p)
    cutoff = jnp.where(top_p < 1.0, jnp.maximum(cutoff, p_cutoff), cutoff)
  return jnp.where(logits >= cutoff[:, None], logits, -jnp.inf)


def sample(logits: jax.Array, keys: jax.Array, *, temperature: Scalar = 1.0, top_k: int = 0,
           top_p: Scalar = 1.0, use_top_p: bool = True) -> jax.Array:
  """Draws one token per row from softmax(filtered logits / temperature).

  Args:
    logits: [B, V] float scores.
    keys: [B] typed PRNG keys, one per sequence, so a row's draw never depends on its batch.
    temperature: > 0.
    top_k: see `filter_logits`.
    top_p: see `filter_logits`.
    use_top_p: see `filter_logits`.

  Returns:
    int32 token ids [B].
  """
  scaled = logits.astype(jnp.float32) / temperature
  filtered = filter_logits(scaled, top_k=top_k, top_p=top_p, use_top_p=use_top_p)
  return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


def select_tokens(logits: jax.Array, keys: jax.Array, spec: SamplingSpec, knobs: dict,
                  seen: jax.Array = None) -> jax.Array:
  """Applies the processors named by `spec` and picks one token per row.

  Args:
    logits: [B, V] float32 logits of the next token.
    keys: [B] PRNG keys for this step (unused when greedy).
    spec: the static program.
    knobs: float32 scalars 'temperature', 'top_p', 'repetition_penalty'.
    seen: [B, V] bool tokens already in each sequence (needed with a repetition penalty).

  Returns:
    int32 token ids [B].
  """
  if spec.repetition_penalty:
    logits = apply_repetition_penalty(logits, seen, knobs['repetition_penalty'])
  if spec.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return sample(logits, keys, temperature=knobs['temperature'], top_k=spec.top_k,
                top_p=knobs['top_p'], use_top_p=spec.top_p)
