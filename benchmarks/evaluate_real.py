"""Task quality of a real model on real data, next to simple baselines on the same examples.

    python benchmarks/prepare_real_data.py --out_dir=/tmp/evaldata     # once
    python benchmarks/smollm2.py --check=false                          # once
    python benchmarks/evaluate_real.py --data_dir=/tmp/evaldata --output=/tmp/evaluate_real.md

llm_jax (`llm_jax.evals`, plain prompts of `runner.BUILTIN_TASKS`, label words scored by
log-likelihood) evaluates the model on the first test examples of each task (--limit, or the
flag named below); the baselines see the same examples:
  prose           bits per byte of held-out Moby Dick chapters | gzip -9 of the same text
  sentiment/spam  zero-shot and --num_fewshot-shot | majority class of the train split, TF-IDF +
                  logistic regression (scikit-learn) trained on the whole train split
  xsum            ROUGE-1/2/L of a greedy summary (--xsum_limit) | the article's first sentence
  ddtp_en_de      BLEU and chrF of a greedy --num_fewshot-shot translation (--translation_limit)
                  | the untranslated English source
  multiple choice acc and acc_norm of a BIG-bench task | chance
Few-shot examples come from each train split, balanced over the classes, so zero- and few-shot
score the same test examples. The subsets are written as JSONL under --work_dir. Prints the
tables and writes them to --output as Markdown.
"""

import collections
import json
import os
import re
import sys
import time

from absl import app
from absl import flags
import numpy as np
from sklearn import feature_extraction
from sklearn import linear_model
from sklearn import pipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smollm2  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_jax.evals import data as data_lib  # pylint: disable=wrong-import-position
from llm_jax.evals import metrics  # pylint: disable=wrong-import-position
from llm_jax.evals import model_source  # pylint: disable=wrong-import-position
from llm_jax.evals import runner  # pylint: disable=wrong-import-position
from llm_jax.evals import scoring  # pylint: disable=wrong-import-position
from llm_jax.evals import tasks as tasks_lib  # pylint: disable=wrong-import-position

_HF_DIR = flags.DEFINE_string('hf_dir', smollm2.DEFAULT_DIR, 'Hugging Face Llama directory.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'What prepare_real_data.py wrote; default '
                                '$LLM_JAX_EVAL_DATA or ~/.cache/llm_jax/eval_data.')
_WORK_DIR = flags.DEFINE_string('work_dir', '/tmp/llm_jax_evaluate_real', 'Subsets go here.')
_OUTPUT = flags.DEFINE_string('output', None, 'Write the Markdown tables to this file.')
_PARTS = flags.DEFINE_list('parts', ['prose', 'classification', 'xsum', 'translation',
                                     'multiple_choice'], 'Which tables to produce.')
_LIMIT = flags.DEFINE_integer('limit', 100, 'Test examples of classification and multiple '
                             'choice.')
_XSUM_LIMIT = flags.DEFINE_integer('xsum_limit', 40, 'XSum articles (long, generated).')
_TRANSLATION_LIMIT = flags.DEFINE_integer('translation_limit', 64, 'DDTP test pairs.')
_NUM_FEWSHOT = flags.DEFINE_integer('num_fewshot', 4, 'Shots of the few-shot runs.')
_SPAM_CHARS = flags.DEFINE_integer('spam_chars', 300, 'Mails are cut to this many characters.')
_PROSE_CHAPTERS = flags.DEFINE_integer('prose_chapters', 4, 'Held-out Moby Dick chapters.')
_MC_TASK = flags.DEFINE_string('mc_task', 'social_iqa', 'BIG-bench multiple-choice task.')
_MAX_SEQ_LEN = flags.DEFINE_integer('max_seq_len', 1024, 'Longest input read (the rolling '
                                    'perplexity window; long prompts keep their end).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Requests per compiled call.')

_CLASSIFICATION = {'sentiment': 'text', 'spam': 'text'}


def _read(name: str) -> list[dict]:
  return data_lib.load_examples(name, root=_DATA_DIR.value or data_lib.data_dir())


def _write(name: str, rows: list[dict]) -> str:
  path = os.path.join(_WORK_DIR.value, name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(row, ensure_ascii=False) + '\n' for row in rows)
  return path


def _cut(rows: list[dict], field: str, max_chars: int) -> list[dict]:
  return [dict(row, **{field: row[field][:max_chars]}) for row in rows]


def _balanced_shots(rows: list[dict], k: int) -> list[dict]:
  """The first k rows taking the labels in turn (2 of each of 2 classes for k=4)."""
  by_label = collections.defaultdict(list)
  for row in rows:
    by_label[row['label']].append(row)
  labels = sorted(by_label)
  return [by_label[labels[i % len(labels)]][i // len(labels)] for i in range(k)]


def _spec(name: str, path: str, **fields) -> tasks_lib.TaskSpec:
  return tasks_lib.spec_from_dict(name, dict(runner.BUILTIN_TASKS[name], path=path, **fields))


def _timed(spec: tasks_lib.TaskSpec, model: tasks_lib.EvalModel) -> tuple[dict, float]:
  start = time.perf_counter()
  result = tasks_lib.run_task(spec, model)
  print(f'{spec.name} ({spec.num_fewshot}-shot): {time.perf_counter() - start:.0f} s',
        flush=True)
  return result, time.perf_counter() - start


def prose_table(model: tasks_lib.EvalModel) -> str:
  chapters = _read('moby_dick/test.jsonl')[:_PROSE_CHAPTERS.value]
  path = _write('moby_dick/test.jsonl', chapters)
  result, seconds = _timed(_spec('moby_dick', path), model)
  return '\n'.join([
      f'Held-out English prose: {len(chapters)} Moby Dick chapters of the test split '
      f'({result["num_bytes"]:,} bytes, {result["num_tokens"]:,} tokens; rolling windows of '
      f'{model.scorer.max_len} tokens).', '',
      '| model | bits per byte | perplexity per token | seconds |', '|---|---:|---:|---:|',
      f'| SmolLM2-135M-Instruct (llm_jax) | {result["bits_per_byte"]:.3f} | '
      f'{result["perplexity"]:.2f} | {seconds:.0f} |',
      f'| gzip -9 | {result["gzip_bits_per_byte"]:.3f} | | |'])


def _tfidf_predictions(train: list[dict], test: list[dict]) -> list[str]:
  classifier = pipeline.make_pipeline(
      feature_extraction.text.TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2),
                                              min_df=2),
      linear_model.LogisticRegression(max_iter=2000))
  classifier.fit([r['text'] for r in train], [r['label'] for r in train])
  return list(classifier.predict([r['text'] for r in test]))


def _classification_rows(name: str, model: tasks_lib.EvalModel) -> list[str]:
  cut = _SPAM_CHARS.value if name == 'spam' else 10**9
  train = _cut(_read(f'{name}/train.jsonl'), 'text', cut)
  test = _cut(_read(f'{name}/test.jsonl'), 'text', cut)[:_LIMIT.value]
  test_path = _write(f'{name}/test.jsonl', test)
  shots_path = _write(f'{name}/shots.jsonl', _balanced_shots(train, _NUM_FEWSHOT.value))
  references = [r['label'] for r in test]
  majority = collections.Counter(r['label'] for r in train).most_common(1)[0][0]
  labels = runner.BUILTIN_TASKS[name]['labels']
  figures = [(f'majority class of train ({majority})',
              metrics.classification([majority] * len(test), references, labels), None),
             (f'TF-IDF + logistic regression (train, {len(train)})',
              metrics.classification(_tfidf_predictions(train, test), references, labels), None)]
  for shots in (0, _NUM_FEWSHOT.value):
    result, seconds = _timed(_spec(name, test_path, num_fewshot=shots, fewshot_path=shots_path),
                             model)
    figures.append((f'SmolLM2 (llm_jax), {shots}-shot', result, seconds))
  return [f'| {name} | {method} | {r["num_examples"]} | {r["accuracy"]:.3f} | '
          f'{r["macro_f1"]:.3f} | {"" if s is None else f"{s:.0f}"} |'
          for method, r, s in figures]


def classification_table(model: tasks_lib.EvalModel) -> str:
  rows = [row for name in _CLASSIFICATION for row in _classification_rows(name, model)]
  return '\n'.join([
      f'Classification by label-word log-likelihood (first {_LIMIT.value} test examples; '
      f'mails cut to {_SPAM_CHARS.value} characters; few-shot examples from the train split, '
      'balanced).', '',
      '| task | method | examples | accuracy | macro F1 | seconds |',
      '|---|---|---:|---:|---:|---:|'] + rows)


def _first_sentence(text: str) -> str:
  return re.split(r'(?<=[.!?])\s+', text.strip(), maxsplit=1)[0]


def xsum_table(model: tasks_lib.EvalModel) -> str:
  test = _read('xsum/test.jsonl')[:_XSUM_LIMIT.value]
  path = _write('xsum/test.jsonl', test)
  lead = metrics.rouge([_first_sentence(r['document']) for r in test],
                       [r['summary'] for r in test])
  ours, seconds = _timed(_spec('xsum', path), model)
  row = lambda method, r, s: (f'| {method} | {r["rouge1"]:.1f} | {r["rouge2"]:.1f} | '
                              f'{r["rougeL"]:.1f} | {s} |')
  return '\n'.join([
      f'XSum summaries (first {len(test)} articles of BIG-bench gem/xsum; ROUGE F x100, '
      'rouge-score with stemming).', '',
      '| method | ROUGE-1 | ROUGE-2 | ROUGE-L | seconds |', '|---|---:|---:|---:|---:|',
      row('lead sentence', lead, ''),
      row('SmolLM2 (llm_jax), 0-shot, greedy', ours, f'{seconds:.0f}')])


def translation_table(model: tasks_lib.EvalModel) -> str:
  test = _read('ddtp_en_de/test.jsonl')[:_TRANSLATION_LIMIT.value]
  path = _write('ddtp_en_de/test.jsonl', test)
  shots_path = _write('ddtp_en_de/shots.jsonl', _read('ddtp_en_de/train.jsonl')[:16])
  copy = metrics.bleu_chrf([r['en'] for r in test], [r['de'] for r in test])
  shots = _NUM_FEWSHOT.value
  ours, seconds = _timed(_spec('ddtp_en_de', path, num_fewshot=shots, fewshot_path=shots_path),
                         model)
  return '\n'.join([
      f'English -> German package synopses (DDTP, first {len(test)} test pairs; sacrebleu '
      'defaults).', '',
      '| method | BLEU | chrF | seconds |', '|---|---:|---:|---:|',
      f'| copy the English source | {copy["bleu"]:.1f} | {copy["chrf"]:.1f} | |',
      f'| SmolLM2 (llm_jax), {shots}-shot, greedy | {ours["bleu"]:.1f} | {ours["chrf"]:.1f} | '
      f'{seconds:.0f} |'])


def multiple_choice_table(model: tasks_lib.EvalModel) -> str:
  name = _MC_TASK.value
  test = _read(runner.BUILTIN_TASKS[name]['path'])[:_LIMIT.value]
  path = _write(f'bigbench/{name}.jsonl', test)
  chance = float(np.mean([1 / len(r['choices']) for r in test]))
  ours, seconds = _timed(_spec(name, path), model)
  return '\n'.join([
      f'BIG-bench {name}, 0-shot (first {len(test)} examples; acc_norm divides by the '
      'choice\'s length in bytes, as lm-eval).', '',
      '| method | acc | acc_norm | seconds |', '|---|---:|---:|---:|',
      f'| chance | {chance:.3f} | {chance:.3f} | |',
      f'| SmolLM2 (llm_jax) | {ours["acc"]:.3f} | {ours["acc_norm"]:.3f} | {seconds:.0f} |'])


_TABLES = {'prose': prose_table, 'classification': classification_table, 'xsum': xsum_table,
           'translation': translation_table, 'multiple_choice': multiple_choice_table}


def main(argv):
  del argv
  unknown = set(_PARTS.value) - set(_TABLES)
  if unknown:
    raise app.UsageError(f'unknown parts {sorted(unknown)}; expected some of {sorted(_TABLES)}')
  config, params, tokenizer = model_source.load_model(hf_dir=_HF_DIR.value,
                                                      max_seq_len=_MAX_SEQ_LEN.value)
  scorer = scoring.Scorer(config, params, batch_size=_BATCH_SIZE.value)
  model = tasks_lib.EvalModel(config, scorer.params, tokenizer, scorer)
  tables = []
  for part in _PARTS.value:
    tables.append(_TABLES[part](model))
    print('\n' + tables[-1] + '\n', flush=True)
  if _OUTPUT.value:
    with open(_OUTPUT.value, 'w', encoding='utf-8') as f:
      f.write('\n\n'.join(tables) + '\n')


if __name__ == '__main__':
  app.run(main)
