"""The OpenAI-compatible HTTP app (FastAPI) in front of a continuous-batching Engine.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both streamed as
server-sent events with "stream": true), GET /health, GET /metrics (Prometheus).

The engine runs on its own thread; handlers only submit requests and await their Outputs,
which the engine thread hands to the event loop (`call_soon_threadsafe`), so the loop never
waits on JAX. A streamed response whose client goes away is cancelled by Starlette; the
generator's `finally` then cancels the engine request, whose slot is free before the next
decode step. Every error is answered with OpenAI's error body and a 4xx/5xx status; the
server keeps serving.
"""

import asyncio
import contextlib
import logging
import time
import uuid
from typing import AsyncIterator, Optional

import fastapi
from fastapi import exceptions as fastapi_exceptions
from fastapi import responses as fastapi_responses
from starlette import exceptions as starlette_exceptions

from llm_jax.data import chat_templates
from llm_jax.inference.engine import Engine
from llm_jax.inference.requests import Output, QueueFullError, ShuttingDownError
from llm_jax.serving import metrics as metrics_lib
from llm_jax.serving import protocol
from llm_jax.serving import responses

_SSE_HEADERS = {'Cache-Control': 'no-cache', 'X-Accel-Buffering': 'no'}


class _Generation:
  """One engine request seen from the event loop: its Outputs as an async iterator."""

  def __init__(self, server: '_Server', prompt: list, params):
    self._server = server
    self._loop = asyncio.get_running_loop()
    self._queue: asyncio.Queue = asyncio.Queue()
    self.prompt = prompt
    self.num_new = 0
    self.started = time.monotonic()
    self.first_token = self.started
    self.finish_reason: Optional[str] = None
    try:
      self._request = server.engine.submit(prompt, params, self._on_output)
    except QueueFullError as e:
      raise protocol.ApiError(429, str(e), code='rate_limit_exceeded', kind='requests') from e
    except ShuttingDownError as e:
      raise protocol.ApiError(503, str(e), code='shutting_down', kind='server_error') from e
    except ValueError as e:
      raise protocol.ApiError(400, str(e), param='prompt',
                              code='context_length_exceeded' if 'context' in str(e)
                              else 'invalid_prompt') from e

  def _on_output(self, output: Output) -> None:
    self._loop.call_soon_threadsafe(self._queue.put_nowait, output)

  def cancel(self) -> None:
    if self.finish_reason is None:
      self._server.engine.cancel(self._request)

  async def outputs(self) -> AsyncIterator[Output]:
    """The request's Outputs; those that arrived while the consumer was busy come merged
    into one, so a stream that falls behind sends fewer, longer chunks instead of a growing
    backlog of one-token chunks."""
    try:
      held = None  # an error that followed tokens: it ends the stream after they went out
      while self.finish_reason is None:
        pending = [held if held is not None else await self._queue.get()]
        held = None
        while pending[-1].finish_reason is None and not self._queue.empty():
          following = self._queue.get_nowait()
          if following.finish_reason == 'error':
            held = following
            break
          pending.append(following)
        output = pending[0] if len(pending) == 1 else _joined(pending)
        if output.token_ids and not self.num_new:
          self.first_token = time.monotonic()
        self.num_new += len(output.token_ids)
        if output.finish_reason == 'error':
          self.finish_reason = 'error'
          raise protocol.ApiError(500, f'generation failed: {output.error}',
                                  kind='server_error')
        self.finish_reason = output.finish_reason
        yield output
    finally:
      self.cancel()
      self._server.metrics.record(self.finish_reason or 'cancelled', len(self.prompt),
                                  self.num_new, self.started, self.first_token,
                                  time.monotonic())

  async def collect(self) -> Output:
    """All Outputs merged into one."""
    return _joined([output async for output in self.outputs()])


def _joined(outputs: list) -> Output:
  """One Output holding the tokens and text of `outputs` in order, and the last one's end.

  Built once from all of them: merging them pairwise would copy the lists again at every
  step, a cost quadratic in the tokens of a long response.
  """
  merged = Output([], [], [])
  for output in outputs:
    merged.token_ids.extend(output.token_ids)
    merged.logprobs.extend(output.logprobs)
    merged.top_logprobs.extend(output.top_logprobs)
    merged.finish_reason, merged.error = output.finish_reason, output.error
  merged.text = ''.join(output.text for output in outputs)
  return merged


class _Server:
  """What the handlers share."""

  def __init__(self, engine: Engine, model_name: str, chat_template):
    self.engine, self.model_name = engine, model_name
    self.tokenizer = engine.tokenizer
    self.chat_template = (chat_templates.detect(self.tokenizer) if chat_template is None
                          else chat_template)
    self.metrics = metrics_lib.ServerMetrics(engine)
    self.token_text = responses.TokenText(self.tokenizer)

  def check_model(self, model: str) -> None:
    if model != self.model_name:
      raise protocol.ApiError(404, f'model {model!r} does not exist; this server serves '
                              f'{self.model_name!r}', param='model', code='model_not_found')

  def encode(self, text: str) -> list:
    """A text prompt's ids: BOS, then the text encoded as plain text (never control tokens)."""
    encode = getattr(self.tokenizer, 'encode_ordinary', self.tokenizer.encode)
    return [self.tokenizer.bos_id] + encode(text)

  def completion_prompts(self, prompt) -> list:
    if isinstance(prompt, str):
      return [self.encode(prompt)]
    if prompt and all(isinstance(p, int) for p in prompt):
      return [list(prompt)]
    if not prompt:
      raise protocol.ApiError(400, 'prompt is empty', param='prompt')
    return [self.encode(p) if isinstance(p, str) else list(p) for p in prompt]

  def max_tokens(self, requested: Optional[int], prompt: list) -> int:
    return max(self.engine.max_len - len(prompt), 0) if requested is None else requested


def _sampling(body, max_tokens: int, stop_ids, logprobs: int):
  try:
    return body.sampling(max_tokens, stop_ids, logprobs)
  except ValueError as e:
    raise protocol.ApiError(400, str(e), param=str(e).split('=')[0]) from e


async def _score(server: _Server, prompt: list) -> dict:
  """The echoed prompt's completions logprobs (the first token has none)."""
  future = server.engine.score(prompt)
  following, top_ids, top_logprobs = await asyncio.wrap_future(future)
  tops = [None] + [list(zip(top_ids[t].tolist(), top_logprobs[t].tolist()))
                   for t in range(len(prompt) - 1)]
  return responses.completion_logprobs(server.token_text, prompt,
                                       [None] + following.tolist(), tops)


async def _completion_choice(server: _Server, index: int, generation: _Generation,
                             body: protocol.CompletionRequest) -> dict:
  echo_logprobs = None
  if body.echo and body.logprobs is not None:
    echo_logprobs = await _score(server, generation.prompt)
  output = await generation.collect()
  text = output.text
  prompt_text = server.tokenizer.decode(generation.prompt) if body.echo else ''
  logprobs = None
  if body.logprobs is not None:
    tops = [top[:body.logprobs] for top in output.top_logprobs]
    logprobs = responses.completion_logprobs(server.token_text, output.token_ids,
                                             output.logprobs, tops, len(prompt_text))
    if echo_logprobs is not None:
      logprobs = responses.merge_completion_logprobs(echo_logprobs, logprobs)
  return {'index': index, 'text': prompt_text + text, 'logprobs': logprobs,
          'finish_reason': output.finish_reason}


async def _stream(server: _Server, generation: _Generation, kind: str, request_id: str,
                  make_choice, include_usage: bool, first_chunk: Optional[dict] = None):
  """SSE chunks of one generation; the generation is cancelled if the client leaves."""
  try:
    if first_chunk is not None:
      yield responses.sse(responses.envelope(kind, request_id, server.model_name,
                                             [first_chunk]))
    async for output in generation.outputs():
      yield responses.sse(responses.envelope(kind, request_id, server.model_name,
                                             [make_choice(output)]))
    if include_usage:
      yield responses.sse(responses.envelope(
          kind, request_id, server.model_name, [],
          responses.usage(len(generation.prompt), generation.num_new)))
    yield responses.sse('[DONE]')
  except protocol.ApiError as e:
    yield responses.sse(e.body())
  finally:
    generation.cancel()


async def completions(body: protocol.CompletionRequest, request: fastapi.Request):
  server: _Server = request.app.state.server
  server.check_model(body.model)
  prompts = server.completion_prompts(body.prompt)
  if body.stream and len(prompts) > 1:
    raise protocol.ApiError(400, 'stream=true takes a single prompt', param='prompt')
  if body.max_tokens == 0 and not body.echo:
    raise protocol.ApiError(400, 'max_tokens=0 is only meaningful with echo=true',
                            param='max_tokens')
  generations = []
  try:
    for prompt in prompts:
      params = _sampling(body, server.max_tokens(body.max_tokens, prompt),
                         [server.tokenizer.eos_id], body.logprobs or 0)
      generations.append(_Generation(server, prompt, params))
  except protocol.ApiError:
    for generation in generations:
      generation.cancel()
    raise
  request_id = f'cmpl-{uuid.uuid4().hex}'
  if body.stream:
    written = [0]  # characters of token text before this chunk: its tokens' first text_offset

    def choice(output: Output) -> dict:
      logprobs = None
      if body.logprobs is not None:
        tops = [top[:body.logprobs] for top in output.top_logprobs]
        logprobs = responses.completion_logprobs(server.token_text, output.token_ids,
                                                 output.logprobs, tops, written[0])
        written[0] += sum(len(token) for token in logprobs['tokens'])
      return {'index': 0, 'text': output.text, 'logprobs': logprobs,
              'finish_reason': output.finish_reason}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return fastapi_responses.StreamingResponse(
        _stream(server, generations[0], 'text_completion', request_id, choice, include_usage),
        media_type='text/event-stream', headers=_SSE_HEADERS)
  try:
    choices = await asyncio.gather(*(_completion_choice(server, i, g, body)
                                     for i, g in enumerate(generations)))
  finally:
    for generation in generations:
      generation.cancel()
  counts = responses.usage(sum(len(g.prompt) for g in generations),
                           sum(g.num_new for g in generations))
  return responses.envelope('text_completion', request_id, server.model_name, list(choices),
                            counts)


async def chat_completions(body: protocol.ChatRequest, request: fastapi.Request):
  server: _Server = request.app.state.server
  server.check_model(body.model)
  messages = [m.model_dump() for m in body.messages]
  try:
    prompt = chat_templates.build_prompt(server.chat_template, server.tokenizer, messages)
  except ValueError as e:
    raise protocol.ApiError(400, str(e), param='messages') from e
  top_logprobs = (body.top_logprobs or 0) if body.logprobs else 0
  max_tokens = server.max_tokens(body.max_completion_tokens or body.max_tokens, prompt)
  stop_ids = chat_templates.stop_ids(server.chat_template, server.tokenizer)
  generation = _Generation(server, prompt, _sampling(body, max_tokens, stop_ids, top_logprobs))
  request_id = f'chatcmpl-{uuid.uuid4().hex}'

  def logprobs_of(output: Output):
    if not body.logprobs:
      return None
    return responses.chat_logprobs(server.token_text, output.token_ids, output.logprobs,
                                   output.top_logprobs)

  if body.stream:
    def choice(output: Output) -> dict:
      return {'index': 0, 'delta': {'content': output.text} if output.text else {},
              'logprobs': logprobs_of(output), 'finish_reason': output.finish_reason}
    first = {'index': 0, 'delta': {'role': 'assistant', 'content': ''}, 'logprobs': None,
             'finish_reason': None}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return fastapi_responses.StreamingResponse(
        _stream(server, generation, 'chat.completion.chunk', request_id, choice,
                include_usage, first),
        media_type='text/event-stream', headers=_SSE_HEADERS)
  output = await generation.collect()
  choice = {'index': 0, 'message': {'role': 'assistant', 'content': output.text},
            'logprobs': logprobs_of(output), 'finish_reason': output.finish_reason}
  return responses.envelope('chat.completion', request_id, server.model_name, [choice],
                            responses.usage(len(prompt), generation.num_new))


def _error_response(server: Optional[_Server], error: protocol.ApiError):
  if server is not None:
    server.metrics.rejected.labels(str(error.status)).inc()
  return fastapi_responses.JSONResponse(error.body(), status_code=error.status)


def _add_error_handlers(app: fastapi.FastAPI) -> None:
  def server_of(request):
    return getattr(request.app.state, 'server', None)

  @app.exception_handler(protocol.ApiError)
  async def api_error(request, error: protocol.ApiError):
    return _error_response(server_of(request), error)

  @app.exception_handler(fastapi_exceptions.RequestValidationError)
  async def invalid_request(request, error):
    message, param = protocol.describe_validation_error(error.errors())
    return _error_response(server_of(request), protocol.ApiError(400, message, param))

  @app.exception_handler(starlette_exceptions.HTTPException)
  async def http_error(request, error):
    return _error_response(server_of(request), protocol.ApiError(
        error.status_code, f'{request.method} {request.url.path}: {error.detail}',
        kind='invalid_request_error' if error.status_code < 500 else 'server_error'))

  @app.exception_handler(Exception)
  async def internal_error(request, error):
    logging.exception('unexpected error on %s', request.url.path)
    return _error_response(server_of(request), protocol.ApiError(
        500, f'internal error: {type(error).__name__}: {error}', kind='server_error'))


def create_app(engine: Engine, model_name: str, chat_template=None,
               shutdown_engine: bool = True) -> fastapi.FastAPI:
  """The app serving `engine` (started here if it is not running) as model `model_name`.

  `chat_template`: a template as `chat_templates.resolve` returns it (a built-in name or the
  model directory's own Jinja template); default: detected from the tokenizer.
  With `shutdown_engine`, the app's shutdown finishes the engine's requests and stops it.
  """
  if engine.tokenizer is None:
    raise ValueError('the HTTP server needs an engine with a tokenizer')

  @contextlib.asynccontextmanager
  async def lifespan(app):
    engine.start()
    yield
    if shutdown_engine:
      await asyncio.to_thread(engine.shutdown)

  app = fastapi.FastAPI(title='llm_jax', lifespan=lifespan)
  app.state.server = server = _Server(engine, model_name, chat_template)
  _add_error_handlers(app)
  app.post('/v1/completions')(completions)
  app.post('/v1/chat/completions')(chat_completions)

  @app.get('/v1/models')
  async def models():
    return {'object': 'list', 'data': [{'id': server.model_name, 'object': 'model',
                                        'created': 0, 'owned_by': 'llm_jax',
                                        'max_model_len': engine.max_len}]}

  @app.get('/health')
  async def health():
    if engine.error is not None:
      raise protocol.ApiError(503, f'engine failed: {engine.error}', kind='server_error')
    return {'status': 'ok', **engine.load()}

  @app.get('/metrics')
  async def metrics():
    return fastapi_responses.Response(server.metrics.exposition(),
                                      media_type='text/plain; version=0.0.4')

  return app
