"""`python -m llm_jax.evaluate` end to end on a tiny random Llama saved by the test.

Figures are checked against what transformers' PyTorch Llama (scores, greedy generations) and
scikit-learn / rouge-score compute for the same examples.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from rouge_score import rouge_scorer
from sklearn import metrics as sk_metrics

from evals_lm_eval_test import greedy_text, make_tiny_hf_dir, write_jsonl
from llm_jax.evals import tasks as tasks_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ['the quick brown fox jumps over the lazy dog.', 'rain falls on the green hills.',
         'hello there, how are you today?']
REVIEWS = [('a cat sat on the mat', 'good'), ('the lazy dog', 'bad'), ('hello there', 'good'),
           ('rain falls', 'bad'), ('the quick brown fox', 'good')]
PROMPT = 'Text: {text}\nLabel:'


def torch_logprob(model, ids: list[int], num_scored: int) -> float:
  """transformers' log-probability of the last `num_scored` tokens of `ids`."""
  with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].double()
  logprobs = torch.log_softmax(logits, -1)
  return float(sum(logprobs[t - 1, ids[t]] for t in range(len(ids) - num_scored, len(ids))))


@pytest.fixture(scope='module')
def evaluated(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('tiny_llama'))
  model = make_tiny_hf_dir(directory)
  data = str(tmp_path_factory.mktemp('data'))
  write_jsonl(os.path.join(data, 'prose.jsonl'), [{'text': t} for t in TEXTS])
  write_jsonl(os.path.join(data, 'reviews.jsonl'), [{'text': t, 'label': l} for t, l in REVIEWS])
  write_jsonl(os.path.join(data, 'pairs.jsonl'),
              [{'source': t, 'target': t.upper()} for t in TEXTS])
  write_jsonl(os.path.join(data, 'mc.jsonl'),
              [{'question': 'the quick', 'choices': [' brown', ' dog'], 'label': 0}])
  task_file = os.path.join(data, 'tasks.json')
  with open(task_file, 'w', encoding='utf-8') as f:
    json.dump({
        'prose': {'kind': 'perplexity', 'path': 'prose.jsonl'},
        'reviews': {'kind': 'classification', 'path': 'reviews.jsonl', 'prompt': PROMPT,
                    'labels': ['bad', 'good']},
        'reviews_chat': {'kind': 'classification', 'path': 'reviews.jsonl', 'prompt': PROMPT,
                         'method': 'generate', 'chat_template': 'llama2', 'num_fewshot': 1,
                         'max_new_tokens': 4},
        'summaries': {'kind': 'summarization', 'path': 'pairs.jsonl', 'prompt': '{source}',
                      'answer_field': 'target', 'max_new_tokens': 5},
        'translations': {'kind': 'translation', 'path': 'pairs.jsonl', 'prompt': '{source}',
                         'answer_field': 'target', 'max_new_tokens': 5},
        'mc': {'kind': 'multiple_choice', 'path': 'mc.jsonl', 'prompt': '{question}'},
    }, f)
  out = os.path.join(data, 'out')
  result = subprocess.run(
      [sys.executable, '-m', 'llm_jax.evaluate', f'--hf_dir={directory}',
       '--tasks=prose,reviews,reviews_chat,summaries,translations,mc',
       f'--task_file={task_file}', f'--data_dir={data}', f'--output_dir={out}',
       '--batch_size=4'],
      capture_output=True, text=True, timeout=300, cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(out, 'results.json'), encoding='utf-8') as f:
    results = json.load(f)
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  return results, result.stdout, out, model, tokenizer


def test_bits_per_byte_equals_transformers_log_likelihood(evaluated):
  results, _, _, model, tokenizer = evaluated
  total = sum(torch_logprob(model, tokenizer(t)['input_ids'], len(tokenizer(t)['input_ids']) - 1)
              for t in TEXTS)
  num_bytes = sum(len(t.encode()) for t in TEXTS)
  assert results['prose']['bits_per_byte'] == pytest.approx(-total / math.log(2) / num_bytes,
                                                            rel=1e-5)


def test_classification_by_score_matches_transformers_choices(evaluated):
  results, _, _, model, tokenizer = evaluated
  predictions = []
  for text, _ in REVIEWS:
    prompt = PROMPT.format(text=text)
    context = tokenizer(prompt)['input_ids']
    scores = []
    for label in ('bad', 'good'):
      whole = tokenizer(f'{prompt} {label}')['input_ids']
      assert whole[:len(context)] == context
      scores.append(torch_logprob(model, whole, len(whole) - len(context)))
    predictions.append(('bad', 'good')[int(np.argmax(scores))])
  references = [label for _, label in REVIEWS]
  figures = results['reviews']
  assert figures['accuracy'] == pytest.approx(sk_metrics.accuracy_score(references, predictions))
  assert figures['confusion_matrix'] == sk_metrics.confusion_matrix(
      references, predictions, labels=['bad', 'good']).tolist()
  assert results['reviews_chat']['num_examples'] == len(REVIEWS) - 1  # one became the shot


def test_summaries_score_transformers_greedy_generations(evaluated):
  results, _, _, model, tokenizer = evaluated
  generations = [greedy_text(model, tokenizer, t, 5).lstrip().split('\n')[0].strip()
                 for t in TEXTS]
  scorer = rouge_scorer.RougeScorer(['rouge1', 'rougeL'], use_stemmer=True)
  scores = [scorer.score(t.upper(), g) for g, t in zip(generations, TEXTS)]
  for name in ('rouge1', 'rougeL'):
    assert results['summaries'][name] == pytest.approx(
        100 * np.mean([s[name].fmeasure for s in scores]))


def test_tables_are_printed_and_written(evaluated):
  results, stdout, out, _, _ = evaluated
  assert set(results) == {'prose', 'reviews', 'reviews_chat', 'summaries', 'translations', 'mc'}
  assert '| prose | perplexity | bits_per_byte |' in stdout
  assert '| translations | translation | chrf |' in stdout
  with open(os.path.join(out, 'results.md'), encoding='utf-8') as f:
    assert f.read() == stdout
  assert 0.0 <= results['mc']['acc'] <= 1.0


def test_bad_task_definitions_name_the_problem():
  with pytest.raises(ValueError, match="unknown keys \\['promt'\\]"):
    tasks_lib.spec_from_dict('t', {'kind': 'classification', 'path': 'x.jsonl', 'promt': ''})
  with pytest.raises(ValueError, match="kind='ranking'"):
    tasks_lib.spec_from_dict('t', {'kind': 'ranking', 'path': 'x.jsonl'})
