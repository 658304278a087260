"""`python -m llm_jax.sample` on a tiny Hugging Face directory, and the chat templates.

The templates are checked against the Jinja chat templates published with Meta's Llama 2 and
Llama 3 Hugging Face checkpoints, rendered with jinja2.
"""

import json
import os
import re
import subprocess
import sys

import jinja2
import pytest
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from llm_jax.data import chat_templates
from llm_jax.data import tokenizer as tokenizer_lib

LLAMA3_SPECIAL = ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>',
                  '<|end_header_id|>', '<|eot_id|>']
# From meta-llama/Meta-Llama-3-8B-Instruct and meta-llama/Llama-2-7b-chat-hf tokenizer_config.
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA2_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")
CONVERSATION = [
    {'role': 'system', 'content': 'You are terse.'},
    {'role': 'user', 'content': ' Hi there! '},
    {'role': 'assistant', 'content': 'Hello.\n'},
    {'role': 'user', 'content': 'What is 2+2?'},
]


class CharTokenizer:
  """One id per character, special tokens by name: decode(encode(x)) == x, whatever the split."""
  vocab_size = 2000

  def __init__(self, bos, eos, specials=()):
    self.names = [bos, eos] + list(specials)
    self.bos_id, self.eos_id = 1000, 1001

  def encode(self, text):
    if text in self.names:
      return [1000 + self.names.index(text)]
    return [ord(c) for c in text]

  def decode(self, ids):
    return ''.join(self.names[i - 1000] if i >= 1000 else chr(i) for i in ids)


@pytest.mark.parametrize('template, jinja, tokenizer', [
    ('llama3', LLAMA3_JINJA, CharTokenizer('<|begin_of_text|>', '<|end_of_text|>',
                                           LLAMA3_SPECIAL[2:])),
    ('llama2', LLAMA2_JINJA, CharTokenizer('<s>', '</s>')),
], ids=['llama3', 'llama2'])
def test_chat_templates_render_like_the_published_ones(template, jinja, tokenizer):
  for messages in (CONVERSATION, CONVERSATION[1:2]):
    expected = jinja2.Template(jinja).render(
        messages=messages, bos_token=tokenizer.names[0], eos_token=tokenizer.names[1],
        add_generation_prompt=True)
    ids = chat_templates.build_prompt(template, tokenizer, messages)
    assert tokenizer.decode(ids) == expected
  assert chat_templates.detect(tokenizer) == template


def test_chat_template_rejects_bad_turns():
  tokenizer = CharTokenizer('<s>', '</s>')
  with pytest.raises(ValueError, match='must end with a user message'):
    chat_templates.build_prompt('llama2', tokenizer, CONVERSATION[:3])
  with pytest.raises(ValueError, match='message 1 has role'):
    chat_templates.build_prompt('llama2', tokenizer, [CONVERSATION[1], CONVERSATION[1]])


def make_hf_directory(directory):
  """A random tiny Llama with a byte-level BPE tokenizer.json that has Llama 3's tokens."""
  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=LLAMA3_SPECIAL,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = ['the quick brown fox jumps over the lazy dog', 'hello there, how are you?',
            'what is next? the answer is here.'] * 20
  bpe.train_from_iterator(corpus, trainer)
  bpe.save(os.path.join(directory, 'tokenizer.json'))
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=304, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
  model.save_pretrained(directory)


def test_chat_keeps_the_conversation_across_turns(tmp_path):
  make_hf_directory(str(tmp_path))
  transcript = tmp_path / 'chat.json'
  result = subprocess.run(
      [sys.executable, '-m', 'llm_jax.sample', f'--hf_dir={tmp_path}', '--chat',
       '--system=Answer briefly.', '--max_new_tokens=6', '--chunk_size=4', '--temperature=0',
       f'--transcript={transcript}'],
      input='hello there\nwhat is next?\n', capture_output=True, text=True, timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert '[llama3 chat' in result.stderr
  messages = json.loads(transcript.read_text())
  assert [m['role'] for m in messages] == ['system', 'user', 'assistant', 'user', 'assistant']
  assert messages[3]['content'] == 'what is next?'
  for reply in (messages[2]['content'], messages[4]['content']):
    assert reply.strip() in result.stdout
  tokenizer = tokenizer_lib.load_tokenizer(str(tmp_path / 'tokenizer.json'))
  prompt_lengths = [int(n) for n in re.findall(r'\[(\d+) prompt tokens', result.stderr)]
  # The second prompt holds the system prompt, the first question and the model's answer.
  assert prompt_lengths == [
      len(chat_templates.llama3_prompt(tokenizer, messages[:2])),
      len(chat_templates.llama3_prompt(tokenizer, messages[:4]))]


# A Llama 3 style template of a directory's own, with a default system prompt the built-in
# format does not have: the CLI must render this one.
OWN_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nBe tiny.<|eot_id|>' }}{% endif %}"
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")


def test_chat_uses_the_directory_template(tmp_path):
  make_hf_directory(str(tmp_path))
  (tmp_path / 'chat_template.jinja').write_text(OWN_TEMPLATE)
  transcript = tmp_path / 'chat.json'
  result = subprocess.run(
      [sys.executable, '-m', 'llm_jax.sample', f'--hf_dir={tmp_path}', '--chat',
       '--max_new_tokens=4', '--chunk_size=4', '--temperature=0', f'--transcript={transcript}'],
      input='hello there\n', capture_output=True, text=True, timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'chat_template.jinja chat' in result.stderr
  reference = transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(tmp_path / 'tokenizer.json'), bos_token='<|begin_of_text|>',
      eos_token='<|end_of_text|>', chat_template=OWN_TEMPLATE)
  messages = json.loads(transcript.read_text())[:1]
  expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)['input_ids']
  prompt_lengths = [int(n) for n in re.findall(r'\[(\d+) prompt tokens', result.stderr)]
  assert prompt_lengths == [len(expected)]


def _sample(directory, *flags_):
  return subprocess.run(
      [sys.executable, '-m', 'llm_jax.sample', f'--hf_dir={directory}', *flags_],
      capture_output=True, text=True, timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      env=dict(os.environ, JAX_PLATFORMS='cpu'))


LONG_PROMPT = 'the quick brown fox jumps over the lazy dog. ' * 30 + 'what is next? the answer'


def test_too_long_prompt_is_one_line_without_the_prompt(tmp_path):
  make_hf_directory(str(tmp_path))
  result = _sample(tmp_path, f'--prompt={LONG_PROMPT}', '--max_new_tokens=4')
  assert result.returncode == 1
  assert result.stderr.strip().count('\n') == 0, result.stderr[-3000:]
  assert 'at most 124 fit with --max_new_tokens=4' in result.stderr  # max_seq_len 128
  assert '--truncate=left' in result.stderr
  assert 'lazy dog' not in result.stderr + result.stdout


def test_beam_search_needs_no_sampling_flags_and_truncate_keeps_the_end(tmp_path):
  make_hf_directory(str(tmp_path))
  result = _sample(tmp_path, f'--prompt={LONG_PROMPT}', '--max_new_tokens=4', '--num_beams=2',
                   '--truncate=left')
  assert result.returncode == 0, result.stderr[-3000:]
  tokenizer = tokenizer_lib.load_tokenizer(str(tmp_path / 'tokenizer.json'))
  total = len(tokenizer.encode(LONG_PROMPT))
  assert f'kept its last 123 of {total} tokens' in result.stderr  # 124 positions, BOS first
  kept = tokenizer.decode(tokenizer.encode(LONG_PROMPT)[-123:])
  assert result.stdout.startswith(kept) and kept.endswith('what is next? the answer')

  # Sampling flags given explicitly are not overridden: beam search refuses them, in one line.
  result = _sample(tmp_path, '--prompt=hello there', '--max_new_tokens=4', '--num_beams=2',
                   '--temperature=0.7')
  assert result.returncode == 1
  assert result.stderr.strip().count('\n') == 0, result.stderr[-3000:]
  assert 'temperature' in result.stderr
