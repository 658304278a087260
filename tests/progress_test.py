"""Progress: a bar with rate and ETA when watched, plain log lines when redirected; the summary."""

import fcntl
import io
import logging
import os
import pty
import struct
import subprocess
import sys
import termios

from llm_jax.training import progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A loop as an evaluation or conversion would write it, deciding by itself where it runs.
LOOP = '''
from llm_jax.training import progress
with progress.phase('compiling'):
  pass
with progress.Progress(5, 'train') as bar:
  for step in range(5):
    bar.update(1, loss=2.5)
  bar.write('step 5 done')
'''


def _run_in_terminal(argv):
  """stdout+stderr of `argv` run in a pseudo-terminal, as a person at a terminal sees them."""
  main, secondary = pty.openpty()
  fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 100, 0, 0))  # 24 x 100
  process = subprocess.Popen(argv, stdin=secondary, stdout=secondary, stderr=secondary,
                             cwd=ROOT, env=_env())
  os.close(secondary)
  chunks = []
  while True:
    try:
      data = os.read(main, 65536)
    except OSError:  # the terminal closes when the process exits
      break
    if not data:
      break
    chunks.append(data)
  os.close(main)
  assert process.wait(timeout=300) == 0, b''.join(chunks).decode(errors='replace')
  return b''.join(chunks).decode(errors='replace')


def _env():
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return env


def test_bar_shows_count_rate_eta_and_figures():
  stream = io.StringIO()
  with progress.Progress(10, 'train', interactive=True, stream=stream) as bar:
    for _ in range(3):
      bar.update(1, loss=2.3456789)
  out = stream.getvalue()
  assert 'train' in out and '3/10' in out
  assert 'step/s' in out or 's/step' in out  # the rate
  assert '<' in out  # elapsed<remaining: the ETA
  assert 'loss=2.346' in out


def test_plain_mode_writes_no_bar_and_logs_lines(caplog):
  stream = io.StringIO()
  with caplog.at_level(logging.INFO, logger='absl'):
    with progress.Progress(10, 'train', interactive=False, stream=stream) as bar:
      bar.update(3, loss=2.0)
      bar.write('step 3/10 | loss 2.0000')
    items = list(progress.track(range(4), 'eval', unit='batch', interactive=False))
  assert not stream.getvalue()
  assert items == [0, 1, 2, 3]
  messages = [r.getMessage() for r in caplog.records]
  assert 'step 3/10 | loss 2.0000' in messages
  assert any(m.startswith('eval: 4 batches in') for m in messages), messages


def test_phase_is_announced_before_and_timed_after():
  stream = io.StringIO()
  with progress.phase('compiling train step', interactive=True, stream=stream):
    stream.write('<work>\n')
  lines = stream.getvalue().splitlines()
  assert lines[0] == 'compiling train step...'
  assert lines[1] == '<work>'
  assert lines[2].startswith('compiling train step: done in ') and lines[2].endswith(' s')


def test_terminal_gets_a_bar_and_a_redirected_output_gets_lines(tmp_path):
  terminal = _run_in_terminal([sys.executable, '-c', LOOP])
  assert '\r' in terminal and '5/5' in terminal and 'step 5 done' in terminal
  assert 'compiling...' in terminal

  log = tmp_path / 'log.txt'
  with open(log, 'w') as f:
    subprocess.run([sys.executable, '-c', 'from absl import logging\n'
                    'logging.set_verbosity(logging.INFO)\n' + LOOP], stdout=f,
                   stderr=subprocess.STDOUT, cwd=ROOT, env=_env(), check=True, timeout=120)
  redirected = log.read_text()
  assert '\r' not in redirected and '5/5' not in redirected
  assert 'compiling...' in redirected and 'step 5 done' in redirected


def test_summary_puts_bits_per_byte_next_to_gzip():
  summary = {'step': 300, 'eval_loss': 1.23456, 'eval_perplexity': 3.437,
             'eval_bits_per_byte': 0.912, 'gzip_bits_per_byte': 1.75,
             'tokens_per_second': 12345.6, 'wall_seconds': 250.0, 'skipped_steps': []}
  text = progress.format_summary(summary, ['/w/plots/loss.png', '/w/plots/eval.png'])
  assert text.splitlines() == [
      'Trained 300 steps in 4.2 min (12,346 tokens/s while training).',
      'Eval loss 1.2346 (perplexity 3.44), 0.912 bits per byte (better than gzip: 1.750).',
      'Plots: loss.png, eval.png in /w/plots.']
  worse = progress.format_summary(dict(summary, eval_bits_per_byte=2.0))
  assert 'not yet below gzip: 1.750' in worse
