"""Loading the model to evaluate: a training workdir or a Hugging Face Llama directory."""

import os
from typing import Optional, Sequence

import jax

from llm_jax import sharding
from llm_jax.convert import hf
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.model import config as config_lib
from llm_jax.training import checkpoint

_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model')


def find_tokenizer(directory: str) -> str:
  """The tokenizer.json or tokenizer.model file in `directory`."""
  for name in _TOKENIZER_FILES:
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f'no tokenizer.json or tokenizer.model in {directory}; pass a '
                          'tokenizer path')


def load_model(*, workdir: Optional[str] = None, hf_dir: Optional[str] = None,
               tokenizer_path: Optional[str] = None, step: Optional[int] = None,
               **overrides) -> tuple[config_lib.ModelConfig, dict, tokenizer_lib.Tokenizer]:
  """(ModelConfig, params, tokenizer) of exactly one of `workdir` and `hf_dir`.

  Args:
    workdir: a training workdir (or checkpoint dir); its tokenizer is `<workdir>/tokenizer.model`
      unless `tokenizer_path` says otherwise.
    hf_dir: a transformers Llama directory with its tokenizer.json (or tokenizer.model).
    tokenizer_path: an explicit tokenizer file.
    step: the checkpoint step of `workdir` (default: the latest).
    **overrides: ModelConfig fields replaced when reading `hf_dir` (e.g. param_dtype).
  """
  if (workdir is None) == (hf_dir is None):
    raise ValueError(f'pass exactly one of workdir and hf_dir (got workdir={workdir!r}, '
                     f'hf_dir={hf_dir!r})')
  if hf_dir is not None:
    config, params = hf.load_hf(hf_dir, **overrides)
    tokenizer_path = tokenizer_path or find_tokenizer(hf_dir)
  else:
    config, params = checkpoint.load_params(workdir, step=step)
    tokenizer_path = tokenizer_path or os.path.join(workdir, 'tokenizer.model')
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_path)
  tokenizer_lib.check_vocab_fits(tokenizer, config.vocab_size)
  return config, params, tokenizer


def parse_mesh(shape) -> Optional[jax.sharding.Mesh]:
  """A mesh from data,fsdp,tensor sizes: '1,1,-1', '1x1x-1' (lm-eval's model_args split on
  commas), a list or a tuple; None or '' = one device."""
  if shape is None or shape == '' or shape == ():
    return None
  if isinstance(shape, str):
    shape = shape.replace('x', ',').split(',')
  try:
    sizes: Sequence[int] = [int(s) for s in shape]
  except ValueError as e:
    raise ValueError(f'mesh={shape!r}; expected sizes data,fsdp,tensor such as 1,1,-1') from e
  return sharding.create_mesh(sizes)
