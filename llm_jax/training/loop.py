"""The training loop: train_and_evaluate(config, workdir) runs, resumes, evaluates and samples.

Reads top to bottom: set up mesh and data, build or restore the sharded state, loop over steps
with periodic logging, evaluation and asynchronous checkpoints, then a final evaluation,
sampled continuations and summary.json. A rerun of the same command resumes from the last
complete checkpoint, every process's data iterator where it was, and sees the same batches; a
rerun of a finished run says so and changes nothing. Whatever ends the run (the last step,
SIGTERM, Ctrl-C, an exception), the checkpoint being written is completed before it returns.
Process 0 alone writes metrics, TensorBoard events and summary.json; every process saves its
own shards and data position.
"""

import contextlib
import dataclasses
import os
import time
import zlib
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from jax.experimental import multihost_utils

from llm_jax import model as model_lib
from llm_jax import sharding
from llm_jax.convert import hf
from llm_jax.data import chat_templates
from llm_jax.data import pipeline
from llm_jax.data import sft
from llm_jax.evals import in_loop
from llm_jax.model import layer_layout
from llm_jax.model import lora
from llm_jax.tools import memory
from llm_jax.training import builder
from llm_jax.training import checkpoint
from llm_jax.training import metrics as metrics_lib
from llm_jax.training import plots
from llm_jax.training import preemption
from llm_jax.training import progress
from llm_jax.training import restore_errors
from llm_jax.training import steps as train_steps
from llm_jax.training import validation

# Fields a resumed or fine-tuning run may change relative to its checkpoint: they change how
# the model computes, not which parameters it has.
COMPUTE_FIELDS = ('dtype', 'remat_policy', 'attention_kernel', 'max_seq_len')


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
  return {'loss': loss, 'perplexity': metrics_lib.perplexity(loss),
          'bits_per_byte': metrics_lib.bits_per_byte(loss_sum, num_bytes), 'tokens': tokens}


def check_compatible(saved: model_lib.ModelConfig, configured: model_lib.ModelConfig,
                     source: str, may_differ=COMPUTE_FIELDS):
  """Raises naming every architecture field in which a checkpoint and the config disagree."""
  differing = [f'{f.name}: checkpoint {getattr(saved, f.name)!r}, config '
               f'{getattr(configured, f.name)!r}' for f in dataclasses.fields(saved)
               if f.name not in may_differ and getattr(saved, f.name) != getattr(configured,
                                                                                 f.name)]
  if differing:
    raise ValueError(f'{source} does not match the configured model: ' + '; '.join(differing))


def _set_aside_later_steps(manager, step: int, workdir: epath.Path):
  """Moves the steps after `step` to workdir/set_aside_checkpoints (kept, never restored), so a
  run restarted from an earlier step (checkpoint.restore_step) can save those steps anew."""
  later = [s for s in manager.all_steps() if s > step]
  if later and jax.process_index() == 0:
    target = workdir / 'set_aside_checkpoints'
    target.mkdir(parents=True, exist_ok=True)
    for later_step in later:
      (epath.Path(manager.directory) / str(later_step)).rename(target / str(later_step))
    logging.warning('restoring step %d: moved the later steps %s to %s', step, later, target)
  if later:
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('llm_jax: later checkpoints set aside')
    manager.reload()


def _in_layout(tree, saved: model_lib.ModelConfig, configured: model_lib.ModelConfig, shardings):
  """A tree restored in the saved layer layout, converted to the configured one and placed."""
  if saved.scan_layers == configured.scan_layers:
    return tree
  converted = layer_layout.convert_layer_layout(tree, configured.num_layers,
                                                to_scanned=configured.scan_layers)
  return jax.device_put(converted, shardings)


def _restore_state(config, program: builder.TrainingProgram, manager, step: int):
  """The TrainState of `step`, in the configured layer layout."""
  saved = restore_errors.read_step(manager, step,
                                   lambda: checkpoint.read_model_config(manager, step))
  configured = program.model_config
  lora_run = bool(config.lora.rank)  # adapters keep their layer layout
  check_compatible(saved, configured, f'the checkpoint of step {step} in {manager.directory}',
                   COMPUTE_FIELDS + (() if lora_run else ('scan_layers',)))
  if saved.scan_layers == configured.scan_layers:
    target = program.abstract_sharded_state()
  else:  # restore as saved, then convert
    abstract, _ = train_steps.abstract_train_state(saved, program.tx)
    target = builder.with_shardings(
        abstract, sharding.tree_shardings(abstract, program.mesh, program.rules))
  restored = restore_errors.read_step(manager, step, lambda: checkpoint.restore(
      manager, step, target.params, target.opt_state, adapters=lora_run))
  shardings = program.state_shardings
  return train_steps.TrainState(
      step=jax.device_put(np.int32(step), shardings.step),
      params=_in_layout(restored['params'], saved, configured, shardings.params),
      opt_state=_in_layout(restored['opt_state'], saved, configured, shardings.opt_state))


def _load_init_params(config, program: builder.TrainingProgram):
  """Parameters of train.init_from in the configured shardings and layer layout."""
  configured = program.model_config
  source = config.train.init_from
  from_hf = hf.is_hf_directory(source)
  saved = hf.read_model_config(source) if from_hf else checkpoint.read_config_of(source)
  check_compatible(saved, configured, f'train.init_from={source!r}',
                   COMPUTE_FIELDS + ('param_dtype', 'scan_layers'))
  if from_hf:
    return hf.load_hf_sharded(source, program.state_shardings.params,
                              param_dtype=configured.param_dtype,
                              scan_layers=configured.scan_layers)[1]
  shardings = program.state_shardings.params
  if saved.scan_layers != configured.scan_layers:
    shardings = sharding.tree_shardings(model_lib.abstract_params(saved), program.mesh,
                                        program.rules)
  _, params = checkpoint.load_params(source, shardings=shardings)
  return _in_layout(params, saved, configured, program.state_shardings.params)


def restore_or_initialise(config, program: builder.TrainingProgram, manager, workdir):
  """Returns (state, resumed step or None): resumed, fine-tuned from init_from, or fresh."""
  step = restore_errors.resume_step(manager, config.checkpoint.restore_step)
  if step is not None:
    if config.checkpoint.restore_step:
      _set_aside_later_steps(manager, step, workdir)
    state = _restore_state(config, program, manager, step)
    logging.info('resumed from step %d in %s', step, manager.directory)
    return state, step
  if not config.train.init_from or config.lora.rank:  # a LoRA run's base is loaded by setup
    return program.init_state(config.seed), None
  # Placed straight into the state's shardings: no random initialisation first.
  abstract = program.abstract_sharded_state()
  params = jax.tree.map(lambda p, a: p.astype(a.dtype), _load_init_params(config, program),
                        abstract.params)
  state = train_steps.TrainState(
      step=jax.device_put(np.int32(0), program.state_shardings.step), params=params,
      opt_state=jax.jit(program.tx.init, out_shardings=program.state_shardings.opt_state)(params))
  logging.info('initialised parameters from %s', config.train.init_from)
  return state, None


def load_lora_base(config, program: builder.TrainingProgram):
  """The frozen base of a LoRA run in its shardings: train.init_from, else a fresh model."""
  if config.train.init_from:
    logging.info('LoRA base: %s', config.train.init_from)
    return _load_init_params(config, program)
  logging.warning('lora.rank > 0 without train.init_from: the base is a fresh random model')
  return program.init_state(config.seed).params


def make_data(config, tokenizer, workdir):
  """(train iterator, eval batches, eval texts): pretraining text, or SFT conversations."""
  if config.data.dataset == 'sft':
    template_dir = (config.train.init_from if hf.is_hf_directory(config.train.init_from)
                    else os.path.dirname(tokenizer.path) or str(workdir))
    template = chat_templates.resolve(config.data.chat_template, tokenizer, template_dir)
    logging.info('SFT chat template: %s', chat_templates.describe(template))
    return sft.make_iterators(config.data, tokenizer, template, seed=config.seed,
                              eval_num_batches=config.eval.num_batches,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
  train_iter = pipeline.make_train_iterator(
      config.data, tokenizer, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  eval_batches, eval_texts = pipeline.make_eval_batches(
      config.data, tokenizer, num_batches=config.eval.num_batches,
      process_index=jax.process_index(), process_count=jax.process_count())
  return train_iter, eval_batches, eval_texts


def sample_continuations(config, model_config, params, tokenizer, mesh, rules) -> list:
  """A few sampled continuations of the config's prompts, to eyeball what the model learned."""
  prompts = list(config.decode.prompts)
  if not prompts:
    return []
  from llm_jax.inference import decode  # pylint: disable=g-import-not-at-top
  texts = decode.generate(
      model_config, params, prompts, tokenizer=tokenizer, mesh=mesh, rules=rules,
      max_new_tokens=config.decode.max_new_tokens, temperature=config.decode.temperature,
      top_k=config.decode.top_k, top_p=config.decode.top_p, eos_id=tokenizer.eos_id,
      seed=config.seed)
  return [{'prompt': p, 'continuation': t} for p, t in zip(prompts, texts)]


@dataclasses.dataclass
class Run:
  """Everything the loop needs, built once by `setup`."""
  config: ml_collections.ConfigDict
  workdir: epath.Path
  program: builder.TrainingProgram
  tokenizer: Any
  manager: Any
  state: Any
  train_iter: Any
  eval_batches: list
  eval_texts: list
  writer: metrics_lib.MetricsWriter
  throughput: metrics_lib.Throughput
  skipped_steps: list = dataclasses.field(default_factory=list)
  closed: bool = False
  bar: Optional[progress.Progress] = None  # the training progress bar, once compiled
  base: Any = None  # a LoRA run's frozen base; state.params are then its adapters

  @property
  def lora_config(self) -> Optional[lora.LoraConfig]:
    return None if self.base is None else lora.LoraConfig.from_section(self.config.lora)

  def model_params(self):
    """The parameters of the model being trained (a LoRA run's base with its adapters)."""
    if self.base is None:
      return self.state.params
    return lora.merge(self.base, self.state.params, self.lora_config)

  @property
  def interactive(self) -> Optional[bool]:
    """Process 0 shows a bar when watched (None: it decides); the others write log lines."""
    return None if jax.process_index() == 0 else False

  def say(self, line: str):
    """A progress line: above the bar when there is one, else a log line."""
    if self.bar is not None:
      self.bar.write(line)
    else:
      logging.info('%s', line)

  def write_plots(self) -> list:
    """Redraws the run's curves from metrics.jsonl (process 0, local workdirs); returns their
    paths. A cloud workdir's curves are drawn where they are looked at: python -m llm_jax.plot."""
    if jax.process_index() != 0 or '://' in str(self.workdir):
      return []
    return plots.write_run_plots(str(self.workdir))

  @property
  def model_config(self) -> model_lib.ModelConfig:
    return self.program.model_config

  @property
  def mesh(self):
    return self.program.mesh

  @property
  def rules(self) -> tuple:
    return self.program.rules

  def evaluate(self) -> dict:
    num_bytes = sum(len(t.encode('utf-8')) for t in self.eval_texts)
    batches = progress.track(self.eval_batches, 'eval', unit='batch',
                             interactive=self.interactive, log_end=False)
    return evaluate(self.program.eval_step, self.state.params, batches, self.mesh, self.rules,
                    num_bytes)

  def save(self, step: int, metrics: Optional[dict] = None):
    checkpoint.save(self.manager, step, self.model_config, self.state.params,
                    self.state.opt_state, self.train_iter, metrics=metrics,
                    lora_config=self.lora_config)

  def close(self):
    """Finishes the pending asynchronous save (whatever ended the run) and releases all."""
    if self.closed:
      return
    self.closed = True
    if self.bar is not None:
      self.bar.close()
    try:
      self.manager.wait_until_finished()
      self.manager.close()
    finally:
      self.writer.close()
      close = getattr(self.train_iter, 'close', None)  # grain's background workers, if any
      if close is not None:
        close()


def setup(config: ml_collections.ConfigDict, workdir) -> Run:
  """Mesh, tokenizer, data, sharded (restored) state and compiled steps for a run."""
  validation.validate_config(config, process_count=jax.process_count(),
                             device_count=jax.device_count())
  in_loop.specs(config.evals)  # an evaluator's bad key fails now, not at its first step
  workdir = checkpoint.absolute(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  program = builder.build(config)
  model_config, mesh, rules = program.model_config, program.mesh, program.rules
  is_sft = config.data.dataset == 'sft'
  tokenizer = pipeline.get_tokenizer(sft.tokenizer_data_config(config.data) if is_sft
                                     else config.data, workdir, model_config.vocab_size)
  if jax.process_index() == 0 and not is_sft:
    pipeline.corpus_epochs(config.data, tokenizer, config.train.num_steps)  # warns if small
  logging.info('model %s, %.2fM parameters; mesh %s', model_config,
               model_lib.count_params(model_lib.abstract_params(model_config)) / 1e6, mesh.shape)
  logging.info('memory per device: %s', memory.estimate_memory_per_device(
      model_config, mesh, rules, program.batch_shape,
      accum_steps=config.optim.grad_accum_steps))
  manager = checkpoint.create_manager(workdir / checkpoint.CHECKPOINT_SUBDIR,
                                      keep=config.checkpoint.keep,
                                      keep_best=config.checkpoint.keep_best,
                                      async_save=config.checkpoint.async_save)
  base = None
  if config.lora.rank:
    base = load_lora_base(config, program)
    program = lora.build_program(config, program, base)
  state, resumed_step = restore_or_initialise(config, program, manager, workdir)
  train_iter, eval_batches, eval_texts = make_data(config, tokenizer, workdir)
  if resumed_step is not None:
    checkpoint.restore_data_iterator(manager, resumed_step, train_iter)
  return Run(
      config=config, workdir=workdir, program=program, tokenizer=tokenizer, manager=manager,
      state=state, train_iter=train_iter, eval_batches=eval_batches, eval_texts=eval_texts,
      base=base,
      writer=metrics_lib.MetricsWriter(workdir, resume_step=resumed_step or 0),
      throughput=metrics_lib.Throughput(model_config, program.batch_shape,
                                        config.train.num_steps))


def log_steps(run: Run, step: int, pending: list):
  """Logs the mean metrics of the steps since the last log; applies the non-finite policy."""
  history = jax.device_get(pending)
  for offset, metrics in enumerate(history):
    if not metrics['finite']:
      bad_step = step - len(history) + offset + 1
      if run.config.train.nonfinite == 'stop':
        raise FloatingPointError(f'non-finite loss or gradient at step {bad_step}; the update '
                                 'was not applied and no checkpoint holds it')
      logging.warning('non-finite loss or gradient at step %d: update skipped', bad_step)
      run.skipped_steps.append(bad_step)
  finite = [m for m in history if m['finite']] or history
  scalars = {k: float(np.mean([m[k] for m in finite]))
             for k in ('loss', 'grad_norm', 'learning_rate')}
  scalars['perplexity'] = metrics_lib.perplexity(scalars['loss'])
  scalars.update(run.throughput.measure(step))
  run.writer.write(step, scalars, 'train/')
  if run.bar is not None:
    run.bar.update(0, loss=scalars['loss'])
  run.say(metrics_lib.format_line(step, run.config.train.num_steps, scalars))


def train_loop(run: Run, stop: preemption.StopRequests) -> tuple[int, Optional[dict]]:
  """Steps until num_steps or a stop request; returns (last step, last evaluation or None)."""
  config = run.config
  step = first_step = int(jax.device_get(run.state.step))
  pending, eval_result = [], None
  run.throughput.start(step)
  while step < config.train.num_steps:
    batch = pipeline.to_global_batch(next(run.train_iter), run.mesh, run.rules)
    # The first call compiles: a phase of its own, announced before the bar starts.
    with (progress.phase('compiling train step', interactive=run.interactive)
          if step == first_step else contextlib.nullcontext()):
      run.state, step_metrics = run.program.train_step(run.state, batch)
    step += 1
    pending.append(step_metrics)
    if run.bar is not None:
      run.bar.update(1)
    if len(pending) == 1 and step == first_step + 1:
      jax.block_until_ready(step_metrics)
      run.throughput.start(step)  # compilation is not training time
      run.bar = progress.Progress(config.train.num_steps, 'train', initial=step,
                                  interactive=run.interactive)
    last = step == config.train.num_steps
    stopping = stop.should_stop()
    if step % config.train.log_every == 0 or last or stopping:
      log_steps(run, step, pending)
      pending = []
    evaluated = step % config.eval.every_steps == 0 or last
    if evaluated:
      eval_result = run.evaluate()
      run.writer.write(step, eval_result, 'eval/')
      run.say(f"eval at step {step}: loss {eval_result['loss']:.4f}, perplexity "
              f"{eval_result['perplexity']:.2f}, {eval_result['bits_per_byte']:.3f} bits per "
              'byte')
      run.write_plots()
      run.throughput.start(step)
    task_scalars = in_loop.run_in_loop_evals(config, run.model_config, run.model_params(),
                                             run.tokenizer, run.mesh, run.rules, step,
                                             last_step=config.train.num_steps)
    if task_scalars:
      run.writer.write(step, task_scalars, 'evals/')
      run.throughput.start(step)
    # With keep_best, every evaluated step is saved with its loss, to compete for best.
    keep_best = evaluated and config.checkpoint.keep_best > 0
    if step % config.checkpoint.every_steps == 0 or last or stopping or keep_best:
      if pending:  # the non-finite policy must see every step a checkpoint holds
        log_steps(run, step, pending)
        pending = []
      run.save(step, {checkpoint.BEST_METRIC: eval_result['loss']} if evaluated else None)
    if stopping:
      break
  if run.bar is not None:
    run.bar.close()  # before the samples and the summary, which are not training
    run.bar = None
  return step, eval_result


def _finish(run: Run, step: int, eval_result: Optional[dict], start_time: float) -> dict:
  """Final evaluation if none ran, samples, and summary.json (process 0)."""
  config = run.config
  if eval_result is None:  # resumed at the end: nothing was trained or evaluated
    eval_result = run.evaluate()
  samples = sample_continuations(config, run.model_config, run.model_params(), run.tokenizer,
                                 run.mesh, run.rules)
  for sample in samples:
    logging.info('sample: %r -> %r', sample['prompt'], sample['continuation'])
  summary = {
      'step': step, 'eval_loss': eval_result['loss'],
      'eval_perplexity': eval_result['perplexity'],
      'eval_bits_per_byte': eval_result['bits_per_byte'],
      'gzip_bits_per_byte': gzip_bits_per_byte(run.eval_texts),
      'tokens_per_second': run.throughput.tokens_per_second,
      'skipped_steps': run.skipped_steps, 'wall_seconds': time.time() - start_time,
      'samples': samples}
  if jax.process_index() == 0:
    metrics_lib.write_summary(run.workdir, summary)
    print(progress.format_summary(summary, run.write_plots()), flush=True)
  return summary


def finished_summary(config: ml_collections.ConfigDict, workdir) -> Optional[dict]:
  """summary.json of a run in `workdir` that already reached config.train.num_steps."""
  summary = metrics_lib.read_summary(workdir)
  if summary is not None and summary.get('step', -1) >= config.train.num_steps:
    return summary
  return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
  """Trains per `config`, writing checkpoints, TensorBoard events and summary.json to workdir.

  Returns:
    The summary; {'step', 'preempted': True} or {'step', 'interrupted': True} when SIGTERM or
    Ctrl-C stopped the run early (a checkpoint of that step is saved: rerun to resume).
  """
  start_time = time.time()
  finished = finished_summary(config, workdir)
  if finished is not None:
    logging.warning('%s already finished at step %d (summary.json); nothing to do. Raise '
                    'train.num_steps to train on.', workdir, finished['step'])
    return dict(finished, already_finished=True)
  run = setup(config, workdir)
  try:
    with sharding.activate(run.mesh, run.rules), preemption.StopRequests() as stop:
      step, eval_result = train_loop(run, stop)
      if step < config.train.num_steps:
        reason = 'preempted' if stop.preempted else 'interrupted'
        logging.warning('stopped at step %d (%s); checkpoint saved: rerun to resume', step,
                        reason)
        return {'step': step, reason: True}
      return _finish(run, step, eval_result, start_time)
  finally:
    run.close()
