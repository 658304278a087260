"""Entry point: python -m llm_jax.main --config=configs/default.py --workdir=DIR.

Parses flags only; everything else lives in llm_jax.training.loop so notebooks can call it
directly. Override any config key on the command line, e.g. --config.optim.learning_rate=1e-3,
and pick presets with --config=configs/llama3_8b.py:arg.

Several processes (a TPU pod's hosts, or CPU processes on one machine) run the same command;
on TPU VMs and SLURM they find each other by themselves, elsewhere pass
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID).

Exit status: 0 when the run finished (or had finished before); 42 when SIGTERM (preemption)
stopped it after saving a checkpoint: rerun the same command to resume; 130 after Ctrl-C
(checkpoint saved).
"""

import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from llm_jax import cli_errors
from llm_jax import distributed
from llm_jax import host_memory
from llm_jax import logging_setup
from llm_jax.training import loop as train
from llm_jax.training import preemption
from llm_jax.training import validation

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to an ml_collections config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs, summary.json.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Join other processes through jax.distributed even when neither the '
    'flags below nor a TPU pod / SLURM environment say there are several.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0, where the processes meet '
    '(default $JAX_COORDINATOR_ADDRESS; auto-detected on TPU VMs and SLURM).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Number of processes (default $JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'This process, 0..num_processes-1 (default $JAX_PROCESS_ID).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging_setup.quiet_library_logs()
  if host_memory.runs_on_cpu_only():
    # Before JAX starts its threads: XLA:CPU's per-step temporaries then reuse heap pages.
    logging.info('keeping freed host memory for reuse: %s', host_memory.retain_freed_memory())
  spec = distributed.launch_spec(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  distributed.initialize(spec, force=_DISTRIBUTED.value)
  logging.info('process %d of %d, %d devices (%s)', jax.process_index(), jax.process_count(),
               jax.device_count(), jax.devices()[0].device_kind)
  try:
    result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except validation.InvalidConfigError as error:
    sys.exit(str(error))  # the problems themselves, not a traceback through the loop
  if result.get('preempted'):
    sys.exit(preemption.PREEMPTED_EXIT_CODE)
  if result.get('interrupted'):
    print(f"interrupted at step {result['step']}; checkpoint saved in {_WORKDIR.value}: rerun to "
          'resume', file=sys.stderr)
    sys.exit(preemption.INTERRUPTED_EXIT_CODE)


if __name__ == '__main__':
  cli_errors.run_app(main)
