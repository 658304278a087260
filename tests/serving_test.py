"""The HTTP server on loopback, driven by real clients: openai, lm-eval, httpx.

A random-weight transformers Llama and a byte-level BPE tokenizer are saved by the test; the
references are transformers' own greedy `generate` and lm-eval's own `hf` model class.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import httpx
import numpy as np
import openai
import pytest
import tokenizers
import torch
import transformers
import uvicorn
from tokenizers import decoders, models, pre_tokenizers, trainers

import llm_jax
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.inference.engine import Engine, Output, SamplingParams
from llm_jax.serving import app as app_lib
from llm_jax.serving.protocol import ApiError
from llm_jax.serving.app import create_app

CORPUS = ['the quick brown fox jumps over the lazy dog.', 'hello there, how are you today?',
          'a cat sat on the mat and looked at the dog.', '[INST] <<SYS>> [/INST]'] * 20
MODEL = 'tiny'
SLOTS, MAX_QUEUE = 4, 2


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('tiny_llama'))
  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<s>', '</s>', '<pad>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe, bos_token='<s>', eos_token='</s>',
      pad_token='<pad>').save_pretrained(directory)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=304, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
      bos_token_id=0, eos_token_id=1, pad_token_id=2, initializer_range=0.3)
  transformers.LlamaForCausalLM(config).eval().save_pretrained(directory)
  return directory


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def server(hf_dir):
  config, params = llm_jax.load_hf(hf_dir)
  tokenizer = tokenizer_lib.load_tokenizer(hf_dir)
  engine = Engine(config, params, num_slots=SLOTS, max_queue=MAX_QUEUE, chunk_size=32,
                  tokenizer=tokenizer)
  port = _free_port()
  uv = uvicorn.Server(uvicorn.Config(create_app(engine, MODEL), host='127.0.0.1', port=port,
                                     log_level='warning'))
  thread = threading.Thread(target=uv.run, daemon=True)
  thread.start()
  while not uv.started:
    time.sleep(0.05)
  yield f'http://127.0.0.1:{port}'
  uv.should_exit = True
  thread.join(30)


@pytest.fixture(scope='module')
def hf_model(hf_dir):
  return (transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval(),
          transformers.AutoTokenizer.from_pretrained(hf_dir))


def _hf_greedy(hf_model, ids, max_new: int) -> str:
  model, tokenizer = hf_model
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=2)
  return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_openai_completions_match_transformers(server, hf_model):
  client = openai.OpenAI(base_url=f'{server}/v1', api_key='none', max_retries=0)
  assert [m.id for m in client.models.list().data] == [MODEL]
  tokenizer = hf_model[1]
  prompts = ['the quick brown', 'hello there, how are']
  result = client.completions.create(model=MODEL, prompt=prompts, max_tokens=12,
                                     temperature=0)
  for prompt, choice in zip(prompts, sorted(result.choices, key=lambda c: c.index)):
    ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
    assert choice.text == _hf_greedy(hf_model, ids, 12)
  streamed = list(client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={'include_usage': True}))
  assert ''.join(c.choices[0].text for c in streamed if c.choices) == result.choices[0].text
  # Streamed log-probabilities: the same tokens and text offsets (counted from the start of the
  # completion, not of each chunk) as the whole response's.
  whole = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=12,
                                    temperature=0, logprobs=1).choices[0].logprobs
  pieces = [c.choices[0].logprobs for c in client.completions.create(
      model=MODEL, prompt=prompts[0], max_tokens=12, temperature=0, logprobs=1, stream=True)]
  assert [t for p in pieces for t in p.tokens] == whole.tokens
  assert [o for p in pieces for o in p.text_offset] == whole.text_offset
  assert whole.text_offset[0] == 0 and len(set(whole.text_offset)) == len(whole.text_offset)
  usage = streamed[-1].usage
  assert usage.prompt_tokens == 1 + len(tokenizer.encode(prompts[0], add_special_tokens=False))
  assert usage.completion_tokens <= 12 and usage.total_tokens == (usage.prompt_tokens +
                                                                  usage.completion_tokens)
  # Special-token text in a prompt stays text, never a control token.
  untrusted = 'hi </s><s> there'
  counted = client.completions.create(model=MODEL, prompt=untrusted, max_tokens=1)
  as_text = tokenizer(untrusted, add_special_tokens=False, split_special_tokens=True)
  assert counted.usage.prompt_tokens == 1 + len(as_text['input_ids'])
  # A stop string cuts the text just before it.
  text = result.choices[0].text
  stop = text[3:6]
  cut = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=12,
                                  temperature=0, stop=[stop])
  assert cut.choices[0].text == text[:text.index(stop)]
  assert cut.choices[0].finish_reason == 'stop'


def test_openai_chat_matches_transformers(server, hf_model):
  from llm_jax.data import chat_templates  # pylint: disable=import-outside-toplevel
  client = openai.OpenAI(base_url=f'{server}/v1', api_key='none', max_retries=0)
  messages = [{'role': 'system', 'content': 'be brief'},
              {'role': 'user', 'content': 'hello there <s></s> [INST]'}]
  reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                         temperature=0, logprobs=True, top_logprobs=2)
  tokenizer = tokenizer_lib.load_tokenizer(server_dir := hf_model[1].name_or_path)
  ids = chat_templates.build_prompt(chat_templates.resolve('auto', tokenizer, server_dir),
                                    tokenizer, messages)
  assert reply.choices[0].message.content == _hf_greedy(hf_model, ids, 10)
  assert reply.usage.prompt_tokens == len(ids)
  assert len(reply.choices[0].logprobs.content) == reply.usage.completion_tokens
  assert all(len(t.top_logprobs) == 2 for t in reply.choices[0].logprobs.content)
  chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                               temperature=0, stream=True))
  assert chunks[0].choices[0].delta.role == 'assistant'
  assert ''.join(c.choices[0].delta.content or '' for c in chunks) == (
      reply.choices[0].message.content)
  assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_lm_eval_local_completions_matches_hf_loglikelihoods(server, hf_dir):
  from lm_eval.api.instance import Instance  # pylint: disable=import-outside-toplevel
  from lm_eval.models.huggingface import HFLM  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from lm_eval.models.openai_completions import LocalCompletionsAPI
  pairs = [('the quick brown', ' fox jumps'), ('hello there, how', ' are you'),
           ('a cat sat on', ' the lazy dog.'), ('', 'the mat')]
  requests = [Instance('loglikelihood', {}, pair, i) for i, pair in enumerate(pairs)]
  reference = HFLM(pretrained=hf_dir, device='cpu', batch_size=1).loglikelihood(requests)
  api = LocalCompletionsAPI(base_url=f'{server}/v1/completions', model=MODEL,
                            tokenizer_backend='huggingface', tokenizer=hf_dir,
                            tokenized_requests=True, max_retries=1)
  got = api.loglikelihood(requests)
  np.testing.assert_allclose([g[0] for g in got], [r[0] for r in reference], atol=1e-4)
  assert [g[1] for g in got] == [r[1] for r in reference]


@pytest.mark.parametrize('body, status, param', [
    ('{"model": "tiny", "prompt": ', 400, None),
    ({'model': 'other', 'prompt': 'hi'}, 404, 'model'),
    ({'model': 'tiny', 'prompt': 'the dog ' * 600}, 400, 'prompt'),
    ({'model': 'tiny', 'prompt': [5, 9999]}, 400, 'prompt'),
    ({'model': 'tiny', 'prompt': 'hi', 'temperature': -1}, 400, 'temperature'),
    ({'model': 'tiny', 'prompt': 'hi', 'top_p': 0}, 400, 'top_p'),
    ({'model': 'tiny', 'prompt': 'hi', 'n': 2}, 400, 'n'),
    ({'model': 'tiny', 'prompt': 'hi', 'logprobs': 9}, 400, 'logprobs'),
    ({'model': 'tiny', 'prompt': 'hi', 'max_tokens': 'many'}, 400, 'max_tokens'),
    ({'prompt': 'hi'}, 400, 'model'),
    ({'model': 'tiny', 'messages': [{'role': 'robot', 'content': 'x'}]}, 400, None),
    ({'model': 'tiny', 'messages': [{'role': 'assistant', 'content': 'x'}]}, 400, 'messages'),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status,
                                                                     param):
  path = '/v1/chat/completions' if 'messages' in str(body) else '/v1/completions'
  content = body if isinstance(body, str) else json.dumps(body)
  response = httpx.post(server + path, content=content,
                        headers={'Content-Type': 'application/json'})
  assert response.status_code == status, response.text
  error = response.json()['error']
  assert error['message'] and error['type']
  if param is not None:
    assert error['param'].startswith(param)
  assert httpx.post(server + '/v1/completions', json={'model': MODEL, 'prompt': 'hi',
                                                      'max_tokens': 2}).status_code == 200


def _metric(server, name: str) -> float:
  text = httpx.get(server + '/metrics').text
  values = [float(line.split()[-1]) for line in text.splitlines()
            if line.startswith(name + ' ') or line.startswith(name + '{')]
  return sum(values)


def test_full_queue_answers_429_and_disconnects_free_slots(server):
  cancelled = _metric(server, 'llm_jax_requests_total{finish_reason="cancelled"}')

  async def scenario():
    async with httpx.AsyncClient(timeout=60) as client:
      streams = await asyncio.gather(*(
          client.send(client.build_request('POST', server + '/v1/completions', json={
              'model': MODEL, 'prompt': 'the dog', 'max_tokens': 1000, 'temperature': 1.0,
              'ignore_eos': True, 'stream': True}), stream=True) for _ in range(SLOTS)))
      # The four slots are busy (a sampled end-of-text token cannot end them early); two more
      # requests wait in the queue, the next gets 429.
      waiting = [asyncio.ensure_future(client.post(server + '/v1/completions', json={
          'model': MODEL, 'prompt': 'hi', 'max_tokens': 1})) for _ in range(MAX_QUEUE)]
      while (await client.get(server + '/health')).json()['waiting'] < MAX_QUEUE:
        await asyncio.sleep(0.01)
      rejected = await client.post(server + '/v1/completions',
                                   json={'model': MODEL, 'prompt': 'hi', 'max_tokens': 1})
      assert rejected.status_code == 429, rejected.text
      assert rejected.json()['error']['code'] == 'rate_limit_exceeded'
      for response in streams:
        await response.aclose()
      # Disconnected clients' slots free at once; the queued requests then complete.
      assert all(r.status_code == 200 for r in await asyncio.gather(*waiting))
      health = (await client.get(server + '/health')).json()
      assert health['active'] == 0 and health['waiting'] == 0

  asyncio.run(scenario())
  # All four long requests ended by cancellation, none ran to its 1000 tokens.
  assert _metric(server, 'llm_jax_requests_total{finish_reason="cancelled"}') == (
      cancelled + SLOTS)


def test_sigterm_finishes_in_flight_requests_then_exits(hf_dir):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  process = subprocess.Popen(
      [sys.executable, '-m', 'llm_jax.serve', f'--hf_dir={hf_dir}', f'--port={port}',
       '--slots=2', '--chunk_size=16', '--max_len=320', '--model_name=tiny'], env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  url = f'http://127.0.0.1:{port}'
  try:
    for _ in range(600):
      try:
        if httpx.get(url + '/health').status_code == 200:
          break
      except httpx.TransportError:
        time.sleep(0.1)
    with httpx.stream('POST', url + '/v1/completions', json={
        'model': MODEL, 'prompt': 'the dog', 'max_tokens': 300, 'temperature': 1.0,
        'ignore_eos': True, 'stream': True, 'stream_options': {'include_usage': True}},
                      timeout=60) as response:
      events = response.iter_lines()
      first = next(line for line in events if line.startswith('data:'))
      process.send_signal(signal.SIGTERM)
      rest = [line for line in events if line.startswith('data:')]
    assert json.loads(first[5:])['choices'][0]['finish_reason'] is None
    assert rest[-1] == 'data: [DONE]'
    assert json.loads(rest[-2][5:])['usage']['completion_tokens'] == 300
    # uvicorn exits by re-raising the SIGTERM it handled, after the app's shutdown ran.
    assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert 'Application shutdown complete' in process.stdout.read().decode()
    with pytest.raises(httpx.TransportError):
      httpx.get(url + '/health')
  finally:
    if process.poll() is None:
      process.kill()
    process.wait()


def test_outputs_queued_while_the_stream_was_busy_go_out_merged_in_order():
  """A stream that falls behind the engine sends what has piled up as one chunk: tokens,
  log-probabilities and text in their order, ending with the last Output's finish reason."""

  class Recorder:
    """Stands in for the engine and the metrics: the test feeds the Outputs itself."""

    def submit(self, prompt, params, on_output):
      del prompt, params, on_output

    def cancel(self, request):
      del request

    def record(self, *args):
      del args

  recorder = Recorder()
  server = types.SimpleNamespace(engine=recorder, metrics=recorder)
  # pylint: disable=protected-access

  async def stream(last: Output):
    generation = app_lib._Generation(server, [5, 6], SamplingParams())
    for i in range(3):
      generation._queue.put_nowait(Output([i], [-i / 10], [[(i, -i / 10)]], f'<{i}>'))
    generation._queue.put_nowait(last)
    chunks = []
    try:
      async for output in generation.outputs():
        chunks.append(output)
    except ApiError as e:
      chunks.append(e)
    return chunks, generation.num_new

  chunks, num_new = asyncio.run(stream(Output([7], [-0.7], [[(7, -0.7)]], '!', 'length')))
  assert len(chunks) == 1 and num_new == 4
  assert chunks[0].token_ids == [0, 1, 2, 7]
  assert chunks[0].logprobs == [0.0, -0.1, -0.2, -0.7]
  assert chunks[0].top_logprobs == [[(0, 0.0)], [(1, -0.1)], [(2, -0.2)], [(7, -0.7)]]
  assert (chunks[0].text, chunks[0].finish_reason) == ('<0><1><2>!', 'length')
  # An engine error is never merged away: the tokens before it still go out, then the error.
  chunks, num_new = asyncio.run(stream(Output([], [], [], '', 'error', 'device lost')))
  assert chunks[0].token_ids == [0, 1, 2] and chunks[0].finish_reason is None
  assert isinstance(chunks[1], ApiError) and 'device lost' in str(chunks[1])
  assert len(chunks) == 2 and num_new == 3
