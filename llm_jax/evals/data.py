"""Reading evaluation examples: local JSONL or CSV files, or a prepared TFDS dataset.

A path is `file.jsonl` (one JSON object per line), `file.csv` (a header row, then one example
per row) or `tfds:NAME[/CONFIG]:SPLIT` (a dataset `tfds build` has prepared as ArrayRecord, read
with `tfds.data_source`; byte strings become text). Relative file paths are resolved against a
data directory (where `benchmarks/prepare_real_data.py` writes the real datasets).
"""

import csv
import json
import os
from typing import Optional

DEFAULT_DATA_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'llm_jax', 'eval_data')


def data_dir() -> str:
  """$LLM_JAX_EVAL_DATA, else ~/.cache/llm_jax/eval_data."""
  return os.environ.get('LLM_JAX_EVAL_DATA') or DEFAULT_DATA_DIR


def _read_jsonl(path: str) -> list[dict]:
  rows = []
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{number}: not valid JSON ({e.msg})') from e
      if not isinstance(row, dict):
        raise ValueError(f'{path}:{number}: expected a JSON object, got {type(row).__name__}')
      rows.append(row)
  return rows


def _read_csv(path: str) -> list[dict]:
  with open(path, encoding='utf-8-sig', newline='') as f:
    return [dict(row) for row in csv.DictReader(f)]


def _text(value):
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if hasattr(value, 'tolist'):
    return _text(value.tolist())
  if isinstance(value, list):
    return [_text(v) for v in value]
  return value


def _read_tfds(spec: str) -> list[dict]:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  try:
    name, split = spec.rsplit(':', 1)
  except ValueError as e:
    raise ValueError(f'tfds:{spec}: expected tfds:NAME[/CONFIG]:SPLIT') from e
  source = tfds.data_source(name, split=split)
  return [{key: _text(value) for key, value in source[i].items()} for i in range(len(source))]


def load_examples(path: str, *, root: Optional[str] = None, limit: int = 0) -> list[dict]:
  """The examples of `path` as dicts (the first `limit` only when limit > 0)."""
  if path.startswith('tfds:'):
    rows = _read_tfds(path[len('tfds:'):])
  else:
    full = path if os.path.isabs(path) else os.path.join(root or data_dir(), path)
    if not os.path.exists(full):
      raise FileNotFoundError(f'evaluation data {full} does not exist (run '
                              'benchmarks/prepare_real_data.py for the built-in tasks)')
    if full.endswith('.jsonl'):
      rows = _read_jsonl(full)
    elif full.endswith('.csv'):
      rows = _read_csv(full)
    else:
      raise ValueError(f'evaluation data {full}: expected a .jsonl or .csv file or tfds:NAME:SPLIT')
  if not rows:
    raise ValueError(f'evaluation data {path} has no examples')
  return rows[:limit] if limit > 0 else rows
