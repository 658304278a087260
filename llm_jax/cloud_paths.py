"""Paths that may be local or on cloud storage (gs://...), all opened through etils.epath.

Local files and cloud objects differ in two ways the rest of the package cares about: a cloud
object cannot be memory-mapped or appended to, and an upload is already all-or-nothing, so the
write-then-rename that makes a local write atomic is only a slower copy there (and an emulator
or a bucket without the move API turns the rename into retries).
"""

import os
from typing import Union

from etils import epath


def is_cloud(path) -> bool:
  """Whether `path` names cloud storage (a URL such as gs://bucket/x) rather than a local file."""
  return '://' in os.fspath(path)


def write_atomically(path, data: Union[str, bytes]) -> None:
  """Writes `data` so that readers see the old file or the whole new one, never a part."""
  path = epath.Path(path)
  target = path if is_cloud(path) else path.parent / f'{path.name}.tmp{os.getpid()}'
  if isinstance(data, bytes):
    target.write_bytes(data)
  else:
    target.write_text(data)
  if target != path:
    target.replace(path)
