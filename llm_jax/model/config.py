"""The frozen model config, its conversion to and from config sections, and the presets.

Shape letters used in einsum strings and shape comments across the package:
  B batch, T query length, S key/cache length, N query heads, K key/value heads, G = N / K,
  H head dim, D model dim, F MLP hidden dim, V vocabulary, L layers.
"""

import dataclasses
from typing import Optional

import jax

from llm_jax.model.layers.attention_kernels import KERNELS
from llm_jax.model.layers.rope import RopeScaling


REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'save_attention_outputs': jax.checkpoint_policies.save_only_these_names('attention_out'),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of one Llama model. Frozen so it can be a static jit argument."""
  vocab_size: int
  embed_dim: int  # D
  num_layers: int  # L
  num_heads: int  # N
  num_kv_heads: int  # K
  head_dim: int  # H
  mlp_dim: int  # F
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: Optional[RopeScaling] = None
  max_seq_len: int = 2048
  tie_embeddings: bool = False
  dtype: str = 'float32'  # matmul/activation dtype; softmax, logits and loss stay float32
  param_dtype: str = 'float32'
  scan_layers: bool = True
  remat_policy: str = 'none'
  attention_kernel: str = 'xla'

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads={self.num_heads} is not a multiple of '
                       f'num_kv_heads={self.num_kv_heads}')
    if self.head_dim % 2:
      raise ValueError(f'head_dim={self.head_dim} must be even for rotary embeddings')
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'remat_policy={self.remat_policy!r}; expected one of '
                       f'{sorted(REMAT_POLICIES)}')
    for field in ('dtype', 'param_dtype'):
      if getattr(self, field) not in ('float32', 'bfloat16', 'float16'):
        raise ValueError(f'{field}={getattr(self, field)!r}; expected float32, bfloat16 or float16')
    if self.attention_kernel not in KERNELS:
      raise ValueError(f'attention_kernel={self.attention_kernel!r}; expected one of {KERNELS}')

  def replace(self, **changes) -> 'ModelConfig':
    return dataclasses.replace(self, **changes)


def _llama3_scaling(factor: float) -> RopeScaling:
  return RopeScaling('llama3', factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)


_LLAMA2 = dict(vocab_size=32000, head_dim=128, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096)
_LLAMA3 = dict(vocab_size=128256, head_dim=128, norm_eps=1e-5, rope_theta=500000.0,
               max_seq_len=8192)
_LLAMA31 = dict(_LLAMA3, max_seq_len=131072, rope_scaling=_llama3_scaling(8.0))

PRESETS = {
    # A few-million-parameter model for tests and the CPU demo.
    'tiny': ModelConfig(vocab_size=2048, embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=2,
                        head_dim=32, mlp_dim=384, max_seq_len=512, rope_theta=10000.0),
    # ~150M parameters: big enough that matmuls, not dispatch, dominate on a CPU.
    'llama-150m': ModelConfig(vocab_size=32000, embed_dim=768, num_layers=12, num_heads=12,
                              num_kv_heads=12, head_dim=64, mlp_dim=2304, max_seq_len=2048),
    'llama2-7b': ModelConfig(embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                             mlp_dim=11008, **_LLAMA2),
    'llama2-13b': ModelConfig(embed_dim=5120, num_layers=40, num_heads=40, num_kv_heads=40,
                              mlp_dim=13824, **_LLAMA2),
    'llama2-70b': ModelConfig(embed_dim=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                              mlp_dim=28672, **_LLAMA2),
    'llama3-8b': ModelConfig(embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                             mlp_dim=14336, **_LLAMA3),
    'llama3-70b': ModelConfig(embed_dim=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                              mlp_dim=28672, **_LLAMA3),
    'llama3.1-8b': ModelConfig(embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                               mlp_dim=14336, **_LLAMA31),
    'llama3.1-70b': ModelConfig(embed_dim=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                                mlp_dim=28672, **_LLAMA31),
    'llama3.1-405b': ModelConfig(embed_dim=16384, num_layers=126, num_heads=128, num_kv_heads=8,
                                 mlp_dim=53248, **_LLAMA31),
    'llama3.2-1b': ModelConfig(embed_dim=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                               mlp_dim=8192, tie_embeddings=True,
                               **dict(_LLAMA31, head_dim=64, rope_scaling=_llama3_scaling(32.0))),
    'llama3.2-3b': ModelConfig(embed_dim=3072, num_layers=28, num_heads=24, num_kv_heads=8,
                               mlp_dim=8192, tie_embeddings=True,
                               **dict(_LLAMA31, rope_scaling=_llama3_scaling(32.0))),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  """Returns the named preset, with any field overridden (e.g. dtype='bfloat16')."""
  if name not in PRESETS:
    raise ValueError(f'unknown model preset {name!r}; available: {sorted(PRESETS)}')
  return PRESETS[name].replace(**overrides)



def to_config_dict(config: ModelConfig) -> dict:
  """Plain dict of a ModelConfig (rope_scaling always present), for ml_collections configs."""
  values = dataclasses.asdict(config)
  values['rope_scaling'] = dataclasses.asdict(config.rope_scaling or RopeScaling())
  return values


def from_config_dict(values) -> ModelConfig:
  """Builds a ModelConfig from the `model` section of a config (a ConfigDict or dict)."""
  values = dict(values.to_dict() if hasattr(values, 'to_dict') else values)
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(values) - fields - {'preset'})
  if unknown:
    raise ValueError(f'unknown model config keys {unknown}; expected a subset of {sorted(fields)}')
  values.pop('preset', None)
  scaling = values.get('rope_scaling')
  if isinstance(scaling, dict):
    scaling = RopeScaling(**scaling)
  values['rope_scaling'] = None if scaling is None or scaling.rope_type == 'default' else scaling
  return ModelConfig(**values)
