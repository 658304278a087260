"""Hyper-parameter sweeps as products of config overrides.

    python launch/sweep.py --config=configs/default.py --workdir_root=/tmp/sweep \
        --sweep=optim.learning_rate=1e-3,3e-3 --sweep=model.num_layers=2,4 [--dry_run]

Runs one `llm_jax.main` per combination (sequentially here; print the commands with --dry_run
and hand them to a scheduler on a cluster), each in its own workdir named after its overrides,
then prints a table of the runs' summary.json figures.
"""

import itertools
import json
import os
import shlex
import subprocess
import sys
from typing import Sequence

from absl import app
from absl import flags

_CONFIG = flags.DEFINE_string('config', 'configs/default.py', 'Config file (and :arg).')
_WORKDIR_ROOT = flags.DEFINE_string('workdir_root', None, 'One subdirectory per run goes here.')
_SWEEP = flags.DEFINE_multi_string('sweep', [], 'key=v1,v2,...: values of one config key.')
_FIXED = flags.DEFINE_multi_string('set', [], 'key=value applied to every run.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the commands instead of running them.')
flags.mark_flag_as_required('workdir_root')

SUMMARY_KEYS = ('step', 'eval_loss', 'eval_bits_per_byte', 'tokens_per_second', 'wall_seconds')


def parse_axes(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
  """'key=v1,v2' -> (key, [v1, v2]), refusing malformed specs with the spec named."""
  axes = []
  for spec in specs:
    key, sep, values = spec.partition('=')
    if not sep or not key or not values:
      raise ValueError(f'--sweep {spec!r} is not of the form key=v1,v2,...')
    axes.append((key, values.split(',')))
  return axes


def run_name(overrides: Sequence[tuple[str, str]]) -> str:
  return '_'.join(f'{key.split(".")[-1]}={value}' for key, value in overrides) or 'base'


def commands(config: str, workdir_root: str, axes, fixed: Sequence[str]) -> list[tuple[str, list]]:
  """(workdir, argv) for every combination of the swept values."""
  keys = [key for key, _ in axes]
  result = []
  for values in itertools.product(*[values for _, values in axes]):
    overrides = list(zip(keys, values))
    workdir = os.path.join(workdir_root, run_name(overrides))
    argv = [sys.executable, '-m', 'llm_jax.main', f'--config={config}', f'--workdir={workdir}']
    argv += [f'--config.{item}' for item in fixed]
    argv += [f'--config.{key}={value}' for key, value in overrides]
    result.append((workdir, argv))
  return result


def summary_table(workdirs: Sequence[str]) -> str:
  lines = ['| run | ' + ' | '.join(SUMMARY_KEYS) + ' |', '|' + '---|' * (len(SUMMARY_KEYS) + 1)]
  for workdir in workdirs:
    path = os.path.join(workdir, 'summary.json')
    if not os.path.exists(path):
      lines.append(f'| {os.path.basename(workdir)} | (no summary.json: the run failed) |')
      continue
    with open(path) as f:
      summary = json.load(f)
    cells = [f'{summary[k]:.4g}' if isinstance(summary.get(k), float) else str(summary.get(k))
             for k in SUMMARY_KEYS]
    lines.append(f'| {os.path.basename(workdir)} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv):
  del argv
  runs = commands(_CONFIG.value, _WORKDIR_ROOT.value, parse_axes(_SWEEP.value), _FIXED.value)
  failed = []
  for workdir, argv in runs:
    print(shlex.join(argv), flush=True)
    if not _DRY_RUN.value and subprocess.run(argv, check=False).returncode:
      failed.append(workdir)
  if not _DRY_RUN.value:
    print(summary_table([workdir for workdir, _ in runs]))
  if failed:
    sys.exit(f'{len(failed)} run(s) failed: {failed}')


if __name__ == '__main__':
  app.run(main)
