"""Orbax checkpoints: training state with the data iterator position, and bare parameters.

A checkpoint directory is an Orbax CheckpointManager root whose steps hold the items
  params        parameter tree (StandardSave; restored straight into any target sharding)
  opt_state     optimizer state (training checkpoints only)
  model_config  the ModelConfig as JSON, so a checkpoint is self-describing
  data_state    the input iterator's state (training checkpoints only)
Orbax writes each step to a temporary directory and renames it when complete, so a checkpoint
cut short by a crash or SIGKILL is never listed as a step, hence never restored.
"""

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging

from llm_jax import model as model_lib
from llm_jax import sharding

CHECKPOINT_SUBDIR = 'checkpoints'


def checkpoint_dir(path: str) -> str:
  """The checkpoint root for a training workdir, or `path` itself if it already is one."""
  sub = os.path.join(path, CHECKPOINT_SUBDIR)
  return sub if os.path.isdir(sub) else path


def create_manager(directory: str, *, keep: Optional[int] = None, async_save: bool = True,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """CheckpointManager keeping the last `keep` steps, saving asynchronously if asked."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only,
      read_only=read_only, cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, model_config: model_lib.ModelConfig,
         params, opt_state=None, data_state: Any = None, *, force: bool = True) -> bool:
  """Saves one step (asynchronously if the manager is async); returns whether it saved."""
  items = {'params': ocp.args.StandardSave(params),
           'model_config': ocp.args.JsonSave(model_lib.to_config_dict(model_config))}
  if opt_state is not None:
    items['opt_state'] = ocp.args.StandardSave(opt_state)
  if data_state is not None:
    items['data_state'] = ocp.args.JsonSave(data_state)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_params, abstract_opt_state=None,
            with_data_state: bool = False) -> dict:
  """Restores a step into the given abstract trees (ShapeDtypeStructs carrying shardings).

  The shardings may differ from those at save time (other mesh, other device count): Orbax reads
  each shard directly into the new layout.
  """
  items = {'params': ocp.args.StandardRestore(abstract_params)}
  if abstract_opt_state is not None:
    items['opt_state'] = ocp.args.StandardRestore(abstract_opt_state)
  if with_data_state:
    items['data_state'] = ocp.args.JsonRestore()
  return dict(manager.restore(step, args=ocp.args.Composite(**items)).items())


def read_model_config(manager: ocp.CheckpointManager, step: int) -> model_lib.ModelConfig:
  """The ModelConfig stored with a step."""
  values = manager.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
  return model_lib.from_config_dict(values['model_config'])


def save_params(directory: str, model_config: model_lib.ModelConfig, params, step: int = 0):
  """Writes a parameters-only checkpoint (e.g. a converted Hugging Face model) and waits."""
  manager = create_manager(directory, async_save=False)
  save(manager, step, model_config, params)
  manager.wait_until_finished()
  manager.close()


def abstract_unboxed_params(model_config: model_lib.ModelConfig, shardings=None):
  """ShapeDtypeStructs of the parameters, on one device unless `shardings` are given."""
  abstract = model_lib.unbox(model_lib.abstract_params(model_config))
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  return sharding.with_shardings(abstract, shardings)


def load_params(directory: str, step: Optional[int] = None, shardings=None):
  """Loads (ModelConfig, params) from a training workdir or a parameters-only checkpoint.

  Args:
    directory: a training workdir, its `checkpoints/` dir, or a dir written by `save_params`.
    step: the step to load; the latest complete one by default.
    shardings: optional tree of target shardings for the parameters.
  """
  root = checkpoint_dir(directory)
  if not os.path.isdir(root):
    raise FileNotFoundError(f'checkpoint directory {root!r} does not exist')
  manager = create_manager(root, read_only=True)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no complete checkpoint in {root!r}')
  if step not in manager.all_steps():
    raise FileNotFoundError(f'step {step} not in {root!r}; available: {manager.all_steps()}')
  model_config = read_model_config(manager, step)
  params = restore(manager, step, abstract_unboxed_params(model_config, shardings))['params']
  logging.info('loaded parameters of step %d from %s', step, root)
  manager.close()
  return model_config, params
