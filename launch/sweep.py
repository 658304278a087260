"""Hyper-parameter sweeps as products of config overrides, compared by table and by plot.

    python launch/sweep.py --config=configs/default.py --workdir_root=/tmp/sweep \
        --sweep=optim.learning_rate=1e-3,3e-3 --sweep=model.num_layers=2,4 \
        [--set=train.num_steps=100] [--sort_by=eval_loss] [--plot] [--dry_run | --report]
    python launch/sweep.py --config=configs/llama3_2_1b.py --workdir_root=gs://bucket/sweep \
        --sweep=optim.learning_rate=1e-4,3e-4 --tpu=my-v5e --zone=us-west4-a

Runs one `llm_jax.main` per combination (sequentially here; print the commands with --dry_run
and hand them to a scheduler on a cluster), each in its own workdir named after its overrides,
or, with --tpu and --zone, one after the other on that TPU VM slice through
`launch/tpu_vm.py rerun_until_done` (workdir_root then on cloud storage, gs://...), and
then prints a table of the runs' summary.json figures, sorted by any of them (`--sort_by=KEY`,
`--sort_by=-KEY` for descending), and with --plot overlays their loss curves in
`<workdir_root>/comparison.png`. `--report` only prints the table (and plot) of the runs
already there.

A config that trains its own SentencePiece tokenizer gets one for the whole sweep, trained
once into `<workdir_root>/tokenizer.model` and passed to every run, so the runs' losses are
measured in the same tokens; unless the sweep varies what the tokenizer is trained on.
"""

import itertools
import json
import os
import shlex
import subprocess
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags
from etils import epath
from ml_collections import config_flags

_CONFIG = flags.DEFINE_string('config', 'configs/default.py', 'Config file (and :arg).')
_WORKDIR_ROOT = flags.DEFINE_string('workdir_root', None, 'One subdirectory per run goes here.')
_SWEEP = flags.DEFINE_multi_string('sweep', [], 'key=v1,v2,...: values of one config key.')
_FIXED = flags.DEFINE_multi_string('set', [], 'key=value applied to every run.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the commands instead of running them.')
_REPORT = flags.DEFINE_bool('report', False, 'Run nothing: table (and plot) of the runs there.')
_SORT_BY = flags.DEFINE_string('sort_by', None, 'summary.json key to sort the table by; a '
                               'leading "-" sorts descending. Default: the sweep order.')
_PLOT = flags.DEFINE_bool('plot', False, 'Overlay the runs\' loss curves in '
                          '<workdir_root>/comparison.png.')
_TPU = flags.DEFINE_string('tpu', None, 'Run on this TPU VM slice (launch/tpu_vm.py), not here.')
_ZONE = flags.DEFINE_string('zone', None, 'The zone of --tpu.')
flags.mark_flag_as_required('workdir_root')

SUMMARY_KEYS = ('step', 'eval_loss', 'eval_bits_per_byte', 'tokens_per_second', 'wall_seconds')
COMPARISON_FILENAME = 'comparison.png'
TOKENIZER_FILENAME = 'tokenizer.model'
# Config keys that change what a trained tokenizer is: sweeping one of them leaves each run to
# train its own.
TOKENIZER_KEYS = ('model.vocab_size', 'data.dataset', 'data.tfds_name', 'data.tfds_data_dir',
                  'data.text_feature', 'data.text_glob', 'data.jsonl_field', 'data.train_split',
                  'data.tokenizer', 'data.tokenizer_path', 'data.tokenizer_train_bytes')


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


def tpu_vm_launcher(tpu: str, zone: str) -> list[str]:
  """The command that runs llm_jax.main's arguments on every worker of a TPU VM slice, again
  after each preemption until the run is done."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tpu_vm.py')
  return [sys.executable, script, 'rerun_until_done', f'--tpu={tpu}', f'--zone={zone}', '--']


def commands(config: str, workdir_root: str, axes, fixed: Sequence[str],
             launcher: Optional[Sequence[str]] = None) -> list[tuple[str, list]]:
  """(workdir, argv) for every combination of the swept values.

  `launcher` runs llm_jax.main's arguments elsewhere (`tpu_vm_launcher`); default: here.
  """
  keys = [key for key, _ in axes]
  launcher = list(launcher or [sys.executable, '-m', 'llm_jax.main'])
  result = []
  for values in itertools.product(*[values for _, values in axes]):
    overrides = list(zip(keys, values))
    workdir = os.path.join(workdir_root, run_name(overrides))
    argv = launcher + [f'--config={config}', f'--workdir={workdir}']
    argv += [f'--config.{item}' for item in fixed]
    argv += [f'--config.{key}={value}' for key, value in overrides]
    result.append((workdir, argv))
  return result


def load_config(config: str, fixed: Sequence[str]):
  """The config every run starts from, with the --set overrides applied as llm_jax.main would."""
  argv = ['sweep', f'--config={config}'] + [f'--config.{item}' for item in fixed]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def shared_tokenizer(config: str, workdir_root: str, axes, fixed: Sequence[str], *,
                     train: bool = True) -> Optional[str]:
  """The path of the sweep's one tokenizer, trained once into workdir_root; None if not shared.

  Not shared when the config loads a given tokenizer (every run already uses the same one) or
  when the sweep varies one of TOKENIZER_KEYS (each run needs its own).

  Args:
    config: the config file (and :arg).
    workdir_root: the sweep's root directory.
    axes: from `parse_axes`.
    fixed: the --set overrides.
    train: False (a dry run) only names the path.
  """
  swept = [key for key, _ in axes if key in TOKENIZER_KEYS]
  if swept:
    print(f'each run trains its own tokenizer: the sweep varies {", ".join(swept)}')
    return None
  run_config = load_config(config, fixed)
  if run_config.data.tokenizer != 'train_spm' or run_config.data.tokenizer_path:
    return None
  root = workdir_root if '://' in workdir_root else os.path.abspath(workdir_root)
  path = os.path.join(root, TOKENIZER_FILENAME)
  if train and not epath.Path(path).exists():
    from llm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    epath.Path(root).mkdir(parents=True, exist_ok=True)
    run_config.data.tokenizer_path = path
    pipeline.get_tokenizer(run_config.data, workdir_root, run_config.model.vocab_size)
  return path


def read_summaries(workdirs: Sequence[str]) -> list[tuple[str, Optional[dict]]]:
  """(workdir, summary.json's contents or None for a run that wrote none)."""
  result = []
  for workdir in workdirs:
    path = epath.Path(workdir) / 'summary.json'
    result.append((workdir, json.loads(path.read_text()) if path.exists() else None))
  return result


def sort_runs(runs: Sequence[tuple[str, Optional[dict]]], sort_by: Optional[str]):
  """Runs sorted by a summary key ('-key': descending); runs without it come last.

  Raises:
    ValueError: naming the key and the keys there are, when no run has a number under it.
  """
  if not sort_by:
    return list(runs)
  key, descending = sort_by.lstrip('-'), sort_by.startswith('-')
  has = [r for r in runs if r[1] is not None and isinstance(r[1].get(key), (int, float))]
  if not has:
    known = sorted({k for _, s in runs if s for k, v in s.items() if isinstance(v, (int, float))})
    raise ValueError(f'--sort_by={sort_by!r}: no run has a number under {key!r}; the summaries '
                     f'have {known}')
  ordered = sorted(has, key=lambda r: r[1][key], reverse=descending)
  return ordered + [r for r in runs if r not in has]


def _cell(value) -> str:
  return f'{value:.4g}' if isinstance(value, float) else str(value)


def summary_table(workdirs: Sequence[str], sort_by: Optional[str] = None) -> str:
  """A Markdown table of the runs' summary.json figures, sorted by `sort_by` if given."""
  keys = list(SUMMARY_KEYS)
  if sort_by and sort_by.lstrip('-') not in keys:
    keys.append(sort_by.lstrip('-'))
  lines = ['| run | ' + ' | '.join(keys) + ' |', '|' + '---|' * (len(keys) + 1)]
  for workdir, summary in sort_runs(read_summaries(workdirs), sort_by):
    if summary is None:
      lines.append(f'| {os.path.basename(workdir)} | (no summary.json: the run failed) |')
      continue
    cells = [_cell(summary.get(k)) for k in keys]
    lines.append(f'| {os.path.basename(workdir)} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot_runs(workdirs: Sequence[str], workdir_root: str) -> Optional[str]:
  """Overlays the curves of the runs that logged metrics; returns the PNG's path."""
  from llm_jax.training import plots  # pylint: disable=g-import-not-at-top
  logged = [w for w in workdirs if (epath.Path(w) / plots.METRICS_FILENAME).exists()]
  if not logged:
    print('no run logged metrics: nothing to plot')
    return None
  return plots.write_comparison(logged, os.path.join(workdir_root, COMPARISON_FILENAME))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    axes = parse_axes(_SWEEP.value)
  except ValueError as e:
    sys.exit(f'sweep: {e}')
  fixed = list(_FIXED.value)
  run_only = not (_DRY_RUN.value or _REPORT.value)
  if not _REPORT.value:
    tokenizer = shared_tokenizer(_CONFIG.value, _WORKDIR_ROOT.value, axes, fixed,
                                 train=run_only)
    if tokenizer:
      fixed.append(f'data.tokenizer_path={tokenizer}')
  if bool(_TPU.value) != bool(_ZONE.value):
    sys.exit('sweep: --tpu and --zone go together')
  launcher = tpu_vm_launcher(_TPU.value, _ZONE.value) if _TPU.value else None
  runs = commands(_CONFIG.value, _WORKDIR_ROOT.value, axes, fixed, launcher)
  failed = []
  for workdir, run_argv in runs:
    if _REPORT.value:
      break
    print(shlex.join(run_argv), flush=True)
    if run_only and subprocess.run(run_argv, check=False).returncode:
      failed.append(workdir)
  if not _DRY_RUN.value:
    workdirs = [workdir for workdir, _ in runs]
    try:
      print(summary_table(workdirs, _SORT_BY.value))
    except ValueError as e:  # an unknown --sort_by key
      sys.exit(f'sweep: {e}')
    if _PLOT.value:
      path = plot_runs(workdirs, _WORKDIR_ROOT.value)
      if path:
        print(f'curves of the runs: {path}')
  if failed:
    sys.exit(f'{len(failed)} run(s) failed: {failed}')


if __name__ == '__main__':
  app.run(main)
