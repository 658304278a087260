"""Chat formats: a model's own Jinja chat template, and the built-in Llama 2 and Llama 3 ones.

A model directory's template (`chat_template` in tokenizer_config.json, or chat_template.jinja)
is rendered as transformers' `apply_chat_template` renders it: Jinja2's immutable sandbox with
trim_blocks and lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`, and the special
tokens (`bos_token`, `eos_token`...) as variables. Its token ids equal transformers' for ordinary
messages, with one difference on purpose: message text never becomes control tokens. Before
rendering, each special-token text inside a message is broken by a private-use marker character
(and each message's text is fenced by markers, so no token forms across its edges); the rendered
string is split at the special tokens that remain, which can only come from the template itself,
and the text between them is encoded with the markers removed and special tokens read as text.

The built-in formats follow Meta's reference implementations. Control tokens (BOS/EOS, Llama 3
headers) are inserted by id and the text pieces are encoded separately, exactly as Meta's
`ChatFormat` does:

  llama2: <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] ...
  llama3: <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>...
          <|start_header_id|>assistant<|end_header_id|>\\n\\n

A conversation is a list of {'role': 'system' | 'user' | 'assistant', 'content': str}: an
optional system message first, then user and assistant messages alternating, ending with user
(a Jinja template may accept more, e.g. tool messages).
"""

import datetime
import json
import os
import re
from typing import Optional, Sequence, Union

from etils import epath
import jinja2
import jinja2.ext
from jinja2 import sandbox
import numpy as np

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


def _encode_text(tokenizer, text: str) -> list[int]:
  """Ids of untrusted text: special-token text inside it stays ordinary text."""
  encode = getattr(tokenizer, 'encode_ordinary', None)  # tokenizers of the Tokenizer protocol
  return encode(text) if encode else tokenizer.encode(text)


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
    ids += [tokenizer.bos_id] + _encode_text(tokenizer, text) + [tokenizer.eos_id]
  ids += ([tokenizer.bos_id] +
          _encode_text(tokenizer, f'[INST] {messages[-1]["content"].strip()} [/INST]'))
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
    ids += (header(message['role']) + _encode_text(tokenizer, message['content'].strip()) +
            [special['<|eot_id|>']])
  return ids + header('assistant')


def detect(tokenizer) -> str:
  """'llama3' when the tokenizer has the Llama 3 header tokens, else 'llama2'."""
  has_llama3 = all(single_token_id(tokenizer, name) is not None for name in _LLAMA3_SPECIAL)
  return 'llama3' if has_llama3 else 'llama2'


# Official Jinja forms of the built-in formats (meta-llama/Meta-Llama-3-8B-Instruct and
# meta-llama/Llama-2-7b-chat-hf), for data that needs assistant-turn masks (SFT).
BUILTIN_JINJA = {
    'llama3': (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
        "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
        "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    'llama2': (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}"
        "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + "
        "message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"),
}
ROLES = ('system', 'user', 'assistant', 'tool')
# End-of-turn tokens of common templates: generation stops on them when the template uses them.
_END_OF_TURN = ('<|im_end|>', '<|eot_id|>', '<|eom_id|>', '<|end|>', '<end_of_turn>')
_TOKEN_VARIABLES = ('bos_token', 'eos_token', 'unk_token', 'pad_token')
_MARKERS = range(0xE000, 0xF900)  # Unicode private use area


class _GenerationTag(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag) renders its body."""
  tags = {'generation'}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(['name:endgeneration'], drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method('_render'), [], [], body).set_lineno(lineno)

  def _render(self, caller):
    return caller()


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # Jinja's own tojson escapes HTML characters; transformers' does not.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(date_format):
  return datetime.datetime.now().strftime(date_format)


def compile_template(source: str) -> jinja2.Template:
  """A chat template compiled in the sandbox transformers renders templates in."""
  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  env.filters['tojson'] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
  return env.from_string(source)


def _token_text(value) -> Optional[str]:
  """A tokenizer_config.json token entry (a string or an AddedToken dict) as text."""
  return value.get('content') if isinstance(value, dict) else value


class ChatTemplate:
  """A Jinja chat template and the special-token variables it is rendered with.

  Attributes:
    source: the Jinja text.
    name: how it is shown to users (the file it came from, or a built-in name).
    variables: bos_token, eos_token... as text (None: taken from the tokenizer).
    stop_tokens: token texts, besides EOS, that end an assistant turn.
  """

  def __init__(self, source: str, name: str = 'jinja', variables: Optional[dict] = None,
               stop_tokens: Sequence[str] = ()):
    self.source, self.name = source, name
    self.variables = dict(variables or {})
    self.stop_tokens = tuple(stop_tokens)
    try:
      self._template = compile_template(source)
    except jinja2.TemplateSyntaxError as e:
      raise ValueError(f'chat template {name}: Jinja syntax error on line {e.lineno}: '
                       f'{e.message}') from e

  def __repr__(self):
    return f'ChatTemplate({self.name!r})'

  def _variables(self, tokenizer) -> dict:
    texts = {i: text for text, i in _special_tokens(tokenizer).items()}
    defaults = {'bos_token': texts.get(tokenizer.bos_id), 'eos_token': texts.get(tokenizer.eos_id)}
    merged = {key: self.variables.get(key) or defaults.get(key) for key in _TOKEN_VARIABLES}
    return {key: value for key, value in merged.items() if value is not None}

  def render(self, messages: Sequence[dict], add_generation_prompt: bool = False,
             tokenizer=None) -> str:
    """The template's text for `messages`, as transformers renders it."""
    variables = self._variables(tokenizer) if tokenizer is not None else dict(self.variables)
    try:
      return self._template.render(messages=list(messages), tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
      raise ValueError(f'chat template {self.name} rejected the conversation: {e}') from e

  def encode(self, tokenizer, messages: Sequence[dict],
             add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered conversation; message text never becomes control tokens."""
    _check_messages(messages)
    specials = _special_tokens(tokenizer)
    marker = _free_marker(messages)
    pattern = _alternation(specials)
    fenced = [_fence_message(m, pattern, marker) for m in messages]
    rendered = self.render(fenced, add_generation_prompt, tokenizer)
    return _encode_rendered(tokenizer, rendered, specials, pattern, marker)

  def encode_conversation(self, tokenizer, messages: Sequence[dict],
                          assistant_turns: str = 'all') -> tuple[list[int], np.ndarray]:
    """(ids, mask) of a whole conversation; mask is True on the tokens of assistant turns.

    A turn's tokens are those the conversation up to it adds to the prompt that asks for it
    (its end-of-turn token included), so the template must render earlier turns the same way
    whatever follows them.

    Args:
      tokenizer: the model's tokenizer.
      messages: the conversation.
      assistant_turns: 'all', or 'last' (only the final assistant message is marked).
    """
    if assistant_turns not in ('all', 'last'):
      raise ValueError(f'assistant_turns={assistant_turns!r}; expected all or last')
    ids = self.encode(tokenizer, messages, add_generation_prompt=False)
    mask = np.zeros(len(ids), bool)
    turns = [i for i, message in enumerate(messages) if message.get('role') == 'assistant']
    for i in turns[-1:] if assistant_turns == 'last' else turns:
      prompt = self.encode(tokenizer, messages[:i], add_generation_prompt=True) if i else []
      upto = self.encode(tokenizer, messages[:i + 1], add_generation_prompt=False)
      if ids[:len(prompt)] != prompt or ids[:len(upto)] != upto:
        raise ValueError(f'chat template {self.name} renders the turns before message {i} '
                         'differently once later messages follow, so the tokens of its '
                         'assistant turns cannot be found')
      mask[len(prompt):len(upto)] = True
    return ids, mask

  def stop_ids(self, tokenizer) -> list[int]:
    """EOS, and the ids of the end-of-turn tokens this template uses."""
    specials = _special_tokens(tokenizer)
    names = list(self.stop_tokens) + [t for t in _END_OF_TURN if t in self.source]
    ids = [tokenizer.eos_id] + [specials[n] for n in names if n in specials]
    return list(dict.fromkeys(ids))


def _check_messages(messages: Sequence[dict]) -> None:
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise ValueError(f'chat message {i} is a {type(message).__name__}, not a dict')
    if message.get('role') not in ROLES:
      raise ValueError(f'chat message {i} has role {message.get("role")!r}; expected one of '
                       f'{ROLES}')
    if not isinstance(message.get('content'), str):
      raise ValueError(f'chat message {i} has no text "content" (got '
                       f'{type(message.get("content")).__name__})')


def _special_tokens(tokenizer) -> dict[str, int]:
  special_tokens = getattr(tokenizer, 'special_tokens', None)
  if special_tokens is None:
    raise ValueError(f'tokenizer {tokenizer!r} cannot list its special tokens; a Jinja chat '
                     'template needs a tokenizer from llm_jax.data.tokenizer')
  return special_tokens()


def _alternation(specials: dict[str, int]) -> re.Pattern:
  """Finds special-token texts, the longest first where several start at one place."""
  names = sorted(specials, key=len, reverse=True)
  return re.compile('|'.join(re.escape(n) for n in names) if names else r'(?!)')


def _free_marker(messages: Sequence[dict]) -> str:
  text = ''.join(m['content'] for m in messages)
  for code in _MARKERS:
    if chr(code) not in text:
      return chr(code)
  raise ValueError('chat messages use every private-use character; cannot encode them safely')


def _fence_message(message: dict, pattern: re.Pattern, marker: str) -> dict:
  """The message with special-token text broken and its non-space text fenced by markers."""
  content = pattern.sub(lambda m: m[0][0] + marker + m[0][1:], message['content'])
  stripped = content.strip()
  if stripped:
    start = content.index(stripped)
    content = (content[:start] + marker + stripped + marker +
               content[start + len(stripped):])
  return dict(message, content=content)


def _encode_rendered(tokenizer, rendered: str, specials: dict[str, int], pattern: re.Pattern,
                     marker: str) -> list[int]:
  """Ids of a rendered template: its special tokens by id, the text between them as text."""
  strip = tokenizer.added_token_strip() if hasattr(tokenizer, 'added_token_strip') else {}
  ids, pieces, position = [], [], 0
  for match in pattern.finditer(rendered):
    start, end = match.span()
    lstrip, rstrip = strip.get(match[0], (False, False))
    text = rendered[position:start]
    pieces.append((text.rstrip() if lstrip else text, match[0]))
    position = end
    if rstrip:
      position = len(rendered) - len(rendered[end:].lstrip())
  pieces.append((rendered[position:], None))
  for text, special in pieces:
    text = text.replace(marker, '')
    if text:
      ids += _encode_text(tokenizer, text)
    if special is not None:
      ids.append(specials[special])
  return ids


def template_from_directory(directory: str) -> Optional[ChatTemplate]:
  """The chat template a model directory ships, or None.

  Read from chat_template.jinja, else the `chat_template` of tokenizer_config.json (a string,
  or a list of named templates of which 'default' is used); the special-token variables come
  from tokenizer_config.json and extra stop tokens from generation_config.json.
  """
  config_path = os.fspath(epath.Path(directory) / 'tokenizer_config.json')
  config = {}
  if epath.Path(config_path).exists():
    config = json.loads(epath.Path(config_path).read_text(encoding='utf-8'))
  jinja_path = os.fspath(epath.Path(directory) / 'chat_template.jinja')
  if epath.Path(jinja_path).exists():
    source, name = epath.Path(jinja_path).read_text(encoding='utf-8'), jinja_path
  else:
    source, name = config.get('chat_template'), config_path
    if isinstance(source, list):
      named = {entry.get('name'): entry.get('template') for entry in source}
      if 'default' not in named:
        raise ValueError(f'{config_path}: chat_template is a list without a "default" entry '
                         f'(names: {sorted(named)})')
      source = named['default']
    if source is None:
      return None
    if not isinstance(source, str):
      raise ValueError(f'{config_path}: chat_template is a {type(source).__name__}, '
                       'expected a string')
  variables = {key: _token_text(config.get(key)) for key in _TOKEN_VARIABLES}
  stop = [_token_text(config.get('eos_token'))]
  return ChatTemplate(source, name, variables, [t for t in stop if t])


Template = Union[str, ChatTemplate]


def resolve(choice: str, tokenizer, model_dir: Optional[str] = None) -> Template:
  """The template to use.

  Args:
    choice: 'auto' (the directory's own template, else llama3 when the tokenizer has its
      tokens, else llama2), 'llama2', 'llama3', or a path to a .jinja file.
    tokenizer: the model's tokenizer.
    model_dir: the model's directory (Hugging Face directory or workdir), or None.

  Returns:
    A built-in name or a ChatTemplate.
  """
  if choice == 'auto':
    own = template_from_directory(model_dir) if model_dir else None
    return own if own is not None else detect(tokenizer)
  if choice in TEMPLATES:
    return choice
  if not epath.Path(choice).is_file():
    raise ValueError(f'chat template {choice!r} is neither auto, {" nor ".join(TEMPLATES)}, '
                     'nor an existing .jinja file')
  return ChatTemplate(epath.Path(choice).read_text(encoding='utf-8'), choice)


def as_jinja(template: Template) -> ChatTemplate:
  """A ChatTemplate for a built-in name (its official Jinja form) or a ChatTemplate."""
  if isinstance(template, ChatTemplate):
    return template
  if template not in BUILTIN_JINJA:
    raise ValueError(f'unknown chat template {template!r}; expected one of {TEMPLATES}')
  return ChatTemplate(BUILTIN_JINJA[template], template)


def describe(template: Template) -> str:
  return template.name if isinstance(template, ChatTemplate) else template


def build_prompt(template: Template, tokenizer, messages: Sequence[dict]) -> list[int]:
  """Token ids of `messages` in a template ('llama2', 'llama3' or a ChatTemplate)."""
  if isinstance(template, ChatTemplate):
    return template.encode(tokenizer, messages, add_generation_prompt=True)
  if template == 'llama2':
    return llama2_prompt(tokenizer, messages)
  if template == 'llama3':
    return llama3_prompt(tokenizer, messages)
  raise ValueError(f'unknown chat template {template!r}; expected one of {TEMPLATES}')


def stop_ids(template: Template, tokenizer) -> list[int]:
  """Tokens that end an assistant turn: EOS, and the template's end-of-turn tokens."""
  if isinstance(template, ChatTemplate):
    return template.stop_ids(tokenizer)
  if template == 'llama3':
    return [_llama3_ids(tokenizer)['<|eot_id|>'], tokenizer.eos_id]
  return [tokenizer.eos_id]
