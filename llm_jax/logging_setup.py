"""Keeps the libraries' INFO lines out of the log, so that the progress lines stay readable.

Orbax alone writes about twenty INFO lines per checkpoint (save started, throughput, metadata
validation, finalize), TFDS a few per dataset load and JAX one per backend it fails to start:
about 70% of a training log. Orbax and TFDS log through absl, whose records all go to the one
Python logger 'absl', the same logger llm_jax's own `logging.info` lines use; they are told
apart by the file that logged them. Libraries that log through their own Python loggers (jax,
grain) are raised to WARNING unless something configured them already. Warnings and errors of
every library still come through.
"""

import importlib.util
import logging
import os

# Packages whose INFO records are dropped; their WARNING and above are kept.
QUIET_PACKAGES = ('orbax', 'tensorflow_datasets', 'grain', 'etils', 'gcsfs')
# Python loggers (not absl) raised to WARNING when nothing set their level before.
QUIET_LOGGERS = ('jax', 'grain', 'orbax', 'tensorflow_datasets', 'gcsfs')


def _package_dirs(names) -> tuple[str, ...]:
  """Installed directories of the packages among `names` (without importing them)."""
  dirs = []
  for name in names:
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.submodule_search_locations:
      dirs += [os.path.join(os.path.realpath(d), '') for d in spec.submodule_search_locations]
  return tuple(dirs)


class LibraryInfoFilter(logging.Filter):
  """Drops records below WARNING logged from a file inside one of `package_dirs`."""

  def __init__(self, package_dirs: tuple[str, ...]):
    super().__init__()
    self.package_dirs = package_dirs

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    return not os.path.realpath(record.pathname).startswith(self.package_dirs)


def quiet_library_logs() -> None:
  """Hides the INFO (and DEBUG) lines of Orbax, TFDS, grain, etils and JAX; keeps our own.

  Call once, early in an entry point; calling again changes nothing.
  """
  absl_logger = logging.getLogger('absl')
  if not any(isinstance(f, LibraryInfoFilter) for f in absl_logger.filters):
    absl_logger.addFilter(LibraryInfoFilter(_package_dirs(QUIET_PACKAGES)))
  for name in QUIET_LOGGERS:
    logger = logging.getLogger(name)
    if logger.level == logging.NOTSET:
      logger.setLevel(logging.WARNING)
