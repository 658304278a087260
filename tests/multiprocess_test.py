"""Real multi-host runs: 2 JAX processes x 4 CPU devices joined on 127.0.0.1, started the way the
README tells a user (`python -m llm_jax.main ... --coordinator_address --num_processes
--process_id`), against 1 process x 8 devices.

One uninterrupted 2-process run is the reference. A second 2-process run is SIGKILLed (both
processes) after a checkpoint; rerun and preempted with SIGTERM to process 1 only, before its
first step; rerun and preempted again after a few steps; and rerun to the end: its losses must
equal the reference's at every step, which holds only if every process resumed its own data
position. Then `llm_jax.sample --mesh` generates across both processes.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from llm_jax.training import preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, 'tests', 'testdata', 'pre_layout_run')
NUM_STEPS = 30
with open(os.path.join(FIXTURE, 'run.json')) as f:
  # A 1-layer model with the fixture's 320-piece tokenizer: seconds per run.
  OVERRIDES = json.load(f)['overrides'] + [
      f'--config.train.num_steps={NUM_STEPS}', '--config.checkpoint.every_steps=5',
      '--config.eval.every_steps=10', '--config.data.global_batch_size=8',
      '--config.data.eval_batch_size=8', '--config.mesh.shape=(-1,1,1)',
      "--config.decode.prompts=('def ',)", '--config.decode.max_new_tokens=4',
      '--config.decode.temperature=0']

pytestmark = pytest.mark.slow


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = ROOT
  return env


def _workdir(path) -> str:
  os.makedirs(path)
  shutil.copy(os.path.join(FIXTURE, 'tokenizer.model'), path)
  return str(path)


def _start(workdir, module='llm_jax.main', extra=(), processes=2, log_dir=None):
  """Starts the processes of one run; returns their Popen objects."""
  port = _free_port()
  popens = []
  for index in range(processes):
    argv = [sys.executable, '-m', module, *extra]
    if module == 'llm_jax.main':
      argv += ['--config=configs/default.py', f'--workdir={workdir}', *OVERRIDES]
    if processes > 1:
      argv += [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={processes}',
               f'--process_id={index}']
    out = open(os.path.join(log_dir or workdir, f'process_{index}.out'), 'ab')
    log = open(os.path.join(log_dir or workdir, f'process_{index}.log'), 'ab')
    popens.append(subprocess.Popen(argv, cwd=ROOT, env=_env(8 // processes), stdout=out,
                                   stderr=log))
  return popens


def _wait(popens, timeout=300) -> list[int]:
  return [p.wait(timeout=timeout) for p in popens]


def _losses(workdir) -> dict:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  steps = [r['step'] for r in records if 'train/loss' in r]
  assert len(steps) == len(set(steps)), f'duplicate metrics rows: {steps}'
  return {r['step']: r['train/loss'] for r in records if 'train/loss' in r}


def _checkpoints(workdir) -> list[int]:
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


def _wait_for(predicate, popens, what: str, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if any(p.poll() is not None for p in popens):
      pytest.fail(f'the run ended before {what}')
    time.sleep(0.05)
  pytest.fail(f'timed out waiting for {what}')


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = _workdir(tmp_path_factory.mktemp('mp') / 'two_processes')
  assert _wait(_start(workdir)) == [0, 0], open(os.path.join(workdir, 'process_1.log')).read()
  return workdir


def test_two_processes_train_like_one_process_with_eight_devices(reference, tmp_path):
  single = _workdir(tmp_path / 'one_process')
  assert _wait(_start(single, processes=1)) == [0]
  two, one = _losses(reference), _losses(single)
  assert sorted(two) == sorted(one) == list(range(1, NUM_STEPS + 1))
  for step in range(1, 6):
    assert two[step] == pytest.approx(one[step], rel=1e-5), step
  # Process 0 alone writes the summary; the end-of-run sample ran across both processes.
  with open(os.path.join(reference, 'summary.json')) as f:
    summary = json.load(f)
  with open(os.path.join(single, 'summary.json')) as f:
    single_summary = json.load(f)
  assert summary['step'] == NUM_STEPS
  assert summary['samples'][0]['prompt'] == 'def '
  assert summary['samples'] == single_summary['samples']
  positions = os.listdir(os.path.join(reference, 'checkpoints', str(NUM_STEPS), 'data_iterator'))
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= set(positions)


def _metrics_rewritten_since(workdir, start: float) -> bool:
  """Whether this attempt's process 0 set up (it rewrites metrics.jsonl without the rows the
  killed attempt wrote after its last checkpoint); until then those stale rows are there."""
  path = os.path.join(workdir, 'metrics.jsonl')
  return os.path.exists(path) and os.stat(path).st_mtime >= start


def _preempt_process_1(popens, workdir) -> int:
  """SIGTERMs process 1 only; both must save the same step and exit preempted. Returns it."""
  popens[1].send_signal(signal.SIGTERM)
  codes = _wait(popens)
  assert codes == [preemption.PREEMPTED_EXIT_CODE] * 2, codes
  preempted_at = max(_checkpoints(workdir))
  for index in range(2):  # both processes wrote their data position of the same step
    assert os.path.exists(os.path.join(workdir, 'checkpoints', str(preempted_at),
                                       'data_iterator', f'process_{index}-of-2.json'))
  return preempted_at


def test_killed_preempted_and_rerun_runs_match_the_uninterrupted_run(reference, tmp_path):
  workdir = _workdir(tmp_path / 'interrupted')
  popens = _start(workdir)
  _wait_for(lambda: 10 in _checkpoints(workdir) if os.path.isdir(
      os.path.join(workdir, 'checkpoints')) else False, popens, 'checkpoint 10')
  for p in popens:
    p.send_signal(signal.SIGKILL)
  _wait(popens)
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))

  # Rerun; preempt process 1 before the first step (the resumed run restores and compiles).
  killed_at = max(_checkpoints(workdir))
  start = time.time()
  popens = _start(workdir)
  _wait_for(lambda: _metrics_rewritten_since(workdir, start), popens, 'the resumed setup')
  preempted_early = _preempt_process_1(popens, workdir)
  assert killed_at < preempted_early < NUM_STEPS

  # Rerun; preempt process 1 once this attempt has trained a few steps.
  start = time.time()
  popens = _start(workdir)
  _wait_for(lambda: _metrics_rewritten_since(workdir, start) and
            max(_losses(workdir)) > preempted_early + 2, popens, 'training after the resume')
  preempted_later = _preempt_process_1(popens, workdir)
  assert preempted_early + 2 < preempted_later < NUM_STEPS

  assert _wait(_start(workdir)) == [0, 0]
  resumed, expected = _losses(workdir), _losses(reference)
  assert sorted(resumed) == list(range(1, NUM_STEPS + 1))
  for step in range(1, NUM_STEPS + 1):
    assert resumed[step] == expected[step], (step, resumed[step], expected[step])


def test_sample_with_a_mesh_across_two_processes(reference, tmp_path):
  logs = str(tmp_path)
  output = tmp_path / 'samples.jsonl'
  extra = [f'--workdir={reference}', '--prompt=def ', '--max_new_tokens=4', '--temperature=0',
           '--mesh=2,2,2', f'--output={output}']
  codes = _wait(_start(None, module='llm_jax.sample', extra=extra, log_dir=logs))
  assert codes == [0, 0], open(os.path.join(logs, 'process_0.log')).read()[-3000:]
  with open(os.path.join(reference, 'summary.json')) as f:
    expected = json.load(f)['samples'][0]
  # stdout also holds what gloo prints, interleaved mid-line: the JSON file is what scripts read.
  assert [json.loads(line) for line in output.read_text().splitlines()] == [
      {'prompt': 'def ', 'continuation': expected['continuation']}]
