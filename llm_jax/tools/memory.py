"""Per-device memory estimate of a training step, printed at start-up, and HBM capacities.

The estimate is analytic (no compilation): exact for parameters, gradients and optimizer
moments (each leaf's shard shape under the mesh and rules), approximate for activations, which
depend on the rematerialisation policy and on what XLA fuses. `python -m llm_jax.aot` gives the
compiler's own numbers for a TPU topology.
"""

import dataclasses
import math
import re
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from llm_jax.tools import flops
from llm_jax import model as model_lib
from llm_jax import sharding

GIB = 1024 ** 3
# HBM of one chip (one jax device; see flops.PEAK_FLOPS for the TPU v4 exception).
HBM_BYTES = {
    'tpu_v4': 32 * GIB,
    'tpu_v5e': 16 * GIB,
    'tpu_v5p': 95 * GIB,
    'tpu_v6e': 32 * GIB,
    'a100': 80 * GIB,
    'h100_sxm': 80 * GIB,
    'h100_pcie': 80 * GIB,
    'h200': 141 * 10 ** 9,
}


def device_hbm_bytes(device) -> Optional[int]:
  """HBM capacity of a jax device in bytes; None when unknown (e.g. a CPU)."""
  key = flops.device_kind_key(device.device_kind)
  if key is None:
    return None
  size = re.search(r'(\d+)\s*gb', device.device_kind.lower())
  if key.startswith(('a100', 'h100')) and size:  # 'NVIDIA A100-SXM4-40GB' and friends
    return int(size.group(1)) * GIB
  return HBM_BYTES[key]


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per device of one training step's state and live activations."""
  params: int
  gradients: int
  optimizer: int
  activations: int
  fsdp_buffers: int = 0  # one layer's gathered weights (double-buffered) and unreduced gradient
  hbm: Optional[int] = None

  @property
  def total(self) -> int:
    return (self.params + self.gradients + self.optimizer + self.activations +
            self.fsdp_buffers)

  def __str__(self) -> str:
    parts = ', '.join(f'{name} {format_bytes(getattr(self, name))}' for name in
                      ('params', 'gradients', 'optimizer', 'activations', 'fsdp_buffers'))
    line = f'memory per device (estimate): {parts}; total {format_bytes(self.total)}'
    if self.hbm:
      line += f' of {format_bytes(self.hbm)} HBM ({self.total / self.hbm:.0%})'
    return line


def format_bytes(num_bytes: float) -> str:
  """'1.50 GiB', '12.0 MiB': GiB from 1 GiB up, MiB below."""
  if num_bytes >= GIB:
    return f'{num_bytes / GIB:.2f} GiB'
  return f'{num_bytes / 2 ** 20:.1f} MiB'


def _sharded_bytes(abstract_tree, mesh: Mesh, rules, dtype=None) -> int:
  """Bytes of one device's shard of every leaf (boxed leaves follow their logical axes)."""
  shardings = jax.tree.leaves(sharding.tree_shardings(abstract_tree, mesh, rules),
                              is_leaf=lambda x: isinstance(x, NamedSharding))
  leaves = jax.tree.leaves(nn.unbox(abstract_tree))
  total = 0
  for leaf, leaf_sharding in zip(leaves, shardings):
    itemsize = jnp.dtype(dtype or leaf.dtype).itemsize
    total += math.prod(leaf_sharding.shard_shape(leaf.shape)) * itemsize
  return total


def _shards(mesh: Mesh, rules, logical_axis: str, size: int) -> int:
  """How many ways the rules split a dimension of `size` named `logical_axis` on this mesh."""
  spec = sharding.logical_to_spec((logical_axis,), (size,), mesh, rules)[0]
  if spec is None:
    return 1
  return math.prod(mesh.shape[a] for a in ((spec,) if isinstance(spec, str) else spec))


def _layer_activation_bytes(config: model_lib.ModelConfig, policy: str, key_len: int,
                            heads_split: int, kv_split: int, mlp_split: int) -> float:
  """Bytes per token that one layer keeps for the backward pass under a remat policy."""
  itemsize = jnp.dtype(config.dtype).itemsize
  d = config.embed_dim
  nh = config.num_heads * config.head_dim / heads_split
  kh = config.num_kv_heads * config.head_dim / kv_split
  f = config.mlp_dim / mlp_split
  # The einsum kernel materialises float32 scores and probabilities; fused kernels keep only
  # the softmax statistics.
  scores = (config.num_heads / heads_split) * key_len
  if config.attention_kernel == 'xla':
    attention = scores * (4 + itemsize)
  else:
    attention = 4 * config.num_heads / heads_split
  if policy == 'none':
    return itemsize * (5 * d + 2 * (nh + 2 * kh) + nh + 4 * f) + attention
  if policy == 'full':
    return itemsize * d
  if policy == 'dots_saveable':
    scores_kept = 4 * scores if config.attention_kernel == 'xla' else 0
    return itemsize * (3 * d + (nh + 2 * kh) + nh + 2 * f) + scores_kept
  if policy == 'dots_with_no_batch_dims_saveable':
    return itemsize * (3 * d + (nh + 2 * kh) + 2 * f)
  if policy == 'save_attention_outputs':
    return itemsize * (d + nh)
  raise ValueError(f'remat_policy={policy!r}; expected one of {sorted(model_lib.REMAT_POLICIES)}')


def activation_bytes(config: model_lib.ModelConfig, mesh: Mesh, rules,
                     batch_shape: Sequence[int]) -> int:
  """Approximate peak activation bytes per device of a forward + backward pass."""
  batch, seq_len = batch_shape
  tokens = batch / _shards(mesh, rules, 'act_batch', batch) * seq_len
  splits = dict(heads_split=_shards(mesh, rules, 'act_heads', config.num_heads),
                kv_split=_shards(mesh, rules, 'act_kv_heads', config.num_kv_heads),
                mlp_split=_shards(mesh, rules, 'act_mlp', config.mlp_dim))
  saved = config.num_layers * _layer_activation_bytes(config, config.remat_policy, seq_len,
                                                      **splits)
  # Rematerialised layers are recomputed one at a time during the backward pass.
  working = 0.0
  if config.remat_policy != 'none':
    working = _layer_activation_bytes(config, 'none', seq_len, **splits)
  # Float32 logits and their gradient.
  logits = 2 * 4 * config.vocab_size / _shards(mesh, rules, 'act_vocab', config.vocab_size)
  return int(tokens * (saved + working + logits))


def fsdp_buffer_bytes(config: model_lib.ModelConfig, mesh: Mesh, rules) -> int:
  """Bytes of one layer's weights gathered over the FSDP axes, twice (the next layer's gather
  overlaps the current layer's compute), plus that layer's gradient before its reduce-scatter.

  Zero when the rules do not shard the weights' embed dimension (no FSDP).
  """
  if _shards(mesh, rules, 'embed', config.embed_dim) == 1:
    return 0
  d, f, h = config.embed_dim, config.mlp_dim, config.head_dim
  heads = config.num_heads * h / _shards(mesh, rules, 'heads', config.num_heads)
  kv_heads = config.num_kv_heads * h / _shards(mesh, rules, 'kv_heads', config.num_kv_heads)
  mlp = f / _shards(mesh, rules, 'mlp', f)
  layer_params = d * (2 * heads + 2 * kv_heads + 3 * mlp)
  return int(layer_params * (2 * jnp.dtype(config.dtype).itemsize +
                             jnp.dtype(config.param_dtype).itemsize))


def estimate_memory_per_device(config: model_lib.ModelConfig, mesh: Mesh, rules,
                               batch_shape: Sequence[int], optimizer_moments: int = 2,
                               moment_dtype: Optional[str] = None,
                               accum_steps: int = 1) -> MemoryEstimate:
  """Per-device bytes of parameters, gradients, optimizer moments and activations.

  Args:
    config: the model.
    mesh: the device mesh (its devices' kind gives the HBM capacity, when known).
    rules: logical-axis rules, as in config.mesh.rules.
    batch_shape: global (batch, sequence length) of one optimizer step.
    optimizer_moments: per-parameter optimizer buffers (AdamW: 2).
    moment_dtype: dtype of those buffers; default the parameter dtype (optax's default).
    accum_steps: gradient-accumulation microbatches; > 1 adds float32 accumulators and
      divides the activations' batch.

  Returns:
    A MemoryEstimate; `str()` of it is a one-line summary for the logs.
  """
  abstract = model_lib.abstract_params(config)
  params = _sharded_bytes(abstract, mesh, rules)
  gradients = params
  if accum_steps > 1:
    gradients += _sharded_bytes(abstract, mesh, rules, 'float32')
  optimizer = optimizer_moments * _sharded_bytes(abstract, mesh, rules,
                                                 moment_dtype or config.param_dtype)
  micro_batch = (batch_shape[0] // accum_steps, batch_shape[1])
  activations = activation_bytes(config, mesh, rules, micro_batch)
  hbm = device_hbm_bytes(mesh.devices.flat[0])
  return MemoryEstimate(params, gradients, optimizer, activations,
                        fsdp_buffer_bytes(config, mesh, rules), hbm)
