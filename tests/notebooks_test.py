"""Executes every notebook in a Jupyter kernel (nbclient), on tiny settings.

A notebook opens with a Colab badge, has a cell tagged "install" (left out here: the checkout is
installed already) and a cell tagged "parameters"; right after it the test inserts a cell that
sets the values of TINY for that notebook (and WORKDIR, when the notebook has one, to a fresh
temporary directory), as papermill does.
"""

import glob
import os

import nbclient
import nbformat
from nbformat import v4
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'notebooks', '*.ipynb')))
# A few-second model: what tests/main_resume_test.py trains, with a smaller tokenizer sample.
TINY_TRAINING = {'model.vocab_size': 320, 'model.num_layers': 2, 'model.embed_dim': 64,
                 'model.mlp_dim': 128, 'data.seq_len': 64, 'data.global_batch_size': 8,
                 'data.eval_batch_size': 8, 'data.tokenizer_train_bytes': 100_000,
                 'eval.num_batches': 2, 'decode.prompts': ('def ',),
                 'decode.max_new_tokens': 4}
TINY = {
    'quickstart.ipynb': {'NUM_STEPS': 4, 'OVERRIDES': TINY_TRAINING},
    'tpu_pod.ipynb': {'CONFIG_FILE': 'configs/default.py',
                      'TOPOLOGIES': ['v5litepod-4', 'v5p-8'],
                      'OVERRIDES': {'data.global_batch_size': 8, 'data.seq_len': 64}},
    'hf_chat_and_eval.ipynb': {'MODEL': 'tiny', 'MAX_NEW_TOKENS': 4},
}
SKIPPED_TAGS = ('install',)


def _outputs(cell, kind):
  """The text (kind='text') or the MIME types (kind='mime') of a cell's outputs."""
  if kind == 'text':
    return ''.join(o.get('text', '') for o in cell.outputs if o.output_type == 'stream')
  return [mime for o in cell.outputs for mime in o.get('data', {})]


def _cell(notebook, cell_id):
  return next(c for c in notebook.cells if c.get('id') == cell_id)


def _execute(path, tmp_path):
  notebook = nbformat.read(path, as_version=4)
  name = os.path.basename(path)
  cells = []
  for cell in notebook.cells:
    tags = cell.metadata.get('tags', [])
    if any(tag in SKIPPED_TAGS for tag in tags):
      continue
    cells.append(cell)
    if 'parameters' in tags:
      values = dict(TINY.get(name, {}))
      if 'WORKDIR' in cell.source:
        values['WORKDIR'] = str(tmp_path / 'workdir')
      cells.append(v4.new_code_cell('\n'.join(f'{k} = {v!r}' for k, v in values.items()),
                                    id='injected-parameters'))
  notebook.cells = cells
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': ROOT}})
  client.execute()
  return notebook


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_colab_ready(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)  # cell ids included (nbformat 4.5)
  first = notebook.cells[0]
  assert first.cell_type == 'markdown' and 'colab.research.google.com' in first.source
  code = [c for c in notebook.cells if c.cell_type == 'code']
  assert 'install' in code[0].metadata.get('tags', []), 'the first code cell installs llm_jax'
  assert any('parameters' in c.metadata.get('tags', []) for c in code)
  for cell in code:  # shell and magic lines fail outside Jupyter and in plain Python
    assert not any(line.lstrip().startswith(('!', '%')) for line in cell.source.splitlines())


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path):
  name = os.path.basename(path)
  if name == 'tpu_pod.ipynb':
    pytest.importorskip('libtpu', reason="compiling for TPUs needs libtpu: pip install '.[tpu]'")
  notebook = _execute(path, tmp_path)
  if name == 'quickstart.ipynb':
    trained = _outputs(_cell(notebook, 'train'), 'text')
    assert 'compiling train step...' in trained  # the compilation phase, before the bar
    assert '4/4' in trained  # the progress bar at its end
    assert 'Trained 4 steps' in trained and 'gzip' in trained  # the summary
    assert 'Plots: loss.png, learning_rate.png, eval.png in ' in trained  # the loop drew them
    assert _outputs(_cell(notebook, 'curves'), 'mime').count('image/png') >= 3
  if name == 'tpu_pod.ipynb':
    table = ''.join(o['data']['text/markdown'] for o in _cell(notebook, 'compile').outputs)
    assert '| v5litepod-4 | 4 |' in table and '| v5p-8 | 4 |' in table and 'yes' in table
    assert 'image/png' in _outputs(_cell(notebook, 'chart'), 'mime')
    commands = _outputs(_cell(notebook, 'launch'), 'text')
    # The smallest slice that fits (the first of two of 4 chips), in a command that creates it.
    assert ('launch/tpu_vm.py create --tpu=llm-jax-v5litepod-4 --zone=us-east5-a '
            '--accelerator_type=v5litepod-4') in commands
  if name == 'hf_chat_and_eval.ipynb':
    chat = _outputs(_cell(notebook, 'chat'), 'text')
    # The directory's own ChatML template, rendered around the question, then an answer.
    assert '<|im_start|>user\nWhat is the capital of France?<|im_end|>\n' in chat
    assert '\nanswer:' in chat
    table = ''.join(o['data']['text/markdown'] for o in _cell(notebook, 'eval').outputs)
    assert '| prose | perplexity | bits_per_byte |' in table
    assert '| prose | perplexity | gzip_bits_per_byte |' in table
    assert '| reviews | classification | accuracy |' in table and 'Confusion matrix' in table
    assert os.path.exists(tmp_path / 'workdir' / 'results.json')
