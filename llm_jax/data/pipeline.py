"""The input pipeline the training loop calls: tokenizer, training batches, evaluation batches.

Training: the train split's documents are shuffled with a seed (reshuffled every epoch, epochs
repeat forever), tokenised (BOS + text + EOS) and packed into rows (see packing.py). Row b of
every global batch comes from its own packed stream (documents b, b + B, ... of the shuffled
order), so a batch mixes B documents; a process reads and packs only the streams of its own
rows, so the global batch does not depend on the number of processes. A background thread (or grain worker processes,
`config.data.num_workers`) prepares batches while the model trains.

The iterator's `get_state()` is a JSON-serialisable dict (ints, lists, dicts); `set_state()`
restores it and the identical batch sequence follows. Each process has its own state (its own
rows), saved and restored per process by the checkpoint. The state does not depend on the
number of devices, only on the process's rows, seq_len, packing, the seeds and num_workers
(with worker processes it holds one state per worker).

Evaluation: every process reads the validation split in its stored order, packs whole
documents into global batches and keeps its rows of each, so all processes run the same number
of evaluation steps. The texts returned are exactly the documents whose tokens (after BOS, up
to and including EOS) the batches score, the same list on every process.
"""

import math
import os
from typing import Any, Iterator, Optional

from absl import flags
from absl import logging
from etils import epath
import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from llm_jax import sharding as sharding_lib
from llm_jax.data import packing as packing_lib
from llm_jax.data import sources
from llm_jax.data import tokenizer as tokenizer_lib

Batch = dict[str, np.ndarray]
TOKENIZER_FILENAME = 'tokenizer.model'
_PREFETCH_BATCHES = 8
# Evaluation skips documents that do not fit in the rows left; after this many in a row it
# stops looking, so a huge validation split is not read to fill a small remainder.
_MAX_SKIPPED_EVAL_DOCUMENTS = 64


def tokenize_document(tokenizer: tokenizer_lib.Tokenizer, text: str) -> np.ndarray:
  """[BOS] + encode(text) + [EOS] as an int32 array."""
  encode_array = getattr(tokenizer, 'encode_array', None)
  ids = encode_array(text) if encode_array else np.asarray(tokenizer.encode(text), np.int32)
  return np.concatenate([np.int32([tokenizer.bos_id]), ids, np.int32([tokenizer.eos_id])])


class _Tokenize:
  """grain map: an example of the source -> its tokenised text (picklable for workers)."""

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer, text_feature: str):
    self._tokenizer, self._text_feature = tokenizer, text_feature

  def __call__(self, example: Any) -> np.ndarray:
    return tokenize_document(self._tokenizer, sources.document_text(example, self._text_feature))


def _training_texts(data_config, num_bytes: int) -> Iterator[str]:
  """The first documents of the train split (stored in hashed, i.e. mixed, order) up to
  `num_bytes` of UTF-8: the same on every host, whatever its shard."""
  source = sources.open_split(data_config, data_config.train_split)
  total = 0
  for index in range(len(source)):
    if total >= num_bytes:
      break
    text = sources.document_text(source[index], sources.text_feature(data_config))
    total += len(text.encode('utf-8'))
    yield text


def _trained_tokenizer(data_config, path: str, model_vocab_size: int):
  """Loads the run's SentencePiece model, training it first (on process 0) if it is missing."""
  exists = epath.Path(path).exists()
  if jax.process_count() > 1:  # process 0's view decides, so no process waits alone
    exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
  if exists:
    return tokenizer_lib.load_tokenizer(path, 'sentencepiece')
  tokenizer = None
  if jax.process_index() == 0:
    texts = list(_training_texts(data_config, data_config.tokenizer_train_bytes))
    num_bytes = sum(len(text.encode('utf-8')) for text in texts)
    logging.info('Training a %d-piece SentencePiece model on %d bytes (%d documents) of %s '
                 'text%s', model_vocab_size, num_bytes, len(texts), data_config.dataset,
                 ', the whole train split' if num_bytes < data_config.tokenizer_train_bytes
                 else '')
    tokenizer = tokenizer_lib.train_sentencepiece(texts, model_vocab_size, path)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('llm_jax: tokenizer written')
  return tokenizer or tokenizer_lib.load_tokenizer(path, 'sentencepiece')


def get_tokenizer(data_config, workdir: str, model_vocab_size: int) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer, checked to fit the model's vocabulary.

  `config.data.tokenizer`: 'train_spm' loads `<workdir>/tokenizer.model` (or
  `config.data.tokenizer_path`) if it exists, else trains a SentencePiece BPE model with
  `model_vocab_size` pieces on `config.data.tokenizer_train_bytes` of training text and stores it
  there, so a resumed run reuses it. 'sentencepiece' / 'huggingface' load
  `config.data.tokenizer_path` (a .model file / a tokenizer.json or its directory).

  Args:
    data_config: the `data` section of the config.
    workdir: the run's directory.
    model_vocab_size: the model's embedding rows; every token id must be below it.

  Returns:
    The tokenizer.
  """
  kind = data_config.tokenizer
  if kind == 'train_spm':
    if not data_config.tokenizer_path and not workdir:
      raise ValueError('tokenizer=train_spm needs a workdir or config.data.tokenizer_path')
    path = data_config.tokenizer_path or os.fspath(epath.Path(workdir) / TOKENIZER_FILENAME)
    tokenizer = _trained_tokenizer(data_config, path, model_vocab_size)
  elif kind in ('sentencepiece', 'huggingface'):
    tokenizer = tokenizer_lib.load_tokenizer(data_config.tokenizer_path, kind)
  else:
    raise ValueError(f'unknown config.data.tokenizer={kind!r}; expected train_spm, '
                     'sentencepiece or huggingface')
  tokenizer_lib.check_vocab_fits(tokenizer, model_vocab_size)
  return tokenizer


def _local_batch_size(global_batch_size: int, process_count: int, key: str) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'config.data.{key}={global_batch_size} must be a positive multiple of '
                     f'the {process_count} processes')
  return global_batch_size // process_count


def _shuffle_seed(seed: int, shuffle_seed: int) -> int:
  """Mixes the run's seed with config.data.shuffle_seed (which varies the data order alone)."""
  return int(np.random.SeedSequence([seed, shuffle_seed]).generate_state(1)[0])


def make_train_iterator(data_config, tokenizer: tokenizer_lib.Tokenizer, *, seed: int,
                        process_index: int = 0, process_count: int = 1):
  """An endless, checkpointable iterator of this process's training batches.

  Args:
    data_config: the `data` section of the config.
    tokenizer: from `get_tokenizer`.
    seed: the run's seed (mixed with config.data.shuffle_seed for the document order).
    process_index: this process (jax.process_index()).
    process_count: all processes (jax.process_count()).

  Returns:
    A grain DatasetIterator of batches (dicts of [global_batch_size // process_count, seq_len]
    numpy arrays, see packing.py) with get_state() -> dict and set_state(dict).
  """
  local_batch = _local_batch_size(data_config.global_batch_size, process_count,
                                  'global_batch_size')
  source = sources.open_split(data_config, data_config.train_split)
  if not len(source):
    raise ValueError(f'split {data_config.train_split!r} has no training documents')
  documents = grain.MapDataset.source(source).shuffle(
      seed=_shuffle_seed(seed, data_config.shuffle_seed))
  tokenize = _Tokenize(tokenizer, sources.text_feature(data_config))
  documents = documents.repeat(None).map(tokenize)
  # Row r of the global batch packs documents r, r + B, r + 2B, ... of the shuffled order, and
  # this process owns rows [process_index * local_batch, ...): each process reads only its own
  # documents, and the global batch is the same whatever the number of processes.
  # Reading and tokenising run in the prefetch thread or worker processes, not in threads of
  # their own: the work holds the GIL, so more threads would only add switching.
  first_row = process_index * local_batch
  streams = [documents[row::data_config.global_batch_size].to_iter_dataset(
      grain.ReadOptions(num_threads=0)) for row in range(first_row, first_row + local_batch)]
  batches = packing_lib.PackedBatchIterDataset(streams, data_config.seq_len,
                                               data_config.packing, tokenizer.pad_id)
  if data_config.num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain's worker processes read its absl flags; outside an absl app (notebooks, tests)
      # they keep their defaults.
      flags.FLAGS.mark_as_parsed()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_config.num_workers, per_worker_buffer_size=_PREFETCH_BATCHES))
  else:
    batches = grain.experimental.ThreadPrefetchIterDataset(
        batches, prefetch_buffer_size=_PREFETCH_BATCHES)
  return iter(batches)


def _eval_documents(data_config, tokenizer, capacity_rows: Optional[int]):
  """(texts, token arrays) of the whole validation documents that fit in `capacity_rows`."""
  source = sources.open_split(data_config, data_config.eval_split)
  seq_len, packing = data_config.seq_len, data_config.packing
  texts, documents, skipped, skipped_in_a_row = [], [], 0, 0
  total_tokens = used_rows = 0
  for index in range(len(source)):
    text = sources.document_text(source[index], sources.text_feature(data_config))
    tokens = tokenize_document(tokenizer, text)
    if packing:
      rows = packing_lib.rows_needed([total_tokens + len(tokens)], seq_len, True)
    else:
      rows = used_rows + packing_lib.rows_needed([len(tokens)], seq_len, False)
    if capacity_rows is not None and rows > capacity_rows:
      skipped += 1
      skipped_in_a_row += 1
      if skipped_in_a_row >= _MAX_SKIPPED_EVAL_DOCUMENTS:
        break
      continue
    skipped_in_a_row = 0
    texts.append(text)
    documents.append(tokens)
    total_tokens += len(tokens)
    used_rows = rows
    # Full: less than one row of input positions left (packing), or no row left.
    if capacity_rows is not None and (
        capacity_rows * seq_len - (total_tokens - 1) < seq_len if packing
        else used_rows >= capacity_rows):
      break
  if skipped:
    logging.info('Evaluation: %d validation documents did not fit in the %s rows left',
                 skipped, capacity_rows)
  if not documents:
    raise ValueError(f'no document of split {data_config.eval_split!r} fits in {capacity_rows}'
                     ' evaluation rows (or the split is empty); raise eval.num_batches or use 0 '
                     'for the whole split')
  return texts, documents


def make_eval_batches(data_config, tokenizer: tokenizer_lib.Tokenizer, *, num_batches: int,
                      process_index: int = 0,
                      process_count: int = 1) -> tuple[list[Batch], list[str]]:
  """Deterministic evaluation batches and the exact texts they score.

  Whole documents are taken in the split's order; one that does not fit in the rows left is
  skipped. Every process gets the same number of batches (its rows of each global batch of
  config.data.eval_batch_size) and the same texts.

  Args:
    data_config: the `data` section of the config.
    tokenizer: from `get_tokenizer`.
    num_batches: at most this many batches; 0 = the whole split.
    process_index: this process.
    process_count: all processes.

  Returns:
    (batches, texts): batches as in training, [eval_batch_size // process_count, seq_len] each
    (the last padded with loss_mask 0); texts, the documents whose tokens after BOS (EOS
    included) are exactly the tokens with loss_mask 1.
  """
  global_batch = data_config.eval_batch_size
  local_batch = _local_batch_size(global_batch, process_count, 'eval_batch_size')
  capacity = num_batches * global_batch if num_batches > 0 else None
  texts, documents = _eval_documents(data_config, tokenizer, capacity)
  rows = packing_lib.pack_documents(documents, data_config.seq_len, data_config.packing,
                                    tokenizer.pad_id)
  count = math.ceil(len(rows['inputs']) / global_batch)
  padding = count * global_batch - len(rows['inputs'])
  if padding:
    empty = packing_lib.stack_rows([packing_lib.empty_row(data_config.seq_len,
                                                          tokenizer.pad_id)] * padding)
    rows = {key: np.concatenate([rows[key], empty[key]]) for key in rows}
  batches = []
  for i in range(count):
    start = i * global_batch + process_index * local_batch
    batches.append({key: value[start:start + local_batch] for key, value in rows.items()})
  return batches, texts


# Documents tokenised to estimate the train split's size in tokens (its first ones, which the
# builders store in hashed, i.e. mixed, order).
_SIZE_SAMPLE_DOCUMENTS = 256


def corpus_epochs(data_config, tokenizer: tokenizer_lib.Tokenizer, num_steps: int) -> float:
  """How many times a run of `num_steps` reads its train split; warns above once.

  A run that repeats a small corpus memorises it: the training loss keeps falling while the
  evaluation loss turns up. With packing the run reads global_batch_size x seq_len tokens a
  step, compared with the split's tokens (estimated from its first documents); without, one
  document per row.

  Args:
    data_config: the `data` section of the config.
    tokenizer: from `get_tokenizer`.
    num_steps: the run's training steps.

  Returns:
    The number of epochs (passes over the train split) the run makes.
  """
  source = sources.open_split(data_config, data_config.train_split)
  num_documents = len(source)
  sample = [len(tokenize_document(tokenizer, sources.document_text(
      source[i], sources.text_feature(data_config))))
            for i in range(min(num_documents, _SIZE_SAMPLE_DOCUMENTS))]
  batch, seq_len = data_config.global_batch_size, data_config.seq_len
  if data_config.packing:
    corpus = num_documents * float(np.mean(sample)) if sample else 0.0
    epochs = num_steps * batch * seq_len / max(corpus, 1.0)
    reads = f'{num_steps * batch * seq_len:,} tokens ({batch} x {seq_len} x {num_steps} steps)'
  else:
    corpus = num_documents
    epochs = num_steps * batch / max(num_documents, 1)
    reads = f'{num_steps * batch:,} documents ({batch} x {num_steps} steps, packing off)'
  size = f'{num_documents:,} documents'
  if data_config.packing:
    approximate = '' if len(sample) == num_documents else 'about '
    size = f'{approximate}{corpus:,.0f} tokens in {size}'
  if epochs > 1:
    logging.warning('The corpus is small for this run: it reads %s, %.1f times its train split '
                    'of %s. Expect it to overfit: add text, or lower train.num_steps or '
                    'data.global_batch_size.', reads, epochs, size)
  return epochs


def to_global_batch(batch: Batch, mesh: jax.sharding.Mesh, rules) -> dict[str, jax.Array]:
  """Assembles each process's local batch into global jax Arrays split over 'act_batch'.

  Args:
    batch: this process's rows, arrays of [local_batch, ...].
    mesh: the device mesh.
    rules: the logical-axis rules (config.mesh.rules).

  Returns:
    The same keys, as jax Arrays of [local_batch * process_count, ...].
  """
  devices_per_row_split = sharding_lib.logical_axis_size('act_batch', mesh, rules)
  result = {}
  for key, local in batch.items():
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    if global_shape[0] % devices_per_row_split:
      raise ValueError(f'the global batch of {global_shape[0]} rows ({key!r}) does not split '
                       f'over the {devices_per_row_split} devices of its mesh axes')
    logical_axes = ('act_batch', 'act_seq')[:local.ndim] + (None,) * (local.ndim - 2)
    sharding = sharding_lib.logical_sharding(logical_axes, global_shape, mesh, rules)
    result[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
  return result
