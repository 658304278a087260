"""Evaluation tasks: a spec per task, and a registry of task kinds that score a model on it.

Kinds (`KINDS`):
  perplexity       per-token perplexity and bits per byte of a text field (rolling windows),
                   next to gzip's bits per byte;
  multiple_choice  acc and acc_norm over a `choices` list and the index of the answer;
  classification   accuracy, macro precision/recall/F1, per-class figures and the confusion
                   matrix; `method='score'` picks the label word with the highest
                   log-likelihood, `method='generate'` reads the label off a greedy generation;
  summarization    ROUGE-1/2/L of greedy generations;
  translation      BLEU and chrF of greedy generations.

Prompts are `spec.prompt` formatted with an example's fields. With `num_fewshot` > 0 the first
examples of `fewshot_path` (default: of the task's own file, then left out of the evaluation)
come first, each followed by its answer. Plain prompts are BOS + text, shots separated by blank
lines, and generations end at the first newline; with `chat_template` set, each shot is a user
turn and an assistant answer and the prompt is the last user turn, rendered by
`llm_jax.data.chat_templates.build_prompt`.
"""

import dataclasses
from typing import Any, Callable, Optional

from llm_jax.data import chat_templates
from llm_jax.evals import data as data_lib
from llm_jax.evals import metrics
from llm_jax.evals import scoring
from llm_jax.inference import decode

KINDS: dict[str, Callable] = {}


def register_kind(name: str):
  """Decorator adding `fn(spec, model, examples, shots) -> dict` to KINDS under `name`."""

  def add(fn):
    KINDS[name] = fn
    return fn

  return add


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One evaluation task (see the module docstring for what each kind reads)."""
  name: str
  kind: str
  path: str
  prompt: str = '{text}'
  text_field: str = 'text'  # perplexity
  choices_field: str = 'choices'  # multiple_choice
  answer_field: str = 'label'  # multiple_choice: index; classification: label; else target
  labels: tuple = ()  # classification classes (default: the sorted answers)
  method: str = 'score'  # classification: 'score' or 'generate'
  num_fewshot: int = 0
  fewshot_path: str = ''
  chat_template: str = ''  # '' = plain prompts; 'auto', or a name chat_templates knows
  system: str = ''
  max_new_tokens: int = 64
  limit: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'task {self.name!r}: kind={self.kind!r}; expected one of {sorted(KINDS)}')
    if self.method not in ('score', 'generate'):
      raise ValueError(f"task {self.name!r}: method={self.method!r}; expected 'score' or "
                       "'generate'")
    object.__setattr__(self, 'labels', tuple(self.labels))


def spec_from_dict(name: str, values: dict) -> TaskSpec:
  """A TaskSpec from a dict (a task file entry), naming any unknown key."""
  known = {f.name for f in dataclasses.fields(TaskSpec)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f'task {name!r}: unknown keys {unknown}; expected some of {sorted(known)}')
  return TaskSpec(**dict(values, name=name))


@dataclasses.dataclass
class EvalModel:
  """What a task needs: the model, its tokenizer, a Scorer, and where generation runs."""
  config: Any
  params: Any
  tokenizer: Any
  scorer: scoring.Scorer
  model_dir: Optional[str] = None  # where the model's own chat template may be (HF directory)

  @classmethod
  def create(cls, config, params, tokenizer, *, mesh=None, rules=None, batch_size: int = 8,
             model_dir: Optional[str] = None):
    scorer = scoring.Scorer(config, params, mesh=mesh, rules=rules, batch_size=batch_size)
    return cls(config, scorer.params, tokenizer, scorer, model_dir)


def _field(spec: TaskSpec, example: dict, key: str):
  if key not in example:
    raise ValueError(f'task {spec.name!r}: an example lacks the field {key!r} (it has '
                     f'{sorted(example)})')
  return example[key]


def _format(spec: TaskSpec, example: dict) -> str:
  try:
    return spec.prompt.format(**example)
  except KeyError as e:
    raise ValueError(f'task {spec.name!r}: the prompt names the field {e.args[0]!r}, which an '
                     f'example lacks (it has {sorted(example)})') from e


def answer_text(spec: TaskSpec, example: dict) -> str:
  """The gold answer as text (a choice, a label, a summary or a translation)."""
  answer = _field(spec, example, spec.answer_field)
  if spec.kind == 'multiple_choice':
    return str(_field(spec, example, spec.choices_field)[int(answer)])
  return str(answer)


def _template(spec: TaskSpec, tokenizer, model_dir: Optional[str]):
  """The task's chat template; 'auto' is the model directory's own, as for generation."""
  return chat_templates.resolve(spec.chat_template, tokenizer, model_dir)


def _plain_text(spec: TaskSpec, example: dict, shots: list) -> str:
  return ''.join(f'{_format(spec, s)} {answer_text(spec, s)}\n\n' for s in shots) + _format(
      spec, example)


def prompt_ids(spec: TaskSpec, tokenizer, example: dict, shots: list,
               model_dir: Optional[str] = None) -> list[int]:
  """Token ids of the prompt of `example` after its few-shot examples."""
  if not spec.chat_template:
    return [tokenizer.bos_id] + tokenizer.encode(_plain_text(spec, example, shots))
  messages = [{'role': 'system', 'content': spec.system}] if spec.system else []
  for shot in shots:
    messages += [{'role': 'user', 'content': _format(spec, shot)},
                 {'role': 'assistant', 'content': answer_text(spec, shot)}]
  messages.append({'role': 'user', 'content': _format(spec, example)})
  return chat_templates.build_prompt(_template(spec, tokenizer, model_dir), tokenizer, messages)


def answer_pairs(spec: TaskSpec, tokenizer, example: dict, shots: list, answers,
                 model_dir: Optional[str] = None) -> list[tuple[list[int], list[int]]]:
  """(prompt ids, answer ids) for each candidate answer: ' answer' after a plain prompt,
  'answer' after a chat turn.

  Plain answers are split off the joint encoding of prompt and answer (as lm-eval does), so a
  token spanning the boundary is scored the way the model would read the text.
  """
  context = prompt_ids(spec, tokenizer, example, shots, model_dir)
  if spec.chat_template:
    return [(context, tokenizer.encode(str(a).strip())) for a in answers]
  text = _plain_text(spec, example, shots)
  pairs = []
  for answer in answers:
    whole = [tokenizer.bos_id] + tokenizer.encode(f'{text} {answer}')
    split = whole[len(context):] if whole[:len(context)] == context else None
    pairs.append((context, split or tokenizer.encode(f' {answer}')))
  return pairs


def _fit(ids: list[int], room: int) -> list[int]:
  return ids[-room:] if len(ids) > room else ids


def generate_texts(spec: TaskSpec, model: EvalModel, prompts: list[list[int]]) -> list[str]:
  """Greedy continuations; plain prompts stop at the first newline, chat ones at end of turn.

  A prompt longer than the model leaves room for keeps its last tokens (the question).
  """
  stop = ([model.tokenizer.eos_id] if not spec.chat_template
          else chat_templates.stop_ids(_template(spec, model.tokenizer, model.model_dir),
                                       model.tokenizer))
  room = model.config.max_seq_len - spec.max_new_tokens
  if room < 1:
    raise ValueError(f'task {spec.name!r}: max_new_tokens={spec.max_new_tokens} leaves no room '
                     f'for a prompt in max_seq_len={model.config.max_seq_len}')
  texts = []
  for start in range(0, len(prompts), model.scorer.batch_size):
    batch = [_fit(p, room) for p in prompts[start:start + model.scorer.batch_size]]
    texts += decode.generate(model.config, model.params, batch,
                             max_new_tokens=spec.max_new_tokens, eos_id=stop,
                             mesh=model.scorer.layout.mesh, rules=model.scorer.layout.rules,
                             tokenizer=model.tokenizer)
  if not spec.chat_template:
    texts = [t.lstrip().split('\n')[0] for t in texts]
  return [t.strip() for t in texts]


@register_kind('perplexity')
def run_perplexity(spec: TaskSpec, model: EvalModel, examples: list, shots: list) -> dict:
  del shots
  texts = [str(_field(spec, e, spec.text_field)) for e in examples]
  documents = [model.tokenizer.encode(t) for t in texts]
  logprobs = model.scorer.loglikelihood_rolling(documents, model.tokenizer.bos_id)
  return metrics.language_modelling(sum(logprobs), sum(len(d) for d in documents), texts)


@register_kind('multiple_choice')
def run_multiple_choice(spec: TaskSpec, model: EvalModel, examples: list, shots: list) -> dict:
  pairs, owners, choices = [], [], []
  for i, example in enumerate(examples):
    options = [str(c) for c in _field(spec, example, spec.choices_field)]
    choices.append(options)
    pairs += answer_pairs(spec, model.tokenizer, example, shots, options, model.model_dir)
    owners += [i] * len(options)
  scores = model.scorer.loglikelihood(pairs)
  logprobs = [[] for _ in examples]
  for owner, (logprob, _) in zip(owners, scores):
    logprobs[owner].append(logprob)
  gold = [int(_field(spec, e, spec.answer_field)) for e in examples]
  return metrics.multiple_choice(logprobs, choices, gold)


def _match_label(text: str, labels: tuple) -> str:
  """The label a generation starts with (case-insensitive), else the generation itself."""
  for label in sorted(labels, key=len, reverse=True):
    if text.lower().startswith(label.lower()):
      return label
  return text


@register_kind('classification')
def run_classification(spec: TaskSpec, model: EvalModel, examples: list, shots: list) -> dict:
  references = [str(_field(spec, e, spec.answer_field)) for e in examples]
  labels = spec.labels or tuple(sorted(set(references)))
  if spec.method == 'generate':
    prompts = [prompt_ids(spec, model.tokenizer, e, shots, model.model_dir) for e in examples]
    predictions = [_match_label(t, labels) for t in generate_texts(spec, model, prompts)]
  else:
    pairs = [pair for e in examples
             for pair in answer_pairs(spec, model.tokenizer, e, shots, labels, model.model_dir)]
    scores = [lp for lp, _ in model.scorer.loglikelihood(pairs)]
    predictions = [labels[max(range(len(labels)), key=lambda j, i=i: scores[i * len(labels) + j])]
                   for i in range(len(examples))]
  return metrics.classification(predictions, references, labels)


@register_kind('summarization')
def run_summarization(spec: TaskSpec, model: EvalModel, examples: list, shots: list) -> dict:
  prompts = [prompt_ids(spec, model.tokenizer, e, shots, model.model_dir) for e in examples]
  predictions = generate_texts(spec, model, prompts)
  result = metrics.rouge(predictions, [answer_text(spec, e) for e in examples])
  return dict(result, num_examples=len(examples))


@register_kind('translation')
def run_translation(spec: TaskSpec, model: EvalModel, examples: list, shots: list) -> dict:
  prompts = [prompt_ids(spec, model.tokenizer, e, shots, model.model_dir) for e in examples]
  predictions = generate_texts(spec, model, prompts)
  result = metrics.bleu_chrf(predictions, [answer_text(spec, e) for e in examples])
  return dict(result, num_examples=len(examples))


def run_task(spec: TaskSpec, model: EvalModel, root: Optional[str] = None) -> dict:
  """Loads the task's examples (and few-shot examples) and returns its metrics."""
  examples = data_lib.load_examples(spec.path, root=root)
  shots = []
  if spec.num_fewshot > 0:
    if spec.fewshot_path:
      shots = data_lib.load_examples(spec.fewshot_path, root=root)[:spec.num_fewshot]
    else:
      shots, examples = examples[:spec.num_fewshot], examples[spec.num_fewshot:]
  if spec.limit > 0:
    examples = examples[:spec.limit]
  if not examples:
    raise ValueError(f'task {spec.name!r}: no examples left after {spec.num_fewshot} shots')
  return KINDS[spec.kind](spec, model, examples, shots)
