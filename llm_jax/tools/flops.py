"""FLOP and byte accounting for training/decoding, per-device peaks, and MFU.

What counts as a FLOP here (the convention of the PaLM paper, appendix B):
  * Matmul parameters, N_matmul: per layer the q, k, v, o projections (D*N*H + 2*D*K*H + N*H*D)
    and the three MLP matrices (3*D*F), times L, plus the output projection D*V. The output
    projection is counted even when it is tied to the embedding table, because it is a real
    matmul either way. The embedding lookup (a gather) and the RMSNorm scales are not counted.
  * Training costs 6 FLOPs per matmul parameter per token (2 forward, 4 backward).
  * Attention scores and the weighted sum of values cost 2 * 2 * S * N * H FLOPs per token and
    layer in the forward pass for S visible keys; causal masking halves the average S to T / 2,
    and training triples it: 6 * L * N * H * T per token.
  * Recomputation from rematerialisation is not counted (MFU, unlike HFU, ignores it).
"""

import re
from typing import Optional

import jax.numpy as jnp

from llm_jax.model.config import ModelConfig

# Dense bfloat16 peak FLOP/s of one chip (the unit jax exposes as one device, except TPU v4 in a
# compile-only topology, which exposes each of its two cores).
PEAK_FLOPS = {
    'tpu_v4': 275e12,
    'tpu_v5e': 197e12,
    'tpu_v5p': 459e12,
    'tpu_v6e': 918e12,
    'a100': 312e12,
    'h100_sxm': 989e12,
    'h100_pcie': 756e12,
    'h200': 989e12,
}

# HBM bandwidth in bytes/s of one chip.
HBM_BANDWIDTH = {
    'tpu_v4': 1.2e12,
    'tpu_v5e': 8.19e11,
    'tpu_v5p': 2.765e12,
    'tpu_v6e': 1.64e12,
    'a100': 2.039e12,  # 80 GB SXM; the 40 GB part has 1.555e12
    'h100_sxm': 3.35e12,
    'h100_pcie': 2.0e12,
    'h200': 4.8e12,
}

# jax `device_kind` strings, most specific first ('TPU v5 lite' before 'TPU v5').
_DEVICE_KIND_PATTERNS = (
    (r'^tpu v4', 'tpu_v4'),
    (r'^tpu v5 ?lite|^tpu v5e', 'tpu_v5e'),
    (r'^tpu v5p?$', 'tpu_v5p'),
    (r'^tpu v6 ?lite|^tpu v6e', 'tpu_v6e'),
    (r'a100', 'a100'),
    (r'h100.*pcie', 'h100_pcie'),
    (r'h100', 'h100_sxm'),
    (r'h200', 'h200'),
)


def device_kind_key(device_kind: str) -> Optional[str]:
  """Maps a jax `device.device_kind` (e.g. 'TPU v5 lite', 'NVIDIA H100 80GB HBM3') to a table key.

  Returns None for kinds without a table entry (CPUs, unknown accelerators).
  """
  kind = device_kind.strip().lower()
  for pattern, key in _DEVICE_KIND_PATTERNS:
    if re.search(pattern, kind):
      return key
  return None


def device_peak_flops(device) -> Optional[float]:
  """Dense bf16 peak FLOP/s of a jax device, or None when unknown (e.g. on CPU)."""
  key = device_kind_key(device.device_kind)
  return None if key is None else PEAK_FLOPS[key]


def device_hbm_bandwidth(device) -> Optional[float]:
  """HBM bandwidth in bytes/s of a jax device, or None when unknown (e.g. on CPU)."""
  key = device_kind_key(device.device_kind)
  return None if key is None else HBM_BANDWIDTH[key]


def matmul_params(config: ModelConfig) -> int:
  """Number of matmul parameters N_matmul (see the module docstring for what counts)."""
  d, n, k, h, f = (config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim,
                   config.mlp_dim)
  per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f
  return config.num_layers * per_layer + d * config.vocab_size


def attention_flops_per_token(config: ModelConfig, seq_len: int, causal: bool = True) -> float:
  """Forward-pass attention FLOPs (scores + weighted values) per token, all layers."""
  visible = seq_len / 2 if causal else seq_len
  return 4.0 * config.num_layers * config.num_heads * config.head_dim * visible


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Model FLOPs of one training token: 6 * N_matmul + 3 * causal attention FLOPs."""
  return 6.0 * matmul_params(config) + 3.0 * attention_flops_per_token(config, seq_len)


def forward_flops_per_token(config: ModelConfig, context_len: int) -> float:
  """Model FLOPs of one decoded token that attends to `context_len` cached keys."""
  return 2.0 * matmul_params(config) + attention_flops_per_token(config, context_len, causal=False)


def decode_bytes_per_token(config: ModelConfig, batch_size: int, context_len: int,
                           weight_dtype: Optional[str] = None,
                           cache_dtype: Optional[str] = None) -> float:
  """HBM bytes read per generated token in batched decoding (the memory-bound roofline).

  Each decode step reads every matmul weight once for the whole batch (the embedding table only
  for the looked-up rows, unless it doubles as the output projection), and each sequence's
  keys/values for its `context_len` cached positions.

  Args:
    config: the model.
    batch_size: sequences decoded together; weight reads are shared among them.
    context_len: cached positions each new token attends to.
    weight_dtype: dtype the weights are stored in; default config.param_dtype.
    cache_dtype: dtype of the KV cache; default config.dtype.

  Returns:
    Bytes per token; divide a chip's HBM bandwidth by it for the token/s roofline.
  """
  weight_bytes = jnp.dtype(weight_dtype or config.param_dtype).itemsize
  cache_bytes = jnp.dtype(cache_dtype or config.dtype).itemsize
  weights = matmul_params(config) * weight_bytes
  embedding_rows = batch_size * config.embed_dim * weight_bytes
  kv_per_sequence = (2 * config.num_layers * config.num_kv_heads * config.head_dim * context_len *
                     cache_bytes)
  return (weights + embedding_rows) / batch_size + kv_per_sequence


def mfu(tokens_per_sec: float, flops_per_token: float, num_devices: int,
        peak: Optional[float]) -> Optional[float]:
  """Model FLOPs utilisation in [0, 1]; None when the peak is unknown (e.g. CPU)."""
  if peak is None:
    return None
  return tokens_per_sec * flops_per_token / (num_devices * peak)
