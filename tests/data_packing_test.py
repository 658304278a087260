"""Packing: every document token is a target exactly once, and a packed row's logits equal each
document's logits computed alone."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from llm_jax import model as model_lib
from llm_jax.data import packing

BOS, EOS, PAD = 1, 2, 0


def _documents(rng, count, max_len, vocab=50):
  """Token arrays [BOS, ..., EOS] with distinct inner tokens (>= 3) and varied lengths."""
  return [np.concatenate([[BOS], rng.integers(3, vocab, rng.integers(0, max_len)), [EOS]])
          .astype(np.int32) for _ in range(count)]


def _scored_pairs(rows):
  """(input, target) pairs with loss_mask 1, in stream order."""
  mask = rows['loss_mask'].astype(bool)
  return list(zip(rows['inputs'][mask].tolist(), rows['targets'][mask].tolist()))


@pytest.mark.parametrize('use_packing', [True, False])
def test_every_document_token_is_a_target_exactly_once(use_packing):
  rng = np.random.default_rng(0)
  seq_len = 16
  documents = _documents(rng, 40, 3 * seq_len)  # some span several rows
  rows = packing.pack_documents(documents, seq_len, use_packing, PAD)
  expected = [pair for doc in documents for pair in zip(doc[:-1].tolist(), doc[1:].tolist())]
  assert _scored_pairs(rows) == expected
  assert rows['inputs'].shape[1] == seq_len
  lengths = [len(d) for d in documents]
  assert len(rows['inputs']) == packing.rows_needed(lengths, seq_len, use_packing)
  if not use_packing:
    assert rows['segment_ids'].max() == 1  # one document (part) per row
  # Padding is segment 0, never scored; within a segment positions count up from 0.
  padding = rows['segment_ids'] == 0
  assert not rows['loss_mask'][padding].any()
  for row in range(len(rows['inputs'])):
    for segment in set(rows['segment_ids'][row].tolist()) - {0}:
      positions = rows['positions'][row][rows['segment_ids'][row] == segment]
      np.testing.assert_array_equal(positions, np.arange(len(positions)))


def test_row_layout_matches_the_batch_contract():
  row = packing.make_row([np.int32([BOS, 5, 6, EOS]), np.int32([BOS, 7])], 7, PAD)
  np.testing.assert_array_equal(row['inputs'], [BOS, 5, 6, EOS, BOS, 7, PAD])
  np.testing.assert_array_equal(row['targets'], [5, 6, EOS, BOS, 7, PAD, PAD])
  np.testing.assert_array_equal(row['segment_ids'], [1, 1, 1, 1, 2, 2, 0])
  np.testing.assert_array_equal(row['positions'], [0, 1, 2, 3, 0, 1, 0])
  np.testing.assert_array_equal(row['loss_mask'], [1, 1, 1, 0, 1, 0, 0])
  assert {k: v.dtype for k, v in row.items()} == {
      'inputs': np.int32, 'targets': np.int32, 'positions': np.int32,
      'segment_ids': np.int32, 'loss_mask': np.float32}


def test_packed_row_logits_equal_each_document_alone():
  config = model_lib.get_preset('tiny', vocab_size=64, num_layers=2, embed_dim=64, mlp_dim=128,
                                num_heads=4, num_kv_heads=2, head_dim=16)
  transformer = model_lib.Transformer(config)
  seq_len = 24
  rng = np.random.default_rng(1)
  long_document = np.concatenate([[BOS], rng.integers(3, config.vocab_size, 40), [EOS]])
  documents = _documents(rng, 5, 20, config.vocab_size) + [long_document.astype(np.int32)]
  rows = packing.pack_documents(documents, seq_len, True, PAD)
  # Random weights from the parameter shapes: no init compile, which dominates this test.
  shapes = nn.unbox(model_lib.abstract_params(config))
  params = {'params': jax.tree.map(
      lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), shapes)}
  packed = jax.jit(transformer.apply)(params, rows['inputs'], positions=rows['positions'],
                                      segment_ids=rows['segment_ids'])
  # Each document (or the part of one in a row) alone, left-aligned in its own padded row:
  # causal attention keeps the padding after it from changing its logits.
  parts = [(r, rows['segment_ids'][r] == s) for r in range(len(rows['inputs']))
           for s in set(rows['segment_ids'][r].tolist()) - {0}]
  alone_tokens = np.zeros((len(parts), seq_len), np.int32)
  for i, (r, where) in enumerate(parts):
    alone_tokens[i, :where.sum()] = rows['inputs'][r][where]
  alone = jax.jit(transformer.apply)(params, alone_tokens)
  for i, (r, where) in enumerate(parts):
    np.testing.assert_allclose(packed[r][where], alone[i, :where.sum()], atol=2e-5, rtol=2e-5)
  assert len(parts) > len(documents)  # the long document's continuation was checked too
