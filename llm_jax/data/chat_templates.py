"""Llama 2 and Llama 3 chat formats, built directly as token ids.

Both follow Meta's reference implementations. Control tokens (BOS/EOS, Llama 3 headers) are
inserted by id and the text pieces are encoded separately, exactly as Meta's `ChatFormat` does;
no special-token text is ever parsed out of a message by this module.

  llama2: <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] ...
  llama3: <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>...
          <|start_header_id|>assistant<|end_header_id|>\\n\\n

A conversation is a list of {'role': 'system' | 'user' | 'assistant', 'content': str}: an
optional system message first, then user and assistant messages alternating, ending with user.
"""

from typing import Optional, Sequence

TEMPLATES = ('llama2', 'llama3')
_LLAMA3_SPECIAL = ('<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>')


def _check_turns(messages: Sequence[dict]) -> tuple[Optional[str], list[dict]]:
  """Splits off the system prompt and checks the user/assistant alternation."""
  messages = list(messages)
  system = None
  if messages and messages[0].get('role') == 'system':
    system = messages.pop(0)['content']
  for i, message in enumerate(messages):
    expected = 'user' if i % 2 == 0 else 'assistant'
    if message.get('role') != expected:
      raise ValueError(f'chat message {i} has role {message.get("role")!r}, expected '
                       f'{expected!r}: after an optional system message, user and assistant '
                       'messages must alternate')
  if not messages or messages[-1]['role'] != 'user':
    raise ValueError('a chat prompt must end with a user message')
  return system, messages


def single_token_id(tokenizer, text: str) -> Optional[int]:
  """The id of `text` if the tokenizer encodes it as one token (a special token), else None."""
  ids = tokenizer.encode(text)
  return ids[0] if len(ids) == 1 else None


def llama2_prompt(tokenizer, messages: Sequence[dict]) -> list[int]:
  """Token ids of a Llama 2 chat prompt, ready for the assistant's next answer."""
  system, messages = _check_turns(messages)
  if system is not None:
    first = messages[0]['content']
    messages[0] = {'role': 'user', 'content': f'<<SYS>>\n{system}\n<</SYS>>\n\n{first}'}
  ids = []
  for user, answer in zip(messages[0::2], messages[1::2]):
    text = f'[INST] {user["content"].strip()} [/INST] {answer["content"].strip()} '
    ids += [tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]
  ids += [tokenizer.bos_id] + tokenizer.encode(f'[INST] {messages[-1]["content"].strip()} [/INST]')
  return ids


def _llama3_ids(tokenizer) -> dict:
  ids = {name: single_token_id(tokenizer, name) for name in _LLAMA3_SPECIAL}
  missing = [name for name, i in ids.items() if i is None]
  if missing:
    raise ValueError(f'tokenizer {getattr(tokenizer, "path", tokenizer)} has no single token '
                     f'for {missing}; it cannot use the llama3 chat template')
  return ids


def llama3_prompt(tokenizer, messages: Sequence[dict]) -> list[int]:
  """Token ids of a Llama 3 chat prompt, ending with the assistant header."""
  system, messages = _check_turns(messages)
  special = _llama3_ids(tokenizer)

  def header(role):
    return ([special['<|start_header_id|>']] + tokenizer.encode(role) +
            [special['<|end_header_id|>']] + tokenizer.encode('\n\n'))

  if system is not None:
    messages = [{'role': 'system', 'content': system}] + messages
  ids = [tokenizer.bos_id]
  for message in messages:
    ids += (header(message['role']) + tokenizer.encode(message['content'].strip()) +
            [special['<|eot_id|>']])
  return ids + header('assistant')


def detect(tokenizer) -> str:
  """'llama3' when the tokenizer has the Llama 3 header tokens, else 'llama2'."""
  has_llama3 = all(single_token_id(tokenizer, name) is not None for name in _LLAMA3_SPECIAL)
  return 'llama3' if has_llama3 else 'llama2'


def build_prompt(template: str, tokenizer, messages: Sequence[dict]) -> list[int]:
  """Token ids of `messages` in the named template ('llama2' or 'llama3')."""
  if template == 'llama2':
    return llama2_prompt(tokenizer, messages)
  if template == 'llama3':
    return llama3_prompt(tokenizer, messages)
  raise ValueError(f'unknown chat template {template!r}; expected one of {TEMPLATES}')


def stop_ids(template: str, tokenizer) -> list[int]:
  """Tokens that end an assistant turn: EOS, and for Llama 3 also <|eot_id|>."""
  if template == 'llama3':
    return [_llama3_ids(tokenizer)['<|eot_id|>'], tokenizer.eos_id]
  return [tokenizer.eos_id]
