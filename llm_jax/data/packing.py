"""Packing tokenised documents into fixed-length training rows.

A document enters as [BOS, t1, ..., tn, EOS]. The documents of a stream are laid end to end and
cut into rows of seq_len + 1 tokens that overlap by one: row k holds stream tokens
[k * seq_len, (k + 1) * seq_len], `inputs` are its first seq_len tokens and `targets` its last
seq_len. So a document continued in the next row loses no target: every token after a BOS (the
EOS included) is a target exactly once in the stream. With `packing=False` a row holds one
document only (a long one still continues in the next rows) and is padded.

A row is a dict of [seq_len] arrays, the batch contract of the training loop:
  inputs int32, targets int32 (the next token), positions int32 (counted from the start of the
  document's part in this row: rotary attention sees only differences, so a continued part
  needs no offset, and positions stay below seq_len), segment_ids int32 (1, 2, ... per
  document part in the row, 0 = padding), loss_mask float32 (1 where targets[t] is the next
  token of inputs[t]'s document, 0 across a document boundary and on padding).
"""

import copy
import math
from typing import Sequence

import grain
import numpy as np

ROW_KEYS = ('inputs', 'targets', 'positions', 'segment_ids', 'loss_mask')


def make_row(pieces: Sequence[np.ndarray], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """One row from consecutive document pieces of at most seq_len + 1 tokens in all."""
  lengths = np.array([len(p) for p in pieces], np.int64)
  total = int(lengths.sum())
  if total > seq_len + 1:
    raise ValueError(f'{total} tokens do not fit a row of {seq_len} + 1')
  tokens = np.full(seq_len + 1, pad_id, np.int32)
  segments = np.zeros(seq_len + 1, np.int32)
  positions = np.zeros(seq_len + 1, np.int32)
  if total:
    tokens[:total] = np.concatenate(pieces)
    segments[:total] = np.repeat(np.arange(1, len(pieces) + 1, dtype=np.int32), lengths)
    starts = np.cumsum(lengths) - lengths
    positions[:total] = np.arange(total) - np.repeat(starts, lengths)
  same_document = (segments[:-1] == segments[1:]) & (segments[:-1] > 0)
  return {
      'inputs': tokens[:-1],
      'targets': tokens[1:],
      'positions': positions[:-1],
      'segment_ids': segments[:-1],
      'loss_mask': same_document.astype(np.float32),
  }


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """A row of padding only (loss_mask all 0), to fill up a last batch."""
  return make_row([], seq_len, pad_id)


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Rows (dicts of [seq_len] arrays) -> one dict of [rows, seq_len] arrays."""
  return {key: np.stack([row[key] for row in rows]) for key in ROW_KEYS}


def rows_needed(lengths: Sequence[int], seq_len: int, packing: bool) -> int:
  """How many rows documents of these token counts (BOS/EOS included) fill."""
  if packing:
    total = int(sum(lengths))
    return math.ceil((total - 1) / seq_len) if total > 1 else 0
  return sum(math.ceil((n - 1) / seq_len) for n in lengths if n > 1)


class RowPacker:
  """Cuts the documents of one grain iterator into rows; checkpointable.

  Its state is the parent's state from just before the first document still (partly) unused,
  plus how many of that document's tokens earlier rows consumed.
  """

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, packing: bool, pad_id: int):
    self._parent = parent
    self._seq_len, self._packing, self._pad_id = seq_len, packing, pad_id
    self._pending = []  # [tokens, start, parent state before tokens], in stream order
    self._resume_start = 0

  def _available(self) -> int:
    return sum(len(tokens) - start for tokens, start, _ in self._pending)

  def _fetch(self) -> bool:
    state = copy.deepcopy(self._parent.get_state())
    try:
      tokens = next(self._parent)
    except StopIteration:
      return False
    start, self._resume_start = self._resume_start, 0
    if len(tokens) > start:
      self._pending.append([np.asarray(tokens, np.int32), start, state])
    return True

  def _advance(self, count: int) -> None:
    while count and self._pending:
      remaining = len(self._pending[0][0]) - self._pending[0][1]
      if remaining <= count:
        self._pending.pop(0)
        count -= remaining
      else:
        self._pending[0][1] += count
        count = 0

  def next_row(self) -> dict[str, np.ndarray]:
    """The next row; StopIteration when a finite stream has no target left."""
    seq_len = self._seq_len
    if self._packing:
      while self._available() < seq_len + 1 and self._fetch():
        pass
    else:
      while not self._pending and self._fetch():
        pass
    if self._available() < 2:
      raise StopIteration
    if not self._packing:
      tokens, start, _ = self._pending[0]
      row = make_row([tokens[start:start + seq_len + 1]], seq_len, self._pad_id)
      if len(tokens) - start - seq_len >= 2:
        self._pending[0][1] += seq_len
      else:
        self._pending.pop(0)
      return row
    pieces, needed = [], seq_len + 1
    for tokens, start, _ in self._pending:
      piece = tokens[start:start + needed]
      pieces.append(piece)
      needed -= len(piece)
      if not needed:
        break
    self._advance(seq_len)
    return make_row(pieces, seq_len, self._pad_id)

  def get_state(self) -> dict:
    if self._pending:
      _, start, parent_state = self._pending[0]
      return {'parent': copy.deepcopy(parent_state), 'start': int(start)}
    return {'parent': copy.deepcopy(self._parent.get_state()), 'start': self._resume_start}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(copy.deepcopy(state['parent']))
    self._pending = []
    self._resume_start = int(state['start'])


class PackedBatchIterDataset(grain.IterDataset):
  """Batches whose row b comes from the b-th of `streams`, each a stream of token arrays.

  With streams reading disjoint slices of one shuffled document order, a batch mixes as many
  documents as it has rows, instead of holding consecutive rows of one long document.
  """

  def __init__(self, streams: Sequence[grain.IterDataset], seq_len: int, packing: bool,
               pad_id: int):
    super().__init__(list(streams))
    self._seq_len, self._packing, self._pad_id = seq_len, packing, pad_id

  def __iter__(self) -> '_PackedBatchIterator':
    return _PackedBatchIterator([iter(stream) for stream in self.parents], self._seq_len,
                                self._packing, self._pad_id)

  def __str__(self) -> str:
    return (f'PackedBatchIterDataset(rows={len(self.parents)}, seq_len={self._seq_len}, '
            f'packing={self._packing})')


class _PackedBatchIterator(grain.DatasetIterator):
  """Iterator of PackedBatchIterDataset; its state is one RowPacker state per row."""

  def __init__(self, parents: Sequence[grain.DatasetIterator], seq_len: int, packing: bool,
               pad_id: int):
    super().__init__(list(parents))
    self._packers = [RowPacker(p, seq_len, packing, pad_id) for p in parents]

  def __next__(self) -> dict[str, np.ndarray]:
    return stack_rows([packer.next_row() for packer in self._packers])

  def get_state(self) -> dict:
    return {'rows': [packer.get_state() for packer in self._packers]}

  def set_state(self, state: dict) -> None:
    if len(state['rows']) != len(self._packers):
      raise ValueError(f'the iterator state holds {len(state["rows"])} row streams, but this '
                       f'iterator has {len(self._packers)} (local batch size changed?)')
    for packer, packer_state in zip(self._packers, state['rows']):
      packer.set_state(packer_state)


def pack_documents(documents: Sequence[np.ndarray], seq_len: int, packing: bool,
                   pad_id: int) -> dict[str, np.ndarray]:
  """All rows of a finite list of tokenised documents, in order, as [rows, seq_len] arrays."""
  stream = grain.MapDataset.source(list(documents)).to_iter_dataset(
      grain.ReadOptions(num_threads=0))
  packer = RowPacker(iter(stream), seq_len, packing, pad_id)
  rows = []
  while True:
    try:
      rows.append(packer.next_row())
    except StopIteration:
      break
  if not rows:
    return {key: value[:0] for key, value in stack_rows([empty_row(seq_len, pad_id)]).items()}
  return stack_rows(rows)
