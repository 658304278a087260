"""OpenAI-compatible request bodies (validated by pydantic) and error bodies.

Fields follow OpenAI's completions and chat completions APIs; `top_k`, `repetition_penalty`
and `ignore_eos` are the common extensions (vLLM's names). Fields the server cannot honour
with a different value (n > 1, presence/frequency penalties, logit_bias) are rejected with a
400 naming the field rather than silently ignored; unknown extra fields are ignored, as OpenAI
clients send a few optional ones.
"""

from typing import Any, Literal, Optional, Union

import pydantic
from pydantic import Field

from llm_jax.inference.requests import SamplingParams

MAX_LOGPROBS = 5


class ApiError(Exception):
  """An error answered with an OpenAI-style body: {'error': {message, type, param, code}}."""

  def __init__(self, status: int, message: str, param: Optional[str] = None,
               code: Optional[str] = None, kind: str = 'invalid_request_error'):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.kind = (status, message, param,
                                                                   code, kind)

  def body(self) -> dict:
    return {'error': {'message': self.message, 'type': self.kind, 'param': self.param,
                      'code': self.code}}


class StreamOptions(pydantic.BaseModel):
  include_usage: bool = False


class _SamplingFields(pydantic.BaseModel):
  """Fields shared by both endpoints."""
  model_config = pydantic.ConfigDict(extra='ignore')

  model: str
  temperature: float = Field(1.0, ge=0.0, le=100.0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  top_k: int = Field(0, ge=-1)  # -1 and 0 are both "off"
  repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
  n: int = Field(1, ge=1, le=1)
  stream: bool = False
  stream_options: Optional[StreamOptions] = None
  stop: Union[str, list[str], None] = None
  seed: Optional[int] = Field(None, ge=-2**31, lt=2**31)
  presence_penalty: float = Field(0.0, ge=0.0, le=0.0)
  frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)
  logit_bias: Optional[dict[str, float]] = Field(None, max_length=0)
  user: Optional[str] = None
  ignore_eos: bool = False  # vLLM's extension: run to max_tokens (benchmarks, tests)

  @pydantic.field_validator('stop')
  @classmethod
  def _stop_strings(cls, stop):
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if len(stop) > 4 or any(not s for s in stop):
      raise ValueError('stop takes at most 4 non-empty strings')
    return stop

  def sampling(self, max_tokens: int, stop_ids, logprobs: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=self.temperature,
                          top_k=max(self.top_k, 0), top_p=self.top_p,
                          repetition_penalty=self.repetition_penalty, seed=self.seed or 0,
                          stop=tuple(self.stop or ()),
                          stop_ids=() if self.ignore_eos else tuple(stop_ids), logprobs=logprobs)


class CompletionRequest(_SamplingFields):
  """POST /v1/completions. `prompt` is text, texts, token ids or lists of token ids."""
  prompt: Union[str, list[str], list[int], list[list[int]]]
  max_tokens: Optional[int] = Field(16, ge=0)
  echo: bool = False
  logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
  suffix: Optional[str] = Field(None, max_length=0)


class ChatMessage(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra='ignore')
  role: Literal['system', 'user', 'assistant']
  content: str


class ChatRequest(_SamplingFields):
  """POST /v1/chat/completions."""
  messages: list[ChatMessage] = Field(min_length=1)
  max_tokens: Optional[int] = Field(None, ge=1)
  max_completion_tokens: Optional[int] = Field(None, ge=1)
  logprobs: bool = False
  top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)


def describe_validation_error(errors: list[dict[str, Any]]) -> tuple[str, Optional[str]]:
  """(one-line message, param) for the first pydantic/FastAPI validation error."""
  first = errors[0]
  location = [str(part) for part in first.get('loc', ()) if part != 'body']
  param = '.'.join(location) or None
  if first.get('type') == 'json_invalid':
    return f'the request body is not valid JSON: {first.get("msg")}', None
  if first.get('type') == 'missing':
    return f'missing required field {param!r}', param
  return f'invalid value for {param!r}: {first.get("msg")}', param
