"""FLOP accounting against a hand count and XLA's cost analysis; device tables and MFU."""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from llm_jax.tools import flops
from llm_jax import model as model_lib

# V=10, D=4, L=2, N=2, K=1, H=2, F=6.
SMALL = model_lib.ModelConfig(vocab_size=10, embed_dim=4, num_layers=2, num_heads=2,
                              num_kv_heads=1, head_dim=2, mlp_dim=6)


def test_training_flops_hand_count():
  # Per layer: q 4*2*2=16, k 4*1*2=8, v 8, o 2*2*4=16, gate/up/down 3*4*6=72 -> 120.
  # Two layers 240, output projection 4*10=40 -> 280 matmul parameters -> 6*280 = 1680.
  # Causal attention at T=8: 6 * L * N * H * T = 6*2*2*2*8 = 384.
  assert flops.matmul_params(SMALL) == 280
  assert flops.training_flops_per_token(SMALL, seq_len=8) == 1680 + 384
  # A tied embedding still costs the output projection.
  assert flops.matmul_params(SMALL.replace(tie_embeddings=True)) == 280


@pytest.mark.parametrize('tie', [False, True])
def test_matmul_params_are_the_model_parameters_minus_embedding_and_norms(tie):
  config = model_lib.get_preset('tiny', tie_embeddings=tie)
  params = nn.unbox(model_lib.abstract_params(config))
  sizes = collections.Counter()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = jax.tree_util.keystr(path)
    kind = 'norm' if 'scale' in name else 'embedding' if 'embedding' in name else 'matmul'
    sizes[kind] += leaf.size
  expected = sizes['matmul'] + (sizes['embedding'] if tie else 0)
  assert flops.matmul_params(config) == expected


def test_forward_flops_match_xla_cost_analysis():
  # Unrolled layers: XLA's cost analysis counts a scanned loop body only once.
  config = model_lib.get_preset('tiny', scan_layers=False)
  batch, seq_len = 2, 64
  tokens = jnp.zeros((batch, seq_len), jnp.int32)
  params = nn.unbox(model_lib.abstract_params(config))
  apply = jax.jit(lambda p, t: model_lib.Transformer(config).apply({'params': p}, t))
  xla_flops = apply.lower(params, tokens).compile().cost_analysis()['flops']
  # The einsum kernel computes every score, masked or not: count attention non-causally.
  ours = batch * seq_len * (2 * flops.matmul_params(config) +
                            flops.attention_flops_per_token(config, seq_len, causal=False))
  assert 0.95 < xla_flops / ours < 1.15  # the rest is norms, RoPE, softmax, SiLU


def test_decode_bytes_hand_count():
  config = SMALL.replace(param_dtype='bfloat16', dtype='bfloat16')
  # Weights 280 * 2 bytes shared by 4 sequences, + one embedding row (4 * 2 bytes) each,
  # + the cache: 2 (k, v) * L 2 * K 1 * H 2 * 16 positions * 2 bytes = 256.
  assert flops.decode_bytes_per_token(config, batch_size=4, context_len=16) == 560 / 4 + 8 + 256


@pytest.mark.parametrize('kind, key', [
    ('TPU v4', 'tpu_v4'), ('TPU v5 lite', 'tpu_v5e'), ('TPU v5e', 'tpu_v5e'), ('TPU v5', 'tpu_v5p'),
    ('TPU v5p', 'tpu_v5p'), ('TPU v6 lite', 'tpu_v6e'), ('NVIDIA A100-SXM4-80GB', 'a100'),
    ('NVIDIA H100 80GB HBM3', 'h100_sxm'), ('NVIDIA H100 PCIe', 'h100_pcie'),
    ('NVIDIA H200', 'h200'), ('cpu', None), ('TPU v7x', None)])
def test_device_kinds_resolve(kind, key):
  assert flops.device_kind_key(kind) == key


def test_peaks_for_devices_and_mfu():
  device = collections.namedtuple('Device', 'device_kind')
  assert flops.device_peak_flops(device('TPU v5 lite')) == 197e12
  assert flops.device_peak_flops(device('TPU v6 lite')) == 918e12
  assert flops.device_peak_flops(device('NVIDIA H100 80GB HBM3')) == 989e12
  assert flops.device_hbm_bandwidth(device('TPU v5 lite')) == 8.19e11
  assert flops.device_peak_flops(jax.devices()[0]) is None  # the CPU test host
  assert flops.mfu(1000.0, 1e9, 2, 1e12) == pytest.approx(0.5)
  assert flops.mfu(1000.0, 1e9, 2, None) is None
