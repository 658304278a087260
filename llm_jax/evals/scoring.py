"""Log-likelihood scoring of token sequences: continuations given contexts, and long documents.

`Scorer.loglikelihood` returns, per (context, continuation) pair of token-id lists, the summed
log-probability of the continuation and whether greedy decoding would have produced it (every
continuation token is the argmax of its logits). It follows lm-evaluation-harness's causal
convention: the model reads `(context + continuation)[-(max_len + 1):][:-1]`, so a pair longer
than the model keeps its rightmost tokens.

`Scorer.loglikelihood_rolling` scores a whole document that may be longer than the model: it is
cut into windows as lm-eval's `get_rolling_token_windows` + `make_disjoint_window` define them
(context_len=1): the first window predicts up to `max_len` tokens after a prefix token, each
later window predicts the next `max_len` tokens with the preceding tokens as context, and the
last window keeps a full `max_len` context while predicting only what is left. Every token is
predicted exactly once; the document's log-likelihood is the sum over its windows.

Requests are sorted by length and scored in batches of `batch_size` rows, one request per row,
right-padded; padding tokens form their own segment (`segment_ids` 0), so they never touch a
real token. Batch and length are rounded up to powers of two (the batch to a multiple of the
mesh's batch shards), so a whole evaluation compiles a handful of programs. Parameters and
inputs are laid out by the logical-axis rules of `llm_jax.sharding` on any mesh; inputs are
built with `jax.make_array_from_callback`, so on a mesh spanning processes every process must
pass the same requests (as lm-eval does when it runs in one process per host with the same
task list) and receives every result.
"""

import dataclasses
import functools
from typing import Optional, Sequence

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm_jax import sharding
from llm_jax.model import config as config_lib
from llm_jax.model import transformer

_MIN_LENGTH_BUCKET = 16
Pair = tuple[Sequence[int], Sequence[int]]


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_len: int) -> list[Pair]:
  """Disjoint (context, continuation) windows covering `tokens`, as lm-eval defines them.

  Equals `map(make_disjoint_window, get_rolling_token_windows(tokens, prefix_id, max_len, 1))`
  of `lm_eval.utils`: scoring each continuation after its context predicts every token once.
  """
  tokens = list(tokens)
  if max_len < 1:
    raise ValueError(f'max_len={max_len}; expected a positive integer')
  windows = []
  if not tokens:
    return windows
  first = min(max_len, len(tokens))
  windows.append(([prefix_id], tokens[:first]))
  predicted = first
  while predicted < len(tokens):
    num_pred = min(len(tokens) - predicted, max_len)
    end = predicted + num_pred
    inputs = tokens[max(0, end - max_len - 1):end - 1]
    windows.append((inputs[:len(inputs) - (num_pred - 1)], tokens[end - num_pred:end]))
    predicted = end
  return windows


def _round_up_pow2(n: int, minimum: int) -> int:
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _strip_boxes(tree):
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def _place(value, target: NamedSharding):
  """Puts a host or device array on `target`; host arrays via a callback (multi-process safe)."""
  if isinstance(value, jax.Array):
    return jax.device_put(value, target)
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, target, lambda index: value[index])


def _score_rows(params, tokens, targets, weights, segment_ids, *, config):
  """Per row: summed log-probability of the weighted targets, and whether all are argmax."""
  logits = transformer.Transformer(config).apply({'params': params}, tokens,
                                                 segment_ids=segment_ids)  # [B, T, V]
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  target_logprobs = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
  is_argmax = jnp.argmax(logits, axis=-1) == targets
  scored = weights > 0
  return (jnp.sum(jnp.where(scored, target_logprobs, 0.0), axis=-1),
          jnp.all(is_argmax | ~scored, axis=-1))


@dataclasses.dataclass(frozen=True)
class _Layout:
  mesh: Mesh
  rules: tuple


@functools.lru_cache(maxsize=16)
def _program(config: config_lib.ModelConfig, layout: _Layout):
  """The compiled scorer for one (config, mesh, rules); jit keys its shapes itself."""
  param_shardings = sharding.tree_shardings(transformer.abstract_params(config), layout.mesh,
                                            layout.rules)
  batch = NamedSharding(layout.mesh, sharding.logical_to_spec(
      ('act_batch', 'act_seq'), (sharding.logical_axis_size('act_batch', layout.mesh,
                                                            layout.rules), 1),
      layout.mesh, layout.rules))
  replicated = NamedSharding(layout.mesh, PartitionSpec())
  program = jax.jit(functools.partial(_score_rows, config=config),
                    in_shardings=(_strip_boxes(param_shardings),) + (batch,) * 4,
                    out_shardings=(replicated, replicated))
  return program, _strip_boxes(param_shardings), batch


def _freeze_rules(rules) -> tuple:
  rules = sharding.DEFAULT_RULES if rules is None else rules
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


class Scorer:
  """Scores token sequences with one model; parameters are placed on the mesh once.

  Args:
    config: the model's ModelConfig.
    params: its parameter tree (numpy or jax arrays, boxed or not).
    mesh: device mesh; default one device.
    rules: logical-axis rules; default `sharding.DEFAULT_RULES`.
    batch_size: requests per compiled call (rounded up to a power of two and to the mesh's
      batch shards).
    max_len: the longest input the model reads; default `config.max_seq_len`.
  """

  def __init__(self, config: config_lib.ModelConfig, params, *, mesh: Optional[Mesh] = None,
               rules=None, batch_size: int = 8, max_len: Optional[int] = None):
    if mesh is None:
      mesh = sharding.create_mesh((1, 1, 1), devices=jax.devices()[:1])
    self.config = config
    self.layout = _Layout(mesh, _freeze_rules(rules))
    self.max_len = config.max_seq_len if max_len is None else int(max_len)
    if not 1 <= self.max_len <= config.max_seq_len:
      raise ValueError(f'max_len={max_len}; expected 1..{config.max_seq_len} (max_seq_len)')
    shards = sharding.logical_axis_size('act_batch', mesh, self.layout.rules)
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size}; expected a positive integer')
    self.batch_size = -(-_round_up_pow2(batch_size, 1) // shards) * shards
    self._program, param_shardings, self._batch_sharding = _program(config, self.layout)
    params = _strip_boxes(flax.core.unfreeze(params))
    try:
      self.params = jax.tree.map(_place, params, param_shardings)
    except ValueError as e:
      raise ValueError(f'params do not match the model config: {e}') from e

  def _check(self, index: int, context: Sequence[int], continuation: Sequence[int]):
    if len(context) == 0 or len(continuation) == 0:
      raise ValueError(f'request {index}: context and continuation need at least one token each '
                       f'(got {len(context)} and {len(continuation)})')
    if len(continuation) > self.max_len:
      raise ValueError(f'request {index}: continuation of {len(continuation)} tokens is longer '
                       f'than max_len={self.max_len}')
    ids = np.asarray(list(context) + list(continuation))
    outside = (ids < 0) | (ids >= self.config.vocab_size)
    if outside.any():
      raise ValueError(f'request {index}: token id {ids[np.argmax(outside)]} is outside the '
                       f'vocabulary [0, {self.config.vocab_size})')

  def _rows(self, pairs: Sequence[Pair]):
    """(tokens, targets, weights, segment_ids) arrays of one batch, padded to its bucket."""
    sequences = [(list(c) + list(x))[-(self.max_len + 1):] for c, x in pairs]
    length = min(_round_up_pow2(max(len(s) - 1 for s in sequences), _MIN_LENGTH_BUCKET),
                 self.max_len)
    shape = (self.batch_size, length)
    tokens, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    weights, segments = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    for row, (sequence, (_, continuation)) in enumerate(zip(sequences, pairs)):
      n = len(sequence) - 1
      tokens[row, :n], targets[row, :n], segments[row, :n] = sequence[:-1], sequence[1:], 1
      weights[row, n - len(continuation):n] = 1
    return tokens, targets, weights, segments

  def loglikelihood(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
    """(log P(continuation | context), is_greedy) for each (context ids, continuation ids)."""
    for i, (context, continuation) in enumerate(pairs):
      self._check(i, context, continuation)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results = [None] * len(pairs)
    with sharding.activate(self.layout.mesh, self.layout.rules):
      for start in range(0, len(order), self.batch_size):
        chunk = order[start:start + self.batch_size]
        arrays = [_place(a, self._batch_sharding) for a in self._rows([pairs[i] for i in chunk])]
        sums, greedy = jax.device_get(self._program(self.params, *arrays))
        for row, i in enumerate(chunk):
          results[i] = (float(sums[row]), bool(greedy[row]))
    return results

  def loglikelihood_rolling(self, documents: Sequence[Sequence[int]],
                            prefix_id: int) -> list[float]:
    """Log-likelihood of each whole document (token ids), conditioned on `prefix_id`."""
    windows, owners = [], []
    for i, document in enumerate(documents):
      for window in rolling_windows(document, prefix_id, self.max_len):
        windows.append(window)
        owners.append(i)
    totals = [0.0] * len(documents)
    for owner, (logprob, _) in zip(owners, self.loglikelihood(windows) if windows else []):
      totals[owner] += logprob
    return totals


def loglikelihoods(config: config_lib.ModelConfig, params, pairs: Sequence[Pair],
                   **scorer_kwargs) -> list[tuple[float, bool]]:
  """One-off `Scorer(config, params, **scorer_kwargs).loglikelihood(pairs)`."""
  return Scorer(config, params, **scorer_kwargs).loglikelihood(pairs)
