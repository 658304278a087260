"""An unreadable latest checkpoint names its step and the override that restores an earlier one."""

import pathlib
import re

import jax
import numpy as np
import pytest

from llm_jax import model as model_lib
from llm_jax.training import checkpoint
from llm_jax.training import restore_errors

MODEL_CONFIG = model_lib.get_preset('tiny', vocab_size=128, embed_dim=32, num_layers=1)


@pytest.fixture(name='manager')
def _manager(tmp_path):
  """Steps 1, 2 and 3, whose single parameter is filled with the step number."""
  manager = checkpoint.create_manager(str(tmp_path / 'checkpoints'), async_save=False)
  for step in (1, 2, 3):
    checkpoint.save(manager, step, MODEL_CONFIG, {'w': np.full((4, 4), step, np.float32)})
  manager.wait_until_finished()
  yield manager
  manager.close()


def _target():
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return {'w': jax.ShapeDtypeStruct((4, 4), np.float32, sharding=device)}


def _restore_params(manager, step):
  return restore_errors.read_step(manager, step, lambda: checkpoint.restore(
      manager, step, _target())['params'])


def _garble(directory, array_data_only=False):
  """Overwrites the files below `directory` (or only the array data in TensorStore's `d/`
  folders, leaving the metadata intact) with bytes no reader accepts."""
  files = [p for p in pathlib.Path(directory).rglob('*')
           if p.is_file() and (p.parent.name == 'd' or not array_data_only)]
  assert files
  for path in files:
    path.write_bytes(b'\xde\xad' * 7)


def _expected_message(manager, step: int) -> str:
  return f'checkpoint step {step} in {manager.directory} cannot be read ('


@pytest.mark.parametrize('item', ['params', 'params array data', 'model_config'])
def test_unreadable_latest_step_names_it_and_an_earlier_one(manager, item):
  _garble(manager.directory / '3' / item.split()[0], array_data_only=item.endswith('data'))
  step = restore_errors.resume_step(manager, 0)
  assert step == 3
  read = ((lambda: _restore_params(manager, step)) if item.startswith('params') else
          (lambda: restore_errors.read_step(
              manager, step, lambda: checkpoint.read_model_config(manager, step))))
  with pytest.raises(restore_errors.UnreadableCheckpointError) as info:
    read()
  message = str(info.value)
  assert message.startswith(_expected_message(manager, 3)), message
  assert message.endswith('); rerun with --config.checkpoint.restore_step=2 to restore an '
                          'earlier step (available: [1, 2, 3])'), message
  assert '\n' not in message
  assert info.value.__cause__ is not None  # the original error stays attached

  # The advice works: step 2 restores.
  earlier = restore_errors.resume_step(manager, 2)
  np.testing.assert_array_equal(_restore_params(manager, earlier)['w'], np.full((4, 4), 2.0))


def test_no_earlier_step_says_so(manager):
  _garble(manager.directory / '1' / 'params')
  with pytest.raises(restore_errors.UnreadableCheckpointError,
                     match=re.escape('no earlier step is available ([1, 2, 3])')):
    _restore_params(manager, 1)


def test_restore_step_must_be_listed(manager):
  with pytest.raises(ValueError, match=re.escape(
      f'checkpoint.restore_step=5 is not a step in {manager.directory}; available: [1, 2, 3]')):
    restore_errors.resume_step(manager, 5)
  assert restore_errors.resume_step(manager, 1) == 1
