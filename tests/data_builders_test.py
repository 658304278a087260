"""Dataset sources: the stdlib and text_files TFDS builders, TFDS catalogue datasets (mocked), and
clear errors for bad input."""

import json
import logging
import os
import sys

import pytest
import tensorflow_datasets as tfds

from configs import default
from llm_jax.data import builders
from llm_jax.data import sources


def _data_config(tmp_path, **overrides):
  config = default.get_config().data
  config.tfds_data_dir = str(tmp_path / 'tfds')
  config.update(overrides)
  return config


def _texts(source):
  return [sources.document_text(source[i], 'text') for i in range(len(source))]


def test_stdlib_subset_builds_a_hash_split_and_is_cached(tmp_path, monkeypatch):
  config = _data_config(tmp_path)
  packages = ('json', 'tomllib', 'html')
  train = sources.open_split(config, 'train', stdlib_packages=packages)
  validation = sources.open_split(config, 'validation', stdlib_packages=packages)
  root = builders.stdlib_root()
  files = builders.stdlib_files(root, packages)
  paths = {split: [e['path'].decode() for e in source]
           for split, source in (('train', train), ('validation', validation))}
  assert not set(paths['train']) & set(paths['validation'])
  nonempty = {f for f in files if os.path.getsize(os.path.join(root, f))}
  assert set(paths['train']) | set(paths['validation']) == nonempty
  assert set(paths['validation']) == builders.validation_keys(files) & nonempty
  example = train[0]
  with open(os.path.join(root, example['path'].decode()), encoding='utf-8') as f:
    assert example['text'].decode() == f.read()
  # A second call reads the ArrayRecord files without generating anything.
  monkeypatch.setattr(builders.PythonStdlib, '_generate_examples',
                      lambda *a: pytest.fail('rebuilt'))
  assert len(sources.open_split(config, 'train', stdlib_packages=packages)) == len(train)
  version = '_'.join(str(v) for v in sys.version_info[:3])
  prepared = tmp_path / 'tfds' / 'python_stdlib' / f'py{version}_html_json_tomllib' / '1.0.0'
  assert any(name.endswith('.array_record-00000-of-00001') for name in os.listdir(prepared))


def test_stdlib_files_leave_out_tests_and_site_packages():
  files = builders.stdlib_files(builders.stdlib_root())
  assert 'os.py' in files and 'json/decoder.py' in files
  assert not [f for f in files if f.startswith(('test/', 'site-packages/')) or '/tests/' in f]
  assert len(files) > 500


def test_validation_split_is_small_and_never_empty():
  keys = [f'doc{i}' for i in range(5000)]
  assert 0.01 < len(builders.validation_keys(keys)) / len(keys) < 0.03
  assert len(builders.validation_keys(['a', 'b'])) == 1  # 2% of 2 would round to none


def _write(path, content):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(content if isinstance(content, bytes) else content.encode())
  return path


def test_text_files_txt_and_jsonl(tmp_path, caplog):
  corpus = tmp_path / 'corpus'
  _write(corpus / 'a.txt', 'first file\nsecond line\n')
  _write(corpus / 'sub' / 'b.jsonl', '\n'.join(
      json.dumps({'body': f'record {i}', 'id': i}) for i in range(20)) + '\n\n')
  big = ''.join(f'line {i} of a long book\n' for i in range(4000))  # ~100 KB: several documents
  _write(corpus / 'book.txt', big)
  _write(corpus / 'empty.txt', '')
  _write(corpus / 'latin1.txt', 'caf\xe9 au lait\n'.encode('latin-1'))
  config = _data_config(tmp_path, dataset='text_files', text_glob=str(corpus / '**' / '*'),
                        jsonl_field='body')
  with caplog.at_level(logging.WARNING):
    train = _texts(sources.open_split(config, 'train'))
    validation = _texts(sources.open_split(config, 'validation'))
  everything = train + validation
  assert validation and train
  assert 'first file\nsecond line\n' in everything
  assert sorted(t for t in everything if t.startswith('record')) == sorted(
      f'record {i}' for i in range(20))
  book = sorted((t for t in everything if t.startswith('line')), key=lambda t: int(t.split()[1]))
  assert ''.join(book) == big and all(len(t) <= builders.TXT_DOCUMENT_CHARS for t in book)
  # Undecodable bytes are replaced, counted and logged by file; empty files too.
  assert 'caf\ufffd au lait\n' in everything
  metadata = sources.make_builder(config).info.metadata
  assert (metadata['undecodable_files'], metadata['empty_files']) == (1, 1)
  assert 'latin1.txt' in caplog.text and 'empty.txt' in caplog.text


def test_text_files_rebuild_when_a_file_changes(tmp_path):
  path = _write(tmp_path / 'data' / 'a.txt', 'one\n')
  _write(tmp_path / 'data' / 'b.txt', 'two\n')
  config = _data_config(tmp_path, dataset='text_files', text_glob=str(tmp_path / 'data'))
  before = sorted(_texts(sources.open_split(config, 'train')) +
                  _texts(sources.open_split(config, 'validation')))
  path.write_text('three and more\n')
  after = sorted(_texts(sources.open_split(config, 'train')) +
                 _texts(sources.open_split(config, 'validation')))
  assert (before, after) == (['one\n', 'two\n'], ['three and more\n', 'two\n'])


@pytest.mark.parametrize('setup, glob_name, error, message', [
    (None, 'missing/a.txt', FileNotFoundError, r'missing/a\.txt .*does not exist'),
    (None, 'nothing/*.txt', FileNotFoundError, r'no files match .*nothing/\*\.txt'),
    ({'e.txt': '', 'f.jsonl': '\n'}, '*', ValueError, 'hold no text'),
    ({'a.txt': 'alone\n'}, '*', ValueError, 'only one document'),
    ({'a.csv': 'x,y\n'}, '*', ValueError, r'neither \.txt nor \.jsonl.*a\.csv'),
    ({'a.jsonl': '{"text": "ok"}\n{oops\n'}, '*.jsonl', ValueError, r'a\.jsonl:2: not a JSON'),
    ({'a.jsonl': '{"txt": "x"}\n'}, '*.jsonl', ValueError, r"a\.jsonl:1: no field 'text'"),
    ({'a.jsonl': '{"text": 3}\n'}, '*.jsonl', ValueError, r'a\.jsonl:1: .* not a string'),
])
def test_text_files_bad_input(tmp_path, setup, glob_name, error, message):
  for name, content in (setup or {}).items():
    _write(tmp_path / 'in' / name, content)
  config = _data_config(tmp_path, dataset='text_files', text_glob=str(tmp_path / 'in' / glob_name))
  with pytest.raises(error, match=message):
    sources.open_split(config, 'train')


def test_unknown_dataset_and_split_are_errors(tmp_path):
  with pytest.raises(ValueError, match=r"config.data.dataset='wiki'"):
    sources.open_split(_data_config(tmp_path, dataset='wiki'), 'train')
  with pytest.raises(ValueError, match='needs config.data.text_glob|text_glob is empty'):
    sources.open_split(_data_config(tmp_path, dataset='text_files'), 'train')
  _write(tmp_path / 'in' / 'a.txt', 'hello\n')
  _write(tmp_path / 'in' / 'b.txt', 'world\n')
  config = _data_config(tmp_path, dataset='text_files', text_glob=str(tmp_path / 'in'))
  with pytest.raises(ValueError, match="no split 'test'"):
    sources.open_split(config, 'test')
  with pytest.raises(tfds.core.registered.DatasetNotFoundError, match='no_such_dataset'):
    sources.open_split(_data_config(tmp_path, dataset='tfds', tfds_name='no_such_dataset'),
                       'train')


def test_tfds_catalogue_dataset_through_data_source(tmp_path):
  config = _data_config(tmp_path, dataset='tfds', tfds_name='lm1b')
  with tfds.testing.mock_data(num_examples=12):
    train = sources.open_split(config, 'train')
    assert len(train) == 12
    assert all(isinstance(text, str) and text for text in _texts(train))
    with pytest.raises(KeyError, match=r"no text feature 'body'.*\['text'\]"):
      sources.document_text(train[0], 'body')
