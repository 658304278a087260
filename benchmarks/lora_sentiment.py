"""Sentiment by LoRA fine-tuning: llm_jax next to transformers + peft, on the same real data.

    python benchmarks/prepare_real_data.py --out_dir=/tmp/evaldata     # once
    python benchmarks/lora_sentiment.py --hf_dir=/tmp/smol --data_dir=/tmp/evaldata \\
        --train_size=320 --test_size=200 --steps=80 --batch_size=4 --seq_len=128

SmolLM2-135M-Instruct (or any Llama-family HF directory) on the Pang & Lee sentence-polarity
split that prepare_real_data.py writes. Every row scores the same first --test_size test
reviews the same way: the user turn asks for the review's sentiment in the model's own chat
template, and the prediction is the label word ('positive' / 'negative') with the higher
log-likelihood as the assistant's answer.

  zero-shot            the base model (llm_jax.evals.scoring, and the same scoring in torch)
  llm_jax LoRA         llm_jax.model.lora steps on the frozen base, scored by llm_jax
  transformers + peft  peft.get_peft_model + torch AdamW, scored in torch
  baselines            majority class and TF-IDF + logistic regression (scikit-learn), trained
                       on the same training reviews (and on the whole train split)

Both fine-tunes see identical batches: the first --train_size training reviews, each one
conversation of one row (llm_jax.data.sft encodes it with the chat template; the loss is on
the assistant tokens only), padded to --seq_len, in one seeded order, --batch_size rows a step.
Same rank, alpha, targets (all seven projections), no dropout, AdamW with the learning-rate
schedule of configs/lora.py (warm-up then cosine) and its betas, epsilon, weight decay and
gradient clipping. One conversation per row rather than the training loop's packed rows:
transformers' eager attention cannot keep packed conversations apart, and the point is the
same batches on both sides. Step times are medians after the first (compiling) step.
"""

import json
import os
import statistics
import sys
import time
from typing import Optional

from absl import app
from absl import flags
import jax
import numpy as np
from sklearn import feature_extraction
from sklearn import linear_model
from sklearn import metrics as sk_metrics
from sklearn import pipeline

# configs/ lives in the checkout, not in the installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import lora as lora_configs  # pylint: disable=wrong-import-position
from llm_jax import host_memory  # pylint: disable=wrong-import-position
from llm_jax import sharding  # pylint: disable=wrong-import-position
from llm_jax.convert import hf  # pylint: disable=wrong-import-position
from llm_jax.data import chat_templates  # pylint: disable=wrong-import-position
from llm_jax.data import packing  # pylint: disable=wrong-import-position
from llm_jax.data import sft  # pylint: disable=wrong-import-position
from llm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=wrong-import-position
from llm_jax.evals import model_source  # pylint: disable=wrong-import-position
from llm_jax.evals import scoring  # pylint: disable=wrong-import-position
from llm_jax.model import lora  # pylint: disable=wrong-import-position
from llm_jax.training import optim  # pylint: disable=wrong-import-position
from llm_jax.training import steps as train_steps  # pylint: disable=wrong-import-position

_HF_DIR = flags.DEFINE_string('hf_dir', os.path.expanduser(
    '~/.cache/llm_jax/models/SmolLM2-135M-Instruct'), 'Hugging Face Llama directory.')
_DATA_DIR = flags.DEFINE_string('data_dir', '/tmp/evaldata', 'What prepare_real_data.py wrote.')
_TRAIN_SIZE = flags.DEFINE_integer('train_size', 320, 'First training reviews fine-tuned on.')
_TEST_SIZE = flags.DEFINE_integer('test_size', 200, 'First test reviews scored.')
_STEPS = flags.DEFINE_integer('steps', 80, 'Optimizer steps of each fine-tune.')
_BATCH = flags.DEFINE_integer('batch_size', 4, 'Conversations (rows) per step.')
_SEQ = flags.DEFINE_integer('seq_len', 128, 'Tokens per row.')
_RANK = flags.DEFINE_integer('rank', 8, 'LoRA rank (alpha = 2 * rank, as configs/lora.py).')
_LR = flags.DEFINE_float('learning_rate', None, 'Peak learning rate; default configs/lora.py.')
_WARMUP = flags.DEFINE_integer('warmup_steps', 10, 'Linear warm-up steps.')
_EVAL_BATCH = flags.DEFINE_integer('eval_batch_size', 8, 'Reviews per scoring call.')
_PARTS = flags.DEFINE_list('parts', ['zero_shot', 'llm_jax', 'peft', 'baselines'],
                           'Rows to produce, among zero_shot, zero_shot_torch (the same '
                           'scoring in torch, a check), llm_jax, peft, baselines.')
_OUTPUT = flags.DEFINE_string('output', None, 'Also write the Markdown table to this file.')

# task -> (label words, the user turn's question, characters of text kept: mails are long).
_TASKS = {
    'sentiment': (('negative', 'positive'),
                  'Is the sentiment of this movie review positive or negative? Answer with one '
                  'word.\n\nReview: {text}', None),
    'spam': (('ham', 'spam'),
             'Is this e-mail spam or ham (a legitimate mail)? Answer with one word.\n\n'
             'E-mail: {text}', 300),
}
_TASK = flags.DEFINE_enum('task', 'sentiment', sorted(_TASKS), 'Which prepared dataset.')


def _labels() -> tuple:
  return _TASKS[_TASK.value][0]
_PEFT_MODULES = {'q': 'q_proj', 'k': 'k_proj', 'v': 'v_proj', 'o': 'o_proj',
                 'gate': 'gate_proj', 'up': 'up_proj', 'down': 'down_proj'}


def _read(split: str, limit: Optional[int] = None) -> list[dict]:
  path = os.path.join(_DATA_DIR.value, _TASK.value, f'{split}.jsonl')
  keep = _TASKS[_TASK.value][2]
  with open(path, encoding='utf-8') as f:
    rows = [json.loads(line) for line in f][:limit]
  rows = [dict(row, text=row['text'][:keep]) for row in rows]
  if limit is not None and len(rows) < limit:
    raise ValueError(f'{path} holds {len(rows)} reviews; asked for {limit}')
  return rows


def _user(text: str) -> dict:
  return {'role': 'user', 'content': _TASKS[_TASK.value][1].format(text=text)}


def _label_pairs(template, tokenizer, reviews: list[dict]) -> list[list[tuple]]:
  """Per review, one (prompt ids, label ids) pair per label; the labels' shared ending (the
  end-of-turn tokens) is cut, so only the label word is scored."""
  out = []
  for review in reviews:
    prompt = chat_templates.build_prompt(template, tokenizer, [_user(review['text'])])
    answers = []
    for label in _labels():
      ids = template.encode(tokenizer, [_user(review['text']),
                                        {'role': 'assistant', 'content': label}],
                            add_generation_prompt=False)
      if ids[:len(prompt)] != prompt:
        raise ValueError('the chat template renders the prompt differently once the answer '
                         'follows; label scoring needs a stable prefix')
      answers.append(ids[len(prompt):])
    while len(answers[0]) > 1 and len(answers[1]) > 1 and answers[0][-1] == answers[1][-1]:
      answers = [a[:-1] for a in answers]
    out.append([(prompt, a) for a in answers])
  return out


def _predict(loglikelihood, pairs: list[list[tuple]]) -> list[str]:
  flat = [p for review in pairs for p in review]
  scores = np.asarray([s for s, _ in loglikelihood(flat)]).reshape(len(pairs), len(_labels()))
  return [_labels()[i] for i in scores.argmax(-1)]


def _figures(gold: list[str], predicted: list[str]) -> dict:
  return {'accuracy': sk_metrics.accuracy_score(gold, predicted),
          'macro_f1': sk_metrics.f1_score(gold, predicted, average='macro', labels=_labels(),
                                          zero_division=0)}


def _training_rows(template, tokenizer, reviews: list[dict]) -> list[dict]:
  """One padded row per conversation; loss mask on the assistant tokens (llm_jax.data.sft)."""
  stats, rows = sft.SftStats(), []
  for review in reviews:
    messages = [_user(review['text']), {'role': 'assistant', 'content': review['label']}]
    encoded = sft.encode_example(template, tokenizer, messages, _SEQ.value, 'all', 'truncate',
                                 stats)
    if encoded is not None:
      rows.extend(sft.pack_conversations([encoded], _SEQ.value, tokenizer.pad_id))
  print(f'training rows: {len(rows)} of {len(reviews)} reviews ({stats.truncated} truncated, '
        f'{stats.dropped} dropped), {int(sum(r["loss_mask"].sum() for r in rows))} target '
        'tokens', flush=True)
  return rows


def _batches(rows: list[dict]) -> list[dict]:
  order = np.random.default_rng(0).permutation(len(rows))
  needed = _STEPS.value * _BATCH.value
  order = np.resize(order, needed)  # repeats the same order when steps outrun the data
  return [packing.stack_rows([rows[i] for i in order[s:s + _BATCH.value]])
          for s in range(0, needed, _BATCH.value)]


def _optim_section():
  config = lora_configs.get_config(f'hf_dir={_HF_DIR.value},rank={_RANK.value}')
  section = config.optim
  section.warmup_steps = _WARMUP.value
  if _LR.value is not None:
    section.learning_rate = _LR.value
  return section, config.lora


def _lora_config(lora_section) -> lora.LoraConfig:
  return lora.LoraConfig(rank=_RANK.value, alpha=float(lora_section.alpha), dropout=0.0,
                         targets=tuple(lora.TARGETS))


def _train_llm_jax(model_config, base, batches, optim_section, lora_config):
  """(adapters, losses, step seconds) of the llm_jax LoRA fine-tune."""
  mesh, rules = sharding.create_mesh((1, 1, 1), devices=jax.devices()[:1]), sharding.DEFAULT_RULES
  tx, schedule = optim.create_optimizer(optim_section, num_steps=_STEPS.value)
  state, shardings = lora.create_state(model_config, lora_config, tx, mesh, rules, seed=0)
  with sharding.activate(mesh, rules):
    placed_base = jax.device_put(base, lora.base_shardings(model_config, mesh, rules))
  shape = batches[0]['inputs'].shape
  step = lora.jit_train_step(model_config, lora_config, tx, schedule, shardings, mesh, rules,
                             shape)
  batch_shardings = train_steps.batch_shardings(mesh, rules, shape)
  losses, times = [], []
  for batch in batches:
    start = time.perf_counter()
    with sharding.activate(mesh, rules):
      placed = {k: jax.device_put(v, batch_shardings[k]) for k, v in batch.items()}
      state, metrics = step(state, placed_base, placed)
    losses.append(float(metrics['loss']))
    times.append(time.perf_counter() - start)
    if len(losses) % 10 == 0:
      print(f'  llm_jax step {len(losses)}: loss {losses[-1]:.4f}, {times[-1]:.2f} s',
            flush=True)
  return jax.device_get(state.params), losses, times


class _TorchModel:
  """transformers' LlamaForCausalLM in float32, optionally wrapped by peft LoRA."""

  def __init__(self, hf_dir: str):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32)

  def loglikelihood(self, pairs):
    """Summed log-probability of each continuation, as scoring.Scorer.loglikelihood."""
    torch = self.torch
    self.model.eval()
    out = []
    with torch.no_grad():
      for start in range(0, len(pairs), _EVAL_BATCH.value):
        chunk = pairs[start:start + _EVAL_BATCH.value]
        sequences = [list(c) + list(x) for c, x in chunk]
        length = max(len(s) for s in sequences)
        ids = torch.zeros((len(chunk), length), dtype=torch.long)
        attention = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, s in enumerate(sequences):
          ids[row, :len(s)] = torch.tensor(s)
          attention[row, :len(s)] = 1
        logprobs = torch.log_softmax(
            self.model(input_ids=ids, attention_mask=attention).logits.float(), -1)
        for row, (context, continuation) in enumerate(chunk):
          positions = torch.arange(len(context) - 1, len(context) + len(continuation) - 1)
          picked = logprobs[row, positions, torch.tensor(continuation)]
          out.append((float(picked.sum()), None))
    return out

  def train_lora(self, batches, optim_section, lora_config: lora.LoraConfig):
    """Wraps the model with peft LoRA and trains it; (losses, step seconds)."""
    import peft  # pylint: disable=g-import-not-at-top
    torch = self.torch
    torch.manual_seed(0)
    self.model = peft.get_peft_model(self.model, peft.LoraConfig(
        r=lora_config.rank, lora_alpha=lora_config.alpha, lora_dropout=0.0,
        target_modules=[_PEFT_MODULES[t] for t in lora_config.targets])).train()
    trainable = [p for p in self.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=optim_section.learning_rate,
                            betas=(optim_section.b1, optim_section.b2), eps=optim_section.eps,
                            weight_decay=optim_section.weight_decay)
    _, schedule = optim.create_optimizer(optim_section, num_steps=_STEPS.value)
    lr_at = [float(schedule(s)) for s in range(len(batches))]  # llm_jax's very schedule
    losses, times = [], []
    for index, batch in enumerate(batches):
      start = time.perf_counter()
      for group in opt.param_groups:
        group['lr'] = lr_at[index]
      inputs = torch.from_numpy(np.asarray(batch['inputs'], np.int64))
      attention = torch.from_numpy((np.asarray(batch['segment_ids']) > 0).astype(np.int64))
      targets = torch.from_numpy(np.asarray(batch['targets'], np.int64))
      mask = torch.from_numpy(np.asarray(batch['loss_mask'], np.float32))
      logits = self.model(input_ids=inputs, attention_mask=attention).logits.float()
      nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                              targets.reshape(-1), reduction='none')
      loss = (nll * mask.reshape(-1)).sum() / mask.sum().clamp(min=1.0)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(trainable, optim_section.grad_clip_norm)
      opt.step()
      opt.zero_grad(set_to_none=True)
      losses.append(float(loss.detach()))
      times.append(time.perf_counter() - start)
      if len(losses) % 10 == 0:
        print(f'  peft step {len(losses)}: loss {losses[-1]:.4f}, {times[-1]:.2f} s',
              flush=True)
    return losses, times


def _baselines(train: list[dict], test: list[dict], gold: list[str]) -> list[tuple]:
  """Majority class and TF-IDF + logistic regression on the fine-tunes' training reviews and
  on the whole train split."""
  full = _read('train')
  rows = []
  for name, reviews in ((f'{len(train)} training reviews', train),
                        (f'whole train split, {len(full)} reviews', full)):
    labels = [r['label'] for r in reviews]
    majority = max(_labels(), key=labels.count)
    rows.append((f'majority class ({name})', _figures(gold, [majority] * len(gold)), None))
    classifier = pipeline.make_pipeline(feature_extraction.text.TfidfVectorizer(),
                                        linear_model.LogisticRegression(max_iter=1000))
    classifier.fit([r['text'] for r in reviews], labels)
    predicted = list(classifier.predict([r['text'] for r in test]))
    rows.append((f'TF-IDF + logistic regression ({name})', _figures(gold, predicted), None))
  return rows


def _training_text(losses, times) -> dict:
  tail = losses[-10:]
  return {'loss_start': losses[0], 'loss_end': statistics.mean(tail),
          'step_s': statistics.median(times[1:]), 'first_step_s': times[0]}


def _table(rows: list[tuple]) -> str:
  lines = ['| model | accuracy | macro F1 | train loss, step 1 | train loss, mean of last 10 '
           '| step s (median) | first step s (compiles) |', '|---|---|---|---|---|---|---|']
  for name, figures, training in rows:
    cells = [name, f'{figures["accuracy"]:.3f}', f'{figures["macro_f1"]:.3f}']
    if training:
      cells += [f'{training["loss_start"]:.3f}', f'{training["loss_end"]:.3f}',
                f'{training["step_s"]:.2f}', f'{training["first_step_s"]:.2f}']
    else:
      cells += ['-'] * 4
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv):
  del argv
  if host_memory.runs_on_cpu_only():
    host_memory.retain_freed_memory()
  hf_dir, parts = _HF_DIR.value, set(_PARTS.value)
  tokenizer = tokenizer_lib.load_tokenizer(model_source.find_tokenizer(hf_dir))
  template = chat_templates.as_jinja(chat_templates.resolve('auto', tokenizer, hf_dir))
  train, test = _read('train', _TRAIN_SIZE.value), _read('test', _TEST_SIZE.value)
  gold = [r['label'] for r in test]
  pairs = _label_pairs(template, tokenizer, test)
  optim_section, lora_section = _optim_section()
  lora_config = _lora_config(lora_section)
  print(f'{os.path.basename(hf_dir.rstrip("/"))}, template {template.name}; {len(train)} '
        f'training reviews, {len(test)} test reviews; LoRA rank {lora_config.rank}, alpha '
        f'{lora_config.alpha}, on {",".join(lora_config.targets)}; {_STEPS.value} steps x '
        f'{_BATCH.value} x {_SEQ.value} tokens; AdamW lr {optim_section.learning_rate} '
        f'({_WARMUP.value} warm-up, {optim_section.schedule}), b2 {optim_section.b2}, weight '
        f'decay {optim_section.weight_decay}, clip {optim_section.grad_clip_norm}', flush=True)
  rows = []
  model_config, base = hf.load_hf(hf_dir, scan_layers=False)
  max_len = _SEQ.value * 2
  if 'zero_shot' in parts:
    start = time.perf_counter()
    scorer = scoring.Scorer(model_config, base, batch_size=_EVAL_BATCH.value, max_len=max_len)
    rows.append(('zero-shot (llm_jax scoring)', _figures(gold, _predict(scorer.loglikelihood,
                                                                        pairs)), None))
    print(f'zero-shot llm_jax: {rows[-1][1]} ({time.perf_counter() - start:.0f} s)', flush=True)
  if 'zero_shot_torch' in parts:
    rows.append(('zero-shot (torch scoring)', _figures(
        gold, _predict(_TorchModel(hf_dir).loglikelihood, pairs)), None))
    print(f'zero-shot torch: {rows[-1][1]}', flush=True)
  batches = _batches(_training_rows(template, tokenizer, train)) if parts & {
      'llm_jax', 'peft'} else []
  if 'llm_jax' in parts:
    adapters, losses, times = _train_llm_jax(model_config, base, batches, optim_section,
                                             lora_config)
    merged = jax.device_get(lora.merge(base, adapters, lora_config))
    scorer = scoring.Scorer(model_config, merged, batch_size=_EVAL_BATCH.value, max_len=max_len)
    rows.append(('llm_jax LoRA', _figures(gold, _predict(scorer.loglikelihood, pairs)),
                 _training_text(losses, times)))
    print(f'llm_jax LoRA: {rows[-1][1]} {rows[-1][2]}', flush=True)
  if 'peft' in parts:
    model = _TorchModel(hf_dir)
    losses, times = model.train_lora(batches, optim_section, lora_config)
    rows.append(('transformers + peft LoRA', _figures(gold, _predict(model.loglikelihood,
                                                                     pairs)),
                 _training_text(losses, times)))
    print(f'peft LoRA: {rows[-1][1]} {rows[-1][2]}', flush=True)
  if 'baselines' in parts:
    rows.extend(_baselines(train, test, gold))
  table = _table(rows)
  print(table, flush=True)
  if _OUTPUT.value:
    with open(_OUTPUT.value, 'w', encoding='utf-8') as f:
      f.write(table + '\n')


if __name__ == '__main__':
  app.run(main)
