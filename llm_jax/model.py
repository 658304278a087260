"""The Llama decoder-only Transformer, its frozen config and the published presets.

Shape letters used in einsum strings and shape comments across the package:
  B batch, T query length, S key/cache length, N query heads, K key/value heads, G = N / K,
  H head dim, D model dim, F MLP hidden dim, V vocabulary, L layers.
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.layers.attention import Attention
from llm_jax.layers.attention_kernels import KERNELS
from llm_jax.layers.embed import Embedder
from llm_jax.layers.mlp import Mlp
from llm_jax.layers.norms import RMSNorm
from llm_jax.layers.projection import project
from llm_jax.layers.rope import RopeScaling

REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'save_attention_outputs': jax.checkpoint_policies.save_only_these_names('attention_out'),
}
CACHE_AXES = ('layers', 'cache_batch', 'cache_seq', 'cache_kv_heads', 'cache_head_dim')


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


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attention(norm(x)), then + mlp(norm(x))."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, segment_ids, cache):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    x = nn.with_logical_constraint(x, ('act_batch', 'act_seq', 'act_embed'))
    normed = RMSNorm(cfg.norm_eps, dtype, param_dtype, name='attention_norm')(x)
    attended, new_cache = Attention(
        cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
        cfg.attention_kernel, dtype, param_dtype, name='attention')(
            normed, positions, segment_ids, cache)
    x = x + attended
    normed = RMSNorm(cfg.norm_eps, dtype, param_dtype, name='mlp_norm')(x)
    x = x + Mlp(cfg.mlp_dim, dtype, param_dtype, name='mlp')(normed)
    return nn.with_logical_constraint(x, ('act_batch', 'act_seq', 'act_embed')), new_cache


class Transformer(nn.Module):
  """Llama decoder. `apply({'params': p}, tokens)` returns float32 logits [B, T, V].

  Keyword arguments: `positions` [B, T] (default 0..T-1), `segment_ids` [B, T] (tokens attend
  only within their segment), and `cache` (from `init_cache`), in which case the call returns
  `(logits, new_cache)` and the new keys/values are stored at slot == position.
  """
  config: ModelConfig

  def _layer_class(self):
    policy = REMAT_POLICIES[self.config.remat_policy]
    if self.config.remat_policy == 'none':
      return DecoderLayer
    return nn.remat(DecoderLayer, policy=policy, prevent_cse=not self.config.scan_layers)

  def _run_layers(self, x, positions, segment_ids, cache):
    cfg = self.config
    layer_class = self._layer_class()
    if cfg.scan_layers:
      scanned = nn.scan(layer_class, variable_axes={'params': 0}, split_rngs={'params': True},
                        in_axes=(nn.broadcast, nn.broadcast, 0), length=cfg.num_layers,
                        metadata_params={nn.PARTITION_NAME: 'layers'})
      return scanned(cfg, name='layers')(x, positions, segment_ids, cache)
    new_caches = []
    for i in range(cfg.num_layers):
      layer_cache = None if cache is None else jax.tree.map(lambda c, i=i: c[i], cache)
      x, layer_cache = layer_class(cfg, name=f'layers_{i}')(x, positions, segment_ids,
                                                            layer_cache)
      new_caches.append(layer_cache)
    if cache is None:
      return x, None
    return x, jax.tree.map(lambda *cs: jnp.stack(cs), *new_caches)

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, cache=None):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    embedder = Embedder(cfg.vocab_size, cfg.embed_dim, cfg.tie_embeddings, dtype, param_dtype,
                        name='embedder')
    x = embedder.encode(tokens)  # [B, T, D]
    x, new_cache = self._run_layers(x, positions, segment_ids, cache)
    x = RMSNorm(cfg.norm_eps, dtype, param_dtype, name='final_norm')(x)
    if cfg.tie_embeddings:
      logits = embedder.decode(x)
    else:
      kernel = self.param('lm_head', nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), ('embed', 'vocab')), (cfg.embed_dim, cfg.vocab_size),
                          param_dtype)
      logits = project(x, kernel.astype(dtype), preferred_element_type=jnp.float32)
    logits = nn.with_logical_constraint(logits, ('act_batch', 'act_seq', 'act_vocab'))
    return logits if cache is None else (logits, new_cache)


def init_cache(config: ModelConfig, batch_size: int, max_len: int,
               dtype: Any = None) -> dict:
  """Zeroed KV cache {'k', 'v'} of shape [L, B, S, K, H] (logical axes: CACHE_AXES)."""
  shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
  dtype = jnp.dtype(dtype or config.dtype)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}


def abstract_params(config: ModelConfig, batch_size: int = 1, seq_len: int = 8):
  """Parameter shapes (boxed with their logical axes) without allocating memory."""
  tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
  return jax.eval_shape(lambda t: Transformer(config).init(jax.random.key(0), t), tokens)['params']


def count_params(params) -> int:
  """Number of scalars in a (possibly boxed or abstract) parameter tree."""
  leaves = jax.tree.leaves(nn.unbox(params))
  return int(sum(leaf.size for leaf in leaves))


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


def unbox(tree):
  """Strips logical-partitioning boxes, leaving plain arrays (or ShapeDtypeStructs)."""
  return nn.unbox(tree)
