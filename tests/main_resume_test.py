"""The main job end to end: a run killed with SIGKILL resumes exactly; summary.json is written."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from llm_jax.training import preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A few-second run on the embedded corpus: tiny model, short rows, a small tokenizer.
OVERRIDES = [
    '--config.model.vocab_size=320', '--config.model.num_layers=2', '--config.model.embed_dim=64',
    '--config.model.mlp_dim=128', '--config.data.seq_len=64', '--config.data.global_batch_size=8',
    '--config.data.eval_batch_size=8', '--config.data.tokenizer_train_bytes=300000',
    '--config.train.log_every=1', '--config.eval.every_steps=1000', '--config.eval.num_batches=2',
    "--config.decode.prompts=('def ',)", '--config.decode.max_new_tokens=8',
]


def _command(workdir, num_steps, every):
  return [sys.executable, '-m', 'llm_jax.main', '--config=configs/default.py',
          f'--workdir={workdir}', f'--config.train.num_steps={num_steps}',
          f'--config.checkpoint.every_steps={every}', *OVERRIDES]


def _env():
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # the job runs on the one real CPU device, as a user's would
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = ROOT
  return env


def _train_records(workdir):
  """(step, loss) of every train record, in file order (a resumed run appends)."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return [(r['step'], r['train/loss']) for r in records if 'train/loss' in r]


def _train_losses(workdir):
  return dict(_train_records(workdir))


def _workdir_with_tokenizer_of(source_workdir, path):
  """A fresh workdir holding the tokenizer another run trained, so both tokenise identically."""
  os.makedirs(path)
  shutil.copy(os.path.join(source_workdir, 'tokenizer.model'), path)
  return str(path)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  subprocess.run(_command(workdir, 60, 10), cwd=ROOT, env=_env(), check=True,
                 timeout=600)
  return workdir


def test_main_job_writes_summary(uninterrupted):
  with open(os.path.join(uninterrupted, 'summary.json')) as f:
    summary = json.load(f)
  for key in ('step', 'eval_loss', 'eval_bits_per_byte', 'gzip_bits_per_byte',
              'tokens_per_second', 'wall_seconds'):
    assert key in summary, key
  assert summary['step'] == 60
  assert 0 < summary['eval_bits_per_byte'] < 20
  assert 0 < summary['gzip_bits_per_byte'] < 8
  assert os.path.exists(os.path.join(uninterrupted, 'tokenizer.model'))
  assert summary['samples'] and summary['samples'][0]['prompt'] == 'def '


def test_sigkill_then_rerun_resumes_with_identical_losses(uninterrupted, tmp_path):
  workdir = _workdir_with_tokenizer_of(uninterrupted, tmp_path / 'killed')
  command = _command(workdir, 60, 10)
  process = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  checkpoints = os.path.join(workdir, 'checkpoints')
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if os.path.isdir(os.path.join(checkpoints, '20')):
      break
    time.sleep(0.05)
  os.kill(process.pid, signal.SIGKILL)
  process.wait()
  assert not os.path.exists(os.path.join(workdir, 'summary.json')), 'run finished before kill'
  killed_steps = [step for step, _ in _train_records(workdir)]
  assert killed_steps and max(killed_steps) < 60
  last_checkpoint = max(int(name) for name in os.listdir(checkpoints) if name.isdigit())

  rerun = subprocess.run(command, cwd=ROOT, env=_env(), check=True, timeout=600,
                         capture_output=True, text=True)
  # The rerun continued from the checkpoint, not from scratch.
  assert f'resumed from step {last_checkpoint} ' in rerun.stderr
  expected = _train_losses(uninterrupted)
  records = _train_records(workdir)
  # One row per step: rows the killed attempt wrote after its last checkpoint were dropped.
  assert [step for step, _ in records] == list(range(1, 61))
  for step, loss in records:
    assert loss == expected[step], (step, loss, expected[step])


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(uninterrupted, tmp_path):
  workdir = _workdir_with_tokenizer_of(uninterrupted, tmp_path / 'preempted')
  # Periodic checkpoints only every 50 steps: a checkpoint before 50 can only be the SIGTERM one.
  process = subprocess.Popen(_command(workdir, 60, 50), cwd=ROOT, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=120) == preemption.PREEMPTED_EXIT_CODE
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))
  steps = [int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit()]
  last_logged = max(step for step, _ in _train_records(workdir))
  assert steps == [last_logged] and last_logged < 50
