"""A run's lifecycle loses nothing: old checkpoints resume, finished runs stay finished, Ctrl-C
saves, and an exception still completes the checkpoint being written.

Each test runs `python -m llm_jax.main` in a subprocess on one CPU device, as a user would, with
the 1-layer model and 320-piece tokenizer of tests/testdata/pre_layout_run.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from llm_jax.training import checkpoint
from llm_jax.training import preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, 'tests', 'testdata', 'pre_layout_run')
with open(os.path.join(FIXTURE, 'run.json')) as f:
  FIXTURE_RUN = json.load(f)

pytestmark = pytest.mark.slow


def _env() -> dict:
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # one CPU device, as a user's run
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = ROOT
  return env


def _command(workdir, *extra, config='configs/default.py') -> list:
  return [sys.executable, '-m', 'llm_jax.main', f'--config={config}', f'--workdir={workdir}',
          *FIXTURE_RUN['overrides'], *extra]


def _run(workdir, *extra, config='configs/default.py', check=True):
  return subprocess.run(_command(workdir, *extra, config=config), cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=300, check=check)


def _records(workdir) -> list:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _fresh_workdir(path) -> str:
  os.makedirs(path)
  shutil.copy(os.path.join(FIXTURE, 'tokenizer.model'), path)
  return str(path)


@pytest.fixture(scope='module')
def resumed_old_run(tmp_path_factory):
  """The fixture's checkpoint (step 2, written before the package layout changed) trained on
  to step 4 by this code."""
  workdir = str(tmp_path_factory.mktemp('old') / 'run')
  shutil.copytree(FIXTURE, workdir)
  result = _run(workdir, '--config.train.num_steps=4')
  return workdir, result


def test_checkpoint_written_before_the_layout_change_resumes_exactly(resumed_old_run):
  workdir, result = resumed_old_run
  assert 'resumed from step 2 ' in result.stderr
  losses = {r['step']: r['train/loss'] for r in _records(workdir) if 'train/loss' in r}
  assert sorted(losses) == [3, 4]  # nothing retrained: the run went on from step 2
  # The losses the old code's uninterrupted 4-step run logged: the parameters, the optimizer
  # state and the data position (its JSON item) were all restored.
  for step, expected in FIXTURE_RUN['losses_of_uninterrupted_run'].items():
    assert losses[int(step)] == pytest.approx(expected, rel=1e-6), step


def test_rerunning_a_finished_run_changes_nothing(resumed_old_run):
  workdir, _ = resumed_old_run
  with open(os.path.join(workdir, 'summary.json'), 'rb') as f:
    summary = f.read()
  metrics = _records(workdir)
  result = _run(workdir, '--config.train.num_steps=4')
  assert 'already finished at step 4' in result.stderr
  with open(os.path.join(workdir, 'summary.json'), 'rb') as f:
    assert f.read() == summary
  assert _records(workdir) == metrics
  assert json.loads(summary)['tokens_per_second'] > 0


def test_exception_during_evaluation_completes_the_checkpoint_being_written(tmp_path):
  workdir = _fresh_workdir(tmp_path / 'run')
  # An evaluator whose data file is missing fails at step 3, while the asynchronous save of
  # step 2 may still be in flight.
  config_file = tmp_path / 'failing_eval.py'
  config_file.write_text(
      'import ml_collections\n'
      'from llm_jax import config_sections\n\n\n'
      'def get_config(arg=None):\n'
      '  config = config_sections.default_config(arg)\n'
      '  config.evals.broken = ml_collections.ConfigDict(dict(\n'
      f"      kind='perplexity', path={str(tmp_path / 'missing.jsonl')!r}, every_steps=3))\n"
      '  return config\n')
  result = _run(workdir, '--config.train.num_steps=6', '--config.checkpoint.every_steps=2',
                config=str(config_file), check=False)
  assert result.returncode != 0
  assert 'missing.jsonl' in result.stderr
  names = os.listdir(os.path.join(workdir, 'checkpoints'))
  assert names == ['2'], names  # complete, and no temporary directory left behind
  model_config, params = checkpoint.load_params(workdir, step=2)
  assert model_config.num_layers == 1 and params['embedder']['embedding'].shape[0] == 320


def test_ctrl_c_saves_a_checkpoint_and_exits_with_one_line(tmp_path):
  workdir = _fresh_workdir(tmp_path / 'run')
  process = subprocess.Popen(_command(workdir, '--config.train.num_steps=100000',
                                      '--config.checkpoint.every_steps=100000',
                                      '--config.train.log_every=1'),
                             cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == preemption.INTERRUPTED_EXIT_CODE
  assert 'Traceback' not in stderr
  steps = [int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit()]
  last_logged = max(r['step'] for r in _records(workdir) if 'train/loss' in r)
  assert steps == [last_logged]
  assert stderr.rstrip().splitlines()[-1] == (
      f'interrupted at step {last_logged}; checkpoint saved in {workdir}: rerun to resume')
