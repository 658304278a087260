"""Orbax checkpoints: training state with the data iterator position, and bare parameters.

A checkpoint directory is an Orbax CheckpointManager root whose steps hold the items
  params        parameter tree (StandardSave; restored straight into any target sharding)
  adapters      instead of params in a LoRA run: the adapter tree only (never the base or a
                merged model), with `lora_config` (JSON: rank, alpha, dropout, targets)
  opt_state     optimizer state (training checkpoints only)
  model_config  the ModelConfig as JSON, so a checkpoint is self-describing
  data_iterator every process's input-iterator position, one file per process (grain's
                checkpoint handler; training checkpoints only)
Checkpoints written before the per-process positions hold `data_state` instead (process 0's
position as JSON); a one-process run still resumes from them.
Orbax writes each step to a temporary directory and renames it when complete, so a checkpoint
cut short by a crash or SIGKILL is never listed as a step, hence never restored. Paths may be
local or on cloud storage (gs://...): they go through etils.epath.
"""

import dataclasses
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from llm_jax import model as model_lib
from llm_jax import sharding

CHECKPOINT_SUBDIR = 'checkpoints'
# The metric by which `keep_best` ranks checkpoints: lower is better.
BEST_METRIC = 'eval_loss'


DATA_ITEM = 'data_iterator'
ADAPTERS_ITEM = 'adapters'
LORA_CONFIG_ITEM = 'lora_config'
LEGACY_DATA_ITEM = 'data_state'


def absolute(path) -> epath.Path:
  """An absolute epath: local paths are resolved, cloud paths (gs://...) kept as they are."""
  path = epath.Path(path)
  return path if '://' in str(path) else path.resolve()


def checkpoint_dir(path) -> epath.Path:
  """The checkpoint root for a training workdir, or `path` itself if it already is one."""
  sub = epath.Path(path) / CHECKPOINT_SUBDIR
  return sub if sub.is_dir() else epath.Path(path)


def _eval_loss(metrics: dict) -> float:
  return metrics[BEST_METRIC]


class _Manager(ocp.CheckpointManager):
  """A CheckpointManager that leaves JAX's preemption sync point to the training loop.

  Orbax asks `reached_preemption_sync_point(step)` itself, among others from its background
  finalize thread with the step being finalized, an older one. JAX sets the sync point to
  "the fastest process's last call + 1" and answers only on exactly that call, so such a
  stale call can put the sync point behind the loop, which then never stops.
  `preemption.StopRequests` is the only caller and forces the save at the step it stops.
  """

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


def create_manager(directory: str, *, keep: Optional[int] = None, keep_best: int = 0,
                   async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
  """CheckpointManager keeping the last `keep` steps, saving asynchronously if asked.

  With `keep_best` > 0 it also keeps the `keep_best` steps of lowest evaluation loss among
  those saved with `metrics={BEST_METRIC: loss}` (see `save`); `manager.best_step()` names
  the best one, also after a restart (Orbax stores each step's metrics with it).
  """
  best = {}
  if keep_best:
    policies = [ocp.checkpoint_managers.BestN(
        get_metric_fn=_eval_loss, reverse=True, n=keep_best,  # reverse: the lowest are kept
        keep_checkpoints_without_metrics=False)]
    if keep is not None:
      policies.append(ocp.checkpoint_managers.LatestN(n=keep))
    best = dict(best_fn=_eval_loss, best_mode='min',
                preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if keep_best else keep, enable_async_checkpointing=async_save,
      create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only, **best)
  return _Manager(absolute(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, model_config: model_lib.ModelConfig,
         params, opt_state=None, data_iterator: Any = None, *, force: bool = True,
         metrics: Optional[dict] = None, lora_config: Any = None) -> bool:
  """Saves one step (asynchronously if the manager is async); returns whether it saved.

  `metrics` ({BEST_METRIC: loss} at an evaluation step) rank the step for `keep_best`. With
  `lora_config` (a llm_jax.model.lora.LoraConfig), `params` are adapters, saved as such.

  Every process must call it. Each writes its own shards and its own data-iterator position
  (read now, before the call returns, so later batches do not leak into the checkpoint).
  """
  items = {'params' if lora_config is None else ADAPTERS_ITEM: ocp.args.StandardSave(params),
           'model_config': ocp.args.JsonSave(model_lib.to_config_dict(model_config))}
  if lora_config is not None:
    items[LORA_CONFIG_ITEM] = ocp.args.JsonSave(dataclasses.asdict(lora_config))
  if opt_state is not None:
    items['opt_state'] = ocp.args.StandardSave(opt_state)
  if data_iterator is not None:
    items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**items), force=force, metrics=metrics)


def restore(manager: ocp.CheckpointManager, step: int, abstract_params,
            abstract_opt_state=None, *, adapters: bool = False) -> dict:
  """Restores a step into the given abstract trees (ShapeDtypeStructs carrying shardings).

  The shardings may differ from those at save time (other mesh, other device count): Orbax reads
  each shard directly into the new layout. With `adapters`, the params come from a LoRA run's
  adapters item; the result names them 'params' either way.
  """
  item = ADAPTERS_ITEM if adapters else 'params'
  items = {item: ocp.args.StandardRestore(abstract_params)}
  if abstract_opt_state is not None:
    items['opt_state'] = ocp.args.StandardRestore(abstract_opt_state)
  restored = dict(manager.restore(step, args=ocp.args.Composite(**items)).items())
  restored['params'] = restored.pop(item)
  return restored


def read_lora_config(manager: ocp.CheckpointManager, step: int) -> Optional[dict]:
  """The LoRA settings stored with a step (rank, alpha, dropout, targets), or None."""
  if not (epath.Path(manager.directory) / str(step) / LORA_CONFIG_ITEM).exists():
    return None
  values = manager.restore(step, args=ocp.args.Composite(
      **{LORA_CONFIG_ITEM: ocp.args.JsonRestore()}))
  return dict(values[LORA_CONFIG_ITEM])


def restore_data_iterator(manager: ocp.CheckpointManager, step: int, iterator) -> None:
  """Moves this process's `iterator` to where it was when `step` was saved."""
  step_dir = epath.Path(manager.directory) / str(step)
  if (step_dir / DATA_ITEM).exists():
    manager.restore(step, args=ocp.args.Composite(
        **{DATA_ITEM: grain.checkpoint.CheckpointRestore(iterator)}))
    return
  if not (step_dir / LEGACY_DATA_ITEM).exists():
    raise FileNotFoundError(f'checkpoint step {step} in {manager.directory} holds no data '
                            'iterator position; it was not written by a training run')
  if jax.process_count() > 1:
    raise ValueError(
        f'checkpoint step {step} in {manager.directory} predates per-process data positions: '
        'it holds process 0\'s only. Resume it with one process, or train on from its '
        'parameters with --config.train.init_from in a new workdir')
  values = manager.restore(step, args=ocp.args.Composite(
      **{LEGACY_DATA_ITEM: ocp.args.JsonRestore()}))
  iterator.set_state(values[LEGACY_DATA_ITEM])


def read_model_config(manager: ocp.CheckpointManager, step: int) -> model_lib.ModelConfig:
  """The ModelConfig stored with a step."""
  values = manager.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
  return model_lib.from_config_dict(values['model_config'])


def save_params(directory, model_config: model_lib.ModelConfig, params, step: int = 0):
  """Writes a parameters-only checkpoint (e.g. a converted Hugging Face model) and waits."""
  manager = create_manager(directory, async_save=False)
  save(manager, step, model_config, params)
  manager.wait_until_finished()
  manager.close()


def abstract_unboxed_params(model_config: model_lib.ModelConfig, shardings=None):
  """ShapeDtypeStructs of the parameters, on one device unless `shardings` are given."""
  abstract = model_lib.unbox(model_lib.abstract_params(model_config))
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  return sharding.with_shardings(abstract, shardings)


def _open_read_only(directory, step: Optional[int]):
  """(manager, step): the latest complete step by default; errors name the directory."""
  root = checkpoint_dir(directory)
  if not root.is_dir():
    raise FileNotFoundError(f'checkpoint directory {str(root)!r} does not exist')
  manager = create_manager(root, read_only=True)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no complete checkpoint in {str(root)!r}')
  if step not in manager.all_steps():
    raise FileNotFoundError(f'step {step} not in {str(root)!r}; available: '
                            f'{manager.all_steps()}')
  return manager, step


def read_config_of(directory, step: Optional[int] = None) -> model_lib.ModelConfig:
  """The ModelConfig of a workdir's (or checkpoint directory's) latest or given step."""
  manager, step = _open_read_only(directory, step)
  try:
    return read_model_config(manager, step)
  finally:
    manager.close()


def load_params(directory, step: Optional[int] = None, shardings=None):
  """Loads (ModelConfig, params) from a training workdir or a parameters-only checkpoint.

  Args:
    directory: a training workdir, its `checkpoints/` dir, or a dir written by `save_params`.
    step: the step to load; the latest complete one by default.
    shardings: optional tree of target shardings for the parameters.
  """
  manager, step = _open_read_only(directory, step)
  model_config = read_model_config(manager, step)
  params = restore(manager, step, abstract_unboxed_params(model_config, shardings))['params']
  logging.info('loaded parameters of step %d from %s', step, manager.directory)
  manager.close()
  return model_config, params
