"""Runs every notebook's code cells in order, with the 'parameters' cell shrunk to tiny values."""

import glob
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'notebooks', '*.ipynb')))
TINY = {'NUM_STEPS': 4}


def _code_cells(path):
  with open(path) as f:
    notebook = json.load(f)
  for cell in notebook['cells']:
    if cell['cell_type'] == 'code':
      yield ''.join(cell['source']), cell['metadata'].get('tags', [])


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  namespace = {}
  has_parameters = False
  for source, tags in _code_cells(path):
    assert not any(line.lstrip().startswith(('!', '%')) for line in source.splitlines()), (
        'shell/magic lines cannot run outside Jupyter')
    exec(compile(source, path, 'exec'), namespace)  # pylint: disable=exec-used
    if 'parameters' in tags:
      has_parameters = True
      namespace.update(TINY, WORKDIR=str(tmp_path / 'workdir'))
  assert has_parameters, 'the notebook needs a cell tagged "parameters"'
