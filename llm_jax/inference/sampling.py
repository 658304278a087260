"""Next-token selection: the generation options, and the logits processors and sampler.

`GenerationOptions` holds and checks a request's settings. The processors follow the Hugging Face `transformers` semantics and order (repetition penalty,
then temperature, then top-k, then top-p), so settings carry over and results are comparable.
Every function works on a batch of float32 logits [B, V] and is traceable under `jit`: the
integer `top_k` is static, the float knobs may be traced scalars (changing them does not
recompile).
"""

import dataclasses
import math
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

Scalar = Union[float, jax.Array]
_FLOAT_KNOBS = ('temperature', 'top_p', 'repetition_penalty', 'length_penalty')
# Beam search's early_stopping travels as a traced int32 code, so switching it never recompiles.
EARLY_STOPPING_CODES = {False: 0, True: 1, 'never': 2}


def early_stopping_code(early_stopping: Union[bool, str]) -> int:
  """The code of transformers' early_stopping setting (True, False or 'never')."""
  for value, code in EARLY_STOPPING_CODES.items():
    if early_stopping is value or (isinstance(value, str) and early_stopping == value):
      return code
  raise ValueError(f"early_stopping={early_stopping!r}; expected True, False or 'never'")


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


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


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
  """How new tokens are chosen; checked on construction, before anything is compiled.

  temperature 0 is greedy decoding. top_k, top_p, repetition_penalty, num_beams,
  length_penalty and early_stopping mean what they mean in transformers' `generate`.
  """
  max_new_tokens: int
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  num_beams: int = 1
  length_penalty: float = 1.0
  early_stopping: Union[bool, str] = False
  seed: int = 0

  def __post_init__(self):
    problems = [
        (not _is_int(self.max_new_tokens) or self.max_new_tokens < 1, 'max_new_tokens',
         'a positive integer'),
        (not math.isfinite(self.temperature) or self.temperature < 0, 'temperature', '>= 0'),
        (not _is_int(self.top_k) or self.top_k < 0, 'top_k', 'an integer >= 0 (0 = off)'),
        (not 0 < self.top_p <= 1, 'top_p', 'in (0, 1]'),
        (not self.repetition_penalty > 0, 'repetition_penalty', '> 0 (1 = off)'),
        (not _is_int(self.num_beams) or self.num_beams < 1, 'num_beams', 'an integer >= 1'),
        (not math.isfinite(self.length_penalty), 'length_penalty', 'a finite number'),
        (not _is_int(self.seed) or not -2**31 <= self.seed < 2**31, 'seed',
         'a 32-bit integer'),
    ]
    for bad, name, expected in problems:
      if bad:
        raise ValueError(f'{name}={getattr(self, name)!r}; expected {expected}')
    early_stopping_code(self.early_stopping)
    if self.num_beams > 1 and (self.temperature > 0 or self.top_k or self.top_p < 1):
      raise ValueError(
          f'num_beams={self.num_beams} runs deterministic beam search, which does not sample: '
          f'use temperature=0, top_k=0 and top_p=1 with it (got temperature='
          f'{self.temperature}, top_k={self.top_k}, top_p={self.top_p})')

  @property
  def spec(self) -> 'SamplingSpec':
    greedy = self.temperature == 0
    return SamplingSpec(greedy=greedy, top_k=0 if greedy else int(self.top_k),
                        top_p=not greedy and self.top_p < 1,
                        repetition_penalty=self.repetition_penalty != 1)

  def knobs(self) -> dict:
    """The runtime values of the compiled programs (changing them does not recompile)."""
    knobs = {name: np.float32(getattr(self, name)) for name in _FLOAT_KNOBS}
    knobs['early_stopping'] = np.int32(early_stopping_code(self.early_stopping))
    return knobs


def limit_vocabulary(logits: jax.Array, num_tokens: jax.Array) -> jax.Array:
  """Rules out ids >= num_tokens: rows a model's padded embedding table has beyond its
  tokenizer's vocabulary, which the tokenizer could not decode."""
  return jnp.where(jnp.arange(logits.shape[-1]) < num_tokens, logits, -jnp.inf)


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
    knobs: float32 scalars 'temperature', 'top_p', 'repetition_penalty', and the int32
      'num_tokens' (ids from it on are never chosen).
    seen: [B, V] bool tokens already in each sequence (needed with a repetition penalty).

  Returns:
    int32 token ids [B].
  """
  logits = limit_vocabulary(logits, knobs['num_tokens'])
  if spec.repetition_penalty:
    logits = apply_repetition_penalty(logits, seen, knobs['repetition_penalty'])
  if spec.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return sample(logits, keys, temperature=knobs['temperature'], top_k=spec.top_k,
                top_p=knobs['top_p'], use_top_p=spec.top_p)
