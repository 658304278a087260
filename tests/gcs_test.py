"""Cloud storage: a run with a gs:// workdir, and Hugging Face / tokenizer files on gs://.

Everything runs against PyPI's `gcp-storage-emulator`, started in the test on 127.0.0.1, with
each GCS client pointed at it: gcsfs (etils.epath's gs:// backend) and google-cloud-storage
(tensorboardX's gs:// writer) through STORAGE_EMULATOR_HOST, TensorStore (Orbax's array data)
through TENSORSTORE_GCS_HTTP_URL and GOOGLE_AUTH_TOKEN_FOR_TESTING.

Two things the emulator cannot serve, and how the test deals with them:
  * Its downloads carry no `x-goog-generation` header, which real GCS always sends and
    TensorStore requires ("Malformed StorageGeneration" when reading an OCDBT manifest back):
    `_serve_generation_headers` adds the object's generation and metageneration to them.
  * It has no Storage Control API (gRPC), which gcsfs's default file system asks for a bucket's
    layout: GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false selects gcsfs's plain JSON-API file system.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from http import HTTPStatus

import jax
import numpy as np
import pytest
import torch
import transformers
from etils import epath
from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.handlers import objects as emulator_objects
from google.auth import credentials
from google.cloud import storage

from llm_jax.convert import load_hf, save_hf
from llm_jax.convert import hf as hf_lib
from llm_jax.data import builders
from llm_jax.data import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, 'tests', 'testdata', 'pre_layout_run')
BUCKET = 'bucket'
NUM_STEPS = 8
with open(os.path.join(FIXTURE, 'run.json')) as f:
  # A 1-layer model with the fixture's 320-piece tokenizer: seconds per run.
  OVERRIDES = json.load(f)['overrides'] + [
      f'--config.train.num_steps={NUM_STEPS}', '--config.checkpoint.every_steps=2',
      '--config.eval.every_steps=4', '--config.eval.num_batches=1',
      '--config.data.global_batch_size=8', '--config.data.eval_batch_size=8',
      '--config.optim.warmup_steps=1', '--config.mesh.shape=(-1,1,1)']


def _serve_generation_headers():
  """Makes the emulator's downloads carry the object's generation, as GCS's do."""
  original = emulator_objects.download

  def download(request, response, storage, *args, **kwargs):
    original(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = obj['generation']
      response['x-goog-metageneration'] = obj['metageneration']

  emulator_objects.download = download  # objects.get (alt=media) calls it by this name
  for _, handlers in emulator_server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler is original:
        handlers[method] = download
  return original


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='session')
def gcs_env():
  """An in-memory GCS emulator with bucket `bucket`; yields the variables that point clients
  at it (also set in this process while the session lasts)."""
  original = _serve_generation_headers()
  url = f'http://127.0.0.1:{_free_port()}'
  server = emulator_server.create_server('127.0.0.1', int(url.rsplit(':', 1)[1]),
                                         in_memory=True, default_bucket=BUCKET)
  server.start()
  env = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
         'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator', 'GOOGLE_CLOUD_PROJECT': 'emulator',
         'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}
  saved = {key: os.environ.get(key) for key in env}
  os.environ.update(env)
  try:
    yield env
  finally:
    server.stop()
    emulator_objects.download = original
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


def _files_under(directory) -> list[str]:
  return sorted(os.path.relpath(os.path.join(root, name), directory)
                for root, dirs, files in os.walk(directory) for name in files + dirs)


def test_hf_directory_and_tokenizer_round_trip_through_gcs(gcs_env, tmp_path):
  del gcs_env
  local = tmp_path / 'hf'
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=1)).save_pretrained(local)
  remote = epath.Path(f'gs://{BUCKET}/hf_in')
  for file in local.iterdir():
    (remote / file.name).write_bytes(file.read_bytes())
  assert hf_lib.is_hf_directory(os.fspath(remote))
  config, params = load_hf(os.fspath(remote))
  local_config, local_params = load_hf(str(local))
  assert config == local_config
  assert jax.tree.structure(params) == jax.tree.structure(local_params)
  jax.tree.map(np.testing.assert_array_equal, params, local_params)

  out = f'gs://{BUCKET}/hf_out'
  save_hf(config, params, out)
  save_hf(config, params, str(tmp_path / 'hf_out'))
  for name in ('model.safetensors', 'config.json'):
    assert (epath.Path(out) / name).read_bytes() == (tmp_path / 'hf_out' / name).read_bytes()
  with pytest.raises(FileExistsError, match='already holds'):
    save_hf(config, params, out)

  texts = [f'def function_{i}(x):\n  return x * {i} + {i * i}\n' * 20 for i in range(50)]
  path = f'gs://{BUCKET}/tokenizer/tokenizer.model'
  trained = tokenizer_lib.train_sentencepiece(texts, 300, path, num_threads=1)
  loaded = tokenizer_lib.load_tokenizer(path)
  assert epath.Path(path).read_bytes() == trained.model_proto
  assert loaded.encode(texts[7]) == trained.encode(texts[7])
  hf_lib.save_tokenizer(loaded, out)
  exported = tokenizer_lib.load_tokenizer(f'{out}/tokenizer.model')
  assert exported.decode(exported.encode(texts[3])) == texts[3]


def test_text_glob_on_gcs_finds_the_matching_files(gcs_env):
  del gcs_env
  texts = epath.Path(f'gs://{BUCKET}/texts')
  for name in ('a.txt', 'sub/b.txt', 'c.jsonl', 'notes.md'):
    (texts / name).write_text(f'text of {name}\n')
  assert builders.resolve_text_files(f'{texts}/*.txt') == [f'{texts}/a.txt']
  with pytest.raises(ValueError, match='neither .txt nor .jsonl'):  # a folder: all its files
    builders.resolve_text_files(str(texts))
  (texts / 'notes.md').unlink()
  assert builders.resolve_text_files(str(texts)) == [f'{texts}/{name}' for name in
                                                     ('a.txt', 'c.jsonl', 'sub/b.txt')]
  with pytest.raises(ValueError, match=r'\*\* is not supported'):
    builders.resolve_text_files(f'{texts}/**/*.txt')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    builders.resolve_text_files(f'{texts}/missing.txt')
  config = builders.text_files_config(f'{texts}/*.jsonl')
  assert config.files == (f'{texts}/c.jsonl',)


def _start(env, workdir: str, directories: dict):
  argv = [sys.executable, '-m', 'llm_jax.main', f'--config={ROOT}/configs/default.py',
          f'--workdir={workdir}', f'--config.data.tfds_data_dir={_tfds_cache()}', *OVERRIDES]
  child = dict(os.environ, **env, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', HOME=directories['home'],
               TMPDIR=directories['tmp'],
               XLA_FLAGS='--xla_force_host_platform_device_count=8 '
                         '--xla_backend_optimization_level=0')  # as in conftest.py
  return subprocess.Popen(argv, cwd=directories['cwd'], env=child, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _tfds_cache() -> str:
  """The machine's prepared dataset cache: an input of the run, outside the checked folders."""
  return os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


def _complete_steps(run: str) -> list[int]:
  """Steps of gs://bucket/<run>/checkpoints that Orbax finished, listed by google-cloud-storage
  (gcsfs, which the run writes through, caches listings in this process)."""
  client = storage.Client(project='emulator', credentials=credentials.AnonymousCredentials())
  names = [blob.name.split('/') for blob in client.list_blobs(BUCKET,
                                                              prefix=f'{run}/checkpoints/')]
  return sorted(int(parts[2]) for parts in names
                if len(parts) == 4 and parts[2].isdigit() and parts[3] == 'commit_success.txt')


@pytest.mark.slow
def test_gs_workdir_trains_is_killed_resumes_and_writes_nothing_locally(gcs_env, tmp_path):
  workdir = epath.Path(f'gs://{BUCKET}/run')
  (workdir / 'tokenizer.model').write_bytes(
      epath.Path(FIXTURE, 'tokenizer.model').read_bytes())
  directories = {name: str(tmp_path / name) for name in ('cwd', 'home', 'tmp')}
  for directory in directories.values():
    os.makedirs(directory)

  first = _start(gcs_env, os.fspath(workdir), directories)
  deadline = time.time() + 120
  while not _complete_steps('run'):
    assert first.poll() is None, first.communicate()[1][-3000:]
    assert time.time() < deadline, 'no checkpoint reached the bucket'
    time.sleep(0.2)
  first.send_signal(signal.SIGKILL)
  first.communicate()
  assert not (workdir / 'summary.json').exists()

  second = _start(gcs_env, os.fspath(workdir), directories)
  _, stderr = second.communicate(timeout=180)
  assert second.returncode == 0, stderr[-3000:]
  resumed = [int(line.split('resumed from step ')[1].split()[0])
             for line in stderr.splitlines() if 'resumed from step ' in line]
  assert len(resumed) == 1 and resumed[0] >= 2, stderr[-3000:]

  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['step'] == NUM_STEPS
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if 'train/loss' in r] == list(range(1, NUM_STEPS + 1))
  events = [p.name for p in (workdir / 'tensorboard').iterdir()]
  assert any(name.startswith('events.out.tfevents') for name in events), events
  assert NUM_STEPS in _complete_steps('run')

  for name, directory in directories.items():
    assert _files_under(directory) == [], f'the run wrote to local {name} {directory}'
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))
