"""Training metrics: TensorBoard events, log lines with ETA, throughput and MFU, summary.json."""

import json
import math
import time
from typing import Optional

import jax
from absl import logging
from etils import epath
from tensorboardX import SummaryWriter

from llm_jax import cloud_paths
from llm_jax.tools import flops


def perplexity(loss: float) -> float:
  """exp(loss), capped so a diverged run logs a large number instead of overflowing."""
  return math.exp(min(loss, 50.0))


def bits_per_byte(loss_sum_nats: float, num_bytes: int) -> float:
  """Total cross-entropy in nats over a text -> bits per UTF-8 byte of that text."""
  return loss_sum_nats / (math.log(2) * max(num_bytes, 1))


class MetricsWriter:
  """Writes scalars to TensorBoard and to metrics.jsonl (one JSON object a line), process 0 only.

  The JSON lines are for scripts (sweeps, tests, plots) that want the numbers without
  TensorBoard. A resumed run first drops the rows after the step it resumes from (written
  after that checkpoint by the attempt that died), so the file has one row per step and kind.
  Cloud storage has no appending: there the whole file is rewritten at every write.
  """

  def __init__(self, workdir, resume_step: Optional[int] = None):
    self._writer = None
    self._path = epath.Path(workdir) / 'metrics.jsonl'
    self._lines: list[str] = []
    self._append = '://' not in str(self._path)
    if jax.process_index() == 0:
      self._writer = SummaryWriter(str(epath.Path(workdir) / 'tensorboard'))
      if self._path.exists():
        self._lines = [line for line in self._path.read_text().splitlines()
                       if line and (resume_step is None or
                                    json.loads(line)['step'] <= resume_step)]
        self._path.write_text(''.join(line + '\n' for line in self._lines))

  def write(self, step: int, scalars: dict, prefix: str = ''):
    if self._writer is None:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(f'{prefix}{name}', float(value), step)
    self._writer.flush()
    record = {'step': step, **{f'{prefix}{k}': float(v) for k, v in scalars.items()}}
    self._lines.append(json.dumps(record))
    if self._append:
      with self._path.open('a') as f:
        f.write(self._lines[-1] + '\n')
    else:
      self._path.write_text(''.join(line + '\n' for line in self._lines))

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None


class Throughput:
  """Tokens/s, step time, MFU and ETA between two log points, and over the whole run.

  Counts every token of every row (B x T per step), padding included, since the accelerator
  computes on all of them; the loss is normalised by the scored tokens instead.
  """

  def __init__(self, model_config, batch_shape, num_steps: int):
    self._tokens_per_step = batch_shape[0] * batch_shape[1]
    self._flops_per_token = flops.training_flops_per_token(model_config, batch_shape[1])
    self._peak = flops.device_peak_flops(jax.devices()[0])
    self._num_devices = jax.device_count()
    self._num_steps = num_steps
    self._last_time: Optional[float] = None
    self._last_step = 0
    self.total_tokens = 0
    self.total_seconds = 0.0

  def start(self, step: int):
    """(Re)starts the clock, e.g. after compilation or evaluation, which are not training."""
    self._last_time, self._last_step = time.time(), step

  def measure(self, step: int) -> dict:
    """Figures for the steps since the last call."""
    now = time.time()
    elapsed = max(now - self._last_time, 1e-9)
    steps = max(step - self._last_step, 1)
    tokens = steps * self._tokens_per_step
    self.total_tokens += tokens
    self.total_seconds += elapsed
    tokens_per_second = tokens / elapsed
    result = {'tokens_per_second': tokens_per_second, 'step_seconds': elapsed / steps,
              'eta_seconds': (self._num_steps - step) * elapsed / steps}
    if self._peak:
      result['mfu'] = flops.mfu(tokens_per_second, self._flops_per_token, self._num_devices,
                                self._peak)
    self._last_time, self._last_step = now, step
    return result

  @property
  def tokens_per_second(self) -> float:
    return self.total_tokens / self.total_seconds if self.total_seconds else 0.0


def format_line(step: int, num_steps: int, scalars: dict) -> str:
  """One progress line: step, loss, perplexity, lr, grad norm, speed, ETA."""
  parts = [f'step {step}/{num_steps}']
  for key, fmt in (('loss', '.4f'), ('perplexity', '.2f'), ('learning_rate', '.2e'),
                   ('grad_norm', '.3f'), ('tokens_per_second', ',.0f'), ('step_seconds', '.3f'),
                   ('mfu', '.1%')):
    if key in scalars:
      parts.append(f'{key} {scalars[key]:{fmt}}')
  if 'eta_seconds' in scalars:
    parts.append(f"eta {scalars['eta_seconds'] / 60:.1f} min")
  return ' | '.join(parts)


SUMMARY_FILENAME = 'summary.json'


def write_summary(workdir, summary: dict):
  """Writes summary.json atomically (readers never see part of it)."""
  path = epath.Path(workdir) / SUMMARY_FILENAME
  cloud_paths.write_atomically(path, json.dumps(summary, indent=2, sort_keys=True))
  logging.info('wrote %s', path)


def read_summary(workdir) -> Optional[dict]:
  """The summary.json of a finished run, or None."""
  path = epath.Path(workdir) / SUMMARY_FILENAME
  return json.loads(path.read_text()) if path.exists() else None
