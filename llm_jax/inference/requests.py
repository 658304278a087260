"""What a client asks of the engine and what it gets back, and the text side of decoding.

`SamplingParams` checks a request's settings before anything runs; `Output` is one event of
a request's stream; `TextTracker` turns a growing list of token ids into text deltas, holding
back text that may still become a stop string or an incomplete UTF-8 character.
"""

import dataclasses
import math
from typing import Optional, Sequence

from llm_jax.inference import sampling


class QueueFullError(RuntimeError):
  """The engine's waiting queue is full; retry later (HTTP 429)."""


class ShuttingDownError(RuntimeError):
  """The engine no longer accepts requests (HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request's tokens are chosen and when it ends.

  temperature 0 is greedy; top_k 0 and top_p 1 are off; repetition_penalty follows
  transformers. `stop` strings end the text (not included); `stop_ids` tokens end it (not
  included in the text, reported in `Output.token_ids`); `max_tokens` bounds new tokens.
  `logprobs` asks for the top-`logprobs` alternatives of every new token (0 = only the chosen
  token's log-probability).
  """
  max_tokens: int = 16
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  seed: int = 0
  stop: tuple = ()
  stop_ids: tuple = ()
  logprobs: int = 0

  def __post_init__(self):
    # Range checks shared with `generate` (the message names the field).
    sampling.GenerationOptions(max(self.max_tokens, 1), self.temperature, self.top_k,
                               self.top_p, self.repetition_penalty, seed=self.seed)
    if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
      raise ValueError(f'max_tokens={self.max_tokens!r}; expected an integer >= 0')
    if not math.isfinite(self.repetition_penalty):
      raise ValueError(f'repetition_penalty={self.repetition_penalty!r}; expected a finite '
                       'number > 0')
    if any(not isinstance(s, str) or not s for s in self.stop):
      raise ValueError(f'stop={list(self.stop)!r}; expected non-empty strings')
    if not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 5:
      raise ValueError(f'logprobs={self.logprobs!r}; expected an integer in [0, 5]')


@dataclasses.dataclass
class Output:
  """New tokens of one request since its previous Output.

  token_ids, logprobs and top_logprobs (lists of (id, logprob) pairs) run parallel; `text` is
  the new text. `finish_reason` is None until the last Output: 'stop' (stop token or string),
  'length' (max_tokens or the cache), 'cancelled' or 'error' (then `error` says why).
  """
  token_ids: list
  logprobs: list
  top_logprobs: list
  text: str = ''
  finish_reason: Optional[str] = None
  error: Optional[str] = None


class TextTracker:
  """Incremental detokenisation with stop strings.

  Decoding the whole output each time (rather than token by token) keeps multi-token
  characters and a tokenizer's spacing rules right; outputs are short, so it is cheap.
  """

  def __init__(self, tokenizer, stop: Sequence[str]):
    self._tokenizer = tokenizer
    self._stop = tuple(stop)
    self._ids: list = []
    self.sent = ''  # text already handed out
    self.stopped = False

  def add(self, ids: Sequence[int]) -> str:
    """Appends token ids; returns the text that is now safe to hand out."""
    if self._tokenizer is None or self.stopped:
      return ''
    self._ids.extend(int(i) for i in ids)
    text = self._tokenizer.decode(self._ids)
    found = [text.find(s, max(0, len(self.sent) - len(s) + 1)) for s in self._stop]
    found = [i for i in found if i >= 0]
    if found:
      self.stopped = True
      return self._advance(text[:min(found)])
    if text.endswith('\ufffd'):
      return ''  # an incomplete UTF-8 character: wait for its other bytes
    hold = 0
    for s in self._stop:
      for k in range(min(len(s) - 1, len(text)), 0, -1):
        if text.endswith(s[:k]):
          hold = max(hold, k)
          break
    return self._advance(text[:len(text) - hold])

  def flush(self) -> str:
    """At the end: the held-back text (no stop string completed)."""
    if self._tokenizer is None or self.stopped:
      return ''
    return self._advance(self._tokenizer.decode(self._ids))

  def _advance(self, text: str) -> str:
    if len(text) <= len(self.sent):
      return ''
    delta = text[len(self.sent):]
    self.sent = text
    return delta
