"""Entry point: python -m llm_jax.main --config=configs/default.py --workdir=DIR.

Parses flags only; everything else lives in llm_jax.training.loop so notebooks can call it directly.
Override any config key on the command line, e.g. --config.optim.learning_rate=1e-3, and pick
presets with --config=configs/llama3_8b.py:arg.
"""

import os

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from llm_jax import host_memory
from llm_jax.training import loop as train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to an ml_collections config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs, summary.json.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', None, 'Call jax.distributed.initialize() (several processes / TPU pod hosts). '
    'Default: auto-detected from the TPU/cluster environment.')
flags.mark_flags_as_required(['config', 'workdir'])


def _runs_on_several_hosts() -> bool:
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return ',' in hosts or 'JAX_COORDINATOR_ADDRESS' in os.environ or (
      int(os.environ.get('SLURM_NTASKS', '1')) > 1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if host_memory.runs_on_cpu_only():
    # Before JAX starts its threads: XLA:CPU's per-step temporaries then reuse heap pages.
    logging.info('keeping freed host memory for reuse: %s', host_memory.retain_freed_memory())
  distributed = _DISTRIBUTED.value
  if distributed is None:
    distributed = _runs_on_several_hosts()
  if distributed:
    jax.distributed.initialize()
  logging.info('process %d of %d, %d devices (%s)', jax.process_index(), jax.process_count(),
               jax.device_count(), jax.devices()[0].device_kind)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
