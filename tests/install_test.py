"""A non-editable `pip install .` runs the main job from any directory with an absolute --config.

The virtual environment sees this machine's site-packages for the dependencies (installing JAX,
TFDS and torch again would take minutes), but holds its own copy of llm_jax built from the
checkout, so nothing is imported from the source tree: the test checks where llm_jax comes from.
"""

import json
import os
import shutil
import subprocess
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, 'tests', 'testdata', 'pre_layout_run')

pytestmark = pytest.mark.slow


def test_installed_package_runs_an_absolute_config_from_another_directory(tmp_path):
  env_dir = tmp_path / 'venv'
  venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
  python = str(env_dir / 'bin' / 'python')
  env = {key: value for key, value in os.environ.items()
         if key not in ('PYTHONPATH', 'XLA_FLAGS')}
  env['JAX_PLATFORMS'] = 'cpu'
  # A copy of the checkout, so the build leaves nothing (build/, *.egg-info) in the tree.
  source = tmp_path / 'source'
  shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
      '.git', '__pycache__', '*.egg-info', 'build', '.pytest_cache', 'notebooks', 'benchmarks'))
  subprocess.run([python, '-m', 'pip', 'install', '--quiet', '--no-deps',
                  '--no-build-isolation', str(source)], check=True, env=env, timeout=300)

  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  located = subprocess.run([python, '-c', 'import llm_jax; print(llm_jax.__file__)'],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
  assert located.stdout.strip().startswith(str(env_dir)), located.stdout

  workdir = elsewhere / 'run'
  workdir.mkdir()
  shutil.copy(os.path.join(FIXTURE, 'tokenizer.model'), workdir)
  with open(os.path.join(FIXTURE, 'run.json')) as f:
    overrides = json.load(f)['overrides']
  config = os.path.join(ROOT, 'configs', 'default.py')
  run = subprocess.run([python, '-m', 'llm_jax.main', f'--config={config}',
                        f'--workdir={workdir}', *overrides, '--config.train.num_steps=2'],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  with open(workdir / 'summary.json') as f:
    assert json.load(f)['step'] == 2
