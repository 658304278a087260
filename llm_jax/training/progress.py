"""Progress a person can see: a bar with rate and ETA when watched, plain log lines otherwise.

In a terminal or a Jupyter/Colab notebook a loop shows a tqdm bar (a widget where ipywidgets is
installed, text otherwise); with its output redirected to a file it writes absl log lines
instead, so log files hold no carriage returns. Work that shows no steps, such as compiling a
step function, is announced as a phase of its own ("compiling train step..." then its duration)
before the bar starts. `format_summary` turns a run's summary.json into a few lines for a person.

    with progress.phase('compiling train step'):
      state, metrics = train_step(state, batch)
    with progress.Progress(num_steps, 'train', initial=1) as bar:
      ...
      bar.update(1, loss=loss)
    for batch in progress.track(batches, 'eval', unit='batch'):
      ...
"""

import contextlib
import importlib.util
import os
import sys
import time
from typing import Any, Iterable, Iterator, Optional, Sequence, TextIO

from absl import logging
from tqdm import std as tqdm_std

# Plain-mode `track` loops log their position at most this often.
_LOG_EVERY_SECONDS = 30.0


def in_notebook() -> bool:
  """Whether this process is a Jupyter/Colab kernel (which shows a bar, not log lines)."""
  ipython = sys.modules.get('IPython')
  if ipython is None:
    return False
  shell = ipython.get_ipython()
  return shell is not None and 'IPKernelApp' in shell.config


def default_stream() -> TextIO:
  """The notebook's stdout cell output, else stderr, where a terminal bar belongs."""
  return sys.stdout if in_notebook() else sys.stderr


def is_interactive(stream: Optional[TextIO] = None) -> bool:
  """Whether a person watches `stream` (default: `default_stream()`): a notebook or a terminal."""
  if in_notebook():
    return True
  stream = stream or default_stream()
  isatty = getattr(stream, 'isatty', None)
  return bool(isatty and isatty())


def _has_widgets() -> bool:
  return importlib.util.find_spec('ipywidgets') is not None


def _bar_class():
  """tqdm's notebook widget where ipywidgets is installed; the text bar everywhere else.

  Like tqdm.auto, without its warning when a notebook lacks ipywidgets: the text bar then
  updates in place in the cell output just as well (one bar at a time: a notebook's text
  output cannot move the cursor up to a second one).
  """
  if in_notebook() and _has_widgets():
    from tqdm import notebook  # pylint: disable=g-import-not-at-top
    return notebook.tqdm
  return tqdm_std.tqdm


class Progress:
  """A progress bar (rate, ETA, latest figures) when watched; log lines through absl otherwise.

  Attributes:
    interactive: whether the bar is shown.
  """

  def __init__(self, total: Optional[int], desc: str, *, initial: int = 0, unit: str = 'step',
               interactive: Optional[bool] = None, stream: Optional[TextIO] = None,
               leave: bool = True):
    """Starts the bar (or nothing, in plain mode).

    Args:
      total: the number of units at completion (None: unknown, no ETA).
      desc: a short name shown before the bar.
      initial: units already done (a resumed run).
      unit: what one update counts, e.g. 'step', 'batch', 'token'.
      interactive: force the bar on or off; None decides by `is_interactive(stream)`.
      stream: where the bar goes; `default_stream()` by default.
      leave: keep the finished bar on screen (False for a bar nested in another loop).
    """
    self._stream = stream or default_stream()
    self.interactive = is_interactive(self._stream) if interactive is None else interactive
    self.desc = desc
    self._bar = None
    if self.interactive:
      bar_class = tqdm_std.tqdm if stream is not None else _bar_class()
      self._bar = bar_class(total=total, desc=desc, initial=initial, unit=unit,
                            file=self._stream, leave=leave, dynamic_ncols=True)

  def update(self, n: int = 1, **figures: Any):
    """Advances by `n` units; `figures` (e.g. loss=2.3) are shown after the bar."""
    if self._bar is None:
      return
    if figures:
      self._bar.set_postfix({k: _short(v) for k, v in figures.items()}, refresh=False)
    self._bar.update(n)

  def write(self, message: str):
    """A line above the bar when interactive (the bar stays below it), else an INFO log line."""
    if self._bar is None:
      logging.info('%s', message, stacklevel=2)  # the log names the caller's file and line
    else:
      self._bar.write(message, file=self._stream)

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self) -> 'Progress':
    return self

  def __exit__(self, *exc):
    self.close()


def _short(value: Any) -> str:
  if isinstance(value, float):
    return f'{value:.4g}'
  return str(value)


@contextlib.contextmanager
def phase(name: str, *, interactive: Optional[bool] = None,
          stream: Optional[TextIO] = None) -> Iterator[None]:
  """Announces work that shows no steps: 'NAME...' now, 'NAME: done in S s' when it ends.

  Args:
    name: e.g. 'compiling train step'.
    interactive: print to `stream` (True) or log through absl (False); None decides.
    stream: where to print; `default_stream()` by default.
  """
  stream = stream or default_stream()
  interactive = is_interactive(stream) if interactive is None else interactive

  def say(message):
    if interactive:
      print(message, file=stream, flush=True)
    else:
      logging.info('%s', message)

  say(f'{name}...')
  start = time.perf_counter()
  yield
  say(f'{name}: done in {time.perf_counter() - start:.1f} s')


def track(iterable: Iterable, desc: str, *, total: Optional[int] = None, unit: str = 'it',
          interactive: Optional[bool] = None, stream: Optional[TextIO] = None,
          leave: bool = False, log_end: bool = True) -> Iterator:
  """Yields the items of `iterable` with a bar, or in plain mode logs its position now and then.

  For evaluation, conversion and generation loops. Plain mode logs at most every 30 s and, with
  `log_end`, once at the end ('DESC: N units in S s').

  Args:
    iterable: the loop's items.
    desc: a short name for the loop.
    total: its length, if `len(iterable)` does not tell.
    unit: what one item is.
    interactive: force the bar on or off; None decides by `is_interactive(stream)`.
    stream: where the bar goes.
    leave: keep the finished bar on screen.
    log_end: in plain mode, log the count and time at the end (off when the caller logs its
      own result line).
  """
  if total is None and hasattr(iterable, '__len__'):
    total = len(iterable)
  if interactive is None and stream is None and in_notebook() and not _has_widgets():
    interactive = False  # a second text bar would garble the cell output of the first
  bar = Progress(total, desc, unit=unit, interactive=interactive, stream=stream, leave=leave)
  start = last_log = time.perf_counter()
  count = 0
  try:
    for item in iterable:
      yield item
      count += 1
      bar.update(1)
      now = time.perf_counter()
      if not bar.interactive and now - last_log >= _LOG_EVERY_SECONDS:
        last_log = now
        logging.info('%s: %d/%s %s', desc, count, total if total is not None else '?',
                     _plural(unit))
  finally:
    bar.close()
  if not bar.interactive and log_end:
    logging.info('%s: %d %s in %.1f s', desc, count, _plural(unit, count),
                 time.perf_counter() - start)


def _plural(unit: str, count: int = 2) -> str:
  if count == 1:
    return unit
  return unit + ('es' if unit.endswith(('s', 'x', 'ch', 'sh')) else 's')


def format_summary(summary: dict, plots: Sequence[str] = ()) -> str:
  """A few lines a person reads at the end of a run, from the fields of summary.json.

  Args:
    summary: as written by the training loop ('step', 'eval_loss', 'eval_perplexity',
      'eval_bits_per_byte', 'gzip_bits_per_byte', 'tokens_per_second', 'wall_seconds');
      absent fields are left out.
    plots: paths of the run's plots.
  """
  lines = []
  trained = f"Trained {summary['step']} steps" if 'step' in summary else 'Run finished'
  if 'wall_seconds' in summary:
    trained += f" in {_duration(summary['wall_seconds'])}"
  if summary.get('tokens_per_second'):
    trained += f" ({summary['tokens_per_second']:,.0f} tokens/s while training)"
  lines.append(trained + '.')
  if 'eval_loss' in summary:
    evaluated = f"Eval loss {summary['eval_loss']:.4f}"
    if 'eval_perplexity' in summary:
      evaluated += f" (perplexity {summary['eval_perplexity']:.2f})"
    if 'eval_bits_per_byte' in summary:
      evaluated += f", {summary['eval_bits_per_byte']:.3f} bits per byte"
      if 'gzip_bits_per_byte' in summary:
        gzip = summary['gzip_bits_per_byte']
        verdict = 'better than' if summary['eval_bits_per_byte'] < gzip else 'not yet below'
        evaluated += f' ({verdict} gzip: {gzip:.3f})'
    lines.append(evaluated + '.')
  if summary.get('skipped_steps'):
    lines.append(f"Skipped non-finite steps: {summary['skipped_steps']}.")
  if plots:
    directories = sorted({os.path.dirname(p) for p in plots})
    names = ', '.join(os.path.basename(p) for p in plots)
    lines.append(f"Plots: {names} in {', '.join(directories)}.")
  return '\n'.join(lines)


def _duration(seconds: float) -> str:
  if seconds < 120:
    return f'{seconds:.1f} s'
  if seconds < 7200:
    return f'{seconds / 60:.1f} min'
  return f'{seconds / 3600:.2f} h'
