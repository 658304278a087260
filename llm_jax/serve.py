"""OpenAI-compatible HTTP server for a training workdir or a Hugging Face directory.

    python -m llm_jax.serve --hf_dir=/ckpt/SmolLM2-135M-Instruct --port=8000 --slots=32
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "max_tokens": 32}'

Requests are decoded together by a continuous-batching engine (`llm_jax.inference.engine`)
over --slots decode slots; at most --max_queue more wait for a slot (then 429). SIGTERM or
Ctrl-C stops accepting connections, finishes the requests in flight, then exits.
"""

import os

from absl import app
from absl import flags
import uvicorn

from llm_jax import sharding
from llm_jax.convert import load_hf
from llm_jax.data import chat_templates
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.inference.engine import Engine
from llm_jax.serving.app import create_app
from llm_jax.training import checkpoint

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (or checkpoint dir) to serve.')
_HF_DIR = flags.DEFINE_string('hf_dir', None, 'Hugging Face Llama directory to serve.')
_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'Tokenizer file; default: found in the '
                                 'model directory.')
_MODEL_NAME = flags.DEFINE_string('model_name', None, "The API's model id; default: the "
                                  "directory's name.")
_CHAT_TEMPLATE = flags.DEFINE_string('chat_template', 'auto', "'auto' (the directory's own "
                                     'template, else detected), llama2, llama3 or a .jinja file.')
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on.')
_PORT = flags.DEFINE_integer('port', 8000, 'Port to listen on.')
_SLOTS = flags.DEFINE_integer('slots', 16, 'Decode slots: requests decoded together.')
_MAX_LEN = flags.DEFINE_integer('max_len', None, 'Context length per request (prompt + new '
                                'tokens); default: the model max_seq_len.')
_MAX_QUEUE = flags.DEFINE_integer('max_queue', 256, 'Requests that may wait for a slot.')
_CHUNK = flags.DEFINE_integer('chunk_size', 256, 'Prompt tokens per prefill call.')
_CACHE_DTYPE = flags.DEFINE_string('cache_dtype', '', "KV cache dtype; '' = bfloat16 on "
                                   'accelerators, the model dtype on CPU.')
_MESH = flags.DEFINE_list('mesh', [], 'Mesh shape data,fsdp,tensor (-1 fills); default one '
                          'device.')
_GRACE = flags.DEFINE_integer('shutdown_grace_seconds', 300, 'On SIGTERM, how long requests in '
                              'flight may take to finish.')


def load_model(workdir, hf_dir, tokenizer_path):
  """(ModelConfig, params, tokenizer) from a training workdir or a Hugging Face directory."""
  if (workdir is None) == (hf_dir is None):
    raise app.UsageError('pass exactly one of --workdir and --hf_dir')
  if hf_dir is not None:
    config, params = load_hf(hf_dir)
    tokenizer_path = tokenizer_path or next(
        (os.path.join(hf_dir, name) for name in ('tokenizer.json', 'tokenizer.model')
         if os.path.exists(os.path.join(hf_dir, name))), None)
    if tokenizer_path is None:
      raise app.UsageError(f'no tokenizer.json or tokenizer.model in {hf_dir}; pass --tokenizer')
  else:
    config, params = checkpoint.load_params(workdir)
    tokenizer_path = tokenizer_path or os.path.join(workdir, 'tokenizer.model')
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_path)
  tokenizer_lib.check_vocab_fits(tokenizer, config.vocab_size)
  return config, params, tokenizer


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  mesh = sharding.create_mesh([int(s) for s in _MESH.value]) if _MESH.value else None
  config, params, tokenizer = load_model(_WORKDIR.value, _HF_DIR.value, _TOKENIZER.value)
  model_dir = _HF_DIR.value or _WORKDIR.value
  engine = Engine(config, params, num_slots=_SLOTS.value, max_len=_MAX_LEN.value,
                  max_queue=_MAX_QUEUE.value, chunk_size=_CHUNK.value, tokenizer=tokenizer,
                  mesh=mesh, cache_dtype=_CACHE_DTYPE.value or None)
  template = chat_templates.resolve(_CHAT_TEMPLATE.value, tokenizer, model_dir)
  name = _MODEL_NAME.value or os.path.basename(os.path.normpath(model_dir))
  uvicorn.run(create_app(engine, name, template), host=_HOST.value, port=_PORT.value,
              timeout_graceful_shutdown=_GRACE.value, log_level='info')


if __name__ == '__main__':
  app.run(main)
