"""A misspelled config override is one line with a suggestion, not a chained traceback."""

import os
import pathlib
import subprocess
import sys

import pytest

from llm_jax import cli_errors
from llm_jax import config_sections

ROOT = pathlib.Path(__file__).parent.parent


def test_main_with_misspelled_key_prints_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-m', 'llm_jax.main', f'--config={ROOT / "configs" / "default.py"}',
       '--config.optim.lerning_rate=1', f'--workdir={tmp_path / "run"}'],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr, result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      'unknown config key optim.lerning_rate; did you mean optim.learning_rate?'), result.stderr
  assert not (tmp_path / 'run').exists()  # nothing ran


@pytest.mark.parametrize('path,message', [
    ('optim.lerning_rate', 'did you mean optim.learning_rate?'),
    ('optm.learning_rate', 'did you mean optim.learning_rate?'),  # misspelled section
    ('train.learning_rate', 'did you mean optim.learning_rate?'),  # key in another section
    ('model.rope_scaling.factr', 'did you mean model.rope_scaling.factor?'),
    ('optim.zzz', 'optim has b1, b2, decay_embeddings, end_lr_ratio, eps'),  # nothing close
    ('optim.learning_rate.x', 'optim.learning_rate is a value, not a section'),
])
def test_unknown_key_message(path, message):
  text = cli_errors.unknown_key_message(config_sections.default_config(), path)
  assert text.startswith(f'unknown config key {path}; {message}'), text


@pytest.mark.parametrize('path', ['optim.learning_rate', 'model.rope_scaling.factor', 'seed'])
def test_known_keys_have_no_message(path):
  assert cli_errors.unknown_key_message(config_sections.default_config(), path) is None
