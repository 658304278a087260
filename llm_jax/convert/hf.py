"""Hugging Face transformers Llama checkpoints <-> llm_jax parameters, without torch.

A transformers `LlamaForCausalLM` directory (config.json plus model.safetensors, or shards with
model.safetensors.index.json) maps onto the parameter tree of `llm_jax.model.Transformer`:

  HF tensor (torch Linear layout)                  llm_jax parameter (scan_layers=True)
  model.embed_tokens.weight [V, D]                 embedder/embedding [V, D]
  model.layers.{i}.self_attn.q_proj.weight [N*H, D]  layers/attention/q_proj [L, D, N, H]
    ... self_attn.{k,v}_proj.weight [K*H, D]       layers/attention/{k,v}_proj [L, D, K, H]
    ... self_attn.o_proj.weight [D, N*H]           layers/attention/o_proj [L, N, H, D]
    ... mlp.{gate,up}_proj.weight [F, D]           layers/mlp/{gate,up}_proj [L, D, F]
    ... mlp.down_proj.weight [D, F]                layers/mlp/down_proj [L, F, D]
    ... input_layernorm.weight [D]                 layers/attention_norm/scale [L, D]
    ... post_attention_layernorm.weight [D]        layers/mlp_norm/scale [L, D]
  model.norm.weight [D]                            final_norm/scale [D]
  lm_head.weight [V, D]                            lm_head [D, V]  (absent when tied)
With scan_layers=False, layer i is `layers_{i}/...` without the leading L axis.

Every mapping is a transpose of the torch `Linear` weight followed by a reshape; rotary
embeddings use HF's rotate-half convention, so no q/k permutation is needed.
"""

import dataclasses
import json
import os
from typing import Any, Iterator, Mapping, Optional

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from llm_jax.convert import safetensors_io
from llm_jax.model.layers.rope import RopeScaling
from llm_jax.model.config import ModelConfig

ARCHITECTURE = 'LlamaForCausalLM'
CONFIG_FILE = 'config.json'
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
# Buffers some older conversions stored next to the weights; they are recomputed from the config.
_IGNORED_SUFFIXES = ('.rotary_emb.inv_freq',)
_DTYPE_NAMES = {np.dtype(dtype).name: dtype for dtype in safetensors_io.DTYPES.values()}


def _require(hf_config: Mapping[str, Any], key: str) -> Any:
  if hf_config.get(key) is None:
    raise ValueError(f'{CONFIG_FILE} lacks the required field {key!r}')
  return hf_config[key]


def _check_supported(hf_config: Mapping[str, Any]) -> None:
  """Refuses configs whose model this codebase would compute differently from transformers."""
  if hf_config.get('model_type') != 'llama':
    raise ValueError(f'{CONFIG_FILE}: model_type={hf_config.get("model_type")!r} is not '
                     'supported; expected "llama"')
  architectures = hf_config.get('architectures')
  if architectures is not None and list(architectures) != [ARCHITECTURE]:
    raise ValueError(f'{CONFIG_FILE}: architectures={architectures} is not supported; expected '
                     f'[{ARCHITECTURE!r}]')
  for key in ('attention_bias', 'mlp_bias'):
    if hf_config.get(key):
      raise ValueError(f'{CONFIG_FILE}: {key}=true is not supported (the model has no biases)')
  if hf_config.get('hidden_act', 'silu') != 'silu':
    raise ValueError(f'{CONFIG_FILE}: hidden_act={hf_config["hidden_act"]!r} is not supported; '
                     'expected "silu"')
  if (hf_config.get('pretraining_tp') or 1) > 1:
    raise ValueError(f'{CONFIG_FILE}: pretraining_tp={hf_config["pretraining_tp"]} is not '
                     'supported; expected 1')


def _rope_from_hf(hf_config: Mapping[str, Any]) -> tuple[float, Optional[RopeScaling]]:
  """(theta, scaling) from transformers 5's `rope_parameters` or 4's rope_theta/rope_scaling."""
  params = hf_config.get('rope_parameters')
  if params is None:
    params = dict(hf_config.get('rope_scaling') or {})
  elif any(isinstance(value, Mapping) for value in params.values()):
    raise ValueError(f'{CONFIG_FILE}: per-layer-type rope_parameters are not supported: {params}')
  theta = float(params.get('rope_theta', hf_config.get('rope_theta', 10000.0)))
  rope_type = params.get('rope_type', params.get('type', 'default'))
  if params.get('partial_rotary_factor', hf_config.get('partial_rotary_factor', 1.0)) != 1.0:
    raise ValueError(f'{CONFIG_FILE}: partial_rotary_factor != 1 is not supported')
  if rope_type == 'default':
    return theta, None
  if rope_type not in ('linear', 'llama3'):
    raise ValueError(f'{CONFIG_FILE}: rope type {rope_type!r} is not supported; expected '
                     'default, linear or llama3')
  fields = ['factor']
  if rope_type == 'llama3':
    fields += ['low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings']
  missing = [f for f in fields if params.get(f) is None]
  if missing:
    raise ValueError(f'{CONFIG_FILE}: rope type {rope_type!r} needs {missing}; got {params}')
  values = {f: params[f] for f in fields}
  if 'original_max_position_embeddings' in values:
    values['original_max_position_embeddings'] = int(values['original_max_position_embeddings'])
  return theta, RopeScaling(rope_type, **values)


def config_from_hf(hf_config: Mapping[str, Any], **overrides) -> ModelConfig:
  """ModelConfig of a transformers Llama `config.json` (a dict); overrides replace fields.

  Raises:
    ValueError: for architectures or settings this model does not implement, naming the field.
  """
  _check_supported(hf_config)
  heads, hidden = _require(hf_config, 'num_attention_heads'), _require(hf_config, 'hidden_size')
  theta, scaling = _rope_from_hf(hf_config)
  dtype = hf_config.get('dtype') or hf_config.get('torch_dtype') or 'float32'
  if dtype not in _DTYPE_NAMES:
    raise ValueError(f'{CONFIG_FILE}: dtype {dtype!r} is not supported; expected one of '
                     f'{sorted(_DTYPE_NAMES)}')
  values = dict(
      vocab_size=_require(hf_config, 'vocab_size'),
      embed_dim=hidden,
      num_layers=_require(hf_config, 'num_hidden_layers'),
      num_heads=heads,
      num_kv_heads=hf_config.get('num_key_value_heads') or heads,
      head_dim=hf_config.get('head_dim') or hidden // heads,
      mlp_dim=_require(hf_config, 'intermediate_size'),
      norm_eps=float(hf_config.get('rms_norm_eps', 1e-6)),
      rope_theta=theta,
      rope_scaling=scaling,
      max_seq_len=int(hf_config.get('max_position_embeddings', 2048)),
      tie_embeddings=bool(hf_config.get('tie_word_embeddings', False)),
      dtype=dtype,
      param_dtype=dtype,
  )
  values.update(overrides)
  return ModelConfig(**values)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
  """transformers `config.json` contents for a ModelConfig (read by transformers 4 and 5)."""
  scaling = config.rope_scaling
  rope = {'rope_type': 'default'} if scaling is None else {'rope_type': scaling.rope_type,
                                                           'factor': scaling.factor}
  if scaling is not None and scaling.rope_type == 'llama3':
    rope.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                original_max_position_embeddings=scaling.original_max_position_embeddings)
  return {
      'architectures': [ARCHITECTURE],
      'model_type': 'llama',
      'vocab_size': config.vocab_size,
      'hidden_size': config.embed_dim,
      'intermediate_size': config.mlp_dim,
      'num_hidden_layers': config.num_layers,
      'num_attention_heads': config.num_heads,
      'num_key_value_heads': config.num_kv_heads,
      'head_dim': config.head_dim,
      'hidden_act': 'silu',
      'max_position_embeddings': config.max_seq_len,
      'rms_norm_eps': config.norm_eps,
      'rope_parameters': dict(rope, rope_theta=config.rope_theta),
      # transformers 4 reads these two instead of rope_parameters.
      'rope_theta': config.rope_theta,
      'rope_scaling': None if scaling is None else rope,
      'tie_word_embeddings': config.tie_embeddings,
      'attention_bias': False,
      'mlp_bias': False,
      'attention_dropout': 0.0,
      'pretraining_tp': 1,
      'use_cache': True,
      'dtype': config.param_dtype,
      'torch_dtype': config.param_dtype,
  }


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One HF tensor and its place in our tree: ours = hf.T reshaped (transpose) or hf itself."""
  hf_name: str
  path: tuple[str, ...]
  hf_shape: tuple[int, ...]
  shape: tuple[int, ...]
  transpose: bool = True


def _layer_tensors(cfg: ModelConfig, i: int) -> list[_Tensor]:
  """HF tensors of decoder layer i; `path` is relative to the layer's subtree."""
  d, n, k, h, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  prefix = f'model.layers.{i}.'
  return [
      _Tensor(prefix + 'self_attn.q_proj.weight', ('attention', 'q_proj'), (n * h, d), (d, n, h)),
      _Tensor(prefix + 'self_attn.k_proj.weight', ('attention', 'k_proj'), (k * h, d), (d, k, h)),
      _Tensor(prefix + 'self_attn.v_proj.weight', ('attention', 'v_proj'), (k * h, d), (d, k, h)),
      _Tensor(prefix + 'self_attn.o_proj.weight', ('attention', 'o_proj'), (d, n * h), (n, h, d)),
      _Tensor(prefix + 'mlp.gate_proj.weight', ('mlp', 'gate_proj'), (f, d), (d, f)),
      _Tensor(prefix + 'mlp.up_proj.weight', ('mlp', 'up_proj'), (f, d), (d, f)),
      _Tensor(prefix + 'mlp.down_proj.weight', ('mlp', 'down_proj'), (d, f), (f, d)),
      _Tensor(prefix + 'input_layernorm.weight', ('attention_norm', 'scale'), (d,), (d,)),
      _Tensor(prefix + 'post_attention_layernorm.weight', ('mlp_norm', 'scale'), (d,), (d,)),
  ]


def _top_tensors(cfg: ModelConfig) -> list[_Tensor]:
  d, v = cfg.embed_dim, cfg.vocab_size
  tensors = [_Tensor('model.embed_tokens.weight', ('embedder', 'embedding'), (v, d), (v, d),
                     transpose=False),
             _Tensor('model.norm.weight', ('final_norm', 'scale'), (d,), (d,))]
  if not cfg.tie_embeddings:
    tensors.append(_Tensor('lm_head.weight', ('lm_head',), (v, d), (d, v)))
  return tensors


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
  for depth, key in enumerate(path):
    if not isinstance(tree, Mapping) or key not in tree:
      raise ValueError(f'parameter {"/".join(path[:depth + 1])} is missing')
    tree = tree[key]
  return tree


def _copy_into(out: np.ndarray, spec: _Tensor, info: safetensors_io.TensorInfo) -> None:
  """Copies an HF tensor into `out` (our layout): one pass, no temporary of the full tensor."""
  if info.shape != spec.hf_shape:
    raise ValueError(f'tensor {spec.hf_name!r} in {info.filename} has shape {list(info.shape)}, '
                     f'expected {list(spec.hf_shape)} from {CONFIG_FILE}')
  source = info.read()
  # Every supported dtype is floating point; numpy's 'same_kind' would refuse bfloat16 -> float16.
  if spec.transpose:
    np.copyto(out.reshape(spec.hf_shape[::-1]), source.T, casting='unsafe')
  else:
    np.copyto(out, source, casting='unsafe')
  del source


def _check_names(cfg: ModelConfig, tensors: Mapping[str, safetensors_io.TensorInfo],
                 directory: str) -> None:
  expected = {t.hf_name for t in _top_tensors(cfg)}
  expected |= {t.hf_name for i in range(cfg.num_layers) for t in _layer_tensors(cfg, i)}
  missing = sorted(expected - set(tensors))
  if missing:
    raise ValueError(f'checkpoint {directory} lacks tensors {missing[:5]}'
                     f'{" and more" if len(missing) > 5 else ""}')
  extra = sorted(name for name in set(tensors) - expected
                 if not name.endswith(_IGNORED_SUFFIXES)
                 and not (cfg.tie_embeddings and name == 'lm_head.weight'))
  if extra:
    raise ValueError(f'checkpoint {directory} has tensors this Llama config does not use: '
                     f'{extra[:5]}{" and more" if len(extra) > 5 else ""}')


def _stored_dtype(tensors: Mapping[str, safetensors_io.TensorInfo]) -> np.dtype:
  """The one dtype of the weights; ignored buffers (rotary inv_freq) may differ."""
  weights = {name: info for name, info in tensors.items()
             if not name.endswith(_IGNORED_SUFFIXES)}
  dtypes = {info.dtype for info in weights.values()}
  if len(dtypes) > 1:
    examples = {info.dtype.name: name for name, info in weights.items()}
    raise ValueError(f'tensors have mixed dtypes (e.g. {examples}); pass param_dtype= to cast '
                     'them all to one')
  return dtypes.pop()


def _check_tied_head(tensors: Mapping[str, safetensors_io.TensorInfo], params: dict) -> None:
  """Some checkpoints store lm_head.weight although it is tied; accept it only if identical."""
  head = tensors['lm_head.weight'].read()
  embedding = params['embedder']['embedding']
  if head.shape != embedding.shape or not np.array_equal(head, embedding):
    raise ValueError('tie_word_embeddings is true but lm_head.weight differs from '
                     'model.embed_tokens.weight')


def load_hf(path: str, *, param_dtype: Optional[str] = None, scan_layers: bool = True,
            **overrides) -> tuple[ModelConfig, dict]:
  """Reads a transformers Llama checkpoint directory without torch, one tensor at a time.

  Args:
    path: directory with config.json and model.safetensors (or shards plus their index).
    param_dtype: 'float32', 'bfloat16' or 'float16' to cast the weights; default keeps the stored
      dtype, which also becomes the config's compute dtype (as transformers would run it).
    scan_layers: True for the stacked [L, ...] layout, False for layers_0 ... layers_{L-1}.
    **overrides: other ModelConfig fields to replace (e.g. dtype='bfloat16', remat_policy='full').

  Returns:
    (config, params): unboxed params as numpy arrays, ready for `Transformer(config).apply`.

  Raises:
    FileNotFoundError: config.json or the safetensors files are missing.
    ValueError: unsupported architecture or setting, missing, unexpected or misshapen tensors,
      unsupported dtypes; the message names the field, tensor or file.
  """
  config_path = epath.Path(path) / CONFIG_FILE
  if not config_path.exists():
    raise FileNotFoundError(f'{config_path} does not exist')
  hf_config = json.loads(config_path.read_text())
  # The architecture, then the tensor names are checked before any weight is read.
  declared = config_from_hf(hf_config)
  tensors = safetensors_io.index_directory(path)
  _check_names(declared, tensors, path)
  if param_dtype is None:
    dtype = _stored_dtype(tensors)
  elif param_dtype in _DTYPE_NAMES:
    dtype = _DTYPE_NAMES[param_dtype]
  else:
    raise ValueError(f'param_dtype={param_dtype!r}; expected one of {sorted(_DTYPE_NAMES)}')
  values = dict(dtype=dtype.name, param_dtype=dtype.name, scan_layers=scan_layers)
  cfg = config_from_hf(hf_config, **dict(values, **overrides))
  params = _read_params(cfg, tensors, dtype)
  if cfg.tie_embeddings and 'lm_head.weight' in tensors:
    _check_tied_head(tensors, params)
  return cfg, params


def _read_params(cfg: ModelConfig, tensors: Mapping[str, safetensors_io.TensorInfo],
                 dtype: np.dtype) -> dict:
  """Allocates each parameter once (stacked when scanning) and fills it tensor by tensor."""
  params = {}
  for spec in _top_tensors(cfg):
    out = np.empty(spec.shape, dtype)
    _copy_into(out, spec, tensors[spec.hf_name])
    _set(params, spec.path, out)
  if cfg.scan_layers:
    stacked = {spec.path: np.empty((cfg.num_layers,) + spec.shape, dtype)
               for spec in _layer_tensors(cfg, 0)}
    for i in range(cfg.num_layers):
      for spec in _layer_tensors(cfg, i):
        _copy_into(stacked[spec.path][i], spec, tensors[spec.hf_name])
    for spec_path, array in stacked.items():
      _set(params, ('layers',) + spec_path, array)
  else:
    for i in range(cfg.num_layers):
      for spec in _layer_tensors(cfg, i):
        out = np.empty(spec.shape, dtype)
        _copy_into(out, spec, tensors[spec.hf_name])
        _set(params, (f'layers_{i}',) + spec.path, out)
  return params


def _hf_sources(cfg: ModelConfig, params: Mapping) -> Iterator[safetensors_io.TensorSource]:
  """(name, shape, dtype, produce) for each HF tensor, in the order transformers writes them."""

  def source(spec: _Tensor, array, where: str):
    array_dtype = np.dtype(array.dtype)
    if tuple(array.shape) != spec.shape:
      raise ValueError(f'parameter {where} for {spec.hf_name} has shape {list(array.shape)}, '
                       f'expected {list(spec.shape)}')
    if array_dtype.name not in _DTYPE_NAMES:
      raise ValueError(f'parameter {where} has dtype {array_dtype}; expected one of '
                       f'{sorted(_DTYPE_NAMES)}')
    if spec.transpose:
      produce = lambda: np.asarray(array).reshape(spec.hf_shape[::-1]).T
    else:
      produce = lambda: np.asarray(array)
    return spec.hf_name, spec.hf_shape, array_dtype, produce

  def top(path: tuple[str, ...]):
    spec = next(t for t in _top_tensors(cfg) if t.path == path)
    return source(spec, _get(params, path), '/'.join(path))

  yield top(('embedder', 'embedding'))
  for i in range(cfg.num_layers):
    for spec in _layer_tensors(cfg, i):
      if 'layers' in params:
        stacked = _get(params, ('layers',) + spec.path)
        where = '/'.join(('layers',) + spec.path)
        if stacked.shape[:1] != (cfg.num_layers,):
          raise ValueError(f'parameter {where} has shape {list(stacked.shape)}; expected '
                           f'{cfg.num_layers} stacked layers')
        yield source(spec, stacked[i], f'{where}[{i}]')
      else:
        path = (f'layers_{i}',) + spec.path
        yield source(spec, _get(params, path), '/'.join(path))
  yield top(('final_norm', 'scale'))
  if not cfg.tie_embeddings:
    yield top(('lm_head',))


def _check_no_extra_params(cfg: ModelConfig, params: Mapping) -> None:
  """A parameter that no HF tensor receives would be dropped silently: refuse instead."""
  if 'layers' in params:
    expected = {('layers',) + t.path for t in _layer_tensors(cfg, 0)}
  else:
    expected = {(f'layers_{i}',) + t.path for i in range(cfg.num_layers)
                for t in _layer_tensors(cfg, i)}
  expected |= {t.path for t in _top_tensors(cfg)}
  paths = {tuple(key.key for key in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  extra = sorted('/'.join(path) for path in paths - expected)
  if extra:
    raise ValueError(f'parameters {extra[:5]} have no Hugging Face Llama counterpart '
                     f'(tie_embeddings={cfg.tie_embeddings}, num_layers={cfg.num_layers})')


def save_hf(config: ModelConfig, params: Mapping, path: str, *,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
            extra_config: Optional[Mapping[str, Any]] = None, overwrite: bool = False) -> None:
  """Writes a directory that `transformers.LlamaForCausalLM.from_pretrained` loads.

  Tensors keep their dtype; above `max_shard_bytes` they are split into numbered shards with a
  model.safetensors.index.json, one shard in host memory at a time.

  Args:
    config: the model's config.
    params: parameter tree, scanned ('layers') or not ('layers_0', ...), boxed or not,
      numpy or (fully addressable) jax arrays; a {'params': ...} wrapper is accepted.
    path: output directory, created if needed.
    max_shard_bytes: largest size of one safetensors file.
    extra_config: further config.json fields that do not describe the architecture, e.g.
      bos_token_id / eos_token_id.
    overwrite: replace safetensors files already in `path` instead of refusing.

  Raises:
    ValueError: missing or misshapen parameters, or extra_config contradicting `config`.
    FileExistsError: `path` already holds a checkpoint and overwrite is False.
  """
  params = nn.unbox(params)
  if set(params) == {'params'}:
    params = params['params']
  hf_config = config_to_hf(config)
  clashes = sorted(k for k in (extra_config or {}) if k in hf_config)
  if clashes:
    raise ValueError(f'extra_config must not set architecture fields {clashes}')
  hf_config.update(extra_config or {})
  sources = list(_hf_sources(config, params))
  _check_no_extra_params(config, params)
  # Declare the dtype the tensors really have (params may have been cast after training).
  hf_config['dtype'] = hf_config['torch_dtype'] = sources[0][2].name
  directory = epath.Path(path)
  directory.mkdir(parents=True, exist_ok=True)  # on cloud storage, nothing until a file is
  files = directory.iterdir() if directory.exists() else ()
  existing = sorted(file.name for file in files
                    if file.name.endswith('.safetensors') or file.name == safetensors_io.INDEX_FILE)
  if existing and not overwrite:
    raise FileExistsError(f'{path} already holds {existing}; pass overwrite=True to replace them')
  for name in existing:
    (directory / name).unlink()
  safetensors_io.write_checkpoint(os.fspath(directory), sources, max_shard_bytes)
  (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True))


def save_tokenizer(tokenizer, path: str, chat_template: Optional[str] = None) -> None:
  """Writes the tokenizer next to an export so `transformers.AutoTokenizer` loads it.

  A SentencePiece model (Llama 2, or one a from-scratch run trained) becomes tokenizer.model
  plus a LlamaTokenizer tokenizer_config.json that encodes text exactly as our tokenizer does
  (no dummy prefix; BOS added, as the training pipeline does). A tokenizer.json is copied with
  the tokenizer_config.json found next to it, if any. `chat_template` is stored in
  tokenizer_config.json.
  """
  # Imported here: tokenizer loading is only needed by exports that carry a tokenizer.
  from llm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  directory = epath.Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  names = {i: text for text, i in tokenizer.special_tokens().items()}
  config = {}
  if isinstance(tokenizer, tokenizer_lib.SentencePieceTokenizer):
    (directory / 'tokenizer.model').write_bytes(tokenizer.model_proto)
    config = {'tokenizer_class': 'LlamaTokenizer', 'legacy': False, 'add_prefix_space': False,
              'add_bos_token': True, 'add_eos_token': False}
  elif isinstance(tokenizer, tokenizer_lib.HuggingFaceTokenizer):
    (directory / 'tokenizer.json').write_text(tokenizer.to_json(), encoding='utf-8')
    source_config = epath.Path(tokenizer.path).parent / 'tokenizer_config.json'
    if source_config.exists():
      config = json.loads(source_config.read_text(encoding='utf-8'))
    config.setdefault('tokenizer_class', 'PreTrainedTokenizerFast')
  else:
    raise ValueError(f'cannot export tokenizer {tokenizer!r}: expected a SentencePiece or '
                     'Hugging Face tokenizer')
  for role, token_id in (('bos', tokenizer.bos_id), ('eos', tokenizer.eos_id),
                         ('pad', tokenizer.pad_id)):
    if token_id in names:
      config.setdefault(f'{role}_token', names[token_id])
  if chat_template is not None:
    config['chat_template'] = chat_template
  (directory / 'tokenizer_config.json').write_text(
      json.dumps(config, indent=2, ensure_ascii=False), encoding='utf-8')


def load_hf_sharded(path: str, shardings, *, param_dtype: Optional[str] = None,
                    scan_layers: bool = True, **overrides) -> tuple[ModelConfig, dict]:
  """`load_hf`, with every parameter placed in its target sharding (e.g. a train state's).

  Each device receives only its shards of the host copy (no random initialisation and no
  replicated copy first), so device memory holds the parameters once.

  Args:
    path: the Hugging Face directory.
    shardings: a tree of jax.sharding.Sharding matching the parameter tree.
    param_dtype, scan_layers, **overrides: as for `load_hf`.
  """
  config, params = load_hf(path, param_dtype=param_dtype, scan_layers=scan_layers, **overrides)
  try:
    placed = jax.tree.map(
        lambda array, target: jax.make_array_from_callback(
            array.shape, target, lambda index, array=array: array[index]), params, shardings)
  except ValueError as e:
    raise ValueError(f'the parameters of {path} do not match the target shardings\' tree '
                     f'(scan_layers={scan_layers}, tie_embeddings={config.tie_embeddings}): '
                     f'{e}') from e
  return config, placed


def is_hf_directory(path: str) -> bool:
  """Whether `path` is a transformers checkpoint directory (config.json and safetensors)."""
  directory = epath.Path(path)
  if not directory.is_dir() or not (directory / CONFIG_FILE).exists():
    return False
  return any(file.name.endswith('.safetensors') for file in directory.iterdir())


def read_model_config(path: str, **overrides) -> ModelConfig:
  """The ModelConfig of a Hugging Face directory's config.json, without reading weights."""
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'{config_path} does not exist')
  with open(config_path) as f:
    return config_from_hf(json.load(f), **overrides)
