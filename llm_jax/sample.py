"""Command line text generation and chat from a training workdir or a Hugging Face directory.

    python -m llm_jax.sample --workdir=/tmp/run --prompt='def main('
    python -m llm_jax.sample --hf_dir=/ckpt/Llama-3.2-1B-Instruct --chat --system='Be brief.'

Text is printed as it is produced: the compiled decode loop runs in chunks of --chunk_size
tokens, carrying the KV cache from chunk to chunk (see `llm_jax.inference.decode.stream`); smaller chunks
show text sooner, larger ones waste less time at chunk boundaries. Beam search (--num_beams > 1)
and several --prompt flags print each result when it is complete.

In --chat mode each stdin line is a user turn; the whole conversation (system prompt, earlier
questions and answers) is re-encoded with the Llama 2 or Llama 3 chat template every turn, and
the oldest exchanges are dropped when it no longer fits max_seq_len. `/reset` starts over;
`/exit` or end of input quits. Per-turn statistics go to stderr.
"""

import json
import os
import sys
import time
from typing import Iterable

from absl import app
from absl import flags

from llm_jax.data import chat_templates
from llm_jax.training import checkpoint
from llm_jax.inference import decode
from llm_jax import sharding
from llm_jax.convert import load_hf
from llm_jax.data import tokenizer as tokenizer_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (or checkpoint dir) to load.')
_HF_DIR = flags.DEFINE_string('hf_dir', None, 'Hugging Face Llama directory to load.')
_TOKENIZER = flags.DEFINE_string(
    'tokenizer', None, 'Tokenizer file; default <workdir>/tokenizer.model, or the '
    'tokenizer.json / tokenizer.model in --hf_dir.')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'Prompt(s) to continue (without --chat).')
_CHAT = flags.DEFINE_bool('chat', False, 'Interactive chat on stdin.')
_SYSTEM = flags.DEFINE_string('system', None, 'System prompt for --chat.')
_TEMPLATE = flags.DEFINE_enum('chat_template', 'auto', ('auto',) + chat_templates.TEMPLATES,
                              'Chat format; auto picks llama3 if the tokenizer has its tokens.')
_TRANSCRIPT = flags.DEFINE_string('transcript', None, 'Write the chat messages here (JSON).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 256, 'Tokens to generate per prompt/turn.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, '0 = greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 40, '0 = off.')
_TOP_P = flags.DEFINE_float('top_p', 0.95, '1 = off.')
_REPETITION = flags.DEFINE_float('repetition_penalty', 1.0, '1 = off.')
_NUM_BEAMS = flags.DEFINE_integer('num_beams', 1, '> 1: beam search (needs --temperature=0 '
                                  '--top_k=0 --top_p=1).')
_LENGTH_PENALTY = flags.DEFINE_float('length_penalty', 1.0, 'Beam search length penalty.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_CHUNK = flags.DEFINE_integer('chunk_size', 8, 'Tokens per streamed chunk.')
_CACHE_DTYPE = flags.DEFINE_string('cache_dtype', '', "KV cache dtype; '' = bfloat16 on "
                                   'accelerators, the model dtype on CPU.')
_MESH = flags.DEFINE_list('mesh', [], 'Mesh shape data,fsdp,tensor (-1 fills), e.g. 1,1,-1; '
                          'default one device.')


def _find_tokenizer(directory: str) -> str:
  for name in ('tokenizer.json', 'tokenizer.model'):
    if os.path.exists(os.path.join(directory, name)):
      return os.path.join(directory, name)
  raise FileNotFoundError(f'no tokenizer.json or tokenizer.model in {directory}; pass '
                          '--tokenizer')


def load_model(workdir, hf_dir, tokenizer_path):
  """(ModelConfig, params, tokenizer) from a training workdir or a Hugging Face directory."""
  if (workdir is None) == (hf_dir is None):
    raise app.UsageError('pass exactly one of --workdir and --hf_dir')
  if hf_dir is not None:
    config, params = load_hf(hf_dir)
    tokenizer_path = tokenizer_path or _find_tokenizer(hf_dir)
  else:
    config, params = checkpoint.load_params(workdir)
    tokenizer_path = tokenizer_path or os.path.join(workdir, 'tokenizer.model')
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_path)
  tokenizer_lib.check_vocab_fits(tokenizer, config.vocab_size)
  return config, params, tokenizer


class _TextPrinter:
  """Prints the text of a growing token list, holding back incomplete UTF-8 characters."""

  def __init__(self, tokenizer, stop_ids: Iterable[int], out=sys.stdout):
    self.tokenizer, self.stop_ids, self.out = tokenizer, set(stop_ids), out
    self.ids, self.shown = [], ''

  def text(self) -> str:
    ids = self.ids[:-1] if self.ids and self.ids[-1] in self.stop_ids else self.ids
    return self.tokenizer.decode(ids)

  def add(self, ids: list[int]) -> None:
    self.ids += ids
    text = self.text().rstrip('\ufffd')
    if text.startswith(self.shown):
      self.out.write(text[len(self.shown):])
      self.out.flush()
      self.shown = text

  def finish(self) -> str:
    text = self.text()
    self.out.write(text[len(self.shown):] if text.startswith(self.shown) else '')
    self.out.write('\n')
    self.out.flush()
    return text


def _sampling_kwargs() -> dict:
  return dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
              top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value,
              repetition_penalty=_REPETITION.value,
              cache_dtype=_CACHE_DTYPE.value or None)


def respond(config, params, tokenizer, prompt_ids, stop_ids, mesh) -> tuple[str, int]:
  """Generates a continuation of one prompt, printing it as it comes; (text, new tokens).

  Beam search prints the text once it is complete and reports 0 new tokens.
  """
  if _NUM_BEAMS.value > 1:
    kwargs = dict(_sampling_kwargs(), num_beams=_NUM_BEAMS.value,
                  length_penalty=_LENGTH_PENALTY.value)
    text = decode.generate(config, params, [prompt_ids], eos_id=stop_ids, mesh=mesh,
                           tokenizer=tokenizer, **kwargs)[0]
    print(text, flush=True)
    return text, 0
  printer = _TextPrinter(tokenizer, stop_ids)
  for chunk in decode.stream(config, params, [prompt_ids], eos_id=stop_ids, mesh=mesh,
                             tokenizer=tokenizer, chunk_size=_CHUNK.value, **_sampling_kwargs()):
    printer.add(chunk[0])
  return printer.finish(), len(printer.ids)


def _fit_conversation(template, tokenizer, messages, max_len) -> list[int]:
  """The prompt ids, dropping the oldest exchanges (not the system prompt) until they fit."""
  while True:
    ids = chat_templates.build_prompt(template, tokenizer, messages)
    first_turn = 1 if messages[0]['role'] == 'system' else 0
    if len(ids) <= max_len or len(messages) - first_turn <= 1:
      return ids
    del messages[first_turn:first_turn + 2]
    print('[dropped the oldest exchange to fit max_seq_len]', file=sys.stderr)


def chat(config, params, tokenizer, mesh) -> list[dict]:
  """The interactive loop: one user turn per stdin line. Returns the conversation."""
  template = _TEMPLATE.value
  if template == 'auto':
    template = chat_templates.detect(tokenizer)
  stop_ids = chat_templates.stop_ids(template, tokenizer)
  system = [{'role': 'system', 'content': _SYSTEM.value}] if _SYSTEM.value else []
  messages, transcript = list(system), list(system)
  print(f'[{template} chat; /reset to start over, /exit to quit]', file=sys.stderr)
  while True:
    print('> ', end='', file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line or line.strip() in ('/exit', '/quit'):
      return transcript
    if line.strip() == '/reset':
      messages = list(system)
      continue
    messages.append({'role': 'user', 'content': line.strip()})
    transcript.append(messages[-1])
    room = config.max_seq_len - _MAX_NEW.value
    prompt = _fit_conversation(template, tokenizer, messages, room)
    if len(prompt) > room:
      print(f'[message too long: {len(prompt)} tokens with the template, at most {room} fit '
            f'with --max_new_tokens={_MAX_NEW.value}]', file=sys.stderr)
      messages.pop()
      transcript.pop()
      continue
    start = time.perf_counter()
    text, num_new = respond(config, params, tokenizer, prompt, stop_ids, mesh)
    seconds = time.perf_counter() - start
    messages.append({'role': 'assistant', 'content': text})
    transcript.append(messages[-1])
    print(f'[{len(prompt)} prompt tokens, {num_new} new tokens, {num_new / seconds:.1f} '
          'tokens/s]', file=sys.stderr)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _CHAT.value and not _PROMPT.value:
    raise app.UsageError('pass --prompt (one or more) or --chat')
  mesh = sharding.create_mesh([int(s) for s in _MESH.value]) if _MESH.value else None
  config, params, tokenizer = load_model(_WORKDIR.value, _HF_DIR.value, _TOKENIZER.value)
  if _CHAT.value:
    transcript = chat(config, params, tokenizer, mesh)
    if _TRANSCRIPT.value:
      with open(_TRANSCRIPT.value, 'w', encoding='utf-8') as f:
        json.dump(transcript, f, indent=1, ensure_ascii=False)
  elif len(_PROMPT.value) == 1:
    prompt_ids = [tokenizer.bos_id] + tokenizer.encode(_PROMPT.value[0])
    print(_PROMPT.value[0], end='', flush=True)
    respond(config, params, tokenizer, prompt_ids, [tokenizer.eos_id], mesh)
  else:
    kwargs = dict(_sampling_kwargs(), num_beams=_NUM_BEAMS.value,
                  length_penalty=_LENGTH_PENALTY.value)
    texts = decode.generate(config, params, _PROMPT.value, tokenizer=tokenizer, mesh=mesh,
                            **kwargs)
    for prompt, text in zip(_PROMPT.value, texts):
      print(f'{prompt}{text}\n---')


if __name__ == '__main__':
  app.run(main)
