"""Runs named tasks on a model and writes the results as JSON and a Markdown table.

Tasks come from `BUILTIN_TASKS` (over the files `benchmarks/prepare_real_data.py` writes into
the evaluation data directory) or from a task file: a JSON object mapping task names to
TaskSpec fields, e.g.

    {"reviews": {"kind": "classification", "path": "/data/reviews.jsonl",
                 "prompt": "Review: {text}\\nSentiment:", "labels": ["negative", "positive"]}}
"""

import json
import os
from typing import Optional, Sequence

from llm_jax.evals import model_source
from llm_jax.evals import tasks as tasks_lib

_SENTIMENT_PROMPT = 'Review: {text}\nIs this review positive or negative? Answer:'
_SPAM_PROMPT = 'Email: {text}\nIs this email spam or ham? Answer:'
BUILTIN_TASKS = {
    'moby_dick': dict(kind='perplexity', path='moby_dick/test.jsonl'),
    'sentiment': dict(kind='classification', path='sentiment/test.jsonl',
                      prompt=_SENTIMENT_PROMPT, labels=('negative', 'positive')),
    'spam': dict(kind='classification', path='spam/test.jsonl', prompt=_SPAM_PROMPT,
                 labels=('ham', 'spam')),
    'xsum': dict(kind='summarization', path='xsum/test.jsonl',
                 prompt='Article: {document}\nOne-sentence summary:', answer_field='summary'),
    'ddtp_en_de': dict(kind='translation', path='ddtp_en_de/test.jsonl',
                       prompt='English: {en}\nGerman:', answer_field='de', max_new_tokens=48),
    'social_iqa': dict(kind='multiple_choice', path='bigbench/social_iqa.jsonl',
                       prompt='{question}\nAnswer:'),
    'winowhy': dict(kind='multiple_choice', path='bigbench/winowhy.jsonl',
                    prompt='{question}\nAnswer:'),
    'timedial': dict(kind='multiple_choice', path='bigbench/timedial.jsonl',
                     prompt='{question}\nAnswer:'),
}


def load_specs(names: Sequence[str], task_file: Optional[str] = None,
               overrides: Optional[dict] = None) -> list[tasks_lib.TaskSpec]:
  """TaskSpecs of `names` from the task file, else the built-in tasks.

  Args:
    names: task names.
    task_file: a JSON file of {name: TaskSpec fields}.
    overrides: fields replaced in every task (e.g. {'limit': 50, 'num_fewshot': 5}).
  """
  available = dict(BUILTIN_TASKS)
  if task_file:
    with open(task_file, encoding='utf-8') as f:
      try:
        from_file = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f'task file {task_file}: not valid JSON ({e})') from e
    if not isinstance(from_file, dict):
      raise ValueError(f'task file {task_file}: expected a JSON object of tasks')
    available.update(from_file)
  specs = []
  for name in names:
    if name not in available:
      raise ValueError(f'unknown task {name!r}; known: {sorted(available)}')
    specs.append(tasks_lib.spec_from_dict(name, dict(available[name], **(overrides or {}))))
  return specs


def evaluate(model: tasks_lib.EvalModel, specs: Sequence[tasks_lib.TaskSpec],
             root: Optional[str] = None) -> dict:
  """{task name: metrics} for each spec."""
  return {spec.name: dict(tasks_lib.run_task(spec, model, root), kind=spec.kind)
          for spec in specs}


def _scalar_rows(results: dict):
  for name, figures in results.items():
    for metric, value in figures.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        yield name, figures['kind'], metric, value


def markdown(results: dict) -> str:
  """A Markdown table of every scalar figure, then each confusion matrix."""
  lines = ['| task | kind | metric | value |', '|---|---|---|---:|']
  for name, kind, metric, value in _scalar_rows(results):
    shown = str(value) if isinstance(value, int) else f'{value:.4f}'
    lines.append(f'| {name} | {kind} | {metric} | {shown} |')
  for name, figures in results.items():
    if 'confusion_matrix' in figures:
      labels = figures['labels']
      lines += ['', f'Confusion matrix of {name} (rows: truth, columns: prediction)', '',
                '| | ' + ' | '.join(labels) + ' |', '|---' * (len(labels) + 1) + '|']
      lines += [f'| {label} | ' + ' | '.join(str(n) for n in row) + ' |'
                for label, row in zip(labels, figures['confusion_matrix'])]
  return '\n'.join(lines) + '\n'


def write_results(results: dict, output_dir: str) -> tuple[str, str]:
  """Writes results.json and results.md into `output_dir`; returns their paths."""
  os.makedirs(output_dir, exist_ok=True)
  json_path = os.path.join(output_dir, 'results.json')
  md_path = os.path.join(output_dir, 'results.md')
  with open(json_path, 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=1, ensure_ascii=False)
  with open(md_path, 'w', encoding='utf-8') as f:
    f.write(markdown(results))
  return json_path, md_path


def run(*, tasks: Sequence[str], workdir: Optional[str] = None, hf_dir: Optional[str] = None,
        tokenizer: Optional[str] = None, task_file: Optional[str] = None,
        output_dir: Optional[str] = None, mesh=None, batch_size: int = 8,
        data_dir: Optional[str] = None, overrides: Optional[dict] = None) -> dict:
  """Loads a model, evaluates `tasks`, writes results.json/.md into `output_dir` when given."""
  specs = load_specs(tasks, task_file, overrides)
  config, params, tokenizer_impl = model_source.load_model(
      workdir=workdir, hf_dir=hf_dir, tokenizer_path=tokenizer)
  model = tasks_lib.EvalModel.create(config, params, tokenizer_impl,
                                     mesh=model_source.parse_mesh(mesh), batch_size=batch_size,
                                     model_dir=hf_dir or workdir)
  results = evaluate(model, specs, data_dir)
  if output_dir:
    write_results(results, output_dir)
  return results
