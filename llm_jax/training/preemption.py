"""Stopping a run without losing work: preemption (SIGTERM) and Ctrl-C.

  * SIGTERM (a TPU preemption notice, a scheduler's stop): the run saves a checkpoint at the
    current step and exits with PREEMPTED_EXIT_CODE, "preempted, rerun to resume", so that a
    scheduler that restarts failed jobs restarts it. With several processes, JAX's
    coordination service owns SIGTERM: a notice to any one process makes every process stop
    at the same step (`reached_preemption_sync_point`), so they save the same checkpoint.
  * Ctrl-C (one process): the first saves a checkpoint and exits with one line; a second
    exits at once. With several processes a Ctrl-C raises KeyboardInterrupt as usual: the
    pending asynchronous save is finished, nothing new is saved (the others cannot join).
"""

import os
import signal
import sys

import jax
from absl import logging
from jax.experimental import multihost_utils

PREEMPTED_EXIT_CODE = 42
INTERRUPTED_EXIT_CODE = 130


class StopRequests:
  """Context manager that turns SIGTERM / Ctrl-C into a stop at a step boundary."""

  def __init__(self):
    self.preempted = False
    self.interrupted = False
    self._previous = {}
    self._calls = 0

  def __enter__(self):
    if jax.process_count() == 1:
      # With several processes JAX's own handler must stay installed: it is what makes all
      # of them reach the preemption sync point at the same step.
      self._install(signal.SIGTERM, self._on_sigterm)
      self._install(signal.SIGINT, self._on_sigint)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _install(self, signum, handler):
    self._previous[signum] = signal.signal(signum, handler)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint at this step, then exiting')
    self.preempted = True

  def _on_sigint(self, signum, frame):
    del signum, frame
    if self.interrupted:
      print('\nsecond Ctrl-C: exiting now without a checkpoint', file=sys.stderr, flush=True)
      os._exit(INTERRUPTED_EXIT_CODE)  # pylint: disable=protected-access
    print('\nCtrl-C: saving a checkpoint at this step (Ctrl-C again to exit at once)',
          file=sys.stderr, flush=True)
    self.interrupted = True

  def should_stop(self) -> bool:
    """Whether to save and stop after the step just run; all processes agree on the step.

    Every process must call it once per step, from the first step of this attempt on.
    """
    self._calls += 1
    # JAX's sync point is "the fastest process's last call + 1", with 0 before any call. The
    # calls of this attempt, counted from 1, keep that meaning after a resume: a notice that
    # comes before the first step (while restoring or compiling) stops after that step. Given
    # the resumed step instead, such a notice would set the sync point to 1, never reached.
    if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(self._calls):
      self.preempted = True
    return self.preempted or self.interrupted
