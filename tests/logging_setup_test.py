"""quiet_library_logs: a real Orbax save logs no INFO lines any more, llm_jax's INFO lines stay."""

import logging
import os

from absl import logging as absl_logging
import numpy as np
import orbax.checkpoint as ocp
import pytest

import llm_jax
from llm_jax import logging_setup
from llm_jax.training import metrics

LLM_JAX_DIR = os.path.join(os.path.dirname(os.path.realpath(llm_jax.__file__)), '')


class _Records(logging.Handler):

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.records = []

  def emit(self, record):
    self.records.append(record)

  def info_from(self, package_dir):
    return [r for r in self.records
            if r.levelno == logging.INFO and os.path.realpath(r.pathname).startswith(package_dir)]


@pytest.fixture(name='records')
def _records_fixture():
  """Captures every record at INFO and above; undoes quiet_library_logs afterwards."""
  handler = _Records()
  root = logging.getLogger()
  absl_logger = logging.getLogger('absl')
  levels = {name: logging.getLogger(name).level for name in logging_setup.QUIET_LOGGERS}
  verbosity, root_level = absl_logging.get_verbosity(), root.level
  absl_logging.set_verbosity(absl_logging.INFO)
  root.setLevel(logging.INFO)  # as under absl's app.run with its default verbosity
  root.addHandler(handler)
  yield handler
  root.removeHandler(handler)
  root.setLevel(root_level)
  absl_logging.set_verbosity(verbosity)
  for f in [f for f in absl_logger.filters if isinstance(f, logging_setup.LibraryInfoFilter)]:
    absl_logger.removeFilter(f)
  for name, level in levels.items():
    logging.getLogger(name).setLevel(level)


def _save_checkpoint(path):
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, {'w': np.arange(4, dtype=np.float32)})


def test_orbax_info_lines_are_dropped_ours_are_kept(records, tmp_path):
  orbax_dir = os.path.join(os.path.dirname(os.path.realpath(ocp.__file__)), '')
  _save_checkpoint(tmp_path / 'before')
  assert records.info_from(orbax_dir), 'Orbax logged no INFO line: nothing to quiet'
  records.records.clear()

  logging_setup.quiet_library_logs()
  logging_setup.quiet_library_logs()  # a second call adds no second filter
  assert sum(isinstance(f, logging_setup.LibraryInfoFilter)
             for f in logging.getLogger('absl').filters) == 1
  _save_checkpoint(tmp_path / 'after')
  metrics.write_summary(str(tmp_path), {'step': 1})

  assert not records.info_from(orbax_dir), [r.getMessage() for r in records.records]
  ours = records.info_from(LLM_JAX_DIR)
  assert any('summary.json' in r.getMessage() for r in ours), [r.getMessage() for r in ours]
  assert (tmp_path / 'after').is_dir()


def test_jax_info_lines_are_dropped_its_warnings_kept(records):
  logging.getLogger('jax._src.xla_bridge').info('chatter before')
  logging_setup.quiet_library_logs()
  logging.getLogger('jax._src.xla_bridge').info('chatter')
  logging.getLogger('jax._src.xla_bridge').warning('a real problem')
  messages = [r.getMessage() for r in records.records]
  assert 'chatter before' in messages, 'jax INFO lines were hidden already: nothing to test'
  assert 'a real problem' in messages and 'chatter' not in messages
