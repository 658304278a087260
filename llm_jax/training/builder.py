"""One assembly of mesh, optimizer, sharded state and compiled steps for a config.

The training loop, ahead-of-time compilation for TPU topologies and the benchmarks all build
the same thing from a config; this module is the only place that does it, so the program a
benchmark times or `llm_jax.aot` sizes is the one a run trains with.
"""

import dataclasses
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from llm_jax import model as model_lib
from llm_jax import sharding
from llm_jax.training import optim
from llm_jax.training import steps as train_steps


@dataclasses.dataclass
class TrainingProgram:
  """Everything compiled for one config on one mesh; nothing allocated until `init_state`."""
  model_config: model_lib.ModelConfig
  mesh: jax.sharding.Mesh
  rules: tuple
  tx: Any
  schedule: Callable
  batch_shape: tuple[int, int]
  eval_batch_shape: tuple[int, int]
  abstract_state: Any  # TrainState of ShapeDtypeStructs, leaves boxed with logical axes
  state_shardings: Any
  train_step: Any  # jitted (state, batch) -> (state, metrics); the state is donated
  eval_step: Any  # jitted (params, batch) -> {'loss_sum', 'tokens'}
  _init: Callable = dataclasses.field(repr=False, default=None)

  def init_state(self, seed: int):
    """A fresh state, initialised directly in its shards (never on one host first)."""
    with sharding.activate(self.mesh, self.rules):
      return jax.jit(lambda key: nn.unbox(self._init(key)),
                     out_shardings=self.state_shardings)(jax.random.key(seed))

  def abstract_sharded_state(self):
    """The state as ShapeDtypeStructs carrying their shardings: a restore or AOT target."""
    return with_shardings(self.abstract_state, self.state_shardings)

  def abstract_batch(self, shape: Optional[Sequence[int]] = None) -> dict:
    """A batch of ShapeDtypeStructs with the step's input shardings."""
    shape = tuple(shape or self.batch_shape)
    shardings = train_steps.batch_shardings(self.mesh, self.rules, shape)
    return {key: jax.ShapeDtypeStruct(shape, jnp.float32 if key == 'loss_mask' else jnp.int32,
                                      sharding=shardings[key])
            for key in train_steps.BATCH_KEYS}


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying shardings; boxes are opened by hand because nn.unbox would
  apply sharding constraints when a mesh is active."""
  boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)
  plain = jax.tree.map(lambda x: x.value if boxed(x) else x, abstract_tree, is_leaf=boxed)
  return sharding.with_shardings(plain, shardings)


def rules_of(config: ml_collections.ConfigDict) -> tuple:
  return tuple(tuple(rule) for rule in config.mesh.rules)


def mesh_of(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  return sharding.create_mesh(config.mesh.shape, config.mesh.axes, config.mesh.num_slices,
                              devices=devices)


def build(config: ml_collections.ConfigDict, devices=None,
          model_config: Optional[model_lib.ModelConfig] = None) -> TrainingProgram:
  """Mesh, optimizer, abstract state with its shardings, and the jitted train/eval steps.

  Args:
    config: a full config (configs/default.py's keys).
    devices: the devices of the mesh; default all (for AOT: a TPU topology's devices).
    model_config: the model to train; default `config.model`.

  Returns:
    The TrainingProgram; its steps compile on first call (or `.lower(...)` for AOT).
  """
  model_config = model_config or model_lib.from_config_dict(config.model)
  mesh, rules = mesh_of(config, devices), rules_of(config)
  tx, schedule = optim.create_optimizer(config.optim, config.train.num_steps)
  batch_shape = (config.data.global_batch_size, config.data.seq_len)
  eval_batch_shape = (config.data.eval_batch_size, config.data.seq_len)
  abstract_state, init = train_steps.abstract_train_state(model_config, tx)
  state_shardings = sharding.tree_shardings(abstract_state, mesh, rules)
  train_step = train_steps.jit_train_step(model_config, tx, schedule, state_shardings, mesh,
                                          rules, batch_shape, config.optim.z_loss,
                                          config.optim.grad_accum_steps)
  eval_step = train_steps.jit_eval_step(model_config, state_shardings.params, mesh, rules,
                                        eval_batch_shape)
  return TrainingProgram(model_config=model_config, mesh=mesh, rules=rules, tx=tx,
                         schedule=schedule, batch_shape=batch_shape,
                         eval_batch_shape=eval_batch_shape, abstract_state=abstract_state,
                         state_shardings=state_shardings, train_step=train_step,
                         eval_step=eval_step, _init=init)
