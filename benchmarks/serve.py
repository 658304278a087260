"""Serving throughput and latency: llm_jax.serve against `transformers serve --continuous-batching`.

    python benchmarks/serve.py --preset=tiny
    python benchmarks/serve.py --hf_dir=~/.cache/llm_jax/models/SmolLM2-135M-Instruct

(the SmolLM2 directory is built by benchmarks/smollm2.py). Both servers serve the same Hugging
Face directory on this machine, one after the other, in float32, and get the same fixed
request mix over /v1/completions, streamed: with seed 0, prompt lengths uniform in
[--min_prompt_words, --max_prompt_words] words (a word is about one to two tokens) and output
lengths uniform in [--min_new, --max_new] tokens, greedy, EOS ignored (llm_jax: `ignore_eos`;
transformers, which refuses that field: a generation config whose EOS id is -1), so both write
exactly max_tokens tokens per request. Each concurrency level (1, 8, 32 by default) sends
2 x concurrency requests (at least 8) through that many concurrent clients. llm_jax decodes
over --slots slots with a --max_len context each; transformers' continuous batching schedules
every request it holds in one batch (its own defaults, which exceed 32 requests).

Printed per server and level: output tokens/s (completion tokens over wall time), time to
first token and inter-token latency (gaps between streamed chunks), p50 and p99, the tokens
written against those asked, and the 1-minute load average when the level ended (the cores
may be shared). llm_jax's engine compiles its programs at start-up; one warm-up round runs
before the measured ones on both servers. Server logs go to $TMPDIR/bench_<server>.log.

`--preset=tiny` saves a random-weight model of the tiny preset's shape with a byte-level BPE
tokenizer trained here (no download). Timing belongs here, never in tests.
"""

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

WORDS = ('the quick brown fox jumps over a lazy dog while rain falls on green hills and '
         'seven cats sit near the old river bank watching boats drift slowly past').split()


def make_tiny_dir(directory: str) -> str:
  """A random Llama with the tiny preset's shape, plus a small BPE tokenizer."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from tokenizers import decoders, models, pre_tokenizers, trainers
  from llm_jax.model.config import get_preset  # pylint: disable=import-outside-toplevel
  preset = get_preset('tiny')
  rng = np.random.default_rng(0)
  corpus = [' '.join(rng.choice(WORDS, size=40)) for _ in range(500)]
  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=preset.vocab_size, special_tokens=['<s>', '</s>', '<pad>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token='<s>', eos_token='</s>',
                                       pad_token='<pad>').save_pretrained(directory)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=preset.vocab_size, hidden_size=preset.embed_dim,
      intermediate_size=preset.mlp_dim, num_hidden_layers=preset.num_layers,
      num_attention_heads=preset.num_heads, num_key_value_heads=preset.num_kv_heads,
      head_dim=preset.head_dim, max_position_embeddings=preset.max_seq_len,
      rope_theta=preset.rope_theta, bos_token_id=0, eos_token_id=1, pad_token_id=2)
  transformers.LlamaForCausalLM(config).save_pretrained(directory)
  return directory


def request_mix(count: int, args, seed: int = 0) -> list:
  rng = np.random.default_rng(seed)
  return [(' '.join(rng.choice(WORDS, size=int(rng.integers(args.min_prompt_words,
                                                             args.max_prompt_words + 1)))),
           int(rng.integers(args.min_new, args.max_new + 1))) for _ in range(count)]


async def _one(client, url, model, prompt, max_tokens, extra) -> dict:
  start = time.perf_counter()
  arrivals, usage = [], None
  body = {'model': model, 'prompt': prompt, 'max_tokens': max_tokens, 'temperature': 0,
          'stream': True, 'stream_options': {'include_usage': True}, **extra}
  async with client.stream('POST', url + '/v1/completions', json=body) as response:
    if response.status_code != 200:
      raise RuntimeError(f'{url}: HTTP {response.status_code}: {await response.aread()}')
    async for line in response.aiter_lines():
      if not line.startswith('data:') or line.strip() == 'data: [DONE]':
        continue
      chunk = json.loads(line[5:])
      if chunk.get('usage'):
        usage = chunk['usage']
      # A chunk per token; its text may be empty (ids the tokenizer cannot show, or text
      # held back by a server), so arrival, not text, marks a token.
      if any(c.get('finish_reason') is None or c.get('text')
             for c in chunk.get('choices') or ()):
        arrivals.append(time.perf_counter())
  tokens = usage['completion_tokens'] if usage else len(arrivals)
  return {'ttft': arrivals[0] - start if arrivals else float('nan'),
          'gaps': np.diff(arrivals).tolist(), 'tokens': tokens, 'asked': max_tokens}


async def run_level(url: str, model: str, mix: list, concurrency: int, extra: dict) -> dict:
  limit = asyncio.Semaphore(concurrency)
  async with httpx.AsyncClient(timeout=600) as client:
    async def bounded(prompt, max_tokens):
      async with limit:
        return await _one(client, url, model, prompt, max_tokens, extra)
    start = time.perf_counter()
    results = await asyncio.gather(*(bounded(p, m) for p, m in mix))
    seconds = time.perf_counter() - start
  ttft = [r['ttft'] for r in results]
  gaps = [g for r in results for g in r['gaps']] or [float('nan')]
  tokens = sum(r['tokens'] for r in results)
  return {'tokens_per_s': tokens / seconds, 'tokens': tokens,
          'asked': sum(r['asked'] for r in results), 'seconds': seconds,
          'load': os.getloadavg()[0],  # the 2 cores are shared: other work skews the figures
          'ttft_p50': np.nanpercentile(ttft, 50), 'ttft_p99': np.nanpercentile(ttft, 99),
          'itl_p50': np.nanpercentile(gaps, 50), 'itl_p99': np.nanpercentile(gaps, 99)}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _wait_ready(url: str, process, seconds: float = 600) -> None:
  deadline = time.time() + seconds
  while time.time() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f'server exited with {process.returncode}')
    try:
      if httpx.get(url + '/v1/models', timeout=5).status_code == 200:
        return
    except httpx.TransportError:
      time.sleep(0.5)
  raise RuntimeError(f'{url} did not come up in {seconds} s')


def bench_server(name: str, command: list, port: int, model: str, args, extra: dict) -> list:
  url = f'http://127.0.0.1:{port}'
  log = open(os.path.join(tempfile.gettempdir(), f'bench_{name.split()[0]}.log'), 'w')
  process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
  rows = []
  try:
    _wait_ready(url, process)
    asyncio.run(run_level(url, model, request_mix(4, args, seed=1), 4, extra))  # warm-up, compiles
    for concurrency in args.concurrency:
      mix = request_mix(max(8, 2 * concurrency), args)
      try:
        result = asyncio.run(run_level(url, model, mix, concurrency, extra))
      except (httpx.HTTPError, RuntimeError) as e:
        # A server that drops a connection fails this level; the table says so.
        print(f'| {name} | {concurrency} | failed: {type(e).__name__}: {e} | | | | |',
              flush=True)
        continue
      rows.append((name, concurrency, result))
      print(_row(*rows[-1]), flush=True)
  finally:
    process.terminate()
    process.wait(120)
    log.close()
  return rows


def _row(name, concurrency, r) -> str:
  return (f'| {name} | {concurrency} | {r["tokens_per_s"]:.1f} | {r["ttft_p50"] * 1e3:.0f} / '
          f'{r["ttft_p99"] * 1e3:.0f} | {r["itl_p50"] * 1e3:.1f} / {r["itl_p99"] * 1e3:.1f} | '
          f'{r["tokens"]} / {r["asked"]} in {r["seconds"]:.1f} s | {r["load"]:.1f} |')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', choices=['tiny'], help='random-weight model of this preset')
  parser.add_argument('--hf_dir', help='Hugging Face directory to serve')
  parser.add_argument('--concurrency', type=int, nargs='+', default=[1, 8, 32])
  parser.add_argument('--slots', type=int, default=32)
  parser.add_argument('--max_len', type=int, default=1024,
                      help="llm_jax's context length per slot, at most the model's (its KV cache "
                      'holds slots x max_len positions)')
  parser.add_argument('--min_prompt_words', type=int, default=16)
  parser.add_argument('--max_prompt_words', type=int, default=128)
  parser.add_argument('--min_new', type=int, default=16)
  parser.add_argument('--max_new', type=int, default=64)
  parser.add_argument('--skip_transformers', action='store_true')
  args = parser.parse_args()
  if (args.preset is None) == (args.hf_dir is None):
    parser.error('pass exactly one of --preset and --hf_dir')
  workdir = None
  if args.preset:
    workdir = tempfile.mkdtemp()
    args.hf_dir = make_tiny_dir(workdir)
  model = os.path.abspath(args.hf_dir)
  with open(os.path.join(model, 'config.json'), encoding='utf-8') as f:
    max_len = min(args.max_len, json.load(f)['max_position_embeddings'])
  ours = [sys.executable, '-m', 'llm_jax.serve', f'--hf_dir={model}', f'--model_name={model}',
          f'--slots={args.slots}', f'--max_len={max_len}',
          f'--max_queue={4 * max(args.concurrency)}']
  print('| server | concurrency | output tokens/s | TTFT p50 / p99 (ms) | '
        'inter-token p50 / p99 (ms) | tokens written / asked | load (1 min) |\n'
        '|---|---|---|---|---|---|---|',
        flush=True)
  port = _free_port()
  rows = bench_server('llm_jax.serve', ours + [f'--port={port}'], port, model, args,
                      {'ignore_eos': True})
  if not args.skip_transformers:
    port = _free_port()
    theirs = [shutil.which('transformers') or 'transformers', 'serve', model,
              '--continuous-batching', '--port', str(port), '--device', 'cpu']
    # It refuses unknown fields such as ignore_eos; an EOS id that no token has (-1) in its
    # generation config makes it ignore EOS too, so both servers write max_tokens tokens.
    rows += bench_server('transformers serve --continuous-batching', theirs, port, model, args,
                         {'generation_config': json.dumps({'eos_token_id': -1,
                                                           'do_sample': False})})
  if workdir:
    shutil.rmtree(workdir, ignore_errors=True)
  return rows


if __name__ == '__main__':
  main()
