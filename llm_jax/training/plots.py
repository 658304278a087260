"""A run's curves as PNG files, and several runs' curves overlaid, from metrics.jsonl.

The training loop appends one JSON object a line to `<workdir>/metrics.jsonl`
(`{"step": 100, "train/loss": 2.3, ...}` and `{"step": 100, "eval/loss": 2.4, ...}`), so the
plots can be drawn at any time, also while the run goes on:

    plots.write_run_plots(workdir)          # <workdir>/plots/{loss,learning_rate,eval}.png
    plots.write_comparison([a, b], 'cmp.png')

Figures are built with matplotlib's object API on the Agg canvas: no pyplot state, no display
needed, and a notebook's own matplotlib backend is left alone.
"""

import io
import json
import math
import os
from typing import TYPE_CHECKING, Optional, Sequence

from etils import epath

if TYPE_CHECKING:
  from matplotlib import figure  # pylint: disable=g-import-not-at-top

PLOTS_SUBDIR = 'plots'
METRICS_FILENAME = 'metrics.jsonl'
TRAIN_LOSS, EVAL_LOSS, LEARNING_RATE = 'train/loss', 'eval/loss', 'train/learning_rate'
# Held-out loss ('eval/...') and the in-loop task evaluators ('evals/<name>/...').
EVAL_PREFIXES = ('eval/', 'evals/')
# Evaluation figures that are bookkeeping, not quality.
_NOT_PLOTTED = ('eval/tokens',)
_DPI = 100


def read_metrics(workdir: str) -> list[dict]:
  """The records of `<workdir>/metrics.jsonl`, in file order.

  A line cut short by a writer that is still running (only the last one can be) is ignored.

  Raises:
    FileNotFoundError: naming the file, if the workdir has no metrics.jsonl.
    ValueError: naming the file and line, if a line before the last is not JSON.
  """
  path = epath.Path(workdir) / METRICS_FILENAME
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist: is {workdir!r} a training workdir?')
  lines = path.read_text().split('\n')
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number == len(lines):  # the unfinished last line of a live run
        continue
      raise ValueError(f'{path} line {number} is not JSON: {e}') from None
  return records


def series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one metric, sorted by step.

  A resumed run appends the steps after its checkpoint again: the last record of a step wins.
  """
  by_step = {r['step']: r[key] for r in records if key in r and 'step' in r}
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def eval_keys(records: Sequence[dict]) -> list[str]:
  """Every evaluation metric the records hold ('eval/...', 'evals/...'), in first-seen order."""
  keys = {}
  for record in records:
    for key in record:
      if key.startswith(EVAL_PREFIXES) and key not in _NOT_PLOTTED:
        keys[key] = None
  return list(keys)


def _new_figure(rows: int = 1, cols: int = 1, width: float = 6.4, height: float = 4.0):
  # Imported here: matplotlib writes its caches under $HOME, which a run that only trains (a
  # TPU VM writing to gs://) should leave alone.
  from matplotlib import figure as figure_lib  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  fig = figure_lib.Figure(figsize=(width * cols, height * rows), dpi=_DPI, layout='constrained')
  backend_agg.FigureCanvasAgg(fig)
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax in axes.flat:
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # steps are whole
  return fig, axes


def _plot(ax, records, key, label=None, **style):
  steps, values = series(records, key)
  if steps:
    ax.plot(steps, values, label=label or key, **style)
  return bool(steps)


def loss_figure(records: Sequence[dict], title: str = '') -> 'figure.Figure':
  """Training loss per logged step, with the evaluation loss as points on the same axes."""
  fig, axes = _new_figure()
  ax = axes[0, 0]
  _plot(ax, records, TRAIN_LOSS, 'train loss')
  _plot(ax, records, EVAL_LOSS, 'eval loss', marker='o')
  ax.set(xlabel='step', ylabel='loss (nats per token)', title=title or 'loss')
  ax.grid(alpha=0.3)
  ax.legend()
  return fig


def learning_rate_figure(records: Sequence[dict], title: str = '') -> 'figure.Figure':
  fig, axes = _new_figure()
  ax = axes[0, 0]
  _plot(ax, records, LEARNING_RATE, 'learning rate')
  ax.set(xlabel='step', ylabel='learning rate', title=title or 'learning rate')
  ax.ticklabel_format(axis='y', style='sci', scilimits=(-2, 3))
  ax.grid(alpha=0.3)
  return fig


def eval_figure(records: Sequence[dict], title: str = '') -> Optional['figure.Figure']:
  """One panel per evaluation metric; None if the run has not evaluated yet."""
  keys = eval_keys(records)
  if not keys:
    return None
  cols = min(len(keys), 3)
  fig, axes = _new_figure(math.ceil(len(keys) / cols), cols, width=4.5, height=3.2)
  for ax, key in zip(axes.flat, keys):
    _plot(ax, records, key, marker='o')
    ax.set(xlabel='step', title=key.split('/', 1)[1])
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(keys):]:
    ax.set_visible(False)
  if title:
    fig.suptitle(title)
  return fig


def write_run_plots(workdir: str, out_dir: Optional[str] = None) -> list[str]:
  """Writes loss.png, learning_rate.png and (once evaluated) eval.png; returns their paths.

  Args:
    workdir: a training workdir (its metrics.jsonl is read).
    out_dir: where the PNG files go; `<workdir>/plots` by default.
  """
  records = read_metrics(workdir)
  out_dir = out_dir or os.path.join(workdir, PLOTS_SUBDIR)
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  title = os.path.basename(os.path.normpath(workdir))
  figures = {'loss': loss_figure(records, f'{title}: loss'),
             'learning_rate': learning_rate_figure(records, f'{title}: learning rate'),
             'eval': eval_figure(records, f'{title}: evaluation')}
  paths = []
  for name, fig in figures.items():
    if fig is None:
      continue
    path = os.path.join(out_dir, f'{name}.png')
    _save(fig, path)
    paths.append(path)
  return paths


def comparison_figure(workdirs: Sequence[str],
                      labels: Optional[Sequence[str]] = None) -> 'figure.Figure':
  """Several runs' training loss (left) and evaluation loss (right), one colour per run.

  Args:
    workdirs: training workdirs.
    labels: one legend entry per workdir; the workdirs' base names by default.
  """
  if not workdirs:
    raise ValueError('no workdir to compare')
  labels = labels or [os.path.basename(os.path.normpath(w)) for w in workdirs]
  if len(labels) != len(workdirs):
    raise ValueError(f'{len(labels)} labels for {len(workdirs)} workdirs')
  fig, axes = _new_figure(1, 2)
  train_ax, eval_ax = axes[0]
  for index, (workdir, label) in enumerate(zip(workdirs, labels)):
    records = read_metrics(workdir)
    color = f'C{index % 10}'
    _plot(train_ax, records, TRAIN_LOSS, label, color=color)
    _plot(eval_ax, records, EVAL_LOSS, label, color=color, marker='o')
  train_ax.set(xlabel='step', ylabel='loss (nats per token)', title='train loss')
  eval_ax.set(xlabel='step', ylabel='loss (nats per token)', title='eval loss')
  for ax in (train_ax, eval_ax):
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize='small')
  return fig


def write_comparison(workdirs: Sequence[str], out: str,
                     labels: Optional[Sequence[str]] = None) -> str:
  """Writes `comparison_figure(workdirs, labels)` to the PNG file `out`; returns `out`."""
  epath.Path(out).parent.mkdir(parents=True, exist_ok=True)
  _save(comparison_figure(workdirs, labels), out)
  return out


def _save(fig, path: str):
  """Writes the PNG in one piece (a temporary file renamed locally), so a reader mid-run never
  sees half of it; to cloud storage (gs://...) in one upload."""
  if '://' in path:
    data = io.BytesIO()
    fig.savefig(data, format='png', dpi=_DPI)
    epath.Path(path).write_bytes(data.getvalue())
    return
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=_DPI)
  os.replace(tmp, path)
