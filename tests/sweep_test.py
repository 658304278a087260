"""launch/sweep.py: the product of overrides becomes one command and workdir per run."""

import importlib.util
import os

import pytest

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
