"""The README's Python example runs as written, and its commands match .ci/run."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
  with open(os.path.join(ROOT, 'README.md')) as f:
    return f.read()


def test_python_example_runs(capsys):
  example = re.search(r'```python\n(.*?)```', _readme(), re.S).group(1)
  namespace = {}
  exec(compile(example, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  assert namespace['logits'].shape == (1, 5, namespace['config'].vocab_size)
  printed = capsys.readouterr().out
  assert re.search(r'\[\[(\d+, ){7}\d+\]\]', printed), printed
  assert os.path.exists(os.path.join(namespace['path'], 'config.json'))


def test_ci_runs_the_readme_install_and_test_commands():
  readme = _readme()
  with open(os.path.join(ROOT, '.ci', 'run')) as f:
    ci = f.read()
  install = "pip install -e '.[test,tpu]'"
  test = 'python -m pytest -q tests'
  assert f'{install} && {test}' in readme
  assert install in ci
  assert test in ci.replace('python3 -m pytest', 'python -m pytest')
