"""Checks a whole training config before anything is built or compiled.

`validate_config` reads every section and raises one ValueError that lists each problem with its
key and value, so a run with a typo'd batch size, a NaN learning rate or an impossible mesh fails
in a second instead of after compilation, after training, or never (a NaN learning rate makes NaN
updates that the non-finite guard does not see, and NaN parameters get checkpointed).
"""

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import ml_collections

from llm_jax import sharding
from llm_jax.data import sources
from llm_jax.model import config as model_config_lib
from llm_jax.model.layers.attention_kernels import KERNELS
from llm_jax.training import optim

NONFINITE_POLICIES = ('skip', 'stop')
TOKENIZER_KINDS = ('train_spm', 'sentencepiece', 'huggingface')
_FLOAT_DTYPES = ('float32', 'bfloat16', 'float16')
_POSITIVE_MODEL_FIELDS = ('vocab_size', 'embed_dim', 'num_layers', 'num_heads', 'num_kv_heads',
                          'head_dim', 'mlp_dim', 'max_seq_len')


class InvalidConfigError(ValueError):
  """A config that cannot run; its message lists every problem, one line each."""


class _Problems:
  """Collects 'key=value: expected ...' lines for one config."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.lines: list[str] = []

  def value(self, key: str) -> Any:
    node = self.config
    for part in key.split('.'):
      node = node[part]
    return node

  def add(self, key: str, message: str) -> None:
    self.lines.append(f'{key}={self.value(key)!r}: {message}')

  def require(self, key: str, ok: Callable[[Any], bool], expectation: str) -> bool:
    """Adds a problem unless `ok(value)`; returns whether the value passed."""
    if ok(self.value(key)):
      return True
    self.add(key, f'expected {expectation}')
    return False

  def integer_at_least(self, key: str, minimum: int) -> bool:
    return self.require(key, lambda v: _is_int(v) and v >= minimum, f'an integer >= {minimum}')

  def finite(self, key: str, ok: Callable[[float], bool], expectation: str) -> bool:
    return self.require(key, lambda v: _is_real(v) and ok(v), f'a finite number {expectation}')

  def one_of(self, key: str, choices: Sequence[str]) -> bool:
    return self.require(key, lambda v: v in choices, f'one of {tuple(choices)}')


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _check_model(p: _Problems) -> None:
  ok = all([p.integer_at_least(f'model.{field}', 1) for field in _POSITIVE_MODEL_FIELDS])
  ok &= p.finite('model.norm_eps', lambda v: v > 0, '> 0')
  ok &= p.finite('model.rope_theta', lambda v: v > 0, '> 0')
  ok &= p.one_of('model.dtype', _FLOAT_DTYPES)
  ok &= p.one_of('model.param_dtype', _FLOAT_DTYPES)
  ok &= p.one_of('model.remat_policy', sorted(model_config_lib.REMAT_POLICIES))
  ok &= p.one_of('model.attention_kernel', KERNELS)
  ok &= p.require('model.scan_layers', lambda v: isinstance(v, bool), 'True or False')
  if ok:  # the remaining relations (heads per kv head, even head_dim, rope scaling)
    try:
      model_config_lib.from_config_dict(p.config.model)
    except (ValueError, TypeError) as e:
      p.lines.append(f'model: {e}')


def _check_data(p: _Problems) -> None:
  data = p.config.data
  if p.one_of('data.dataset', sources.DATASETS + ('sft',)):  # sft: llm_jax/data/sft.py
    if data.dataset == 'tfds':
      p.require('data.tfds_name', bool, "a TFDS name for data.dataset='tfds' (e.g. 'lm1b')")
    if data.dataset == 'text_files':
      p.require('data.text_glob', bool, "a file pattern for data.dataset='text_files'")
  if p.one_of('data.tokenizer', TOKENIZER_KINDS):
    if data.tokenizer == 'train_spm':
      p.integer_at_least('data.tokenizer_train_bytes', 1)
    else:
      p.require('data.tokenizer_path', bool,
                f'the path of a tokenizer file for data.tokenizer={data.tokenizer!r}')
  p.require('data.packing', lambda v: isinstance(v, bool), 'True or False')
  p.integer_at_least('data.num_workers', 0)
  if p.integer_at_least('data.seq_len', 1) and _is_int(p.config.model.max_seq_len):
    p.require('data.seq_len', lambda v: v <= p.config.model.max_seq_len,
              f'at most model.max_seq_len={p.config.model.max_seq_len}')


def _resolved_mesh(p: _Problems, device_count: int) -> Optional[dict[str, int]]:
  """{mesh axis: size} as create_mesh will build it, or None after adding the problem."""
  mesh = p.config.mesh
  axes, shape = tuple(mesh.axes), tuple(mesh.shape)
  if len(axes) != len(shape) or len(set(axes)) != len(axes):
    p.add('mesh.shape', f'expected one size per axis of mesh.axes={axes}')
    return None
  if not p.integer_at_least('mesh.num_slices', 1):
    return None
  if device_count % mesh.num_slices:
    p.add('mesh.num_slices', f'does not divide the {device_count} devices')
    return None
  try:
    sizes = sharding.resolve_mesh_shape(shape, device_count // mesh.num_slices)
  except ValueError as e:
    p.add('mesh.shape', f'{e} (per slice)' if mesh.num_slices > 1 else str(e))
    return None
  # Slices are joined along the first axis (sharding.create_mesh).
  sizes = (sizes[0] * mesh.num_slices,) + sizes[1:]
  return dict(zip(axes, sizes))


def _check_rules(p: _Problems) -> bool:
  axes = set(p.config.mesh.axes)
  for rule in p.config.mesh.rules:
    if len(rule) != 2:
      p.lines.append(f'mesh.rules: rule {tuple(rule)!r} is not a (logical axis, mesh axes) pair')
      return False
    targets = rule[1]
    targets = () if targets is None else (targets,) if isinstance(targets, str) else targets
    unknown = [t for t in targets if t not in axes]
    if unknown:
      p.lines.append(f'mesh.rules: rule {tuple(rule)!r} names mesh axes {unknown} that are not '
                     f'in mesh.axes={tuple(p.config.mesh.axes)}')
      return False
  return True


def _batch_shards(p: _Problems, sizes: dict[str, int]) -> int:
  """How many ways the rules split a batch (the 'act_batch' logical axis) over the mesh."""
  rules = tuple(tuple(rule) for rule in p.config.mesh.rules)
  axes = nn.logical_to_mesh_axes(('act_batch',), rules)[0]
  if axes is None or axes is nn.spmd._unassigned_axis:  # pylint: disable=protected-access
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(sizes[a] for a in axes)


def _check_batches(p: _Problems, process_count: int, device_count: int) -> None:
  """Batch sizes against processes, the mesh's batch split and gradient accumulation."""
  sizes = _resolved_mesh(p, device_count)
  shards = _batch_shards(p, sizes) if sizes is not None and _check_rules(p) else None
  for key in ('data.global_batch_size', 'data.eval_batch_size'):
    if not p.integer_at_least(key, 1):
      continue
    size = p.value(key)
    if size % process_count:
      p.add(key, f'expected a multiple of the {process_count} processes (each reads its rows)')
    elif shards is not None and size % shards:
      p.add(key, f'expected a multiple of the {shards} devices the batch is split over (mesh '
                 f"{sizes}, rule for 'act_batch')")
  if p.integer_at_least('optim.grad_accum_steps', 1):
    batch = p.config.data.global_batch_size
    if _is_int(batch) and batch >= 1 and batch % p.config.optim.grad_accum_steps:
      p.add('optim.grad_accum_steps', f'does not divide data.global_batch_size={batch}')


def _check_optim(p: _Problems) -> None:
  p.finite('optim.learning_rate', lambda v: v > 0, '> 0')
  p.one_of('optim.schedule', optim.SCHEDULES)
  p.finite('optim.end_lr_ratio', lambda v: 0 <= v <= 1, 'in [0, 1]')
  p.finite('optim.b1', lambda v: 0 <= v < 1, 'in [0, 1)')
  p.finite('optim.b2', lambda v: 0 <= v < 1, 'in [0, 1)')
  p.finite('optim.eps', lambda v: v > 0, '> 0')
  p.finite('optim.weight_decay', lambda v: v >= 0, '>= 0')
  p.finite('optim.grad_clip_norm', lambda v: v >= 0, '>= 0 (0 = no clipping)')
  p.finite('optim.z_loss', lambda v: v >= 0, '>= 0')
  p.require('optim.decay_embeddings', lambda v: isinstance(v, bool), 'True or False')
  # A warmup longer than the run is allowed: the learning rate then never reaches its peak
  # (short smoke runs of a long recipe do this on purpose).
  p.integer_at_least('optim.warmup_steps', 0)


def _check_schedule(p: _Problems) -> None:
  """train, eval and checkpoint: step counts and periods."""
  p.integer_at_least('train.num_steps', 1)
  p.integer_at_least('train.log_every', 1)
  p.one_of('train.nonfinite', NONFINITE_POLICIES)
  p.integer_at_least('eval.every_steps', 1)
  p.integer_at_least('eval.num_batches', 0)
  p.integer_at_least('checkpoint.every_steps', 1)
  p.integer_at_least('checkpoint.keep', 1)
  p.require('checkpoint.async_save', lambda v: isinstance(v, bool), 'True or False')
  p.integer_at_least('checkpoint.restore_step', 0)


def _check_decode(p: _Problems) -> None:
  decode = p.config.decode
  p.require('decode.prompts', lambda v: isinstance(v, (tuple, list)) and all(
      isinstance(t, str) for t in v), 'a sequence of strings')
  if decode.prompts and p.integer_at_least('decode.max_new_tokens', 1):
    max_len = p.config.model.max_seq_len
    if _is_int(max_len):
      p.require('decode.max_new_tokens', lambda v: v < max_len,
                f'less than model.max_seq_len={max_len} (the prompt needs room)')
  p.finite('decode.temperature', lambda v: v >= 0, '>= 0 (0 = greedy)')
  p.integer_at_least('decode.top_k', 0)
  p.finite('decode.top_p', lambda v: 0 < v <= 1, 'in (0, 1]')


def validate_config(config: ml_collections.ConfigDict, *, process_count: int = 1,
                    device_count: Optional[int] = None) -> None:
  """Raises one ValueError naming every invalid key of a training config, with its value.

  Nothing is built or compiled: the checks are arithmetic on the config, the process count and
  the device count.

  Args:
    config: a full training config (`llm_jax.config_sections.default_config()` and the like).
    process_count: the processes of the run (jax.process_count()); batches split over them.
    device_count: all devices of the run; default jax.device_count().

  Raises:
    ValueError: one line per problem, e.g. "optim.learning_rate=nan: expected a finite
      number > 0".
  """
  device_count = jax.device_count() if device_count is None else device_count
  problems = _Problems(config)
  _check_model(problems)
  _check_data(problems)
  _check_batches(problems, process_count, device_count)
  _check_optim(problems)
  _check_schedule(problems)
  _check_decode(problems)
  if problems.lines:
    count = len(problems.lines)
    raise InvalidConfigError(f'invalid config ({count} problem{"s" * (count > 1)}):\n  ' +
                     '\n  '.join(problems.lines))
