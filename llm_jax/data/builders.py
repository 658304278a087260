"""TFDS builders (ArrayRecord files) for the corpora that need no download.

* `PythonStdlib`: the `*.py` sources of the running interpreter's standard library, the default
  corpus (about 13 MB). Left out: site-packages and the CPython test suite (test/, */tests/,
  idlelib/idle_test/), which is as big as the library itself and holds deliberately malformed
  files. One config per interpreter version, so a different Python builds its own copy.
* `TextFiles`: the user's own `.txt` / `.jsonl` files matching a glob. A `.jsonl` line is one
  document (its `jsonl_field`); a `.txt` file is cut at line ends into documents of at most
  `TXT_DOCUMENT_CHARS` (a longer line stays whole; a small file into about 64 pieces of at least
  `TXT_MIN_DOCUMENT_CHARS`), so one big file still gives a train and a validation split. The
  config name is a fingerprint of the files (paths, sizes, modification times), so edited files
  are rebuilt.

Both split documents into train and validation by a hash of their key (relative path, plus line
or chunk number): about VALIDATION_PERCENT go to validation, and at least
MIN_VALIDATION_DOCUMENTS when there are twice as many (one of two, two of four...). Both have
the features {'text': Text, 'path': Text} and record in `info.metadata` how many files held
bytes that are not UTF-8 (decoded with U+FFFD replacement characters) or, for TextFiles, were
empty; the counts are also logged with the file names.
Preparing them needs no TensorFlow: tfds' GeneratorBasedBuilder writes ArrayRecord by itself.
"""

import dataclasses
import glob
import hashlib
import json
import os
import sys
import sysconfig
from typing import Iterator, Sequence

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

from llm_jax import cloud_paths

VALIDATION_PERCENT = 2.0
# A small corpus's validation split still holds this many documents (when it has twice as many):
# a loss measured on one document says more about that document than about the model.
MIN_VALIDATION_DOCUMENTS = 4
TXT_DOCUMENT_CHARS = 32_768
TXT_MIN_DOCUMENT_CHARS = 2_048
TXT_DOCUMENTS_PER_FILE = 64
TEXT_SUFFIXES = ('.txt', '.jsonl')
_EXCLUDED_TOP_DIRS = ('site-packages', 'dist-packages', 'test')
_EXCLUDED_DIRS = ('tests', 'idle_test', '__pycache__')
_LOGGED_FILES = 5  # a warning names at most this many files


def validation_keys(keys: Sequence[str], percent: float = VALIDATION_PERCENT) -> set[str]:
  """The keys whose SHA-256 falls in the lowest `percent`, topped up with the next lowest to
  MIN_VALIDATION_DOCUMENTS (never more than half of the keys, at least one of two)."""
  hashes = {key: int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], 'big')
            for key in keys}
  threshold = percent / 100 * 2**64
  chosen = {key for key, h in hashes.items() if h < threshold}
  minimum = max(min(MIN_VALIDATION_DOCUMENTS, len(hashes) // 2), 1 if len(hashes) >= 2 else 0)
  if len(chosen) < minimum:
    chosen = set(sorted(hashes, key=hashes.get)[:minimum])
  return chosen


def decode_utf8(data: bytes) -> tuple[str, bool]:
  """Decodes UTF-8; returns (text, whether some bytes were invalid and replaced by U+FFFD)."""
  try:
    return data.decode('utf-8'), False
  except UnicodeDecodeError:
    return data.decode('utf-8', errors='replace'), True


class _FileStats:
  """Counts empty and undecodable files while a split is generated; logs and records them."""

  def __init__(self):
    self.empty, self.undecodable = [], []

  def record(self, metadata, dataset: str) -> None:
    for kind, files in (('empty', self.empty), ('undecodable', self.undecodable)):
      metadata[f'{kind}_files'] = metadata.get(f'{kind}_files', 0) + len(files)
      if files:
        what = ('are empty' if kind == 'empty'
                else 'hold bytes that are not UTF-8 (replaced by U+FFFD)')
        logging.warning('%s: %d files %s, e.g. %s', dataset, len(files), what,
                        files[:_LOGGED_FILES])


class _LocalBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared by the builders here: their info, and where tfds finds their code."""
  # tfds finds a packaged builder's code with `importlib_resources`, which it requires only on
  # Python < 3.9 and is usually missing; this is the path its own fallback computes.
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version('1.0.0')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=_features(),
                                 metadata=tfds.core.MetadataDict())


def _features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({'text': tfds.features.Text(), 'path': tfds.features.Text()})


def stdlib_root() -> str:
  """The running interpreter's standard-library directory."""
  return sysconfig.get_paths()['stdlib']


def stdlib_files(root: str, packages: Sequence[str] = ()) -> list[str]:
  """Relative paths of the library's .py files (optionally only the given top-level names)."""
  paths = []
  for directory, subdirectories, filenames in os.walk(root):
    relative = os.path.relpath(directory, root)
    parts = [] if relative == '.' else relative.split(os.sep)
    at_top = not parts
    # Prune in place so os.walk never enters site-packages (often gigabytes) or the tests.
    subdirectories[:] = sorted(
        d for d in subdirectories
        if d not in _EXCLUDED_DIRS
        and not (at_top and (d in _EXCLUDED_TOP_DIRS or (packages and d not in packages))))
    for filename in filenames:
      if filename.endswith('.py') and not (at_top and packages and filename[:-3] not in packages):
        paths.append('/'.join(parts + [filename]))
  return sorted(paths)


@dataclasses.dataclass
class PythonStdlibConfig(tfds.core.BuilderConfig):
  """`packages`: only these top-level modules/packages (a small corpus for tests); () = all."""
  packages: tuple[str, ...] = ()


def stdlib_config(packages: Sequence[str] = ()) -> PythonStdlibConfig:
  """The config for this interpreter: named after its version (and the packages, if any)."""
  version = '_'.join(str(v) for v in sys.version_info[:3])
  name = f'py{version}' + ''.join(f'_{p}' for p in sorted(packages))
  return PythonStdlibConfig(name=name, packages=tuple(sorted(packages)),
                            description=f'Python {sys.version.split()[0]} standard library')


class PythonStdlib(_LocalBuilder):
  """The Python standard library's source files, one per document.

  Construct with `config=stdlib_config()` (or `stdlib_config(packages)` for a subset).
  """

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    root = stdlib_root()
    files = stdlib_files(root, self.builder_config.packages)
    if not files:
      raise ValueError(f'no Python files found in the standard library at {root} '
                       f'(packages={self.builder_config.packages})')
    validation = validation_keys(files)
    return {
        'train': self._generate_examples(root, [f for f in files if f not in validation]),
        'validation': self._generate_examples(root, [f for f in files if f in validation]),
    }

  def _generate_examples(self, root: str, files: Sequence[str]):
    stats = _FileStats()
    for relative in files:
      with open(os.path.join(root, relative), 'rb') as f:
        text, replaced = decode_utf8(f.read())
      if replaced:
        stats.undecodable.append(relative)
      if text:  # Empty files (many __init__.py) are expected here: skipped, not reported.
        yield relative, {'text': text, 'path': relative}
    stats.record(self.info.metadata, 'python_stdlib')


def resolve_text_files(pattern: str) -> list[str]:
  """The sorted files matching `pattern`; clear errors for a missing path or an empty match."""
  if not pattern:
    raise ValueError('config.data.text_glob is empty; set it to the .txt/.jsonl files to train '
                     'on, e.g. --config.data.text_glob=/data/*.txt')
  pattern = pattern if cloud_paths.is_cloud(pattern) else os.path.expanduser(pattern)
  if not glob.has_magic(pattern) and not epath.Path(pattern).exists():
    raise FileNotFoundError(f'text file {pattern} (config.data.text_glob) does not exist')
  if epath.Path(pattern).is_dir():
    pattern = os.path.join(pattern, '**', '*')
  if cloud_paths.is_cloud(pattern):
    files = _cloud_glob(pattern)
  else:
    files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if not files:
    raise FileNotFoundError(f'no files match config.data.text_glob={pattern!r}')
  unsupported = [f for f in files if not f.endswith(TEXT_SUFFIXES)]
  if unsupported:
    raise ValueError(f'config.data.text_glob={pattern!r} matches files that are neither .txt '
                     f'nor .jsonl: {unsupported[:_LOGGED_FILES]}')
  return files if cloud_paths.is_cloud(pattern) else [os.path.abspath(f) for f in files]


def _cloud_files_below(directory: epath.Path) -> Iterator[str]:
  for child in directory.iterdir():
    if child.is_dir():
      yield from _cloud_files_below(child)
    else:
      yield os.fspath(child)


def _cloud_glob(pattern: str) -> list[str]:
  """The sorted files matching a cloud pattern (gs://bucket/dir/*.txt, gs://bucket/dir/**/*)."""
  parts = pattern.split('/')
  first_magic = next(i for i, part in enumerate(parts) if glob.has_magic(part))
  root, rest = epath.Path('/'.join(parts[:first_magic])), '/'.join(parts[first_magic:])
  if rest == '**/*':  # a directory: every file below it
    return sorted(_cloud_files_below(root))
  if '**' in rest:  # etils.epath refuses it on cloud storage (one listing per folder)
    raise ValueError(f'config.data.text_glob={pattern!r}: ** is not supported on cloud '
                     'storage; name the folder itself to take every file below it, or use *')
  return sorted(os.fspath(p) for p in root.glob(rest) if p.is_file())


@dataclasses.dataclass
class TextFilesConfig(tfds.core.BuilderConfig):
  """`files`: absolute paths of the .txt/.jsonl files; `jsonl_field`: the text of a record."""
  files: tuple[str, ...] = ()
  jsonl_field: str = 'text'


def text_files_config(pattern: str, jsonl_field: str = 'text') -> TextFilesConfig:
  """The config for the files matching `pattern`, named by their fingerprint."""
  files = resolve_text_files(pattern)
  fingerprint = hashlib.sha256(jsonl_field.encode())
  for path in files:
    if cloud_paths.is_cloud(path):
      info = epath.Path(path).stat()
      fingerprint.update(f'{path}\0{info.length}\0{info.mtime}\0'.encode())
    else:
      info = os.stat(path)
      fingerprint.update(f'{path}\0{info.st_size}\0{info.st_mtime_ns}\0'.encode())
  return TextFilesConfig(name=f'files_{fingerprint.hexdigest()[:16]}', files=tuple(files),
                         jsonl_field=jsonl_field, description=f'{len(files)} files: {pattern}')


def _relative_names(files: Sequence[str]) -> list[str]:
  root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
  return [os.path.relpath(f, root) for f in files]


def _txt_documents(text: str) -> Iterator[str]:
  """Cuts a text at line ends into pieces of at most TXT_DOCUMENT_CHARS (a longer line alone).

  A small file is cut finer, into about TXT_DOCUMENTS_PER_FILE pieces of at least
  TXT_MIN_DOCUMENT_CHARS, so that its validation split is a few pieces, not a quarter of it.
  """
  limit = min(TXT_DOCUMENT_CHARS,
              max(TXT_MIN_DOCUMENT_CHARS, len(text) // TXT_DOCUMENTS_PER_FILE))
  chunk = []
  size = 0
  for line in text.splitlines(keepends=True):
    if chunk and size + len(line) > limit:
      yield ''.join(chunk)
      chunk, size = [], 0
    chunk.append(line)
    size += len(line)
  if chunk:
    yield ''.join(chunk)


def _jsonl_documents(data: bytes, path: str, field: str, stats: _FileStats) -> Iterator[str]:
  replaced_any = False
  for number, line in enumerate(data.split(b'\n'), start=1):
    if not line.strip():
      continue
    line, replaced = decode_utf8(line)
    replaced_any |= replaced
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{number}: not a JSON object ({e})') from e
    if not isinstance(record, dict) or field not in record:
      keys = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise ValueError(f'{path}:{number}: no field {field!r} (config.data.jsonl_field); '
                       f'the record has {keys}')
    if not isinstance(record[field], str):
      raise ValueError(f'{path}:{number}: field {field!r} is a {type(record[field]).__name__},'
                       ' not a string')
    yield record[field]
  if replaced_any:
    stats.undecodable.append(path)


class TextFiles(_LocalBuilder):
  """Local .txt / .jsonl files; construct with `config=text_files_config(pattern, field)`."""
  # 1.1.0: small .txt files cut into smaller documents; small validation splits of 2 to 4.
  VERSION = tfds.core.Version('1.1.0')

  def _documents(self, stats: _FileStats) -> Iterator[tuple[str, str]]:
    """(key, text) of every non-empty document, in file order."""
    files = self.builder_config.files
    for path, name in zip(files, _relative_names(files)):
      data = epath.Path(path).read_bytes()
      if not data.strip():
        stats.empty.append(path)
        continue
      if path.endswith('.jsonl'):
        texts = _jsonl_documents(data, path, self.builder_config.jsonl_field, stats)
      else:
        text, replaced = decode_utf8(data)
        if replaced:
          stats.undecodable.append(path)
        texts = _txt_documents(text)
      for number, text in enumerate(texts):
        if text:
          yield f'{name}:{number}', text

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    stats = _FileStats()
    keys = [key for key, _ in self._documents(stats)]
    stats.record(self.info.metadata, 'text_files')
    if len(keys) < 2:
      raise ValueError(f'the files of config.data.text_glob ({self.builder_config.description}) '
                       f'hold {"no text" if not keys else "only one document"}; a train and a '
                       'validation split need at least two (add files, or text of over '
                       f'{TXT_MIN_DOCUMENT_CHARS} characters)')
    validation = validation_keys(keys)
    return {'train': self._generate_examples(validation, False),
            'validation': self._generate_examples(validation, True)}

  def _generate_examples(self, validation: set[str], is_validation: bool):
    for key, text in self._documents(_FileStats()):
      if (key in validation) == is_validation:
        yield key, {'text': text, 'path': key}
