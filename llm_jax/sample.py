"""Command line text generation and chat from a training workdir or a Hugging Face directory.

    python -m llm_jax.sample --workdir=/tmp/run --prompt='def main('
    python -m llm_jax.sample --hf_dir=/ckpt/Llama-3.2-1B-Instruct --chat --system='Be brief.'

Text is printed as it is produced: the compiled decode loop runs in chunks of --chunk_size
tokens, carrying the KV cache from chunk to chunk (see `llm_jax.inference.decode.stream`); smaller chunks
show text sooner, larger ones waste less time at chunk boundaries. Beam search (--num_beams > 1)
and several --prompt flags print each result when it is complete.

In --chat mode each stdin line is a user turn; the whole conversation (system prompt, earlier
questions and answers) is re-encoded with the chat template every turn (the model directory's
own Jinja template when it has one, see `llm_jax.data.chat_templates`), and
the oldest exchanges are dropped when it no longer fits max_seq_len. `/reset` starts over;
`/exit` or end of input quits. Per-turn statistics go to stderr.
"""

import json
import os
import sys
import time
from typing import Iterable, Optional

from absl import app
from absl import flags
from etils import epath
import jax

from llm_jax.data import chat_templates
from llm_jax.training import checkpoint
from llm_jax.inference import decode
from llm_jax import distributed
from llm_jax import model as model_lib
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
_TEMPLATE = flags.DEFINE_string(
    'chat_template', 'auto', "Chat format: auto (the model directory's own Jinja template, else "
    'llama3 if the tokenizer has its tokens, else llama2), llama2, llama3, or a .jinja file.')
_TRANSCRIPT = flags.DEFINE_string('transcript', None, 'Write the chat messages here (JSON).')
_OUTPUT = flags.DEFINE_string(
    'output', None, 'Also write each prompt and its continuation here, one JSON object a line '
    '(for scripts; stdout mixes in what libraries print). Written by process 0.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 256, 'Tokens to generate per prompt/turn.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, '0 = greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 40, '0 = off.')
_TOP_P = flags.DEFINE_float('top_p', 0.95, '1 = off.')
_REPETITION = flags.DEFINE_float('repetition_penalty', 1.0, '1 = off.')
_NUM_BEAMS = flags.DEFINE_integer('num_beams', 1, '> 1: beam search, deterministic: '
                                  'temperature 0, top_k 0 and top_p 1 unless given explicitly.')
_TRUNCATE = flags.DEFINE_enum(
    'truncate', 'none', ['none', 'left'], 'A prompt longer than max_seq_len - max_new_tokens: '
    'none = refuse it; left = keep its last tokens (after BOS).')
_LENGTH_PENALTY = flags.DEFINE_float('length_penalty', 1.0, 'Beam search length penalty.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_CHUNK = flags.DEFINE_integer('chunk_size', 8, 'Tokens per streamed chunk.')
_CACHE_DTYPE = flags.DEFINE_string('cache_dtype', '', "KV cache dtype; '' = bfloat16 on "
                                   'accelerators, the model dtype on CPU.')
_MESH = flags.DEFINE_list('mesh', [], 'Mesh shape data,fsdp,tensor (-1 fills), e.g. 1,1,-1; '
                          'default one device.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0 when several processes share --mesh '
    '(default $JAX_COORDINATOR_ADDRESS; auto-detected on TPU VMs and SLURM).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')


def _find_tokenizer(directory: str) -> str:
  for name in ('tokenizer.json', 'tokenizer.model'):
    if (epath.Path(directory) / name).exists():
      return os.fspath(epath.Path(directory) / name)
  raise FileNotFoundError(f'no tokenizer.json or tokenizer.model in {directory}; pass '
                          '--tokenizer')


def load_model(workdir, hf_dir, tokenizer_path, mesh=None):
  """(ModelConfig, params, tokenizer) from a training workdir or a Hugging Face directory.

  With a `mesh`, a checkpoint's parameters are read straight into their shards on it (the
  only way when the mesh spans processes).
  """
  if (workdir is None) == (hf_dir is None):
    raise app.UsageError('pass exactly one of --workdir and --hf_dir')
  if hf_dir is not None:
    config, params = load_hf(hf_dir)
    tokenizer_path = tokenizer_path or _find_tokenizer(hf_dir)
  else:
    shardings = None
    if mesh is not None:
      abstract = model_lib.abstract_params(checkpoint.read_config_of(workdir))
      shardings = sharding.tree_shardings(abstract, mesh, sharding.DEFAULT_RULES)
    config, params = checkpoint.load_params(workdir, shardings=shardings)
    tokenizer_path = tokenizer_path or os.fspath(epath.Path(workdir) / 'tokenizer.model')
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
  """The decoding settings of the flags; beam search is deterministic unless told otherwise."""
  sampling_flags = {'temperature': (_TEMPERATURE, 0.0), 'top_k': (_TOP_K, 0),
                    'top_p': (_TOP_P, 1.0)}
  values = {name: flag.value if flag.present or _NUM_BEAMS.value <= 1 else deterministic
            for name, (flag, deterministic) in sampling_flags.items()}
  return dict(max_new_tokens=_MAX_NEW.value, seed=_SEED.value,
              repetition_penalty=_REPETITION.value,
              cache_dtype=_CACHE_DTYPE.value or None, **values)


def fit_prompt(ids: list[int], room: int, truncate: str, bos_id: int) -> list[int]:
  """The prompt ids if they fit in `room` positions; else its last ones (truncate='left').

  Raises:
    ValueError: a one-line message (without the prompt's text) when the prompt does not fit
      and truncate is 'none'.
  """
  if len(ids) <= room:
    return ids
  if room < 2:
    raise ValueError(f'--max_new_tokens={_MAX_NEW.value} leaves {room} of the model\'s '
                     'max_seq_len for the prompt; lower --max_new_tokens')
  if truncate != 'left':
    raise ValueError(f'the prompt has {len(ids)} tokens; at most {room} fit with '
                     f'--max_new_tokens={_MAX_NEW.value}; pass --truncate=left to keep its last '
                     'tokens, or lower --max_new_tokens')
  keep = [bos_id] if ids and ids[0] == bos_id else []
  kept = keep + ids[len(ids) - (room - len(keep)):]
  print(f'[prompt truncated: kept its last {len(kept) - len(keep)} of {len(ids) - len(keep)} '
        'tokens]', file=sys.stderr)
  return kept


def respond(config, params, tokenizer, prompt_ids, stop_ids,
            mesh) -> tuple[str, int, Optional[float]]:
  """Generates a continuation of one prompt, printing it as it comes.

  Returns:
    (text, new tokens, tokens/s after the first chunk or None): the first chunk waits for
    compilation and the prompt, so the rate measures decoding alone. Beam search prints the
    text once it is complete and reports (text, 0, None).
  """
  if _NUM_BEAMS.value > 1:
    kwargs = dict(_sampling_kwargs(), num_beams=_NUM_BEAMS.value,
                  length_penalty=_LENGTH_PENALTY.value)
    text = decode.generate(config, params, [prompt_ids], eos_id=stop_ids, mesh=mesh,
                           tokenizer=tokenizer, **kwargs)[0]
    print(text, flush=True)
    return text, 0, None
  printer = _TextPrinter(tokenizer, stop_ids)
  first_chunk = None  # (time, tokens) once the first chunk is out: compilation and prefill done
  for chunk in decode.stream(config, params, [prompt_ids], eos_id=stop_ids, mesh=mesh,
                             tokenizer=tokenizer, chunk_size=_CHUNK.value, **_sampling_kwargs()):
    printer.add(chunk[0])
    if first_chunk is None:
      first_chunk = (time.perf_counter(), len(printer.ids))
  rate = None
  if first_chunk is not None and len(printer.ids) > first_chunk[1]:
    rate = (len(printer.ids) - first_chunk[1]) / (time.perf_counter() - first_chunk[0])
  return printer.finish(), len(printer.ids), rate


def _fit_conversation(template, tokenizer, messages, max_len) -> list[int]:
  """The prompt ids, dropping the oldest exchanges (not the system prompt) until they fit."""
  while True:
    ids = chat_templates.build_prompt(template, tokenizer, messages)
    first_turn = 1 if messages[0]['role'] == 'system' else 0
    if len(ids) <= max_len or len(messages) - first_turn <= 1:
      return ids
    del messages[first_turn:first_turn + 2]
    print('[dropped the oldest exchange to fit max_seq_len]', file=sys.stderr)


def chat(config, params, tokenizer, mesh, model_dir=None) -> list[dict]:
  """The interactive loop: one user turn per stdin line. Returns the conversation."""
  template = chat_templates.resolve(_TEMPLATE.value, tokenizer, model_dir)
  stop_ids = chat_templates.stop_ids(template, tokenizer)
  system = [{'role': 'system', 'content': _SYSTEM.value}] if _SYSTEM.value else []
  messages, transcript = list(system), list(system)
  print(f'[{chat_templates.describe(template)} chat; /reset to start over, /exit to quit]',
        file=sys.stderr)
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
    if len(prompt) > room and _TRUNCATE.value == 'left':
      prompt = fit_prompt(prompt, room, 'left', tokenizer.bos_id)
    if len(prompt) > room:
      print(f'[message too long: {len(prompt)} tokens with the template, at most {room} fit '
            f'with --max_new_tokens={_MAX_NEW.value}]', file=sys.stderr)
      messages.pop()
      transcript.pop()
      continue
    start = time.perf_counter()
    text, num_new, rate = respond(config, params, tokenizer, prompt, stop_ids, mesh)
    seconds = time.perf_counter() - start
    messages.append({'role': 'assistant', 'content': text})
    transcript.append(messages[-1])
    speed = f', {rate:.1f} tokens/s' if rate is not None else ''
    print(f'[{len(prompt)} prompt tokens, {num_new} new tokens in {seconds:.1f} s{speed} '
          '(after the first chunk: compilation and prompt excluded)]', file=sys.stderr)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _CHAT.value and not _PROMPT.value:
    raise app.UsageError('pass --prompt (one or more) or --chat')
  distributed.initialize(distributed.launch_spec(_COORDINATOR.value, _NUM_PROCESSES.value,
                                                 _PROCESS_ID.value))
  mesh = sharding.create_mesh([int(s) for s in _MESH.value]) if _MESH.value else None
  config, params, tokenizer = load_model(_WORKDIR.value, _HF_DIR.value, _TOKENIZER.value, mesh)
  if _CHAT.value:
    transcript = chat(config, params, tokenizer, mesh, _HF_DIR.value or _WORKDIR.value)
    if _TRANSCRIPT.value:
      epath.Path(_TRANSCRIPT.value).write_text(
          json.dumps(transcript, indent=1, ensure_ascii=False), encoding='utf-8')
  else:
    room = config.max_seq_len - _MAX_NEW.value
    prompts = [fit_prompt([tokenizer.bos_id] + tokenizer.encode(p), room, _TRUNCATE.value,
                          tokenizer.bos_id) for p in _PROMPT.value]
    # What the model continues: the prompt as given, or its kept end.
    shown = [p if len(ids) - 1 == len(tokenizer.encode(p)) else tokenizer.decode(ids[1:])
             for p, ids in zip(_PROMPT.value, prompts)]
    if len(prompts) == 1:
      print(shown[0], end='', flush=True)
      texts = [respond(config, params, tokenizer, prompts[0], [tokenizer.eos_id], mesh)[0]]
    else:
      kwargs = dict(_sampling_kwargs(), num_beams=_NUM_BEAMS.value,
                    length_penalty=_LENGTH_PENALTY.value)
      texts = decode.generate(config, params, prompts, tokenizer=tokenizer, mesh=mesh,
                              **kwargs)
      for prompt, text in zip(shown, texts):
        print(f'{prompt}{text}\n---')
    if _OUTPUT.value and jax.process_index() == 0:
      epath.Path(_OUTPUT.value).write_text(''.join(
          json.dumps({'prompt': prompt, 'continuation': text}, ensure_ascii=False) + '\n'
          for prompt, text in zip(shown, texts)), encoding='utf-8')


def main_with_one_line_errors(argv):
  """`main`, where a bad setting or prompt (a ValueError) ends with one line, not a traceback."""
  try:
    main(argv)
  except ValueError as error:
    sys.exit(f'llm_jax.sample: {error}')


if __name__ == '__main__':
  app.run(main_with_one_line_errors)
