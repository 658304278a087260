"""Plots from metrics.jsonl: a run's curves, and several runs overlaid in one PNG."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import colors
from PIL import Image

from llm_jax.training import plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_run(workdir, train_losses, eval_losses, learning_rate=1e-3, partial_line=''):
  """metrics.jsonl as the training loop writes it: train records, then eval records."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for step, loss in train_losses.items():
      f.write(json.dumps({'step': step, 'train/loss': loss, 'train/learning_rate':
                          learning_rate * step, 'train/grad_norm': 1.0}) + '\n')
      if step in eval_losses:
        f.write(json.dumps({'step': step, 'eval/loss': eval_losses[step],
                            'eval/bits_per_byte': eval_losses[step] / 2,
                            'eval/tokens': 100.0}) + '\n')
    f.write(partial_line)
  return str(workdir)


def _pixels(path):
  return np.asarray(Image.open(path).convert('RGB'))


def _has_colour(pixels, name):
  """Whether any pixel is (close to) matplotlib's colour `name`, e.g. 'C0'."""
  rgb = np.array(colors.to_rgb(name)) * 255
  return bool((np.abs(pixels.astype(int) - rgb).max(axis=-1) <= 8).any())


@pytest.fixture
def two_runs(tmp_path):
  fast = _write_run(tmp_path / 'sweep' / 'lr=3e-3', {1: 5.0, 2: 4.0, 3: 3.0, 4: 2.5},
                    {2: 4.2, 4: 2.9})
  slow = _write_run(tmp_path / 'sweep' / 'lr=1e-3', {1: 5.0, 2: 4.8, 3: 4.6, 4: 4.4},
                    {2: 4.9, 4: 4.5})
  return fast, slow


def test_comparison_png_has_both_runs_curves(two_runs, tmp_path):
  out = str(tmp_path / 'cmp.png')
  fig = plots.comparison_figure(two_runs)
  train_ax, eval_ax = fig.axes
  assert [line.get_label() for line in train_ax.lines] == ['lr=3e-3', 'lr=1e-3']
  assert list(train_ax.lines[1].get_xdata()) == [1, 2, 3, 4]
  assert list(train_ax.lines[1].get_ydata()) == [5.0, 4.8, 4.6, 4.4]
  assert list(eval_ax.lines[0].get_ydata()) == [4.2, 2.9]

  assert plots.write_comparison(two_runs, out) == out
  pixels = _pixels(out)
  assert pixels.shape == (400, 1280, 3)  # figsize 12.8 x 4 inches at 100 dpi
  assert (pixels < 250).any(axis=-1).mean() > 0.02, 'the image is (nearly) blank'
  assert _has_colour(pixels, 'C0') and _has_colour(pixels, 'C1'), 'a run has no curve'
  assert not _has_colour(pixels, 'C2')


def test_plot_command_overlays_runs_in_their_common_directory(two_runs):
  result = subprocess.run([sys.executable, '-m', 'llm_jax.plot', *two_runs], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=True)
  expected = os.path.join(os.path.dirname(two_runs[0]), 'comparison.png')
  assert result.stdout.split() == [expected]
  pixels = _pixels(expected)
  assert _has_colour(pixels, 'C0') and _has_colour(pixels, 'C1')


def test_plot_command_refuses_a_directory_without_metrics_in_one_line(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'llm_jax.plot', str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().count('\n') == 0, result.stderr
  assert 'metrics.jsonl' in result.stderr and 'Traceback' not in result.stderr


def test_run_plots_mid_run_and_after_evaluation(tmp_path):
  # Mid-run: no evaluation yet, and the writer is in the middle of a line.
  workdir = _write_run(tmp_path / 'run', {1: 3.0, 2: 2.0}, {}, partial_line='{"step": 3, "tr')
  paths = plots.write_run_plots(workdir)
  assert sorted(os.path.basename(p) for p in paths) == ['learning_rate.png', 'loss.png']
  assert all(os.path.dirname(p) == os.path.join(workdir, 'plots') for p in paths)
  assert _has_colour(_pixels(paths[0]), 'C0')

  _write_run(workdir, {1: 3.0, 2: 2.0}, {2: 2.2})
  paths = plots.write_run_plots(workdir)
  assert 'eval.png' in [os.path.basename(p) for p in paths]
  fig = plots.eval_figure(plots.read_metrics(workdir))
  titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
  assert titles == ['loss', 'bits_per_byte']  # eval/tokens is bookkeeping, not plotted


def test_resumed_run_plots_the_last_record_of_a_repeated_step(tmp_path):
  workdir = _write_run(tmp_path / 'run', {1: 3.0, 2: 2.0, 3: 1.5}, {})
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:  # resumed from step 2
    f.write(json.dumps({'step': 3, 'train/loss': 1.4}) + '\n')
  fig = plots.loss_figure(plots.read_metrics(workdir))
  line, = fig.axes[0].lines
  assert list(line.get_xdata()) == [1, 2, 3]
  assert list(line.get_ydata()) == [3.0, 2.0, 1.4]


def test_damaged_metrics_line_is_named(tmp_path):
  workdir = _write_run(tmp_path / 'run', {1: 3.0}, {})
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path) as f:
    good = f.read()
  with open(path, 'w') as f:
    f.write('not json\n' + good)
  with pytest.raises(ValueError, match='metrics.jsonl line 1'):
    plots.read_metrics(workdir)
