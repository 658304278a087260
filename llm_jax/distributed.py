"""Joining the processes of a multi-host run: explicit coordinator, TPU VM / SLURM detection.

A pod slice or GPU cluster runs one process per host, all started with the same command. They
find each other through a coordinator (process 0's address and a free port):

  * explicitly, on any machine (a laptop or CI on loopback included): flags
    `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`, or the environment
    variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID;
  * automatically on Cloud TPU VMs and under SLURM or Open MPI, where JAX reads the cluster's
    own environment.

CPU processes exchange collectives through gloo (JAX's CPU default is none, which cannot run a
program spanning processes).
"""

import dataclasses
import os
from typing import Optional

import jax
from absl import logging

ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
  """How this process joins the others; all None means auto-detection by JAX."""
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None

  @property
  def explicit(self) -> bool:
    return self.coordinator_address is not None


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  if value is None or value == '':
    return None
  try:
    return int(value)
  except ValueError as e:
    raise ValueError(f'environment variable {name}={value!r} is not an integer') from e


def launch_spec(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                process_id: Optional[int] = None) -> LaunchSpec:
  """Flags where given, else the environment variables; checks they are complete and sane."""
  spec = LaunchSpec(
      coordinator_address or os.environ.get(ENV_COORDINATOR) or None,
      num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES),
      process_id if process_id is not None else _env_int(ENV_PROCESS_ID))
  given = [spec.coordinator_address is not None, spec.num_processes is not None,
           spec.process_id is not None]
  if any(given) and not all(given):
    raise ValueError(
        'an explicit launch needs all of --coordinator_address (or $JAX_COORDINATOR_ADDRESS), '
        '--num_processes ($JAX_NUM_PROCESSES) and --process_id ($JAX_PROCESS_ID); got '
        f'coordinator_address={spec.coordinator_address!r}, num_processes={spec.num_processes!r},'
        f' process_id={spec.process_id!r}')
  if spec.explicit:
    host, sep, port = spec.coordinator_address.rpartition(':')
    if not sep or not host or not port.isdigit():
      raise ValueError(f'coordinator_address={spec.coordinator_address!r} is not HOST:PORT')
    if spec.num_processes < 1 or not 0 <= spec.process_id < spec.num_processes:
      raise ValueError(f'process_id={spec.process_id} must be in [0, num_processes='
                       f'{spec.num_processes})')
  return spec


def cluster_detected() -> bool:
  """Whether the environment says this is one of several hosts (TPU pod, SLURM job)."""
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return ',' in hosts or int(os.environ.get('SLURM_NTASKS', '1') or 1) > 1


def uses_cpu() -> bool:
  """Whether JAX will run on the CPU (no accelerator asked for or visible)."""
  platforms = os.environ.get('JAX_PLATFORMS', '') or jax.config.jax_platforms or ''
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not any(os.path.exists(path) for path in ('/dev/accel0', '/dev/vfio', '/dev/nvidia0'))


def initialize(spec: LaunchSpec, force: bool = False) -> bool:
  """Joins the other processes if the launch is explicit, detected, or `force`d.

  Must run before anything touches a JAX device. Returns whether jax.distributed was started.
  """
  if not (spec.explicit or force or cluster_detected()):
    return False
  if uses_cpu():
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if spec.explicit:
    jax.distributed.initialize(spec.coordinator_address, spec.num_processes, spec.process_id)
  else:
    jax.distributed.initialize()
  logging.info('joined %d processes as process %d', jax.process_count(), jax.process_index())
  return True
