"""Evaluators that the training loop runs every N steps, chosen by name in `config.evals`.

As in big_vision, each entry of `config.evals` names one evaluator; its `kind` is a task kind of
`llm_jax.evals.tasks` (perplexity, multiple_choice, classification, summarization,
translation), `every_steps` says how often it runs, and the other keys are TaskSpec fields:

    config.evals = ml_collections.ConfigDict()
    config.evals.ppl_held_out = ml_collections.ConfigDict(dict(
        kind='perplexity', path='/data/held_out.jsonl', every_steps=1000))
    config.evals.sentiment = ml_collections.ConfigDict(dict(
        kind='classification', path='/data/sst2_dev.jsonl', every_steps=2000,
        prompt='Review: {text}\\nSentiment:', labels=('negative', 'positive'), limit=200))

`run_in_loop_evals` returns the scalars of the evaluators due at a step as
`{'<name>/<metric>': value}`, ready for the metric writer. Every process runs it (the scorer
and the decoder are SPMD programs); process 0 writes the summaries.
"""

from typing import Optional

from absl import logging

from llm_jax.evals import tasks as tasks_lib

_LOOP_KEYS = ('every_steps',)


def _entries(evals) -> dict:
  """The evaluator sections of `config.evals` as plain dicts."""
  if evals is None:
    return {}
  entries = evals.to_dict() if hasattr(evals, 'to_dict') else dict(evals)
  for name, entry in entries.items():
    if not isinstance(entry, dict):
      raise ValueError(f'config.evals.{name} must be a section (ConfigDict), got {entry!r}')
    every = entry.get('every_steps')
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
      raise ValueError(f'config.evals.{name}.every_steps={every!r}; expected a positive integer')
  return entries


def due_evaluators(evals, step: int, last_step: Optional[int] = None) -> list[str]:
  """Names of the evaluators to run after `step` (every N steps, and at the last step)."""
  return [name for name, entry in _entries(evals).items()
          if step > 0 and (step % entry['every_steps'] == 0 or step == last_step)]


def specs(evals) -> dict:
  """{name: TaskSpec} of every evaluator; checks the whole section (call it at start-up)."""
  return {name: tasks_lib.spec_from_dict(name, {k: v for k, v in entry.items()
                                                if k not in _LOOP_KEYS})
          for name, entry in _entries(evals).items()}


def _scalars(name: str, figures: dict) -> dict:
  return {f'{name}/{metric}': float(value) for metric, value in figures.items()
          if isinstance(value, (int, float)) and not isinstance(value, bool)}


def run_in_loop_evals(config, model_config, params, tokenizer, mesh, rules, step: int,
                      last_step: Optional[int] = None) -> dict:
  """Runs the evaluators of `config.evals` due at `step`; returns {'name/metric': value}.

  Args:
    config: the run's ConfigDict (reads `config.evals` and `config.data.eval_batch_size`).
    model_config: the ModelConfig.
    params: the current (sharded) parameters.
    tokenizer: the run's tokenizer.
    mesh: the training mesh.
    rules: the logical-axis rules.
    step: the step just completed.
    last_step: the run's final step, at which every evaluator runs.
  """
  due = due_evaluators(config.evals, step, last_step)
  if not due:
    return {}
  all_specs = specs(config.evals)
  model = tasks_lib.EvalModel.create(model_config, params, tokenizer, mesh=mesh, rules=rules,
                                     batch_size=config.data.eval_batch_size)
  scalars = {}
  for name in due:
    figures = tasks_lib.run_task(all_specs[name], model)
    logging.info('step %d: evaluator %s: %s', step, name, figures)
    scalars.update(_scalars(name, figures))
  return scalars
