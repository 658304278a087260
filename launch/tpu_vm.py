"""Cloud TPU VM lifecycle: create a slice, install this checkout, run, follow, rerun, delete.

    python launch/tpu_vm.py create --tpu=my-v5p --zone=us-east5-a --accelerator_type=v5p-64 \
        --runtime_version=v2-alpha-tpuv5 --spot
    python launch/tpu_vm.py setup --tpu=my-v5p --zone=us-east5-a
    python launch/tpu_vm.py run --tpu=my-v5p --zone=us-east5-a -- \
        --config=configs/llama3_8b.py --workdir=gs://bucket/llama3-8b \
        --config.data.tokenizer_path=/ckpt/tokenizer.json
    python launch/tpu_vm.py logs --tpu=my-v5p --zone=us-east5-a --worker=0
    python launch/tpu_vm.py rerun_until_done --tpu=my-v5p ... -- --config=... --workdir=gs://...
    python launch/tpu_vm.py delete --tpu=my-v5p --zone=us-east5-a

Arguments after `--` go to `python -m llm_jax.main` unchanged, on every worker. `--dry_run`
prints the gcloud commands, one per line and shell-quoted, and runs nothing.

The slice is a queued resource named `--tpu`; with one slice its node has the same name, with
`--num_slices=N` (multislice) its nodes are `--tpu` followed by `-0` ... `-N-1` and the
commands address them all through `gcloud compute tpus queued-resources ssh/scp --node=all`.

Every worker runs `python3 -m llm_jax.main --distributed ARGS`: on TPU VMs
jax.distributed.initialize() reads the coordinator, the process count and this worker's id
from the VM's metadata, and for multislice the MEGASCALE_* values (coordinator, number of
slices, slice id) that the TPU runtime writes there itself; this launcher sets none of them. It
adds `--config.mesh.num_slices=N` unless ARGS set it. Outside TPU VMs pass
`--coordinator_address`, `--num_processes` and `--process_id` in ARGS instead.

The job exits with PREEMPTED_EXIT_CODE when it saved a checkpoint because it was told to stop;
`rerun_until_done` then reruns it (recreating the queued resource when a spot slice was taken
away) until it exits 0 or fails otherwise.
"""

import configparser
import dataclasses
import functools
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags

# The status `python -m llm_jax.main` exits with after saving on SIGTERM: "preempted, rerun to
# resume". Defined here too so that the launcher runs without JAX installed.
PREEMPTED_EXIT_CODE = 42
REMOTE_DIR = 'llm_jax'  # the checkout's copy, relative to the home directory of each worker
LOG_FILE = 'llm_jax.log'  # detached runs write here, in the worker's home directory
STATUS_FILE = 'llm_jax.exit_status'  # every run leaves its exit status here
ARCHIVE_NAME = 'llm_jax_checkout.tar.gz'
# Queued-resource states that still end in ACTIVE without anyone acting.
PENDING_STATES = ('ACCEPTED', 'CREATING', 'WAITING_FOR_RESOURCES', 'PROVISIONING')
ACTIONS = ('create', 'setup', 'run', 'logs', 'rerun_until_done', 'delete')

def _define_flags() -> dict:
  """Flags exist only when this file runs as a program, so that tests and launch/sweep.py can
  import it next to other programs' flags (both have a --dry_run)."""
  return dict(
      tpu=flags.DEFINE_string('tpu', None, 'Queued resource name (and node name, or prefix).'),
      zone=flags.DEFINE_string('zone', None, 'Zone, e.g. us-east5-a.'),
      project=flags.DEFINE_string('project', None, 'Project; default: gcloud\'s configured one.'),
      accelerator=flags.DEFINE_string('accelerator_type', None, 'Slice type, e.g. v5p-64.'),
      runtime=flags.DEFINE_string('runtime_version', None, 'TPU VM image, e.g. v2-alpha-tpuv5.'),
      spot=flags.DEFINE_bool('spot', False, 'Spot capacity (cheaper, preemptible).'),
      reserved=flags.DEFINE_bool('reserved', False, 'Capacity from the project\'s reservation.'),
      num_slices=flags.DEFINE_integer('num_slices', 1, 'Slices joined over DCN (multislice).'),
      worker=flags.DEFINE_string('worker', '0', 'Worker whose log `logs` follows (of the first '
                                 'slice with --num_slices).'),
      detach=flags.DEFINE_bool('detach', False, '`run` in the background, output to '
                               '~/llm_jax.log.'),
      dry_run=flags.DEFINE_bool('dry_run', False, 'Print the gcloud commands, run nothing.'),
      poll_seconds=flags.DEFINE_float('poll_seconds', 30.0, 'Between queued-resource state '
                                      'checks.'),
      max_runs=flags.DEFINE_integer('max_runs', 100, '`rerun_until_done` gives up after this '
                                    'many.'))


@dataclasses.dataclass(frozen=True)
class Target:
  """Which queued resource the commands address."""
  name: str
  zone: str
  project: Optional[str] = None
  num_slices: int = 1

  def location(self) -> list[str]:
    return [f'--zone={self.zone}'] + ([f'--project={self.project}'] if self.project else [])


def create_command(target: Target, accelerator_type: str, runtime_version: str, *,
                   spot: bool = False, reserved: bool = False) -> list[str]:
  """The queued-resource request for one slice (or `num_slices` of them)."""
  if spot and reserved:
    raise ValueError('--spot and --reserved exclude each other: choose one capacity')
  if target.num_slices < 1:
    raise ValueError(f'--num_slices={target.num_slices} must be at least 1')
  command = ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', target.name,
             *target.location(), f'--accelerator-type={accelerator_type}',
             f'--runtime-version={runtime_version}']
  if target.num_slices == 1:
    command.append(f'--node-id={target.name}')
  else:
    command += [f'--node-count={target.num_slices}', f'--node-prefix={target.name}']
  return command + (['--spot'] if spot else []) + (['--reserved'] if reserved else [])


def state_command(target: Target) -> list[str]:
  """Prints the queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...)."""
  return ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', target.name,
          *target.location(), '--format=value(state.state)']


def delete_command(target: Target) -> list[str]:
  """Deletes the queued resource and its nodes, without asking."""
  return ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', target.name,
          *target.location(), '--force', '--quiet']


def ssh_command(target: Target, remote: str, worker: str = 'all') -> list[str]:
  """Runs the shell command `remote` on `worker` of every node of the slice(s)."""
  if target.num_slices == 1:
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', target.name, *target.location(),
            f'--worker={worker}', f'--command={remote}']
  node = 'all' if worker == 'all' else '0'
  return ['gcloud', 'compute', 'tpus', 'queued-resources', 'ssh', target.name,
          *target.location(), f'--node={node}', f'--worker={worker}', f'--command={remote}']


def scp_command(target: Target, local_path: str, remote_path: str) -> list[str]:
  """Copies one local file to `remote_path` on every worker of every node."""
  group = 'tpu-vm' if target.num_slices == 1 else 'queued-resources'
  nodes = [] if target.num_slices == 1 else ['--node=all']
  return ['gcloud', 'compute', 'tpus', group, 'scp', local_path,
          f'{target.name}:{remote_path}', *target.location(), *nodes, '--worker=all']


def setup_commands(target: Target, archive: str, jax_requirement: str) -> list[list[str]]:
  """Copies the packed checkout to every worker, unpacks it and installs it with libtpu."""
  install = (f'rm -rf {REMOTE_DIR} && mkdir {REMOTE_DIR} && '
             f'tar -xzf {ARCHIVE_NAME} -C {REMOTE_DIR} && rm {ARCHIVE_NAME} && '
             f'cd {REMOTE_DIR} && python3 -m pip install --quiet '
             f"{shlex.quote('.[tpu]')} {shlex.quote(f'jax[tpu]{jax_requirement}')}")
  return [scp_command(target, archive, ARCHIVE_NAME), ssh_command(target, install)]


def job_argv(argv: Sequence[str], num_slices: int = 1) -> list[str]:
  """The main job's command line on a worker."""
  argv = list(argv)
  if num_slices > 1 and not any(a.startswith('--config.mesh.num_slices') for a in argv):
    argv.append(f'--config.mesh.num_slices={num_slices}')
  return ['python3', '-m', 'llm_jax.main', '--distributed', *argv]


def job_shell(argv: Sequence[str], num_slices: int = 1, detach: bool = False) -> str:
  """The shell line a worker runs: the job, its exit status kept in ~/STATUS_FILE."""
  job = (f'{shlex.join(job_argv(argv, num_slices))}; status=$?; '
         f'echo $status > ~/{STATUS_FILE}; exit $status')
  if detach:
    job = f'nohup sh -c {shlex.quote(job)} > ~/{LOG_FILE} 2>&1 < /dev/null &'
  return f'cd ~/{REMOTE_DIR} && {job}'


def run_commands(tpu: str, zone: str, project: Optional[str], argv: Sequence[str], *,
                 num_slices: int = 1, detach: bool = False) -> list[list[str]]:
  """gcloud commands that run `python -m llm_jax.main ARGV` on every worker of `tpu`.

  Args:
    tpu: the queued resource (and node) name.
    zone: its zone.
    project: its project, or None for gcloud's configured one.
    argv: the main job's flags, e.g. ['--config=configs/x.py', '--workdir=gs://b/run'].
    num_slices: slices of a multislice queued resource.
    detach: run in the background with output in ~/llm_jax.log (follow it with `logs`).

  Returns:
    The commands, each an argv list for subprocess.
  """
  target = Target(tpu, zone, project, num_slices)
  return [ssh_command(target, job_shell(argv, num_slices, detach))]


def logs_command(target: Target, worker: str) -> list[str]:
  """Follows a worker's ~/llm_jax.log from its beginning (Ctrl-C stops following only)."""
  return ssh_command(target, f'tail -n +1 -F ~/{LOG_FILE}', worker)


def last_status_command(target: Target) -> list[str]:
  """Prints the exit status of the last run on worker 0 (of node 0)."""
  return ssh_command(target, f'cat ~/{STATUS_FILE}', worker='0')


def pack_checkout(root: str, archive: str) -> int:
  """Packs git's tracked and untracked-but-not-ignored files of `root`; returns their count."""
  listing = subprocess.run(['git', '-C', root, 'ls-files', '-z', '--cached', '--others',
                            '--exclude-standard'], check=True, capture_output=True, text=True)
  paths = [p for p in listing.stdout.split('\0') if p and os.path.isfile(os.path.join(root, p))]
  with tarfile.open(archive, 'w:gz') as tar:
    for path in paths:
      tar.add(os.path.join(root, path), arcname=path)
  return len(paths)


def jax_tpu_requirement(root: str) -> str:
  """The version range setup.cfg allows for jax, e.g. '>=0.10.2,<0.11', for `jax[tpu]`."""
  parser = configparser.ConfigParser()
  parser.read(os.path.join(root, 'setup.cfg'))
  for line in parser['options']['install_requires'].split('\n'):
    match = re.fullmatch(r'jax\s*([<>=!~].*)', line.strip())
    if match:
      return match.group(1)
  raise ValueError(f'{root}/setup.cfg: no jax requirement in [options] install_requires')


@dataclasses.dataclass(frozen=True)
class Capacity:
  """What `create` asks for; kept to recreate a slice that was taken away."""
  accelerator_type: Optional[str]
  runtime_version: Optional[str]
  spot: bool = False
  reserved: bool = False

  def create(self, target: Target) -> list[str]:
    if not self.accelerator_type or not self.runtime_version:
      raise app.UsageError('creating the slice needs --accelerator_type and --runtime_version')
    return create_command(target, self.accelerator_type, self.runtime_version,
                          spot=self.spot, reserved=self.reserved)


class Gcloud:
  """Runs commands and returns their status, or (dry run) prints them and runs nothing."""

  def __init__(self, dry_run: bool = False, sleep: Callable[[float], None] = time.sleep):
    self.dry_run = dry_run
    self.sleep = sleep

  def call(self, command: Sequence[str]) -> int:
    print(shlex.join(command), flush=True)
    return 0 if self.dry_run else subprocess.run(command, check=False).returncode

  def output(self, command: Sequence[str], dry_run_output: str) -> tuple[int, str]:
    print(shlex.join(command), flush=True)
    if self.dry_run:
      return 0, dry_run_output
    result = subprocess.run(command, check=False, stdout=subprocess.PIPE, text=True)
    return result.returncode, result.stdout.strip()

  def note(self, text: str) -> None:
    print(f'# {text}', flush=True)


def current_state(gcloud: Gcloud, target: Target) -> str:
  """The queued resource's state, or '' when it does not exist (describe fails)."""
  code, state = gcloud.output(state_command(target), dry_run_output='ACTIVE')
  return state if code == 0 else ''


def wait_until_active(gcloud: Gcloud, target: Target, poll_seconds: float) -> None:
  """Polls until ACTIVE; a state that cannot become ACTIVE any more is an error naming it."""
  while (state := current_state(gcloud, target)) != 'ACTIVE':
    if state not in PENDING_STATES:
      raise RuntimeError(f'queued resource {target.name} is {state or "gone"}, it will not '
                         'become ACTIVE')
    gcloud.sleep(poll_seconds)


def ensure_active(gcloud: Gcloud, target: Target, capacity: Capacity, poll_seconds: float) -> bool:
  """Makes the slice ACTIVE, recreating it if it was deleted or preempted; True if new."""
  state = current_state(gcloud, target)
  if state == 'ACTIVE':
    return False
  created = state not in PENDING_STATES
  if created:
    if state:  # SUSPENDED (a spot slice taken away), FAILED, ...: the request must be renewed
      gcloud.note(f'queued resource {target.name} is {state}: deleting and recreating it')
      _check(gcloud.call(delete_command(target)), 'delete')
    _check(gcloud.call(capacity.create(target)), 'create')
  wait_until_active(gcloud, target, poll_seconds)
  return created


def setup(gcloud: Gcloud, target: Target, root: str) -> None:
  """Packs the checkout at `root`, copies it to every worker and installs it there."""
  with tempfile.TemporaryDirectory() as tmp:
    archive = os.path.join(tmp, ARCHIVE_NAME)
    if gcloud.dry_run:
      gcloud.note(f'pack the files git tracks or would track under {root} into {archive}')
    else:
      gcloud.note(f'packed {pack_checkout(root, archive)} files of {root}')
    for command in setup_commands(target, archive, jax_tpu_requirement(root)):
      _check(gcloud.call(command), 'setup')


def rerun_until_done(gcloud: Gcloud, target: Target, capacity: Capacity, argv: Sequence[str],
                     root: str, *, poll_seconds: float, max_runs: int) -> int:
  """Runs the job until it exits 0 or fails other than by preemption; returns its status.

  A run counts as preempted when it exits PREEMPTED_EXIT_CODE, when the slice is no longer
  ACTIVE afterwards, or when worker 0 recorded PREEMPTED_EXIT_CODE (gcloud need not pass a
  worker's own status through when it runs on several).
  """
  (command,) = run_commands(target.name, target.zone, target.project, argv,
                            num_slices=target.num_slices)
  for run in range(1, max_runs + 1):
    if ensure_active(gcloud, target, capacity, poll_seconds):
      setup(gcloud, target, root)
    status = gcloud.call(command)
    if status == 0:
      return 0
    if status != PREEMPTED_EXIT_CODE and current_state(gcloud, target) == 'ACTIVE':
      _, recorded = gcloud.output(last_status_command(target), dry_run_output='0')
      if recorded != str(PREEMPTED_EXIT_CODE):
        gcloud.note(f'run {run} failed with exit status {status}; not rerunning')
        return status
    gcloud.note(f'run {run} was preempted; rerunning to resume')
  gcloud.note(f'still preempted after {max_runs} runs (--max_runs); giving up')
  return PREEMPTED_EXIT_CODE


def _check(status: int, what: str) -> None:
  if status:
    raise SystemExit(f'{what} failed: gcloud exited with status {status}')


def main(argv, flag_values: dict):
  if len(argv) < 2 or argv[1] not in ACTIONS:
    raise app.UsageError(f'expected an action, one of {", ".join(ACTIONS)}; got {argv[1:2]}')
  action, job_args = argv[1], argv[2:]
  if action not in ('run', 'rerun_until_done') and job_args:
    raise app.UsageError(f'{action} takes no arguments after the flags; got {job_args}')
  if not flag_values['tpu'].value or not flag_values['zone'].value:
    raise app.UsageError('--tpu and --zone are required')
  target = Target(flag_values['tpu'].value, flag_values['zone'].value, flag_values['project'].value, flag_values['num_slices'].value)
  capacity = Capacity(flag_values['accelerator'].value, flag_values['runtime'].value, flag_values['spot'].value, flag_values['reserved'].value)
  gcloud = Gcloud(dry_run=flag_values['dry_run'].value)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if action == 'create':
    _check(gcloud.call(capacity.create(target)), 'create')
    wait_until_active(gcloud, target, flag_values['poll_seconds'].value)
  elif action == 'setup':
    setup(gcloud, target, root)
  elif action == 'run':
    for command in run_commands(target.name, target.zone, target.project, job_args,
                                num_slices=target.num_slices, detach=flag_values['detach'].value):
      sys.exit(gcloud.call(command))
  elif action == 'logs':
    sys.exit(gcloud.call(logs_command(target, flag_values['worker'].value)))
  elif action == 'rerun_until_done':
    sys.exit(rerun_until_done(gcloud, target, capacity, job_args, root,
                              poll_seconds=flag_values['poll_seconds'].value, max_runs=flag_values['max_runs'].value))
  else:
    _check(gcloud.call(delete_command(target)), 'delete')


if __name__ == '__main__':
  _FLAG_VALUES = _define_flags()
  app.run(functools.partial(main, flag_values=_FLAG_VALUES))
