"""SFT data: only assistant tokens are targets, prompts never move the loss, packing isolates
conversations, and truncation is counted."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from llm_jax import model as model_lib
from llm_jax.data import chat_templates
from llm_jax.data import sft
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.training import steps

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
EXAMPLES = [
    {'messages': [{'role': 'system', 'content': 'be brief'},
                  {'role': 'user', 'content': 'hello there'},
                  {'role': 'assistant', 'content': 'the quick fox'},
                  {'role': 'user', 'content': 'how are you?'},
                  {'role': 'assistant', 'content': 'the lazy dog'}]},
    {'prompt': 'what is next?', 'completion': 'the answer is here.'},
    {'messages': [{'role': 'user', 'content': 'jumps over'},
                  {'role': 'assistant', 'content': 'brown dog'}]},
]
# The text each example contributes as targets, read off the examples themselves.
ASSISTANT_TEXT = ['the quick fox<|im_end|>\nthe lazy dog<|im_end|>\n',
                  'the answer is here.<|im_end|>\n', 'brown dog<|im_end|>\n']
CONFIG = model_lib.ModelConfig(vocab_size=320, embed_dim=32, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=128)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  directory = tmp_path_factory.mktemp('tok')
  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=['<|endoftext|>', '<|im_start|>',
                                                                '<|im_end|>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator(['the quick brown fox jumps over the lazy dog', 'hello there, how '
                           'are you? what is next? the answer is here.'] * 20, trainer)
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token='<|endoftext|>',
                                            eos_token='<|im_end|>', pad_token='<|endoftext|>',
                                            chat_template=CHATML)
  hf.save_pretrained(str(directory))
  data = directory / 'train.jsonl'
  data.write_text('\n'.join(json.dumps(e) for e in EXAMPLES) + '\n')
  tokenizer = tokenizer_lib.load_tokenizer(str(directory))
  template = chat_templates.template_from_directory(str(directory))
  return hf, tokenizer, template, str(data)


def test_only_assistant_tokens_are_targets(setup):
  hf, tokenizer, template, path = setup
  conversations = list(sft.read_jsonl(sft.expand_paths(path)))
  rows, stats = sft.build_rows(conversations, template, tokenizer, seq_len=96)
  assert stats.conversations == 3 and stats.dropped == 0 and stats.truncated == 0
  targets = []
  for row in rows:
    for segment in range(1, row['segment_ids'].max() + 1):
      in_segment = (row['segment_ids'] == segment) & (row['loss_mask'] > 0)
      targets.append(hf.decode(row['targets'][in_segment]))
      # Positions restart at every conversation.
      assert row['positions'][row['segment_ids'] == segment][0] == 0
  assert targets == ASSISTANT_TEXT
  _, last_only = sft.build_rows(conversations, template, tokenizer, seq_len=96,
                                assistant_turns='last')
  only_last = len(hf('the lazy dog<|im_end|>\n')['input_ids'])
  assert stats.target_tokens - last_only.target_tokens == (
      len(hf('the quick fox<|im_end|>\n')['input_ids']))
  assert only_last < stats.target_tokens


def test_prompt_targets_change_neither_loss_nor_gradients(setup):
  _, tokenizer, template, path = setup
  rows, _ = sft.build_rows(sft.read_jsonl([path]), template, tokenizer, seq_len=96)
  batch = steps_batch(rows)
  params = model_lib.unbox(model_lib.Transformer(CONFIG).init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  gradients = jax.jit(steps.accumulate_gradients, static_argnums=(2, 3, 4))
  grads, ce_sum, tokens = gradients(params, batch, CONFIG, 0.0, 1)
  rng = np.random.default_rng(0)
  changed = dict(batch)
  noise = rng.integers(0, CONFIG.vocab_size, batch['targets'].shape)
  changed['targets'] = np.where(batch['loss_mask'] > 0, batch['targets'], noise).astype(np.int32)
  assert (changed['targets'] != batch['targets']).sum() > 20
  grads2, ce_sum2, tokens2 = gradients(params, changed, CONFIG, 0.0, 1)
  assert float(ce_sum) == float(ce_sum2) and float(tokens) == float(tokens2)
  jax.tree.map(np.testing.assert_array_equal, grads, grads2)
  # An assistant target does move the loss.
  changed['targets'] = np.where(batch['loss_mask'] > 0, noise, batch['targets']).astype(np.int32)
  _, ce_sum3, _ = gradients(params, changed, CONFIG, 0.0, 1)
  assert float(ce_sum3) != float(ce_sum)


def steps_batch(rows):
  batch = {key: np.stack([r[key] for r in rows]) for key in steps.BATCH_KEYS}
  return batch


def test_packed_conversations_do_not_attend_across(setup):
  _, tokenizer, template, path = setup
  rows, _ = sft.build_rows(sft.read_jsonl([path]), template, tokenizer, seq_len=128)
  row = rows[0]
  assert row['segment_ids'].max() >= 2
  model = model_lib.Transformer(CONFIG)
  params = model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))['params']
  apply = jax.jit(lambda tokens, positions, segments: model.apply(
      {'params': params}, tokens, positions=positions, segment_ids=segments))
  packed = apply(row['inputs'][None], row['positions'][None], row['segment_ids'][None])[0]
  for segment in range(1, row['segment_ids'].max() + 1):
    where = row['segment_ids'] == segment
    length = int(where.sum())
    # The conversation alone, first in a row of the same length (causal: the padding after it
    # cannot change its logits).
    alone_tokens = np.zeros_like(row['inputs'])
    alone_tokens[:length] = row['inputs'][where]
    positions = np.arange(len(alone_tokens), dtype=np.int32)
    alone = apply(alone_tokens[None], positions[None], np.ones_like(alone_tokens)[None])[0]
    np.testing.assert_allclose(packed[where], alone[:length], atol=1e-5)


def test_truncation_is_stated_and_counted(setup):
  _, tokenizer, template, _ = setup
  long_answer = [{'role': 'user', 'content': 'hello'},
                 {'role': 'assistant', 'content': 'the quick brown fox ' * 20}]
  long_prompt = [{'role': 'user', 'content': 'the lazy dog ' * 20},
                 {'role': 'assistant', 'content': 'yes'}]
  rows, stats = sft.build_rows([long_answer, long_prompt], template, tokenizer, seq_len=32)
  assert (stats.truncated, stats.dropped, stats.rows) == (2, 1, 1)
  assert rows[0]['segment_ids'].min() == 1  # the kept conversation fills its row
  _, stats = sft.build_rows([long_answer], template, tokenizer, seq_len=32, truncation='drop')
  assert (stats.truncated, stats.dropped, stats.rows) == (0, 1, 0)


def test_bad_lines_are_named(setup, tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"text": "x"}\n')
  with pytest.raises(ValueError, match=r'bad.jsonl:2: expected "messages"'):
    list(sft.read_jsonl([str(path)]))
  path.write_text('{"messages": [{"role": "robot", "content": "hi"}]}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:1: messages\[0\] has role 'robot'"):
    list(sft.read_jsonl([str(path)]))


def test_batches_have_the_pretraining_keys(setup):
  _, tokenizer, template, path = setup
  rows, _ = sft.build_rows(sft.read_jsonl([path]), template, tokenizer, seq_len=64)
  iterator = iter(sft.make_dataset(rows, 2, seed=0))
  batch = next(iterator)
  assert sorted(batch) == sorted(steps.BATCH_KEYS)
  assert batch['inputs'].shape == (2, 64)
  state = iterator.get_state()
  following = next(iterator)
  iterator.set_state(state)
  np.testing.assert_array_equal(next(iterator)['inputs'], following['inputs'])


def test_docstring_task_is_made_from_source_files():
  source = ('def add(a, b=1):\n  """Adds two numbers.\n\n  More text.\n  """\n  return a + b\n\n'
            'def _hidden():\n  """Private."""\n\n'
            'def bare():\n  return 0\n')
  conversations = list(sft.docstring_conversations(['not python (', source], limit=10))
  assert conversations == [[
      {'role': 'user', 'content': 'Write the docstring of this Python function:\n'
                                  'def add(a, b=1):'},
      {'role': 'assistant', 'content': 'Adds two numbers.'}]]
