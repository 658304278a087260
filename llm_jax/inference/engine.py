"""A continuous-batching engine: many requests share B decode slots and one compiled step.

    engine = Engine(config, params, num_slots=32, tokenizer=tokenizer)
    engine.start()
    request = engine.submit(prompt_ids, SamplingParams(max_tokens=64), on_output)
    ...
    engine.shutdown()

One thread (the engine's own) owns the device. Between two decode steps it admits waiting
requests into free slots, all at once, and prefills them together: each prefill call writes
one chunk of each of up to P requests straight into their slots' cache rows, reading the
weights once for all of them (`slots.prefill_rows`). It then drops cancelled requests,
launches one compiled step over all B slots (`slots.decode_slots`) and hands every active
request its new token. Requests thus join
and leave at every step; nothing waits for a batch to finish. Outputs reach the caller through
its `on_output` callback, called on the engine thread: it must return quickly (the HTTP server
only moves the Output to its event loop).

The host never waits for a step before launching the next one: a step's tokens stay on the
device and feed the next step directly, and the host hands them out while that next step
runs (unless `overlap_host=False`). The step attends only to the first W cache positions, W
the smallest window (64, 128, 192, 256, 384, ... or max_len) that holds every active
sequence, and runs only the first R slots (R the whole count, or a half or quarter of it, at
least 8) that hold every active one (a request takes the lowest free slot): its cost follows
the longest live sequence rather than max_len, and the number of live requests rather than
the slot count.

Each slot samples with its own parameters and PRNG seed, and its tokens go only to the request
that holds the slot: a request's tokens are read from its slot's row and its row is reset by
the first chunk of the next request's prefill. Prompts of at most `chunk_size` tokens are
packed, whole, one after another into one row of a prefill call (up to `chunk_size` tokens
and `_MAX_PACKED` prompts a call, the row padded to 16, 32, 64, 96, 128, 192, ... tokens),
each attending to itself only. A longer prompt is cut into chunks by its own length alone
(the largest of a few powers of two up to `chunk_size` that the rest of the prompt fills),
one chunk a call, each attending to the slot's cache before it.
The prefill programs compile once per row length (packed) or chunk size and window (two), the
decode step once per window and slot count, all before the first request; per-request
parameters are runtime values.
"""

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import model as model_lib
from llm_jax import sharding
from llm_jax.inference import decode
from llm_jax.inference import slots as slots_lib
from llm_jax.inference.requests import (Output, QueueFullError, SamplingParams,
                                        ShuttingDownError, TextTracker)

__all__ = ['Engine', 'Output', 'QueueFullError', 'Request', 'SamplingParams',
           'ShuttingDownError']

_MIN_CHUNK = 16
_MIN_WINDOW = 64
# Most prompts packed into one prefill call (a static size of the packed programs).
_MAX_PACKED = 16
# A prefill chunk attends to the first _PREFILL_WINDOW positions of its slot's cache when its
# prompt fits there, to the whole cache otherwise.
_PREFILL_WINDOW = 256
# pylint: disable=protected-access  (the engine shares decode.py's layout and placement helpers)


@dataclasses.dataclass(eq=False)
class Request:
  """One request's host-side bookkeeping (fields after `on_output` belong to the engine)."""
  id: int
  prompt: np.ndarray  # [P] int32
  params: SamplingParams
  on_output: Callable[[Output], None]
  tracker: TextTracker
  submitted: float
  cancelled: bool = False
  slot: Optional[int] = None
  prefilled: int = 0  # prompt tokens already in the slot's cache
  num_new: int = 0
  first_token_time: Optional[float] = None
  finished: bool = False


@dataclasses.dataclass(frozen=True)
class _Step:
  """A dispatched decode step: its drawn arrays (on the device) and which requests it fed."""
  drawn: tuple  # (tokens [B], logprobs [B], top ids [B, 5], top logprobs [B, 5])
  active: np.ndarray  # [B] bool
  requests: list  # the request in each slot at launch (None: free)


def _size_ladder(low: int, high: int, fine_from: int) -> list:
  """Static sizes from `low` (a power of two) to `high` (included): powers of two, and from
  `fine_from` (at least 2) on also the sizes halfway between them (with 64: 64, 96, 128, 192,
  256, 384, ...). A call pads its work up to the next size: fewer sizes mean fewer programs to
  compile (all before the first request), finer ones less padding where the work is large
  enough for it to matter."""
  sizes = [min(low, high)]
  while sizes[-1] < high:
    size = sizes[-1]
    power = 1 << (size.bit_length() - 1)
    step = power // 2 if size >= fine_from else size
    sizes.append(min(size + step, high))
  return sizes


def _row_counts(num_slots: int, multiple: int) -> list:
  """Slot counts of the decode programs: num_slots, and its halves down to 8 (or a quarter),
  each a multiple of the mesh's data axes."""
  counts = [num_slots]
  while counts[-1] % 2 == 0 and counts[-1] // 2 >= max(8, num_slots // 4):
    counts.append(counts[-1] // 2)
  return sorted(c for c in counts if c % multiple == 0)


def _chunk_sizes(chunk_size: int) -> list:
  sizes = [_MIN_CHUNK]
  while sizes[-1] < chunk_size:
    sizes.append(min(sizes[-1] * 2, chunk_size))
  return sizes


def _prefill_windows(chunk: int, windows: list) -> list:
  """The attention windows of prefill calls with `chunk`-token chunks: the smallest decode
  window that holds _PREFILL_WINDOW positions (or the chunk), and the whole cache."""
  base = next((w for w in windows if w >= max(chunk, _PREFILL_WINDOW)), windows[-1])
  return sorted({base, windows[-1]})


class Engine:
  """Continuous batching over `num_slots` decode slots; see the module docstring.

  Args:
    config: the model's ModelConfig.
    params: its parameters (boxed or not, stacked or unrolled as the config says).
    num_slots: B, requests decoded together.
    max_len: cache length S per slot (prompt + new tokens); default config.max_seq_len.
    max_queue: requests that may wait for a slot; more get QueueFullError.
    chunk_size: prompt tokens per prefill call.
    tokenizer: turns tokens into text (and enables stop strings); ids it cannot decode are
      never generated.
    overlap_host: whether the host hands out a step's tokens while the next step runs (the
      default) or waits for each step first (on a CPU, whose cores the host's work shares
      with the step, that can be faster for a model whose step is long).
    mesh, rules, cache_dtype, unroll_layers: as in `decode.generate`.
  """

  def __init__(self, config: model_lib.ModelConfig, params, *, num_slots: int = 8,
               max_len: Optional[int] = None, max_queue: int = 64, chunk_size: int = 256,
               tokenizer=None, mesh=None, rules=None, cache_dtype=None,
               unroll_layers: Optional[bool] = None, overlap_host: bool = True):
    self.layout = decode._make_layout(mesh, rules)
    multiple = self.layout.batch_multiple()
    if num_slots < 1 or num_slots % multiple:
      raise ValueError(f'num_slots={num_slots}; expected a positive multiple of {multiple} '
                       '(the data axes of the mesh)')
    self.max_len = config.max_seq_len if max_len is None else max_len
    if not 1 < self.max_len <= config.max_seq_len:
      raise ValueError(f'max_len={max_len}; expected 2..{config.max_seq_len} (max_seq_len)')
    if chunk_size < _MIN_CHUNK:
      raise ValueError(f'chunk_size={chunk_size}; expected at least {_MIN_CHUNK}')
    self.config, self.tokenizer, self.num_slots = config, tokenizer, num_slots
    self.max_queue = max_queue
    self._chunk_sizes = _chunk_sizes(chunk_size)
    self._packed_sizes = _size_ladder(_MIN_CHUNK, chunk_size, fine_from=64)
    self._windows = _size_ladder(_MIN_WINDOW, self.max_len, fine_from=128)  # decode windows
    self._prefill_windows = {c: _prefill_windows(c, self._windows) for c in self._chunk_sizes}
    prefill_shapes = [(c, window) for c in self._chunk_sizes
                      for window in self._prefill_windows[c]]
    # A packed row has a batch of one, which data axes cannot split: there prompts go by rows.
    self._max_packed = min(num_slots, _MAX_PACKED) if multiple == 1 else 0
    self._num_tokens = np.int32(config.vocab_size if tokenizer is None else
                                min(tokenizer.vocab_size, config.vocab_size))
    run_config = decode._run_config(config, self.layout, unroll_layers)
    platform = self.layout.mesh.devices.flat[0].platform
    self._score_config = run_config.replace(
        attention_kernel=slots_lib.efficient_kernel(run_config, platform))
    with sharding.activate(self.layout.mesh, self.layout.rules):
      self._params = decode._place_params(config, params, self.layout, run_config)
    self._state = self._initial_state(run_config, cache_dtype)
    shardings = jax.tree.map(lambda x: x.sharding, self._state)
    self._row_counts = _row_counts(num_slots, multiple)
    decode_shapes = [(w, rows) for w in self._windows for rows in self._row_counts]
    self._prefills, self._packed, self._steps = slots_lib.compiled_programs(
        run_config, self.layout, shardings, prefill_shapes, decode_shapes)
    self._scorer = slots_lib.compiled_scorer(self._score_config, self.layout)
    self._last = np.zeros((num_slots,), np.int32)  # first tokens of fresh slots
    self._fresh = np.zeros((num_slots,), bool)
    self._positions = np.zeros((num_slots,), np.int32)
    self._counts = np.zeros((num_slots,), np.int32)
    self._knobs = {name: np.zeros((num_slots,), dtype) for name, dtype in slots_lib.KNOBS}
    self._slots: list = [None] * num_slots
    self._in_flight: Optional[_Step] = None
    self._overlap_host = overlap_host
    self._previous = None  # [B] tokens drawn by the latest step, on the device
    self._waiting: collections.deque = collections.deque()
    self._score_jobs: collections.deque = collections.deque()
    self._cond = threading.Condition()
    self._ids = itertools.count()
    self._accepting = True
    self._stopping = False
    self._thread = threading.Thread(target=self._run, name='llm_jax-engine', daemon=True)
    self.error: Optional[str] = None
    self.stats = collections.Counter()  # tokens, requests, cancelled, ... (engine thread)
    self._recent = collections.deque(maxlen=256)  # (time, tokens) of recent steps

  def _initial_state(self, run_config, cache_dtype) -> dict:
    dtype = decode._cache_dtype(self.config, self.layout, cache_dtype)
    shape = (run_config.num_layers, self.num_slots, self.max_len, run_config.num_kv_heads,
             run_config.head_dim)
    cache_sharding = self.layout.sharding(model_lib.CACHE_AXES, shape)
    seen_shape = (self.num_slots, run_config.vocab_size)
    zeros = jax.jit(lambda: {'cache': {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)},
                             'seen': jnp.zeros(seen_shape, bool)},
                    out_shardings={'cache': {'k': cache_sharding, 'v': cache_sharding},
                                   'seen': self.layout.sharding(('cache_batch', None),
                                                                seen_shape)})
    return zeros()

  # --------------------------------------------------------------------------- client side

  def start(self) -> 'Engine':
    """Starts the engine thread (once; later calls do nothing)."""
    with self._cond:
      if not self._thread.is_alive() and not self._stopping:
        self._thread.start()
    return self

  def check_prompt(self, prompt: Sequence[int], max_tokens: int) -> np.ndarray:
    """The prompt as int32 ids, or a ValueError naming what is wrong with it."""
    ids = np.asarray(prompt)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError('prompt must be a non-empty list of token ids')
    bad = (ids < 0) | (ids >= self.config.vocab_size)
    if bad.any():
      raise ValueError(f'prompt token id {ids[np.argmax(bad)]} is outside the vocabulary '
                       f'[0, {self.config.vocab_size})')
    if ids.size + max_tokens > self.max_len:
      raise ValueError(f'the prompt has {ids.size} tokens; with max_tokens={max_tokens} it '
                       f'needs {ids.size + max_tokens} positions, more than the context length '
                       f'{self.max_len}')
    return ids.astype(np.int32)

  def submit(self, prompt: Sequence[int], params: SamplingParams,
             on_output: Callable[[Output], None]) -> Request:
    """Queues a request; its Outputs go to `on_output` (on the engine thread).

    Raises ValueError (bad prompt), QueueFullError or ShuttingDownError.
    """
    ids = self.check_prompt(prompt, params.max_tokens)
    request = Request(next(self._ids), ids, params, on_output,
                      TextTracker(self.tokenizer, params.stop), time.monotonic())
    with self._cond:
      if not self._accepting:
        raise ShuttingDownError('the server is shutting down')
      if len(self._waiting) >= self.max_queue + self._free_slot_count():
        raise QueueFullError(f'{len(self._waiting)} requests are already waiting for one of '
                             f'{self.num_slots} slots; retry later')
      self._waiting.append(request)
      self._cond.notify()
    return request

  def cancel(self, request: Request) -> None:
    """Stops a request; its slot is free before the next decode step."""
    with self._cond:
      request.cancelled = True
      self._cond.notify()

  def score(self, prompt: Sequence[int]) -> concurrent.futures.Future:
    """Future of (logprob of each token after the first [P-1], top ids [P, 5], top logprobs
    [P, 5]) for a token sequence; runs on the engine thread between steps."""
    ids = self.check_prompt(prompt, 0)
    future = concurrent.futures.Future()
    with self._cond:
      if not self._accepting:
        raise ShuttingDownError('the server is shutting down')
      self._score_jobs.append((ids, future))
      self._cond.notify()
    return future

  def shutdown(self, timeout: Optional[float] = None) -> None:
    """Stops accepting requests, finishes the queued and running ones, stops the thread."""
    with self._cond:
      self._accepting = False
      self._stopping = True
      self._cond.notify()
    if self._thread.is_alive():
      self._thread.join(timeout)

  def load(self) -> dict:
    """Queue length, active slots and recent output tokens/s (approximate, lock-free)."""
    now = time.monotonic()
    recent = [(t, n) for t, n in list(self._recent) if now - t < 10.0]
    rate = 0.0
    if len(recent) > 1 and recent[-1][0] > recent[0][0]:
      rate = sum(n for _, n in recent[1:]) / (recent[-1][0] - recent[0][0])
    return {'waiting': len(self._waiting), 'active': sum(s is not None for s in self._slots),
            'slots': self.num_slots, 'tokens_per_second': rate}

  def generate(self, prompts: Sequence[Sequence[int]],
               params: Sequence[SamplingParams]) -> list:
    """Submits all requests at once and waits: each one's new token ids (blocking helper)."""
    results = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]
    errors = []

    def collect(i):
      def on_output(output: Output):
        results[i].extend(output.token_ids)
        if output.finish_reason is not None:
          if output.error:
            errors.append(output.error)
          done[i].set()
      return on_output

    for i, (prompt, p) in enumerate(zip(prompts, params)):
      self.submit(prompt, p, collect(i))
    for event in done:
      event.wait()
    if errors:
      raise RuntimeError(f'engine failed: {errors[0]}')
    return results

  # --------------------------------------------------------------------------- engine thread

  def _free_slot_count(self) -> int:
    return sum(s is None for s in self._slots)

  def _next_work(self):
    """Admits waiting requests into free slots; blocks while idle; None when done."""
    with self._cond:
      while True:
        while self._waiting and None in self._slots:
          request = self._waiting.popleft()
          if request.cancelled:
            self._finish(request, 'cancelled')
            continue
          request.slot = self._slots.index(None)
          self._slots[request.slot] = request
        scores = list(self._score_jobs)
        self._score_jobs.clear()
        busy = any(s is not None for s in self._slots) or self._in_flight is not None
        if scores or busy:
          return scores
        if self._stopping:
          return None
        self._cond.wait()

  def _warm_up(self) -> None:
    """Compiles every program before the first request, so that none waits for a compile.

    Runs every prefill program with unused rows only (they write nothing) and steps with
    every slot free.
    """
    for (size, _), prefill in self._prefills.items():
      knobs = {name: values[:1] for name, values in self._knobs.items()}
      self._state, _ = prefill(
          self._params, self._state, np.full((1,), self.num_slots, np.int32),
          np.zeros((1, size), np.int32), np.zeros((1,), np.int32),
          np.zeros((1,), np.int32), knobs, self._num_tokens)
    for size in self._packed_sizes if self._max_packed else ():
      self._state, _ = self._packed(self._params, self._state, *self._packed_args(size, []))
    previous = jnp.zeros((self.num_slots,), jnp.int32)
    for step in self._steps.values():
      self._state, drawn = step(
          self._params, self._state, previous, self._last, self._fresh, self._positions,
          np.zeros((self.num_slots,), bool), self._knobs, self._counts, self._num_tokens)
    self._previous = drawn[0]
    jax.block_until_ready(drawn)

  def _run(self) -> None:
    try:
      with sharding.activate(self.layout.mesh, self.layout.rules):
        self._warm_up()
        while (scores := self._next_work()) is not None:
          for ids, future in scores:
            self._run_score(ids, future)
          admitted = []
          for request in list(self._slots):
            if request is not None and request.cancelled:
              self._finish(request, 'cancelled')
            elif request is not None and request.num_new == 0:
              admitted.append(request)
          self._run_prefills(admitted)
          launched = self._launch_step()
          if self._overlap_host:
            # The next step runs while the host hands out the previous step's tokens.
            self._deliver_step(self._in_flight)
            self._in_flight = launched
          else:
            self._deliver_step(launched)
    except Exception as e:  # pylint: disable=broad-except
      # Every waiting client must hear of it; the exception itself is logged in full.
      logging.exception('engine thread failed')
      self.error = f'{type(e).__name__}: {e}'
      with self._cond:
        self._accepting = False
        pending = [r for r in self._slots if r is not None] + list(self._waiting)
        self._waiting.clear()
        for _, future in self._score_jobs:
          future.set_exception(RuntimeError(self.error))
      for request in pending:
        self._finish(request, 'error', error=self.error)

  def _run_score(self, ids: np.ndarray, future: concurrent.futures.Future) -> None:
    size = max(_MIN_CHUNK, 1 << (ids.size - 1).bit_length())
    tokens = np.zeros((1, size), np.int32)
    tokens[0, :ids.size] = ids
    following, top_ids, top_logprobs = jax.device_get(
        self._scorer(self._params, tokens, self._num_tokens))
    future.set_result((following[:ids.size - 1], top_ids[:ids.size],
                       top_logprobs[:ids.size]))

  def _set_knobs(self, slot: int, params: SamplingParams) -> None:
    for name, _ in slots_lib.KNOBS:
      self._knobs[name][slot] = getattr(params, name)

  def _next_chunk(self, request: Request) -> int:
    """The size of the request's next prefill chunk: the largest that the rest of its prompt
    fills, so little of it is padding (a function of the prompt alone)."""
    rest = request.prompt.size - request.prefilled
    return next((c for c in reversed(self._chunk_sizes) if c <= rest), self._chunk_sizes[0])

  def _run_prefills(self, requests: list) -> None:
    """Prefills the admitted requests and hands each its first token.

    Prompts that fit a packed call go in as few calls as they fill (in order of arrival);
    longer ones go chunk by chunk, one per call.
    """
    pending = []
    for request in requests:
      if request.params.max_tokens == 0:
        self._finish(request, 'length')
      else:
        self._set_knobs(request.slot, request.params)
        pending.append(request)
    fits = self._packed_sizes[-1] if self._max_packed else 0
    packable = [r for r in pending if r.prompt.size <= fits]
    while packable:
      group, total = [], 0
      for request in packable:
        if len(group) < self._max_packed and total + request.prompt.size <= fits:
          group.append(request)
          total += request.prompt.size
      self._prefill_packed(group)
      packable = [r for r in packable if r not in group]
    for request in pending:
      while request.prompt.size > fits and request.prefilled < request.prompt.size:
        self._prefill_chunk(request)

  def _packed_args(self, size: int, group: list) -> tuple:
    """The arguments of a packed prefill call of `size` tokens after the state."""
    pieces, free = self._max_packed, self.num_slots
    tokens, token_slots = np.zeros((size,), np.int32), np.full((size,), free, np.int32)
    positions, segments = np.zeros((size,), np.int32), np.full((size,), -1, np.int32)
    piece_slots, piece_ends = np.full((pieces,), free, np.int32), np.zeros((pieces,), np.int32)
    knobs = {name: np.zeros((pieces,), dtype) for name, dtype in slots_lib.KNOBS}
    start = 0
    for piece, request in enumerate(group):
      end = start + request.prompt.size
      tokens[start:end], token_slots[start:end] = request.prompt, request.slot
      positions[start:end], segments[start:end] = np.arange(request.prompt.size), piece
      piece_slots[piece], piece_ends[piece] = request.slot, end - 1
      for name in knobs:
        knobs[name][piece] = self._knobs[name][request.slot]
      start = end
    return (tokens, token_slots, positions, segments, piece_slots, piece_ends, knobs,
            self._num_tokens)

  def _prefill_packed(self, group: list) -> None:
    """One packed prefill call: the whole prompts of `group`."""
    total = sum(r.prompt.size for r in group)
    size = next(n for n in self._packed_sizes if n >= total)
    self._state, first = self._packed(self._params, self._state,
                                      *self._packed_args(size, group))
    for request in group:
      request.prefilled = request.prompt.size
    self._hand_out_first_tokens(list(enumerate(group)), first)

  def _prefill_chunk(self, request: Request) -> None:
    """One prefill call: the next chunk of `request`'s prompt."""
    size = self._next_chunk(request)
    piece = request.prompt[request.prefilled:request.prefilled + size]
    tokens = np.zeros((1, size), np.int32)
    tokens[0, :piece.size] = piece
    slot, start = request.slot, request.prefilled
    knobs = {name: values[slot:slot + 1].copy() for name, values in self._knobs.items()}
    window = next(w for w in self._prefill_windows[size] if w >= start)
    self._state, first = self._prefills[size, window](
        self._params, self._state, np.array([slot], np.int32), tokens,
        np.array([start], np.int32), np.array([request.prompt.size], np.int32), knobs,
        self._num_tokens)
    request.prefilled += size
    if request.prefilled >= request.prompt.size:
      self._hand_out_first_tokens([(0, request)], first)

  def _hand_out_first_tokens(self, rows: list, first) -> None:
    """Delivers each (row, request)'s first token, drawn by a prefill call at `row`."""
    first = jax.device_get(first)
    now = time.monotonic()
    for row, request in rows:
      token, logprob, top_ids, top_logprobs = (x[row] for x in first)
      slot = request.slot
      self._last[slot], self._positions[slot], self._counts[slot] = token, request.prompt.size, 1
      self._fresh[slot] = True
      request.first_token_time = now
      self._deliver(request, token, logprob, top_ids, top_logprobs)

  def _launch_step(self) -> Optional['_Step']:
    """Dispatches one decode step of every slot whose request has its first token.

    The host does not wait for the step here: its tokens stay on the device and feed the next
    step directly, and `_deliver_step` hands them out. When that happens after the next launch
    (overlap_host), a request that turns out to be complete (max_tokens, a stop string) gets
    one more step that is thrown away; it always fits in the cache, since a request may use
    every position up to max_len.
    """
    active = np.array([r is not None and r.num_new > 0 and not r.cancelled
                       for r in self._slots])
    if not active.any():
      return None
    needed = int(self._positions[active].max()) + 1
    window = next(w for w in self._windows if w >= needed)
    last_slot = int(np.flatnonzero(active)[-1])
    rows = next(r for r in self._row_counts if r > last_slot)
    # Copies: on CPU a numpy argument may be used in place, and the host edits these arrays
    # while the step runs.
    host = [np.copy(x) for x in (self._last, self._fresh, self._positions)]
    knobs = {name: np.copy(values) for name, values in self._knobs.items()}
    self._state, drawn = self._steps[window, rows](
        self._params, self._state, self._previous, *host, active, knobs,
        np.copy(self._counts), self._num_tokens)
    self._previous = drawn[0]
    self._positions[active] += 1
    self._counts[active] += 1
    self._fresh[:] = False
    return _Step(drawn, active, list(self._slots))

  def _deliver_step(self, step: Optional['_Step']) -> None:
    """Hands each request its token of `step`, unless it ended or left since the launch."""
    if step is None:
      return
    tokens, logprobs, top_ids, top_logprobs = jax.device_get(step.drawn)
    self._recent.append((time.monotonic(), int(step.active.sum())))
    for slot in np.flatnonzero(step.active):
      request = step.requests[slot]
      if request.finished or request.cancelled or self._slots[slot] is not request:
        continue
      self._deliver(request, tokens[slot], logprobs[slot], top_ids[slot], top_logprobs[slot])

  def _deliver(self, request: Request, token, logprob, top_ids, top_logprobs) -> None:
    """Hands one new token to its request, and ends the request when it is complete."""
    request.num_new += 1
    self.stats['tokens'] += 1
    params = request.params
    top = [(int(i), float(lp)) for i, lp in zip(top_ids[:params.logprobs],
                                                 top_logprobs[:params.logprobs])]
    output = Output([int(token)], [float(logprob)], [top])
    if int(token) in params.stop_ids:
      output.finish_reason = 'stop'
    else:
      output.text = request.tracker.add([int(token)])
      if request.tracker.stopped:
        output.finish_reason = 'stop'
      elif request.num_new >= params.max_tokens:
        output.finish_reason = 'length'
        output.text += request.tracker.flush()
    self._emit(request, output)
    if output.finish_reason is not None:
      self._release(request)

  def _finish(self, request: Request, reason: str, error: Optional[str] = None) -> None:
    if reason == 'cancelled':
      self.stats['cancelled'] += 1
    self._emit(request, Output([], [], [], finish_reason=reason, error=error))
    self._release(request)

  def _release(self, request: Request) -> None:
    request.finished = True
    self.stats['requests'] += 1
    if request.slot is not None and self._slots[request.slot] is request:
      self._slots[request.slot] = None

  def _emit(self, request: Request, output: Output) -> None:
    if request.finished:
      return
    try:
      request.on_output(output)
    except Exception:  # pylint: disable=broad-except
      # A broken consumer loses its own request, never the engine or the other requests.
      logging.exception('output callback of request %d failed; cancelling it', request.id)
      request.cancelled = True
