"""The training loop: train_and_evaluate(config, workdir) runs, resumes, evaluates and samples.

Reads top to bottom: set up mesh and data, build or restore the sharded state, loop over steps
with periodic logging, evaluation and asynchronous checkpoints, then a final evaluation,
sampled continuations and summary.json. A rerun of the same command resumes from the last
complete checkpoint, including the data iterator's position, and sees the same batches.
"""

import math
import os
import signal
import time
import zlib

import jax
import ml_collections
import numpy as np
from absl import logging

from llm_jax import checkpoint
from llm_jax import memory
from llm_jax import metrics as metrics_lib
from llm_jax import model as model_lib
from llm_jax import optim
from llm_jax import sharding
from llm_jax import train_steps
from llm_jax.data import pipeline


class PreemptionFlag:
  """Set by SIGTERM (TPU preemption notice); the loop saves a checkpoint and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint, then exiting')
    self.requested = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


def gzip_bits_per_byte(texts) -> float:
  """zlib level 9 on the concatenated held-out texts: the baseline a language model must beat."""
  data = ''.join(texts).encode('utf-8')
  return 8 * len(zlib.compress(data, 9)) / max(len(data), 1)


def evaluate(eval_fn, params, batches, mesh, rules, num_bytes: int) -> dict:
  """Loss, perplexity and bits per byte over the evaluation batches."""
  loss_sum, tokens = 0.0, 0.0
  for batch in batches:
    out = jax.device_get(eval_fn(params, pipeline.to_global_batch(batch, mesh, rules)))
    loss_sum += float(out['loss_sum'])
    tokens += float(out['tokens'])
  loss = loss_sum / max(tokens, 1.0)
  return {'loss': loss, 'perplexity': math.exp(min(loss, 50.0)),
          'bits_per_byte': metrics_lib.bits_per_byte(loss_sum, num_bytes), 'tokens': tokens}


def restore_or_initialise(config, model_config, tx, manager, mesh, rules):
  """Returns (state, shardings, data_state): resumed, fine-tuned from init_from, or fresh."""
  state, shardings = train_steps.create_train_state(model_config, tx, mesh, rules, config.seed)
  step = manager.latest_step()
  if step is not None:
    saved_config = checkpoint.read_model_config(manager, step)
    if saved_config != model_config:
      raise ValueError(f'the checkpoint at step {step} in {manager.directory} was written for '
                       f'{saved_config}, but the config asks for {model_config}')
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    restored = checkpoint.restore(manager, step, abstract.params, abstract.opt_state,
                                  with_data_state=True)
    logging.info('resumed from step %d in %s', step, manager.directory)
    state = train_steps.TrainState(step=jax.device_put(np.int32(step), shardings.step),
                                   params=restored['params'], opt_state=restored['opt_state'])
    return state, shardings, restored['data_state']
  if config.train.init_from:
    loaded_config, params = checkpoint.load_params(config.train.init_from,
                                                   shardings=shardings.params)
    if loaded_config.replace(**_numerics(model_config)) != model_config:
      raise ValueError(f'train.init_from={config.train.init_from!r} holds {loaded_config}, which '
                       f'does not match the configured model {model_config}')
    state = state.replace(params=params)
    logging.info('initialised parameters from %s', config.train.init_from)
  return state, shardings, None


def _numerics(model_config):
  """Fields a fine-tuning run may change relative to the checkpoint it starts from."""
  return {k: getattr(model_config, k) for k in ('dtype', 'scan_layers', 'remat_policy',
                                                'attention_kernel', 'max_seq_len')}


def sample_continuations(config, model_config, params, tokenizer, mesh, rules) -> list:
  """A few sampled continuations of the config's prompts, to eyeball what the model learned."""
  prompts = list(config.decode.prompts)
  if not prompts:
    return []
  from llm_jax import decode  # pylint: disable=g-import-not-at-top
  texts = decode.generate(
      model_config, params, prompts, tokenizer=tokenizer, mesh=mesh, rules=rules,
      max_new_tokens=config.decode.max_new_tokens, temperature=config.decode.temperature,
      top_k=config.decode.top_k, top_p=config.decode.top_p, eos_id=tokenizer.eos_id,
      seed=config.seed)
  return [{'prompt': p, 'continuation': t} for p, t in zip(prompts, texts)]


def _close(iterator):
  """Stops the input pipeline's background workers, if it has any."""
  close = getattr(iterator, 'close', None)
  if close is not None:
    close()


def _check_finite(history, step_offset):
  """Raises naming the first step whose loss or gradient was not finite."""
  for i, finite in enumerate(history):
    if not finite:
      raise FloatingPointError(f'non-finite loss or gradient at step {step_offset + i + 1}; the '
                               'update was not applied and no checkpoint holds it')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains per `config`, writing checkpoints, TensorBoard events and summary.json to workdir."""
  start_time = time.time()
  os.makedirs(workdir, exist_ok=True)
  model_config = model_lib.from_config_dict(config.model)
  rules = tuple(tuple(rule) for rule in config.mesh.rules)
  mesh = sharding.create_mesh(config.mesh.shape, config.mesh.axes, config.mesh.num_slices)
  tokenizer = pipeline.get_tokenizer(config.data, workdir, model_config.vocab_size)
  num_steps = config.train.num_steps
  tx, schedule = optim.create_optimizer(config.optim, num_steps)
  batch_shape = (config.data.global_batch_size, config.data.seq_len)
  logging.info('model %s, %.2fM parameters; mesh %s', model_config,
               model_lib.count_params(model_lib.abstract_params(model_config)) / 1e6, mesh.shape)
  logging.info('memory per device: %s', memory.estimate_memory_per_device(
      model_config, mesh, rules, batch_shape, accum_steps=config.optim.grad_accum_steps))

  manager = checkpoint.create_manager(os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR),
                                      keep=config.checkpoint.keep,
                                      async_save=config.checkpoint.async_save)
  state, shardings, data_state = restore_or_initialise(config, model_config, tx, manager, mesh,
                                                       rules)
  train_iter = pipeline.make_train_iterator(
      config.data, tokenizer, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  if data_state is not None:
    train_iter.set_state(data_state)
  eval_batches, eval_texts = pipeline.make_eval_batches(
      config.data, tokenizer, num_batches=config.eval.num_batches,
      process_index=jax.process_index(), process_count=jax.process_count())
  eval_bytes = sum(len(t.encode('utf-8')) for t in eval_texts)

  train_step = train_steps.jit_train_step(model_config, tx, schedule, shardings, mesh, rules,
                                          batch_shape, config.optim.z_loss,
                                          config.optim.grad_accum_steps)
  eval_batch_shape = (config.data.eval_batch_size, config.data.seq_len)
  eval_step = train_steps.jit_eval_step(model_config, shardings.params, mesh, rules,
                                        eval_batch_shape)
  writer = metrics_lib.MetricsWriter(workdir)
  throughput = metrics_lib.Throughput(model_config, config.data.seq_len, num_steps)
  step = int(jax.device_get(state.step))
  first_step = step
  pending, eval_result, tokens_trained = [], None, 0.0

  def save_checkpoint():
    _check_finite([bool(m['finite']) for m in jax.device_get(pending)], step - len(pending))
    checkpoint.save(manager, step, model_config, state.params, state.opt_state,
                    train_iter.get_state())

  with sharding.activate(mesh, rules), PreemptionFlag() as preemption:
    throughput.start(step)
    while step < num_steps and not preemption.requested:
      batch = pipeline.to_global_batch(next(train_iter), mesh, rules)
      state, step_metrics = train_step(state, batch)
      step += 1
      pending.append(step_metrics)
      if step % config.train.log_every == 0 or step == num_steps:
        history = jax.device_get(pending)
        _check_finite([bool(m['finite']) for m in history], step - len(history))
        tokens = sum(float(m['tokens']) for m in history)
        tokens_trained += tokens
        scalars = {k: float(np.mean([m[k] for m in history]))
                   for k in ('loss', 'grad_norm', 'learning_rate')}
        scalars['perplexity'] = math.exp(min(scalars['loss'], 50.0))
        scalars.update(throughput.measure(step, tokens))
        writer.write(step, scalars, 'train/')
        logging.info(metrics_lib.format_line(step, num_steps, scalars))
        pending = []
      if step % config.eval.every_steps == 0 or step == num_steps:
        eval_result = evaluate(eval_step, state.params, eval_batches, mesh, rules, eval_bytes)
        writer.write(step, eval_result, 'eval/')
        logging.info('eval at step %d: %s', step, eval_result)
        throughput.start(step)
      if step % config.checkpoint.every_steps == 0 or step == num_steps or preemption.requested:
        save_checkpoint()
    manager.wait_until_finished()
    if preemption.requested:
      logging.warning('stopped at step %d after SIGTERM; checkpoint saved', step)
      writer.close()
      _close(train_iter)
      return {'step': step, 'preempted': True}
    if eval_result is None:
      eval_result = evaluate(eval_step, state.params, eval_batches, mesh, rules, eval_bytes)
    samples = sample_continuations(config, model_config, state.params, tokenizer, mesh, rules)
  for sample in samples:
    logging.info('sample: %r -> %r', sample['prompt'], sample['continuation'])
  wall = time.time() - start_time
  summary = {
      'step': step, 'eval_loss': eval_result['loss'], 'eval_perplexity': eval_result['perplexity'],
      'eval_bits_per_byte': eval_result['bits_per_byte'],
      'gzip_bits_per_byte': gzip_bits_per_byte(eval_texts),
      'tokens_per_second': tokens_trained / max(wall, 1e-9) if step > first_step else 0.0,
      'wall_seconds': wall, 'samples': samples}
  if jax.process_index() == 0:
    metrics_lib.write_summary(workdir, summary)
  writer.close()
  manager.close()
  _close(train_iter)
  return summary
