"""validate_config: every bad value is reported with its key before anything compiles."""

import importlib.util
import math
import pathlib

import pytest

from llm_jax import config_sections
from llm_jax.training import validation

CONFIG_FILES = sorted((pathlib.Path(__file__).parent.parent / 'configs').glob('[!_]*.py'))


def _load_config(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _with(overrides: dict):
  config = config_sections.default_config()
  for key, value in overrides.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


def _problems(config, **kwargs) -> list[str]:
  with pytest.raises(ValueError) as info:
    validation.validate_config(config, **kwargs)
  return [line.strip() for line in str(info.value).splitlines()[1:]]


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: p.name)
def test_shipped_configs_pass(path):
  config = _load_config(path)
  if config.data.tokenizer != 'train_spm':  # their docstrings tell the user to pass the path
    config.data.tokenizer_path = '/path/tokenizer'
  cpu_demos = ('default.py', 'sft.py', 'lora.py')
  device_counts = (1, 8) if path.name in cpu_demos else (1, 8, 256)  # CPU demos vs pods
  for device_count in device_counts:
    validation.validate_config(config, device_count=device_count)


def test_tokenizer_path_required_for_a_given_tokenizer():
  config = _with({'data.tokenizer': 'huggingface'})
  assert _problems(config, device_count=8) == [
      "data.tokenizer_path='': expected the path of a tokenizer file for "
      "data.tokenizer='huggingface'"]


BAD_VALUES = [
    ('optim.learning_rate', math.nan, 'a finite number > 0'),
    ('optim.learning_rate', math.inf, 'a finite number > 0'),
    ('optim.learning_rate', 0.0, 'a finite number > 0'),
    ('optim.learning_rate', -1e-3, 'a finite number > 0'),
    ('optim.warmup_steps', -1, 'an integer >= 0'),
    ('optim.schedule', 'cosin', "one of ('cosine', 'linear', 'constant')"),
    ('optim.b2', 1.0, 'in [0, 1)'),
    ('optim.eps', 0.0, '> 0'),
    ('optim.end_lr_ratio', 2.0, 'in [0, 1]'),
    ('optim.grad_accum_steps', 0, 'an integer >= 1'),
    ('optim.grad_accum_steps', 3, 'does not divide data.global_batch_size=16'),
    ('train.log_every', 0, 'an integer >= 1'),
    ('train.num_steps', 0, 'an integer >= 1'),
    ('train.nonfinite', 'ignore', "one of ('skip', 'stop')"),
    ('eval.every_steps', 0, 'an integer >= 1'),
    ('eval.num_batches', -1, 'an integer >= 0'),
    ('checkpoint.every_steps', 0, 'an integer >= 1'),
    ('checkpoint.keep', 0, 'an integer >= 1'),
    ('checkpoint.restore_step', -1, 'an integer >= 0'),
    ('data.dataset', 'c4', "one of ('stdlib', 'text_files', 'tfds', 'sft')"),
    ('data.tokenizer', 'bpe', "one of ('train_spm', 'sentencepiece', 'huggingface')"),
    ('data.seq_len', 1024, 'at most model.max_seq_len=512'),
    ('data.seq_len', 0, 'an integer >= 1'),
    ('data.global_batch_size', 12, 'a multiple of the 8 devices the batch is split over'),
    ('data.eval_batch_size', 4, 'a multiple of the 8 devices the batch is split over'),
    ('data.eval_batch_size', 0, 'an integer >= 1'),
    ('data.num_workers', -1, 'an integer >= 0'),
    ('model.attention_kernel', 'flash', "one of ('xla', 'blockwise', 'cudnn', 'splash')"),
    ('model.dtype', 'float8', "one of ('float32', 'bfloat16', 'float16')"),
    ('model.remat_policy', 'some', 'one of'),
    ('model.num_layers', 0, 'an integer >= 1'),
    ('model.norm_eps', math.nan, 'a finite number > 0'),
    ('mesh.shape', (3, -1, 1), 'does not divide the 8 devices'),
    ('mesh.shape', (-1, -1, 1), 'more than one -1'),
    ('mesh.shape', (-1, 1), 'one size per axis'),
    ('mesh.num_slices', 3, 'does not divide the 8 devices'),
    ('decode.top_p', 0.0, 'in (0, 1]'),
    ('decode.temperature', -1.0, '>= 0'),
    ('decode.max_new_tokens', 512, 'less than model.max_seq_len=512'),
]


@pytest.mark.parametrize('key,value,expected', BAD_VALUES,
                         ids=[f'{k}={v}' for k, v, _ in BAD_VALUES])
def test_bad_value_is_named_with_its_key(key, value, expected):
  problems = _problems(_with({key: value}), device_count=8)
  assert len(problems) == 1, problems
  assert problems[0].startswith(f'{key}={value!r}: '), problems
  assert expected in problems[0], problems


def test_every_problem_is_listed_at_once():
  config = _with({'optim.learning_rate': math.nan, 'train.log_every': 0,
                  'data.eval_batch_size': 12})
  problems = _problems(config, device_count=8)
  assert [line.split('=')[0] for line in problems] == [
      'data.eval_batch_size', 'optim.learning_rate', 'train.log_every']


def test_batch_against_processes_and_fsdp_mesh():
  # 2 processes, 4 devices each; the batch is split over data x fsdp = 2 x 2 devices.
  config = _with({'data.global_batch_size': 6, 'data.eval_batch_size': 3,
                  'mesh.shape': (2, 2, -1)})
  problems = _problems(config, process_count=2, device_count=8)
  assert problems == [
      'data.global_batch_size=6: expected a multiple of the 4 devices the batch is split over '
      "(mesh {'data': 2, 'fsdp': 2, 'tensor': 2}, rule for 'act_batch')",
      'data.eval_batch_size=3: expected a multiple of the 2 processes (each reads its rows)']


def test_tensor_parallel_mesh_accepts_batch_smaller_than_device_count():
  # The batch is split over data x fsdp only: 2 rows suffice on a (2, 1, 4) mesh.
  config = _with({'data.global_batch_size': 2, 'data.eval_batch_size': 2,
                  'mesh.shape': (2, 1, 4)})
  validation.validate_config(config, device_count=8)


def test_rule_naming_an_unknown_mesh_axis():
  config = _with({'mesh.rules': (('act_batch', 'dp'),)})
  problems = _problems(config, device_count=8)
  assert problems == ["mesh.rules: rule ('act_batch', 'dp') names mesh axes ['dp'] that are not "
                      "in mesh.axes=('data', 'fsdp', 'tensor')"]


def test_model_relations_are_checked():
  problems = _problems(_with({'model.num_kv_heads': 3}), device_count=8)
  assert problems == ['model: num_heads=4 is not a multiple of num_kv_heads=3']
