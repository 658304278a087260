"""Converts between Hugging Face Llama checkpoints and llm_jax Orbax checkpoints.

  python -m llm_jax.convert hf-to-orbax --hf_dir=/ckpt/Llama-3.2-1B --out=/ckpt/llama3.2-1b
  python -m llm_jax.convert orbax-to-hf --checkpoint=/runs/ft --out=/ckpt/ft-hf \
      --base_hf_dir=/ckpt/Llama-3.2-1B

The Orbax side is what `--config.train.init_from` reads and what training writes; `--checkpoint`
accepts a training workdir, its checkpoints/ directory or a converted directory. With
`--base_hf_dir`, the exported directory also gets the original's token ids (bos/eos/pad),
tokenizer files and generation_config.json, so it is ready for `transformers` as a whole.
"""

import json
import os
import shutil
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax

from llm_jax.training import checkpoint
from llm_jax import model as model_lib
from llm_jax.convert import hf
from llm_jax.data import pipeline
from llm_jax.data import tokenizer as tokenizer_lib

COMMANDS = ('hf-to-orbax', 'orbax-to-hf')
# Files of a Hugging Face directory that describe tokenization and generation, not weights.
_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                    'tokenizer.model', 'generation_config.json')
_TOKEN_ID_FIELDS = ('bos_token_id', 'eos_token_id', 'pad_token_id')

_HF_DIR = flags.DEFINE_string('hf_dir', None, 'hf-to-orbax: Hugging Face checkpoint directory.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                  'orbax-to-hf: training workdir or Orbax checkpoint directory.')
_STEP = flags.DEFINE_integer('step', None, 'orbax-to-hf: step to export (default: latest).')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')
_PARAM_DTYPE = flags.DEFINE_enum('param_dtype', None, ['float32', 'bfloat16', 'float16'],
                                 'hf-to-orbax: cast weights to this dtype (default: as stored).')
_SCAN_LAYERS = flags.DEFINE_bool('scan_layers', True,
                                 'hf-to-orbax: stacked [L, ...] layer parameters (as training '
                                 'with model.scan_layers=True expects).')
_MAX_SHARD_BYTES = flags.DEFINE_integer('max_shard_bytes', hf.DEFAULT_MAX_SHARD_BYTES,
                                        'orbax-to-hf: largest safetensors file.')
_BASE_HF_DIR = flags.DEFINE_string('base_hf_dir', None,
                                   'orbax-to-hf: Hugging Face directory to take token ids, '
                                   'tokenizer and generation config from.')


def hf_to_orbax(hf_dir: str, out: str, *, param_dtype: Optional[str] = None,
                scan_layers: bool = True) -> None:
  """Reads a Hugging Face Llama directory and writes a parameters-only Orbax checkpoint."""
  config, params = hf.load_hf(hf_dir, param_dtype=param_dtype, scan_layers=scan_layers)
  checkpoint.save_params(out, config, params)
  logging.info('wrote %s (%s) to %s', hf_dir, config, out)


def _base_fields(base_hf_dir: str, vocab_size: int) -> dict:
  """Token-id fields of the base directory's config.json, checked against our vocabulary."""
  with open(os.path.join(base_hf_dir, hf.CONFIG_FILE)) as f:
    base = json.load(f)
  if base.get('vocab_size') != vocab_size:
    raise ValueError(f'--base_hf_dir={base_hf_dir} has vocab_size={base.get("vocab_size")}, but '
                     f'the checkpoint has {vocab_size}: its tokenizer does not fit')
  return {key: base[key] for key in _TOKEN_ID_FIELDS if key in base}


def _host_shardings(checkpoint_dir: str, step: Optional[int]):
  """Places every restored parameter in host memory: one accelerator could not hold a 70B."""
  root = checkpoint.checkpoint_dir(checkpoint_dir)
  if not os.path.isdir(root):
    raise FileNotFoundError(f'checkpoint directory {root!r} does not exist')
  manager = checkpoint.create_manager(root, read_only=True)
  try:
    if not manager.all_steps():
      raise FileNotFoundError(f'no complete checkpoint in {root!r}')
    step = manager.latest_step() if step is None else step
    if step not in manager.all_steps():
      raise FileNotFoundError(f'no complete checkpoint for step {step} in {root!r}; '
                              f'available: {manager.all_steps()}')
    config = checkpoint.read_model_config(manager, step)
  finally:
    manager.close()
  host = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  return jax.tree.map(lambda _: host, model_lib.unbox(model_lib.abstract_params(config)))


def orbax_to_hf(checkpoint_dir: str, out: str, *, step: Optional[int] = None,
                max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES,
                base_hf_dir: Optional[str] = None) -> None:
  """Exports the parameters of an Orbax checkpoint as a Hugging Face Llama directory."""
  config, params = checkpoint.load_params(checkpoint_dir, step=step,
                                          shardings=_host_shardings(checkpoint_dir, step))
  extra = _base_fields(base_hf_dir, config.vocab_size) if base_hf_dir else None
  hf.save_hf(config, params, out, max_shard_bytes=max_shard_bytes, extra_config=extra)
  for name in _TOKENIZER_FILES if base_hf_dir else ():
    if os.path.exists(os.path.join(base_hf_dir, name)):
      shutil.copy(os.path.join(base_hf_dir, name), os.path.join(out, name))
  trained = os.path.join(checkpoint_dir, pipeline.TOKENIZER_FILENAME)
  if not base_hf_dir and os.path.exists(trained):
    # A from-scratch run's SentencePiece model, so that AutoTokenizer loads the export.
    hf.save_tokenizer(tokenizer_lib.load_tokenizer(trained), out)
  logging.info('wrote %s to %s', checkpoint_dir, out)


def _required(flag) -> str:
  if not flag.value:
    raise app.UsageError(f'--{flag.name} is required for this command')
  return flag.value


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f'expected exactly one command out of {COMMANDS}, got {argv[1:]}')
  if argv[1] == 'hf-to-orbax':
    hf_to_orbax(_required(_HF_DIR), _required(_OUT), param_dtype=_PARAM_DTYPE.value,
                scan_layers=_SCAN_LAYERS.value)
  else:
    orbax_to_hf(_required(_CHECKPOINT), _required(_OUT), step=_STEP.value,
                max_shard_bytes=_MAX_SHARD_BYTES.value, base_hf_dir=_BASE_HF_DIR.value)


if __name__ == '__main__':
  app.run(main)
