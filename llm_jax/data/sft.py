"""Supervised fine-tuning data: chat conversations rendered with a chat template, loss on the
assistant's tokens only, packed into rows with the pretraining batch contract.

Input: JSONL files, one example a line, either `{"messages": [{"role", "content"}, ...]}`
(system/user/assistant) or `{"prompt": str, "completion": str}` (one user turn and its answer).
Each conversation is encoded by `ChatTemplate.encode_conversation`; the tokens of assistant turns
(their end-of-turn token included, so the model learns to stop) are the only targets: all turns
by default, or only the last (`assistant_turns='last'`).

Packing: conversations are never split across rows. They are laid into rows of seq_len + 1
tokens in order, a new row starting when the next conversation does not fit, and each
conversation is a segment of its row (its own segment id, positions from 0), so attention never
crosses conversations. The rows have the keys of `packing.ROW_KEYS`, so the pretraining
`train_step` trains on them unchanged.

Truncation policy: a conversation longer than seq_len + 1 tokens keeps its first seq_len + 1
tokens ('truncate', the default: the start of the conversation is the context its answers need)
or is left out ('drop'). A conversation with no assistant token left (none at all, or all cut
off) is dropped. The counts of truncated and dropped conversations are logged and returned.
"""

import ast
import dataclasses
import functools
import json
from typing import Iterable, Iterator, Sequence

from absl import logging
from etils import epath
import grain
import ml_collections
import numpy as np

from llm_jax.data import chat_templates
from llm_jax.data import packing
from llm_jax.data import sources

TRUNCATION = ('truncate', 'drop')


@dataclasses.dataclass
class SftStats:
  """What happened to the conversations on their way into rows."""
  conversations: int = 0
  truncated: int = 0
  dropped: int = 0
  rows: int = 0
  target_tokens: int = 0


def _as_messages(example, where: str) -> list[dict]:
  if not isinstance(example, dict):
    raise ValueError(f'{where}: expected a JSON object, got {type(example).__name__}')
  if 'messages' in example:
    messages = example['messages']
    if not isinstance(messages, list) or not messages:
      raise ValueError(f'{where}: "messages" must be a non-empty list')
    for i, message in enumerate(messages):
      if not isinstance(message, dict) or not isinstance(message.get('content'), str):
        raise ValueError(f'{where}: messages[{i}] needs a string "content"')
      if message.get('role') not in ('system', 'user', 'assistant'):
        raise ValueError(f'{where}: messages[{i}] has role {message.get("role")!r}; expected '
                         'system, user or assistant')
    return [{'role': m['role'], 'content': m['content']} for m in messages]
  if 'prompt' in example and 'completion' in example:
    for key in ('prompt', 'completion'):
      if not isinstance(example[key], str):
        raise ValueError(f'{where}: "{key}" must be a string')
    return [{'role': 'user', 'content': example['prompt']},
            {'role': 'assistant', 'content': example['completion']}]
  raise ValueError(f'{where}: expected "messages", or "prompt" and "completion"; got keys '
                   f'{sorted(example)}')


def read_jsonl(paths: Sequence[str]) -> Iterator[list[dict]]:
  """The conversations of JSONL files (blank lines skipped), as lists of messages."""
  for path in paths:
    file = epath.Path(path)
    if not file.exists():
      raise FileNotFoundError(f'SFT data file {path} does not exist')
    for number, line in enumerate(file.read_text().splitlines(), 1):
      if not line.strip():
        continue
      where = f'{path}:{number}'
      try:
        example = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where}: not valid JSON ({e.msg})') from e
      yield _as_messages(example, where)


def expand_paths(pattern: str) -> list[str]:
  """Files matching a glob (or comma-separated globs), sorted; raises when none match."""
  paths = []
  for part in pattern.split(','):
    part = part.strip()
    parent = epath.Path(part).parent
    matches = sorted(str(p) for p in parent.glob(epath.Path(part).name)) if part else []
    paths += matches
  if not paths:
    raise FileNotFoundError(f'no SFT data file matches {pattern!r}')
  return paths


def encode_example(template: chat_templates.ChatTemplate, tokenizer, messages: list[dict],
                   seq_len: int, assistant_turns: str, truncation: str,
                   stats: SftStats):
  """(tokens, target mask) of one conversation cut to seq_len + 1 tokens, or None if dropped.

  The target mask of token t says whether token t is an assistant token (a target).
  """
  stats.conversations += 1
  ids, mask = template.encode_conversation(tokenizer, messages, assistant_turns)
  if len(ids) > seq_len + 1:
    if truncation == 'drop':
      stats.dropped += 1
      return None
    stats.truncated += 1
    ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
  if not mask[1:].any():
    stats.dropped += 1
    return None
  return np.asarray(ids, np.int32), np.asarray(mask, bool)


def pack_conversations(encoded: Iterable[tuple[np.ndarray, np.ndarray]], seq_len: int,
                       pad_id: int) -> Iterator[dict[str, np.ndarray]]:
  """Rows of whole conversations (one segment each), loss on assistant targets only."""
  pieces, masks, used = [], [], 0

  def row():
    out = packing.make_row(pieces, seq_len, pad_id)
    targets_mask = np.zeros(seq_len + 1, bool)
    targets_mask[:used] = np.concatenate(masks)
    out['loss_mask'] = out['loss_mask'] * targets_mask[1:].astype(np.float32)
    return out

  for ids, mask in encoded:
    if used + len(ids) > seq_len + 1:
      yield row()
      pieces, masks, used = [], [], 0
    pieces.append(ids)
    masks.append(mask)
    used += len(ids)
  if pieces:
    yield row()


def build_rows(conversations: Iterable[list[dict]], template, tokenizer, seq_len: int, *,
               assistant_turns: str = 'all', truncation: str = 'truncate'
               ) -> tuple[list[dict[str, np.ndarray]], SftStats]:
  """All rows of a finite set of conversations, and the statistics (also logged).

  Args:
    conversations: lists of messages.
    template: a ChatTemplate, or a built-in name ('llama2', 'llama3').
    tokenizer: the model's tokenizer.
    seq_len: tokens per row.
    assistant_turns: 'all' or 'last'.
    truncation: 'truncate' or 'drop' (see the module docstring).
  """
  if truncation not in TRUNCATION:
    raise ValueError(f'truncation={truncation!r}; expected one of {TRUNCATION}')
  template = chat_templates.as_jinja(template)
  stats = SftStats()
  encoded = (encode_example(template, tokenizer, messages, seq_len, assistant_turns,
                            truncation, stats) for messages in conversations)
  rows = list(pack_conversations((e for e in encoded if e is not None), seq_len,
                                 tokenizer.pad_id))
  stats.rows = len(rows)
  stats.target_tokens = int(sum(r['loss_mask'].sum() for r in rows))
  logging.info('SFT data: %d conversations -> %d rows of %d tokens, %d target tokens; '
               '%d truncated to fit, %d dropped (%s policy, or no assistant token left)',
               stats.conversations, stats.rows, seq_len, stats.target_tokens, stats.truncated,
               stats.dropped, truncation)
  return rows, stats


def make_dataset(rows: Sequence[dict[str, np.ndarray]], batch_size: int, *, seed: int,
                 shuffle: bool = True) -> grain.IterDataset:
  """Endless batches ([batch_size, seq_len] arrays) of the rows, reshuffled every epoch.

  The grain iterator is checkpointable (`get_state`/`set_state`), like the pretraining one.
  """
  if len(rows) < batch_size:
    raise ValueError(f'the SFT data fills {len(rows)} rows, fewer than one batch of '
                     f'{batch_size}; add data or lower the batch size')
  dataset = grain.MapDataset.source(list(rows))
  if shuffle:
    dataset = dataset.shuffle(seed=seed)
  dataset = dataset.repeat().batch(batch_size, drop_remainder=True,
                                   batch_fn=packing.stack_rows)
  return dataset.to_iter_dataset(grain.ReadOptions(num_threads=0))


def docstring_conversations(texts: Iterable[str], limit: int) -> Iterator[list[dict]]:
  """Instruction data made from Python sources: "write the docstring of this function".

  Each function with a docstring gives one conversation: the user shows its signature, the
  assistant answers with the docstring's first paragraph. Files that do not parse are skipped.
  """
  count = 0
  for text in texts:
    try:
      tree = ast.parse(text)
    except (SyntaxError, ValueError):
      continue
    for node in ast.walk(tree):
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      docstring = ast.get_docstring(node)
      if not docstring or node.name.startswith('_'):
        continue
      summary = docstring.strip().split('\n\n')[0].strip()
      signature = f'def {node.name}({ast.unparse(node.args)}):'
      yield [{'role': 'user', 'content': 'Write the docstring of this Python function:\n'
                                         f'{signature}'},
             {'role': 'assistant', 'content': summary}]
      count += 1
      if count >= limit:
        return


def _conversations(data_config, split: str) -> list[list[dict]]:
  """The conversations of config.data.sft_files, or the docstring task of the stdlib corpus."""
  if data_config.sft_files:
    conversations = list(read_jsonl(expand_paths(data_config.sft_files)))
  else:
    source = sources.open_split(tokenizer_data_config(data_config), 'train')
    texts = (sources.document_text(source[i], 'text') for i in range(len(source)))
    conversations = list(docstring_conversations(texts, data_config.sft_max_conversations))
  if not conversations:
    raise ValueError('the SFT data holds no conversation (config.data.sft_files)')
  # Every sft_eval_every-th conversation is held out for evaluation.
  every = data_config.sft_eval_every
  held_out = [c for i, c in enumerate(conversations) if i % every == every - 1]
  train = [c for i, c in enumerate(conversations) if i % every != every - 1]
  return held_out if split == 'eval' else train


def _local_rows(batch: dict[str, np.ndarray], process_index: int, process_count: int):
  local = len(batch['inputs']) // process_count
  return {k: v[process_index * local:(process_index + 1) * local] for k, v in batch.items()}


def make_iterators(data_config, tokenizer, template, *, seed: int, eval_num_batches: int,
                   process_index: int = 0, process_count: int = 1):
  """(train iterator, eval batches, eval texts) of SFT data for the training loop.

  Every process builds the same rows and keeps its own slice of each global batch. The eval
  texts are the held-out assistant answers (what the evaluation scores).
  """
  rows_of = lambda split: build_rows(
      _conversations(data_config, split), template, tokenizer, data_config.seq_len,
      assistant_turns=data_config.sft_assistant_turns, truncation=data_config.sft_truncation)
  train_rows, _ = rows_of('train')
  global_batch = data_config.global_batch_size
  if global_batch % process_count:
    raise ValueError(f'config.data.global_batch_size={global_batch} is not a multiple of the '
                     f'{process_count} processes')
  train = make_dataset(train_rows, global_batch, seed=seed).map(
      functools.partial(_local_rows, process_index=process_index, process_count=process_count))
  eval_rows, _ = rows_of('eval')
  eval_batch = data_config.eval_batch_size
  num_batches = len(eval_rows) // eval_batch
  if eval_num_batches:
    num_batches = min(num_batches, eval_num_batches)
  eval_batches = [_local_rows(packing.stack_rows(eval_rows[i * eval_batch:(i + 1) * eval_batch]),
                              process_index, process_count) for i in range(num_batches)]
  eval_texts = [tokenizer.decode(r['targets'][r['loss_mask'] > 0])
                for r in eval_rows[:num_batches * eval_batch]]
  if not eval_batches:
    raise ValueError(f'the held-out SFT data fills {len(eval_rows)} rows, fewer than one eval '
                     f'batch of {eval_batch}; lower config.data.sft_eval_every or the batch')
  return iter(train), eval_batches, eval_texts


def tokenizer_data_config(data_config):
  """The data config a SentencePiece tokenizer is trained on for an SFT run (train_spm).

  The stdlib corpus, of which the built-in docstring task is made; give SFT data in files a
  tokenizer of its own (data.tokenizer='sentencepiece' or 'huggingface').
  """
  stdlib = ml_collections.ConfigDict(data_config.to_dict())
  stdlib.dataset = 'stdlib'
  return stdlib
