"""LoRA adapters <-> Hugging Face PEFT adapter directories, and merged exports.

A PEFT LoRA directory holds adapter_config.json (r, lora_alpha, target_modules...) and
adapter_model.safetensors with torch `Linear` layouts under the `base_model.model.` prefix:

  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight  [r, D]
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight  [N*H, r]

Ours (see llm_jax.model.lora) are A = lora_A.T reshaped to the kernel's input dims + [r] and
B = lora_B.T reshaped to [r] + the kernel's output dims, stacked over layers when scanning.
Keys without the prefix or tensors PEFT would not use are refused instead of loading as zeros.
"""

import json
import os
from typing import Mapping, Optional

import flax.linen as nn
import jax
import numpy as np
from safetensors import numpy as safetensors_numpy

from llm_jax.convert import hf
from llm_jax.convert import safetensors_io
from llm_jax.model import lora
from llm_jax.model.config import ModelConfig

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
PREFIX = 'base_model.model.'
MODULES = {'q': 'self_attn.q_proj', 'k': 'self_attn.k_proj', 'v': 'self_attn.v_proj',
           'o': 'self_attn.o_proj', 'gate': 'mlp.gate_proj', 'up': 'mlp.up_proj',
           'down': 'mlp.down_proj'}
_TARGET_OF_MODULE = {name.split('.')[-1]: target for target, name in MODULES.items()}


def _key(layer: int, target: str, which: str) -> str:
  return f'{PREFIX}model.layers.{layer}.{MODULES[target]}.lora_{which}.weight'


def _layer_arrays(adapters, model_config: ModelConfig, target: str):
  """[(A, B)] per layer, each in our per-layer layout, as float32 numpy arrays."""
  flat = lora.flatten_adapters(jax.device_get(nn.unbox(adapters)))
  path, _ = lora.KERNELS[target]
  pairs = []
  for prefix in lora.layer_prefixes(model_config):
    a, b = (np.asarray(x, np.float32) for x in flat[prefix + path])
    if model_config.scan_layers:
      pairs += [(a[i], b[i]) for i in range(model_config.num_layers)]
    else:
      pairs.append((a, b))
  return pairs


def save_adapter(path: str, model_config: ModelConfig, lora_config: lora.LoraConfig,
                 adapters, base_model_name_or_path: str = '') -> None:
  """Writes a PEFT LoRA directory that `peft.PeftModel.from_pretrained` loads."""
  tensors = {}
  for target in lora_config.targets:
    for layer, (a, b) in enumerate(_layer_arrays(adapters, model_config, target)):
      rank = a.shape[-1]
      tensors[_key(layer, target, 'A')] = np.ascontiguousarray(a.reshape(-1, rank).T)
      tensors[_key(layer, target, 'B')] = np.ascontiguousarray(b.reshape(rank, -1).T)
  os.makedirs(path, exist_ok=True)
  safetensors_numpy.save_file(tensors, os.path.join(path, WEIGHTS_FILE),
                              metadata={'format': 'pt'})
  config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': lora_config.rank,
      'lora_alpha': lora_config.alpha, 'lora_dropout': lora_config.dropout,
      'target_modules': sorted(MODULES[t].split('.')[-1] for t in lora_config.targets),
      'bias': 'none', 'use_rslora': False, 'use_dora': False, 'fan_in_fan_out': False,
      'init_lora_weights': True, 'inference_mode': True,
      'base_model_name_or_path': base_model_name_or_path, 'modules_to_save': None,
  }
  with open(os.path.join(path, CONFIG_FILE), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)


def _read_config(path: str) -> tuple[dict, lora.LoraConfig]:
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'{config_path} does not exist')
  with open(config_path) as f:
    config = json.load(f)
  if config.get('peft_type', 'LORA') != 'LORA':
    raise ValueError(f'{config_path}: peft_type {config.get("peft_type")!r} is not LORA')
  for key, supported in (('use_rslora', False), ('use_dora', False), ('fan_in_fan_out', False),
                         ('bias', 'none')):
    if config.get(key, supported) != supported:
      raise ValueError(f'{config_path}: {key}={config[key]!r} is not supported (only '
                       f'{supported!r})')
  for key in ('rank_pattern', 'alpha_pattern'):
    if config.get(key):
      raise ValueError(f'{config_path}: per-module {key} is not supported')
  modules = config.get('target_modules')
  if modules == 'all-linear':
    modules = list(_TARGET_OF_MODULE)
  if not isinstance(modules, list):
    raise ValueError(f'{config_path}: target_modules={modules!r}; expected a list of '
                     f'{sorted(_TARGET_OF_MODULE)} or "all-linear"')
  unknown = sorted(set(modules) - set(_TARGET_OF_MODULE))
  if unknown:
    raise ValueError(f'{config_path}: target_modules {unknown} are not Llama projections')
  targets = tuple(t for t in lora.TARGETS if MODULES[t].split('.')[-1] in modules)
  return config, lora.LoraConfig(int(config['r']), float(config['lora_alpha']),
                                 float(config.get('lora_dropout') or 0.0), targets)


def load_adapter(path: str, model_config: ModelConfig) -> tuple[lora.LoraConfig, dict]:
  """Reads a PEFT LoRA directory into (LoraConfig, adapters) for `model_config`.

  Raises:
    FileNotFoundError: adapter_config.json or adapter_model.safetensors is missing.
    ValueError: unsupported PEFT options, keys outside `base_model.model.`, missing, extra or
      misshapen tensors; the message names the file and key.
  """
  _, lora_config = _read_config(path)
  weights = os.path.join(path, WEIGHTS_FILE)
  if not os.path.exists(weights):
    raise FileNotFoundError(f'{weights} does not exist')
  tensors = safetensors_io.read_header(weights)
  expected = {_key(i, t, w) for i in range(model_config.num_layers)
              for t in lora_config.targets for w in 'AB'}
  unprefixed = sorted(k for k in tensors if not k.startswith(PREFIX))
  if unprefixed:
    raise ValueError(f'{weights}: keys {unprefixed[:3]} lack the {PREFIX!r} prefix PEFT loads '
                     'them under')
  missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
  if missing or extra:
    raise ValueError(f'{weights}: missing tensors {missing[:3]}, unexpected tensors '
                     f'{extra[:3]} for target_modules {lora_config.targets} and '
                     f'{model_config.num_layers} layers')
  specs = {spec[0]: spec for spec in lora.adapter_specs(model_config, lora_config)}
  adapters = {}
  for prefix in lora.layer_prefixes(model_config):
    for target in lora_config.targets:
      path_in_tree = prefix + lora.KERNELS[target][0]
      _, a_shape, _, b_shape, _, _ = specs[path_in_tree]
      layers = (range(model_config.num_layers) if model_config.scan_layers
                else [int(prefix[0].split('_')[1])])
      a_layers, b_layers = [], []
      for layer in layers:
        a_layers.append(_read(tensors, _key(layer, target, 'A'), weights).T)
        b_layers.append(_read(tensors, _key(layer, target, 'B'), weights).T)
      a = np.stack(a_layers) if model_config.scan_layers else a_layers[0]
      b = np.stack(b_layers) if model_config.scan_layers else b_layers[0]
      for name, value, shape in (('lora_a', a, a_shape), ('lora_b', b, b_shape)):
        if value.size != np.prod(shape):
          raise ValueError(f'{weights}: {target} adapters have {value.shape} values per layer '
                           f'stack, expected shape {shape} (rank {lora_config.rank})')
        _set(adapters, path_in_tree + (name,), value.reshape(shape))
  return lora_config, adapters


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _read(tensors: Mapping[str, safetensors_io.TensorInfo], key: str, where: str) -> np.ndarray:
  info = tensors[key]
  if len(info.shape) != 2:
    raise ValueError(f'{where}: tensor {key!r} has shape {list(info.shape)}, expected 2 dims')
  return np.asarray(info.read(), np.float32)


def save_merged(path: str, model_config: ModelConfig, lora_config: lora.LoraConfig, base,
                adapters, tokenizer=None, chat_template: Optional[str] = None,
                **save_kwargs) -> None:
  """Writes base + adapters merged as a transformers Llama directory, with its tokenizer."""
  merged = jax.device_get(lora.merge(base, adapters, lora_config))
  hf.save_hf(model_config, merged, path, **save_kwargs)
  if tokenizer is not None:
    hf.save_tokenizer(tokenizer, path, chat_template=chat_template)
