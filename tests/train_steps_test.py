"""Sharded training steps: mesh invariance, parameter shardings, accumulation, non-finite guard."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from configs import default
from llm_jax.training import checkpoint
from llm_jax import model as model_lib
from llm_jax.training import optim
from llm_jax import sharding
from llm_jax.training import steps as train_steps

RULES = sharding.DEFAULT_RULES
BATCH, SEQ = 8, 32
MODEL = model_lib.get_preset('tiny', vocab_size=256, embed_dim=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=16, mlp_dim=128)


def _optim(**overrides):
  optim_config = default.get_config().optim
  optim_config.unlock()
  optim_config.update(dict(warmup_steps=1, learning_rate=1e-2, **overrides))
  return optim.create_optimizer(optim_config, num_steps=10)


def _batches(num, batch=BATCH, seed=0):
  """Random packed batches: two documents a row, loss masked at the boundary and padding."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    tokens = rng.integers(0, MODEL.vocab_size, (batch, SEQ + 1)).astype(np.int32)
    split = rng.integers(4, SEQ - 4, batch)
    index = np.arange(SEQ)
    segment_ids = np.where(index[None] < split[:, None], 1, 2).astype(np.int32)
    segment_ids[:, -3:] = 0  # padding
    positions = np.where(segment_ids == 2, index[None] - split[:, None], index[None])
    loss_mask = (segment_ids != 0).astype(np.float32)
    loss_mask[np.arange(batch), split - 1] = 0.0  # no target across the document boundary
    out.append({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
                'positions': positions.astype(np.int32), 'segment_ids': segment_ids,
                'loss_mask': loss_mask})
  return out


def _run(mesh, batches, accum_steps=1, model_config=MODEL):
  tx, schedule = _optim()
  with sharding.activate(mesh, RULES):
    state, shardings = train_steps.create_train_state(model_config, tx, mesh, RULES, seed=0)
    step = train_steps.jit_train_step(model_config, tx, schedule, shardings, mesh, RULES,
                                      batches[0]['inputs'].shape, accum_steps=accum_steps)
    losses = []
    for batch in batches:
      state, metrics = step(state, batch)
      losses.append(float(metrics['loss']))
  return state, shardings, losses


@pytest.fixture(scope='module')
def single_device_run():
  mesh = sharding.create_mesh((1, 1, 1), devices=jax.devices()[:1])
  state, _, losses = _run(mesh, _batches(5))
  return jax.device_get(state.params), losses


@pytest.mark.parametrize('shape', [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_losses_and_shardings_do_not_depend_on_the_mesh(shape, single_device_run):
  ref_params, ref_losses = single_device_run
  mesh = sharding.create_mesh(shape)
  state, shardings, losses = _run(mesh, _batches(5))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert losses[-1] < losses[0]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
               jax.device_get(state.params), ref_params)
  # Every parameter is laid out as the rules say (dimensions the axes don't divide replicate).
  abstract = model_lib.abstract_params(MODEL)
  flat_abstract = jax.tree_util.tree_flatten_with_path(
      abstract, is_leaf=lambda x: hasattr(x, 'names'))[0]
  flat_actual = dict(jax.tree_util.tree_flatten_with_path(state.params)[0])
  for path, boxed in flat_abstract:
    expected = []
    for name, dim in zip(boxed.names, boxed.value.shape):
      axes = dict(RULES)[name]
      size = 1 if axes is None else int(np.prod(
          [mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))
      expected.append(axes if axes is not None and dim % size == 0 else None)
    actual = flat_actual[tuple(path)].sharding.spec
    assert PartitionSpec(*expected) == actual, (path, actual)


def test_tensor_rules_shard_what_they_name():
  mesh = sharding.create_mesh((1, 2, 4))
  _, shardings, _ = _run(mesh, _batches(1))
  mlp = shardings.params['layers']['mlp']
  assert mlp['gate_proj'].spec == PartitionSpec(None, 'fsdp', 'tensor')
  assert mlp['down_proj'].spec == PartitionSpec(None, 'tensor', 'fsdp')
  # 2 kv heads cannot be split 4 ways: replicated rather than an error.
  assert shardings.params['layers']['attention']['k_proj'].spec == PartitionSpec(
      None, 'fsdp', None, None)


def test_microbatches_give_the_same_update_as_one_big_batch():
  mesh = sharding.create_mesh((2, 2, 2))
  batches = _batches(2, batch=8)
  big, _, big_losses = _run(mesh, batches, accum_steps=1)
  micro, _, micro_losses = _run(mesh, batches, accum_steps=4)
  np.testing.assert_allclose(micro_losses, big_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               jax.device_get(micro.params), jax.device_get(big.params))


def test_non_finite_loss_skips_the_update():
  mesh = sharding.create_mesh((8, 1, 1))
  tx, schedule = _optim()
  batch = _batches(1)[0]
  batch['loss_mask'] = batch['loss_mask'].copy()
  batch['loss_mask'][0, 0] = np.nan
  with sharding.activate(mesh, RULES):
    state, shardings = train_steps.create_train_state(MODEL, tx, mesh, RULES, seed=0)
    before = jax.device_get(state.params)
    step = train_steps.jit_train_step(MODEL, tx, schedule, shardings, mesh, RULES,
                                      batch['inputs'].shape)
    state, metrics = step(state, batch)
  assert not bool(metrics['finite'])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
  assert int(state.step) == 1


def test_checkpoint_saved_on_8_devices_restores_on_4(tmp_path):
  mesh8 = sharding.create_mesh((2, 2, 2))
  state, _, _ = _run(mesh8, _batches(1))
  manager = checkpoint.create_manager(str(tmp_path / 'ckpt'), async_save=False)
  checkpoint.save(manager, 1, MODEL, state.params, state.opt_state)
  manager.wait_until_finished()

  mesh4 = sharding.create_mesh((1, 2, 2), devices=jax.devices()[:4])
  tx, _ = _optim()
  abstract, _ = train_steps.abstract_train_state(MODEL, tx)
  shardings = sharding.tree_shardings(abstract, mesh4, RULES)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        model_lib.unbox(abstract), shardings)
  restored = checkpoint.restore(manager, 1, target.params, target.opt_state)
  for got, want in zip(jax.tree.leaves(restored['params']), jax.tree.leaves(state.params)):
    assert len(got.sharding.device_set) <= 4
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  for got, want in zip(jax.tree.leaves(restored['opt_state']), jax.tree.leaves(state.opt_state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
