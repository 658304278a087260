"""lm-evaluation-harness parity: the `llm_jax` model class against lm-eval's own `hf` class.

A random-weight transformers Llama and a byte-level BPE tokenizer are saved by the test; three
local task YAMLs (multiple choice, rolling perplexity, generate_until exact match) over local
JSONL files are run through `lm_eval.simple_evaluate` with both classes, offline.
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from llm_jax.evals import scoring

CORPUS = ['the quick brown fox jumps over the lazy dog.', 'hello there, how are you today?',
          'what is next? the answer is here.', 'a cat sat on the mat and looked at the dog.',
          'rain falls on the green hills in spring.'] * 20
MAX_POSITIONS = 48


def make_tiny_hf_dir(directory: str) -> transformers.LlamaForCausalLM:
  """Saves a random tiny Llama and its tokenizer (BOS added like Llama's); returns the model."""
  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=['<s>', '</s>', '<pad>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator(CORPUS, trainer)
  bpe.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[
      ('<s>', bpe.token_to_id('<s>'))])
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe, bos_token='<s>', eos_token='</s>', pad_token='<pad>')
  tokenizer.save_pretrained(directory)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=304, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
      bos_token_id=bpe.token_to_id('<s>'), eos_token_id=bpe.token_to_id('</s>'),
      pad_token_id=bpe.token_to_id('<pad>'),
      # Sharp logits: greedy choices are then far from ties that rounding could flip.
      initializer_range=0.3)
  model = transformers.LlamaForCausalLM(config).eval()
  model.save_pretrained(directory)
  return model


def write_jsonl(path, rows):
  with open(path, 'w', encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')


def write_task(directory, name, data_file, body: str):
  with open(os.path.join(directory, f'{name}.yaml'), 'w', encoding='utf-8') as f:
    f.write(f'task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n'
            f'    test: {data_file}\ntest_split: test\n{body}')


def greedy_text(model, tokenizer, context: str, num_tokens: int) -> str:
  """transformers' own greedy continuation of `context`, as text."""
  ids = tokenizer(context, return_tensors='pt')['input_ids']
  with torch.no_grad():
    out = model.generate(ids, max_new_tokens=num_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
  return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def write_tasks(directory: str, model, tokenizer) -> list[str]:
  """Multiple choice, rolling perplexity and generate_until tasks over local JSONL files."""
  contexts = ['the quick brown', 'hello there, how', 'a cat sat on']
  # One choice per question is transformers' greedy continuation, so is_greedy is exercised
  # (no delimiter: the choice follows the context exactly as generated).
  mc_rows = [{'question': c, 'choices': [' fox jumps', greedy_text(model, tokenizer, c, 3),
                                         ' is here.'], 'label': 0} for c in contexts]
  write_jsonl(os.path.join(directory, 'mc.jsonl'), mc_rows)
  write_task(directory, 'tiny_mc', os.path.join(directory, 'mc.jsonl'),
             'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ntarget_delimiter: ""\n'
             'doc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
             'metric_list:\n  - metric: acc\n  - metric: acc_norm\n')
  long_text = ' '.join(CORPUS[:6])  # longer than the model: several rolling windows
  write_jsonl(os.path.join(directory, 'ppl.jsonl'),
              [{'text': long_text}, {'text': 'the lazy dog.'}])
  write_task(directory, 'tiny_ppl', os.path.join(directory, 'ppl.jsonl'),
             'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
             'metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n')
  write_jsonl(os.path.join(directory, 'gen.jsonl'),
              [{'prompt': 'Q: what is next?\nA:', 'answer': ' the answer'},
               {'prompt': 'the quick', 'answer': ' brown'},
               {'prompt': 'rain falls on the green', 'answer': ' hills'}])
  write_task(directory, 'tiny_gen', os.path.join(directory, 'gen.jsonl'),
             'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
             'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n", "."]\n'
             '  max_gen_toks: 6\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n')
  return ['tiny_mc', 'tiny_ppl', 'tiny_gen']


@pytest.fixture(scope='module')
def tiny_hf_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('tiny_llama'))
  model = make_tiny_hf_dir(directory)
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  task_dir = os.path.join(directory, 'tasks')
  os.makedirs(task_dir)
  return directory, task_dir, write_tasks(task_dir, model, tokenizer)


def run_lm_eval(model, model_args, task_dir, tasks):
  import lm_eval  # pylint: disable=import-outside-toplevel
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  from llm_jax.evals import lm_eval_model  # pylint: disable=import-outside-toplevel,unused-import
  return lm_eval.simple_evaluate(
      model=model, model_args=model_args, tasks=tasks, log_samples=True,
      task_manager=TaskManager(include_path=task_dir, include_defaults=False),
      batch_size=1 if model == 'hf' else 4, device='cpu')


def responses(results, task):
  samples = sorted(results['samples'][task], key=lambda s: s['doc_id'])
  return [s['resps'] for s in samples]


@pytest.fixture(scope='module')
def both_runs(tiny_hf_dir):
  directory, task_dir, tasks = tiny_hf_dir
  ours = run_lm_eval('llm_jax', f'hf_dir={directory},mesh=2x2x2', task_dir, tasks)
  theirs = run_lm_eval('hf', f'pretrained={directory},dtype=float32', task_dir, tasks)
  return ours, theirs


def test_multiple_choice_loglikelihoods_and_greedy_flags_match_hf(both_runs):
  ours, theirs = (responses(r, 'tiny_mc') for r in both_runs)
  ours_flat = [resp[0] for doc in ours for resp in doc]
  theirs_flat = [resp[0] for doc in theirs for resp in doc]
  assert len(ours_flat) == 9
  np.testing.assert_allclose([float(lp) for lp, _ in ours_flat],
                             [float(lp) for lp, _ in theirs_flat], atol=1e-4, rtol=0)
  assert [g for _, g in ours_flat] == [g for _, g in theirs_flat]
  assert any(g for _, g in theirs_flat) and not all(g for _, g in theirs_flat)
  for metric in ('acc,none', 'acc_norm,none'):
    assert both_runs[0]['results']['tiny_mc'][metric] == both_runs[1]['results']['tiny_mc'][metric]


def test_rolling_loglikelihoods_match_hf_across_windows(both_runs):
  ours, theirs = (responses(r, 'tiny_ppl') for r in both_runs)
  np.testing.assert_allclose([float(doc[0][0]) for doc in ours],
                             [float(doc[0][0]) for doc in theirs], atol=1e-4, rtol=0)


def test_generations_are_identical_to_hf(both_runs):
  ours, theirs = (responses(r, 'tiny_gen') for r in both_runs)
  assert ours == theirs
  assert any(doc[0][0] for doc in theirs)  # not all empty: the comparison has content


def test_windows_equal_lm_eval_definition():
  from lm_eval import utils  # pylint: disable=import-outside-toplevel
  for length in (0, 1, 5, 16, 17, 40):
    tokens = list(range(10, 10 + length))
    for max_len in (1, 4, 16):
      expected = [utils.make_disjoint_window(w)
                  for w in utils.get_rolling_token_windows(tokens, 3, max_len, 1)]
      assert scoring.rolling_windows(tokens, 3, max_len) == expected, (length, max_len)


def test_lm_eval_command_line_runs_the_llm_jax_class(tiny_hf_dir, both_runs, tmp_path):
  directory, task_dir, _ = tiny_hf_dir
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, '-m', 'llm_jax.evals.lm_eval_cli', 'run', '--model', 'llm_jax',
       '--model_args', f'hf_dir={directory}', '--batch_size', '4', '--tasks', 'tiny_gen',
       '--include_path', task_dir, '--output_path', str(tmp_path), '--log_samples'],
      capture_output=True, text=True, timeout=300, cwd=repo,
      env=dict(os.environ, JAX_PLATFORMS='cpu', HF_DATASETS_OFFLINE='1'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert '|tiny_gen|' in result.stdout
  samples_files = glob.glob(str(tmp_path / '**' / 'samples_tiny_gen_*.jsonl'), recursive=True)
  assert len(samples_files) == 1, samples_files
  with open(samples_files[0], encoding='utf-8') as f:
    samples = sorted((json.loads(line) for line in f), key=lambda s: s['doc_id'])
  assert [s['resps'] for s in samples] == responses(both_runs[1], 'tiny_gen')
