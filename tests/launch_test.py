"""launch/tpu_vm.py: the gcloud commands of each action, and reruns against a scripted gcloud."""

import importlib.util
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, 'launch', 'tpu_vm.py')
_SPEC = importlib.util.spec_from_file_location('tpu_vm', LAUNCHER)
tpu_vm = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(tpu_vm)

LOCATION = ['--tpu=my-tpu', '--zone=us-east5-a', '--project=my-proj']


def _dry_run(action, *args):
  """The lines `tpu_vm.py ACTION --dry_run ...` prints, each split back into its argv."""
  result = subprocess.run([sys.executable, LAUNCHER, action, '--dry_run', *args], check=True,
                          capture_output=True, text=True)
  return [shlex.split(line) for line in result.stdout.splitlines() if not line.startswith('#')]


def _remote(command):
  """The shell line a gcloud ssh command runs on the workers."""
  (remote,) = [a[len('--command='):] for a in command if a.startswith('--command=')]
  return remote


def _words(shell_line):
  """A shell line's words and operators (';', '&&', '>', '&' apart), quotes removed."""
  lexer = shlex.shlex(shell_line, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  return list(lexer)


def test_create_requests_a_spot_or_reserved_queued_resource_and_waits_for_it():
  create, describe = _dry_run('create', *LOCATION, '--accelerator_type=v5p-64',
                              '--runtime_version=v2-alpha-tpuv5', '--spot')
  assert create[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'my-tpu']
  for flag in ('--zone=us-east5-a', '--project=my-proj', '--accelerator-type=v5p-64',
               '--runtime-version=v2-alpha-tpuv5', '--node-id=my-tpu', '--spot'):
    assert flag in create
  assert '--reserved' not in create
  assert describe[3:6] == ['queued-resources', 'describe', 'my-tpu']
  (reserved, _) = _dry_run('create', *LOCATION, '--accelerator_type=v5p-64',
                           '--runtime_version=v2-alpha-tpuv5', '--reserved')
  assert '--reserved' in reserved and '--spot' not in reserved
  with pytest.raises(ValueError, match='--spot and --reserved'):
    tpu_vm.create_command(tpu_vm.Target('t', 'z'), 'v5p-8', 'v2', spot=True, reserved=True)


def test_multislice_asks_for_one_node_per_slice_and_runs_on_all_of_them():
  (create, _) = _dry_run('create', *LOCATION, '--accelerator_type=v5e-256',
                         '--runtime_version=v2-alpha-tpuv5-lite', '--num_slices=4')
  assert '--node-count=4' in create and '--node-prefix=my-tpu' in create
  assert not any(a.startswith('--node-id') for a in create)
  (run,) = _dry_run('run', *LOCATION, '--num_slices=4', '--', '--config=configs/llama3_8b.py')
  assert run[3:6] == ['queued-resources', 'ssh', 'my-tpu']
  assert '--node=all' in run and '--worker=all' in run
  assert '--config.mesh.num_slices=4' in _words(_remote(run))
  (run,) = tpu_vm.run_commands('t', 'z', None, ['--config.mesh.num_slices=2'], num_slices=2)
  assert '--config.mesh.num_slices=4' not in _remote(run)  # the user's own setting is kept


def test_run_passes_arguments_with_spaces_and_quotes_unchanged_to_every_worker():
  tricky = ['--config=configs/default.py', '--workdir=gs://bucket/my run',
            """--config.data.text_glob=/data/it's "all"/*.txt""", '--config.x=$HOME;rm -rf ~']
  (run,) = _dry_run('run', *LOCATION, '--', *tricky)
  assert run[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu']
  assert '--worker=all' in run and '--zone=us-east5-a' in run and '--project=my-proj' in run
  words = _words(_remote(run))
  start = words.index('python3')
  assert words[:3] == ['cd', '~/llm_jax', '&&']
  assert words[start:start + 4] == ['python3', '-m', 'llm_jax.main', '--distributed']
  assert words[start + 4:start + 8] == tricky
  assert tpu_vm.run_commands('my-tpu', 'us-east5-a', 'my-proj', tricky) == [run]


def test_detached_run_writes_a_log_that_logs_follows():
  (run,) = _dry_run('run', *LOCATION, '--detach', '--', '--config=configs/default.py')
  words = _words(_remote(run))
  assert 'nohup' in words and words[-1] == '&'
  assert words[words.index('>') + 1] == '~/llm_jax.log'
  inner = shlex.split(words[words.index('nohup') + 3])
  assert inner[:4] == ['python3', '-m', 'llm_jax.main', '--distributed']
  (logs,) = _dry_run('logs', *LOCATION, '--worker=3')
  assert '--worker=3' in logs
  assert _words(_remote(logs)) == ['tail', '-n', '+1', '-F', '~/llm_jax.log']


def test_setup_copies_the_checkout_to_every_worker_and_installs_the_tpu_extra():
  scp, install = _dry_run('setup', *LOCATION)
  assert scp[3:5] == ['tpu-vm', 'scp'] and '--worker=all' in scp
  assert scp[6] == 'my-tpu:llm_jax_checkout.tar.gz'
  assert install[3:5] == ['tpu-vm', 'ssh'] and '--worker=all' in install
  words = _words(_remote(install))
  assert '.[tpu]' in words and 'jax[tpu]>=0.10.2,<0.11' in words
  multi_scp, _ = _dry_run('setup', *LOCATION, '--num_slices=2')
  assert multi_scp[3:5] == ['queued-resources', 'scp'] and '--node=all' in multi_scp


def test_delete_removes_the_queued_resource_without_a_prompt():
  (delete,) = _dry_run('delete', *LOCATION)
  assert delete[3:6] == ['queued-resources', 'delete', 'my-tpu']
  assert '--force' in delete and '--quiet' in delete


FAKE_GCLOUD = textwrap.dedent('''\
    #!{python}
    """Answers each call with the next scripted reply, after checking it is the expected one."""
    import json, os, sys
    argv = sys.argv[1:]
    with open(os.environ['FAKE_GCLOUD_LOG'], 'a') as f:
      f.write(json.dumps(argv) + '\\n')
    with open(os.environ['FAKE_GCLOUD_SCRIPT']) as f:
      script = json.load(f)
    calls = sum(1 for _ in open(os.environ['FAKE_GCLOUD_LOG']))
    if calls > len(script):
      sys.exit(f'unscripted call {{argv}}')
    words, code, stdout = script[calls - 1]
    if not all(w in ' '.join(argv) for w in words):
      sys.exit(f'call {{calls}}: expected {{words}}, got {{argv}}')
    print(stdout)
    sys.exit(code)
    ''')


def _rerun_until_done(tmp_path, script):
  """Runs rerun_until_done against a fake gcloud; returns (exit status, the calls it made)."""
  repo = tmp_path / 'repo'
  (repo / 'launch').mkdir(parents=True)
  shutil.copy(LAUNCHER, repo / 'launch')
  shutil.copy(os.path.join(ROOT, 'setup.cfg'), repo)
  subprocess.run(['git', 'init', '-q', str(repo)], check=True)
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  gcloud = bin_dir / 'gcloud'
  gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
  gcloud.chmod(gcloud.stat().st_mode | stat.S_IXUSR)
  (tmp_path / 'script.json').write_text(json.dumps(script))
  env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
             FAKE_GCLOUD_LOG=str(tmp_path / 'calls.jsonl'),
             FAKE_GCLOUD_SCRIPT=str(tmp_path / 'script.json'))
  result = subprocess.run(
      [sys.executable, str(repo / 'launch' / 'tpu_vm.py'), 'rerun_until_done', *LOCATION,
       '--accelerator_type=v5p-8', '--runtime_version=v2-alpha-tpuv5', '--spot',
       '--poll_seconds=0', '--', '--config=configs/default.py', '--workdir=gs://b/run'],
      env=env, capture_output=True, text=True, check=False)
  with open(tmp_path / 'calls.jsonl') as f:
    calls = [json.loads(line) for line in f]
  assert len(calls) == len(script), (result.stdout, result.stderr, calls)
  return result.returncode, calls


ACTIVE = [['describe'], 0, 'ACTIVE']
RUN = ['ssh', 'llm_jax.main --distributed']


def test_rerun_until_done_reruns_after_the_preempted_status_until_success(tmp_path):
  status, calls = _rerun_until_done(tmp_path, [ACTIVE, [RUN, 42, ''], ACTIVE, [RUN, 0, '']])
  assert status == 0
  assert calls[1] == calls[3]  # the same command both times


def test_rerun_until_done_recreates_a_slice_that_was_taken_away(tmp_path):
  status, calls = _rerun_until_done(tmp_path, [
      ACTIVE, [RUN, 255, ''],  # the ssh connection dies with the preempted VM
      [['describe'], 1, ''],  # ... and the queued resource is gone
      [['describe'], 1, ''],
      [['queued-resources create my-tpu', '--spot', '--node-id=my-tpu'], 0, ''],
      [['describe'], 0, 'WAITING_FOR_RESOURCES'], ACTIVE,
      [['scp', '--worker=all'], 0, ''], [['ssh', '--worker=all', 'pip install'], 0, ''],
      [RUN, 0, '']])
  assert status == 0


def test_rerun_until_done_stops_on_another_failure_with_its_status(tmp_path):
  status, _ = _rerun_until_done(tmp_path, [
      ACTIVE, [RUN, 1, ''], ACTIVE,
      [['ssh', '--worker=0', 'cat ~/llm_jax.exit_status'], 0, '42'],  # worker 0 was preempted
      ACTIVE, [RUN, 1, ''], ACTIVE,
      [['ssh', '--worker=0', 'cat ~/llm_jax.exit_status'], 0, '3']])  # a real failure
  assert status == 1
