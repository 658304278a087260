"""Random-access document sources: one split of a dataset named by the `data` config.

`config.data.dataset` picks the source:
  * 'stdlib': the embedded Python standard-library corpus (builders.PythonStdlib);
  * 'text_files': .txt/.jsonl files (local or gs://) matching `config.data.text_glob`;
  * 'tfds': any TFDS catalogue dataset with a text feature, `config.data.tfds_name`
    (e.g. 'lm1b', 'c4/en:3.1.0', 'wikipedia/20230601.en'), read with `tfds.data_source`.
All are ArrayRecord files under `config.data.tfds_data_dir` ('' = TFDS' default,
~/tensorflow_datasets or $TFDS_DATA_DIR) and prepared once; later calls reuse them.
"""

from typing import Any, Optional, Sequence

import tensorflow_datasets as tfds

from llm_jax.data import builders

DATASETS = ('stdlib', 'text_files', 'tfds')


def _data_dir(data_config) -> Optional[str]:
  return data_config.tfds_data_dir or None


def make_builder(data_config, stdlib_packages: Sequence[str] = ()) -> tfds.core.DatasetBuilder:
  """The prepared builder of the 'stdlib' or 'text_files' dataset (built on first use)."""
  if data_config.dataset == 'stdlib':
    builder = builders.PythonStdlib(config=builders.stdlib_config(stdlib_packages),
                                    data_dir=_data_dir(data_config), file_format='array_record')
  elif data_config.dataset == 'text_files':
    config = builders.text_files_config(data_config.text_glob, data_config.jsonl_field)
    builder = builders.TextFiles(config=config, data_dir=_data_dir(data_config),
                                 file_format='array_record')
  else:
    raise ValueError(f'dataset {data_config.dataset!r} has no local builder')
  builder.download_and_prepare(file_format='array_record')
  return builder


def open_split(data_config, split: str, stdlib_packages: Sequence[str] = ()) -> Sequence[Any]:
  """A random-access sequence of the split's examples (dicts holding the text feature).

  Args:
    data_config: the `data` section of the config.
    split: a split name, with TFDS slicing allowed (e.g. 'train', 'validation', 'train[:1%]').
    stdlib_packages: for 'stdlib', build only these top-level packages (tests).

  Returns:
    A `tfds` ArrayRecord data source (len() and [i]).
  """
  if data_config.dataset not in DATASETS:
    raise ValueError(f'unknown config.data.dataset={data_config.dataset!r}; expected one of '
                     f'{DATASETS}')
  if data_config.dataset == 'tfds':
    if not data_config.tfds_name:
      raise ValueError('config.data.dataset=tfds needs config.data.tfds_name (e.g. lm1b)')
    return tfds.data_source(data_config.tfds_name, split=split, data_dir=_data_dir(data_config))
  builder = make_builder(data_config, stdlib_packages)
  if split.split('[')[0] not in builder.info.splits:
    raise ValueError(f'dataset {builder.name} has no split {split!r}; it has '
                     f'{sorted(builder.info.splits)}')
  return builder.as_data_source(split=split)


def text_feature(data_config) -> str:
  """The feature holding the text: config.data.text_feature for TFDS, 'text' for ours."""
  return data_config.text_feature if data_config.dataset == 'tfds' else 'text'


def document_text(example: Any, feature: str) -> str:
  """The text of one example: `example[feature]`, decoded from UTF-8 if stored as bytes."""
  try:
    value = example[feature]
  except (KeyError, TypeError) as e:
    keys = sorted(example) if isinstance(example, dict) else type(example).__name__
    raise KeyError(f'examples have no text feature {feature!r} (config.data.text_feature); '
                   f'they have {keys}') from e
  if isinstance(value, bytes):
    return value.decode('utf-8', errors='replace')
  return str(value)
