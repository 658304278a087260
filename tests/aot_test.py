"""Ahead-of-time compilation for a TPU topology from this CPU host, and the memory estimate.

Compiling for TPUs needs libtpu (no TPU), from the project's `tpu` extra: the README's test
command installs `.[test,tpu]`; without it the TPU compilation test is skipped.
"""

import jax
import numpy as np
import pytest

from configs import default
from llm_jax.tools import aot
from llm_jax.tools import memory
from llm_jax import model as model_lib
from llm_jax.training import optim
from llm_jax import sharding
from llm_jax.training import steps as train_steps

GIB = 1024 ** 3


@pytest.mark.parametrize('name, expected', [
    ('v5e:2x2', 'v5e:2x2'), ('v5e-8', 'v5e:2x4'), ('v5litepod-4', 'v5e:2x2'),
    ('v6e-256', 'v6e:16x16'), ('v5p-8', 'v5p:2x2x1'), ('v5p-128', 'v5p:4x4x4'),
    ('v4-32', 'v4:2x2x4')])
def test_topology_names(name, expected):
  assert aot.topology_name(name) == expected


@pytest.mark.parametrize('name', ['v5e-6', 'v9-8', 'tpu'])
def test_bad_topology_names_are_refused(name):
  with pytest.raises(ValueError, match=f'--topology={name!r}'):
    aot.topology_name(name)


def test_check_fits_exits_naming_the_step():
  fits = aot.CompileReport('decode step', GIB, 0, 0, GIB, 0, 0.0, 0.0, 16 * GIB, 1.0)
  too_big = aot.CompileReport('train step', 10 * GIB, 10 * GIB, 10 * GIB, 8 * GIB, 0, 0.0, 0.0,
                              16 * GIB, 1.0)
  refused = aot.CompileReport('train step', 0, 0, 0, 0, 0, 0.0, 0.0, 16 * GIB, 1.0,
                              out_of_memory='Ran out of memory on HBM')
  aot.check_fits([fits])
  with pytest.raises(SystemExit, match='train step needs 18.00 GiB per chip, the chip has 16'):
    aot.check_fits([fits, too_big])
  with pytest.raises(SystemExit, match='train step: Ran out of memory on HBM'):
    aot.check_fits([refused])


def test_tiny_train_and_decode_compile_for_v5e_2x2_with_splash():
  pytest.importorskip('libtpu', reason="needs libtpu: pip install '.[tpu]'")
  config = default.get_config()
  config.model.attention_kernel = 'splash'
  config.mesh.shape = (2, 1, 2)  # batch over data, heads over tensor: splash under shard_map
  devices = aot.topology_devices('v5e:2x2')
  assert [d.device_kind for d in devices] == ['TPU v5 lite'] * 4
  # As `python -m llm_jax.aot` runs: conftest's 'highest' matmul precision would make the TPU
  # compiler emulate float32 matmuls in several bfloat16 passes (2.5x the compile time).
  with jax.default_matmul_precision('default'):
    train, decode = aot.compile_steps(config, devices, decode_batch_size=4, decode_cache_len=128)
  assert train.fits and decode.fits and train.hbm == 16 * GIB

  # The compiled step's inputs are exactly the state the estimate counts, plus the batch.
  model_config = model_lib.from_config_dict(config.model)
  mesh = sharding.create_mesh(config.mesh.shape, devices=devices)
  batch_shape = (config.data.global_batch_size, config.data.seq_len)
  estimate = memory.estimate_memory_per_device(model_config, mesh, sharding.DEFAULT_RULES,
                                               batch_shape)
  batch_bytes = len(train_steps.BATCH_KEYS) * 4 * np.prod(batch_shape) / 2  # data=2
  state_bytes = estimate.params + estimate.optimizer
  assert train.arguments == pytest.approx(state_bytes + batch_bytes, rel=0.01)
  assert train.aliased == pytest.approx(state_bytes, rel=0.01)  # the state is donated
  cache_bytes = 2 * np.prod((4, 4, 128, 2, 32)) * 4 / 4  # k and v over data=2 x tensor=2
  assert decode.arguments == pytest.approx(estimate.params + cache_bytes, rel=0.01)
  assert decode.aliased == pytest.approx(cache_bytes, rel=0.01)


def test_memory_estimate_counts_the_real_shards():
  # The parameter and optimizer bytes of a real initialised state on device 0 of a (1, 4, 2)
  # mesh: FSDP over 4 and tensor parallel over 2.
  config = default.get_config()
  model_config = model_lib.get_preset('tiny')
  mesh = sharding.create_mesh((1, 4, 2))
  tx, _ = optim.create_optimizer(config.optim, 10)
  state, _ = train_steps.create_train_state(model_config, tx, mesh, sharding.DEFAULT_RULES, 0)
  device = jax.devices()[0]

  def bytes_on_device(tree):
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree) if leaf.ndim
               for shard in leaf.addressable_shards if shard.device == device)

  estimate = memory.estimate_memory_per_device(model_config, mesh, sharding.DEFAULT_RULES,
                                               (8, 64))
  assert estimate.params == bytes_on_device(state.params)
  assert estimate.optimizer == bytes_on_device(state.opt_state)  # scalars (counts) excluded
  assert 'memory per device (estimate): params' in str(estimate)
