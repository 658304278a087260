"""launch/sweep.py: the product of overrides becomes one command and workdir per run."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import colors
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SPEC = importlib.util.spec_from_file_location('sweep', os.path.join(ROOT, 'launch', 'sweep.py'))
sweep = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(sweep)


def test_product_of_axes_gives_one_run_per_combination():
  axes = sweep.parse_axes(['optim.learning_rate=1e-3,3e-3', 'model.num_layers=2,4,6'])
  runs = sweep.commands('configs/default.py', '/tmp/s', axes, ['train.num_steps=10'])
  assert len(runs) == 6
  workdirs = [w for w, _ in runs]
  assert len(set(workdirs)) == 6
  assert '/tmp/s/learning_rate=3e-3_num_layers=4' in workdirs
  argv = dict(runs)['/tmp/s/learning_rate=3e-3_num_layers=4']
  assert '--config.optim.learning_rate=3e-3' in argv
  assert '--config.model.num_layers=4' in argv
  assert '--config.train.num_steps=10' in argv


def test_malformed_sweep_is_refused_with_the_spec_named():
  with pytest.raises(ValueError, match='optim.learning_rate'):
    sweep.parse_axes(['optim.learning_rate'])


def test_summary_table_reports_missing_runs(tmp_path):
  ok = tmp_path / 'a'
  ok.mkdir()
  (ok / 'summary.json').write_text('{"step": 5, "eval_loss": 2.5}')
  table = sweep.summary_table([str(ok), str(tmp_path / 'b')])
  assert '| a | 5 | 2.5 |' in table
  assert 'b | (no summary.json' in table


def _write_summary(workdir, **figures):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump({'step': 4, **figures}, f)
  return str(workdir)


def test_summary_table_sorts_by_any_metric(tmp_path):
  runs = [_write_summary(tmp_path / 'a', eval_loss=3.0, tokens_per_second=100.0,
                         gzip_bits_per_byte=2.0),
          str(tmp_path / 'failed'),
          _write_summary(tmp_path / 'b', eval_loss=2.0, tokens_per_second=300.0,
                         gzip_bits_per_byte=2.0),
          _write_summary(tmp_path / 'c', eval_loss=2.5, tokens_per_second=200.0,
                         gzip_bits_per_byte=2.0)]

  def order(sort_by):
    rows = sweep.summary_table(runs, sort_by).splitlines()[2:]
    return [row.split('|')[1].strip() for row in rows]

  assert order(None) == ['a', 'failed', 'b', 'c']
  assert order('eval_loss') == ['b', 'c', 'a', 'failed']
  assert order('-tokens_per_second') == ['b', 'c', 'a', 'failed']
  header = sweep.summary_table(runs, 'gzip_bits_per_byte').splitlines()[0]
  assert header.endswith('| gzip_bits_per_byte |')  # a key outside the default columns
  with pytest.raises(ValueError, match="'eval_los'.*'eval_loss'"):
    sweep.summary_table(runs, 'eval_los')


TINY_TOKENIZER = ['model.vocab_size=320', 'data.tokenizer_train_bytes=20000']


def test_one_tokenizer_per_sweep_passed_to_every_run(tmp_path):
  root = str(tmp_path / 'sweep')
  axes = sweep.parse_axes(['optim.learning_rate=1e-3,3e-3'])
  path = sweep.shared_tokenizer('configs/default.py', root, axes, TINY_TOKENIZER)
  assert path == os.path.join(root, 'tokenizer.model')
  assert os.path.getsize(path) > 0
  from llm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  assert tokenizer_lib.load_tokenizer(path, 'sentencepiece').vocab_size == 320
  runs = sweep.commands('configs/default.py', root, axes,
                        TINY_TOKENIZER + [f'data.tokenizer_path={path}'])
  for _, argv in runs:
    assert f'--config.data.tokenizer_path={path}' in argv

  # A sweep over the vocabulary needs one tokenizer per run.
  other = str(tmp_path / 'vocab_sweep')
  vocab_axes = sweep.parse_axes(['model.vocab_size=320,384'])
  assert sweep.shared_tokenizer('configs/default.py', other, vocab_axes, TINY_TOKENIZER) is None
  assert not os.path.exists(other)
  # A config that loads a given tokenizer already shares it.
  assert sweep.shared_tokenizer('configs/default.py', other, axes,
                                TINY_TOKENIZER + [f'data.tokenizer_path={path}']) is None


def test_report_prints_the_sorted_table_and_plots_the_runs(tmp_path):
  root = tmp_path / 'sweep'
  for name, losses in (('learning_rate=1e-3', [5.0, 4.5]), ('learning_rate=3e-3', [5.0, 3.0])):
    workdir = root / name
    _write_summary(workdir, eval_loss=losses[-1])
    with open(workdir / 'metrics.jsonl', 'w') as f:
      for step, loss in enumerate(losses, 1):
        f.write(json.dumps({'step': step, 'train/loss': loss}) + '\n')
      f.write(json.dumps({'step': 2, 'eval/loss': losses[-1]}) + '\n')
  result = subprocess.run(
      [sys.executable, 'launch/sweep.py', f'--workdir_root={root}', '--report', '--plot',
       '--sweep=optim.learning_rate=1e-3,3e-3', '--sort_by=eval_loss'],
      cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ,
                                                                       PYTHONPATH=ROOT))
  assert result.returncode == 0, result.stderr
  rows = [line for line in result.stdout.splitlines() if line.startswith('| learning_rate')]
  assert [row.split('|')[1].strip() for row in rows] == ['learning_rate=3e-3',
                                                         'learning_rate=1e-3']
  png = root / 'comparison.png'
  assert f'curves of the runs: {png}' in result.stdout
  pixels = np.asarray(Image.open(png).convert('RGB')).astype(int)
  for colour in ('C0', 'C1'):  # one curve per run
    rgb = np.array(colors.to_rgb(colour)) * 255
    assert (np.abs(pixels - rgb).max(axis=-1) <= 8).any(), colour


def test_a_sweep_on_a_tpu_vm_runs_each_command_through_the_launcher():
  axes = sweep.parse_axes(['optim.learning_rate=1e-3,3e-3'])
  launcher = sweep.tpu_vm_launcher('my-v5e', 'us-west4-a')
  runs = sweep.commands('configs/llama3_2_1b.py', 'gs://bucket/sweep', axes, [], launcher)
  workdir, argv = runs[1]
  assert workdir == 'gs://bucket/sweep/learning_rate=3e-3'
  assert argv[1].endswith(os.path.join('launch', 'tpu_vm.py'))
  separator = argv.index('--')
  assert argv[2:separator] == ['rerun_until_done', '--tpu=my-v5e', '--zone=us-west4-a']
  assert argv[separator + 1:] == ['--config=configs/llama3_2_1b.py', f'--workdir={workdir}',
                                  '--config.optim.learning_rate=3e-3']
