"""Which checkpoint step to resume, and an error that says how to get past an unreadable one.

A step Orbax lists is complete, but its files can still fail to read (a truncated copy, a
deleted shard, a bucket object rewritten by hand). Resuming then fails deep inside TensorStore;
`read_step` turns that into one line naming the step, the directory, the reason, and the
`checkpoint.restore_step` override that restores an earlier step instead.
"""

from typing import Callable, Optional, TypeVar

import orbax.checkpoint as ocp

T = TypeVar('T')
_MAX_REASON_CHARS = 300


class UnreadableCheckpointError(RuntimeError):
  """A listed checkpoint step whose files cannot be restored."""


def resume_step(manager: ocp.CheckpointManager, restore_step: int = 0) -> Optional[int]:
  """The step to resume: `restore_step` (config.checkpoint.restore_step) if > 0, else the latest.

  Args:
    manager: the run's checkpoint manager.
    restore_step: a step the manager lists, or 0 for the latest one.

  Returns:
    The step, or None when there is no checkpoint (and restore_step is 0).

  Raises:
    ValueError: restore_step is not a listed step.
  """
  if not restore_step:
    return manager.latest_step()
  steps = sorted(manager.all_steps())
  if restore_step not in steps:
    raise ValueError(f'checkpoint.restore_step={restore_step} is not a step in '
                     f'{manager.directory}; available: {steps}')
  return restore_step


def _reason(error: BaseException) -> str:
  text = ' '.join(str(error).split()) or 'no message'
  if len(text) > _MAX_REASON_CHARS:
    text = text[:_MAX_REASON_CHARS] + '...'
  return f'{type(error).__name__}: {text}'


def unreadable_checkpoint_error(manager: ocp.CheckpointManager, step: int,
                                error: BaseException) -> UnreadableCheckpointError:
  """The error for `step` failing to restore with `error`, naming the step to restore instead."""
  steps = sorted(manager.all_steps())
  earlier = [s for s in steps if s < step]
  if earlier:
    advice = (f'rerun with --config.checkpoint.restore_step={earlier[-1]} to restore an earlier '
              f'step (available: {steps})')
  else:
    advice = (f'no earlier step is available ({steps}); move {manager.directory}/{step} away to '
              'start over')
  return UnreadableCheckpointError(f'checkpoint step {step} in {manager.directory} cannot be '
                                   f'read ({_reason(error)}); {advice}')


def read_step(manager: ocp.CheckpointManager, step: int, read: Callable[[], T]) -> T:
  """Runs `read()` (restoring items of `step`); a failure becomes an UnreadableCheckpointError.

  Example:
    restored = restore_errors.read_step(manager, step, lambda: checkpoint.restore(
        manager, step, params_target, opt_state_target, with_data_state=True))
  """
  try:
    return read()
  # Orbax and TensorStore raise many types for bad files (ValueError, OSError, KeyError,
  # JSONDecodeError, tensorstore's own); the original stays chained as the cause.
  except Exception as e:  # pylint: disable=broad-except
    raise unreadable_checkpoint_error(manager, step, e) from e
