"""OpenAI response bodies built from engine Outputs: choices, logprobs, usage, SSE framing."""

import json
import time
from typing import Optional, Sequence


def sse(payload) -> str:
  """One server-sent event; `payload` is a JSON-able object or the final '[DONE]'."""
  data = payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))
  return f'data: {data}\n\n'


def usage(num_prompt: int, num_completion: int) -> dict:
  return {'prompt_tokens': num_prompt, 'completion_tokens': num_completion,
          'total_tokens': num_prompt + num_completion}


def envelope(kind: str, request_id: str, model: str, choices: list,
             usage_counts: Optional[dict] = None) -> dict:
  """The fields every completion (or chunk) has; `kind` is OpenAI's `object`."""
  body = {'id': request_id, 'object': kind, 'created': int(time.time()), 'model': model,
          'choices': choices}
  if usage_counts is not None:
    body['usage'] = usage_counts
  return body


class TokenText:
  """Token ids -> the strings OpenAI's logprobs show (one decode per id, cached)."""

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer
    self._cache: dict = {}

  def __call__(self, token_id: int) -> str:
    if token_id not in self._cache:
      self._cache[token_id] = self._tokenizer.decode([token_id])
    return self._cache[token_id]


def completion_logprobs(token_text: TokenText, token_ids: Sequence[int],
                        logprobs: Sequence[Optional[float]], tops: Sequence[Optional[list]],
                        offset: int = 0) -> dict:
  """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs and
  text_offset (character offsets of each token, starting at `offset`)."""
  tokens = [token_text(int(t)) for t in token_ids]
  offsets = []
  for token in tokens:
    offsets.append(offset)
    offset += len(token)
  top_logprobs = []
  for top in tops:
    if top is None:
      top_logprobs.append(None)
      continue
    entry = {}
    for token_id, logprob in top:
      entry.setdefault(token_text(token_id), logprob)  # best first: keep the best of equals
    top_logprobs.append(entry)
  return {'tokens': tokens, 'token_logprobs': list(logprobs), 'top_logprobs': top_logprobs,
          'text_offset': offsets}


def merge_completion_logprobs(first: dict, second: dict) -> dict:
  return {key: first[key] + second[key] for key in first}


def chat_logprobs(token_text: TokenText, token_ids, logprobs, tops) -> dict:
  """The chat `logprobs` object: {'content': [{token, logprob, bytes, top_logprobs}]}."""

  def item(token_id, logprob):
    text = token_text(int(token_id))
    return {'token': text, 'logprob': logprob, 'bytes': list(text.encode('utf-8'))}

  content = []
  for token_id, logprob, top in zip(token_ids, logprobs, tops):
    content.append(dict(item(token_id, logprob),
                        top_logprobs=[item(i, lp) for i, lp in top]))
  return {'content': content}
