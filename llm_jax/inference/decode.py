"""Text generation with a KV cache: prefill, a compiled sampling loop, streaming, beam search.

A batch of prompts of different lengths is right-padded and prefilled into the cache in one call;
the model stores keys/values at slot == position, so each sequence then continues at its own
position (stale slots beyond a sequence's position are never visible to it). New tokens come
from a `lax.while_loop` that stops after `max_new_tokens` or once every sequence has emitted a
stop token: no Python runs per token. Batch, prompt length and `max_new_tokens` are rounded up to
buckets (powers of two), so a new prompt length rarely recompiles; each bucket compiles two
programs (prefill + first token, and the loop; beam search: one) once per (model config,
sampling program, mesh, rules). The float knobs (temperature, top_p, penalties), beam search's
early_stopping and the seed are runtime values: changing them never recompiles. On CPU the
layers run unrolled (see `_run_config`).

The cache and activations are laid out by the same logical-axis rules as training (cache axes
`model.CACHE_AXES`: batch over the data axes, KV heads over tensor), on any mesh.

Streaming (`stream`) runs the same loop in chunks of `chunk_size` tokens and carries the state,
cache included (donated, so updated in place), from one call to the next: the host sees text
every chunk at the price of one dispatch and one small device-to-host copy per chunk. A
per-token host callback inside the loop would show text sooner but makes every step wait for
the host, which costs far more than a chunk boundary on accelerators.
"""

import dataclasses
import functools
import math
from typing import Any, Iterator, Optional, Sequence, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm_jax.inference import beam_search
from llm_jax import model as model_lib
from llm_jax.inference import sampling
from llm_jax import sharding

PAD_ID = 0  # what a finished sequence "emits"; never returned to the caller
_MIN_BUCKET = 8
# Logical axes of the DecodeState fields; fields not listed are replicated.
_STATE_AXES = {
    'cache': model_lib.CACHE_AXES, 'tokens': ('act_batch', None), 'last': ('act_batch',),
    'positions': ('act_batch',), 'num_new': ('act_batch',), 'done': ('act_batch',),
    'keys': ('act_batch',), 'seen': ('act_batch', 'act_vocab'),
}


@flax.struct.dataclass
class DecodeState:
  """What the sampling loop carries. B rows, M = room for new tokens, S = cache length."""
  cache: dict  # {'k', 'v'} [L, B, S, K, H]
  tokens: jax.Array  # [B, M] new tokens; PAD_ID once a row is done
  last: jax.Array  # [B] newest token, not yet fed to the model
  positions: jax.Array  # [B] the position of `last`
  num_new: jax.Array  # [B] tokens emitted, stop token included
  done: jax.Array  # [B] stop token emitted, max_new reached, or a batch-padding row
  keys: jax.Array  # [B] one PRNG key per sequence, folded with the step for each draw
  seen: Optional[jax.Array]  # [B, V] tokens in each sequence (repetition penalty only)
  step: jax.Array  # [] tokens emitted by the batch
  max_new: jax.Array  # [] requested new tokens (<= M)
  stop_ids: jax.Array  # [E]
  knobs: dict  # runtime scalars, see GenerationOptions.knobs


@dataclasses.dataclass(frozen=True)
class _Layout:
  """The mesh and rules the programs are compiled for (hashable: a compile-cache key)."""
  mesh: Mesh
  rules: tuple

  def sharding(self, axes, shape) -> NamedSharding:
    return sharding.logical_sharding(axes, shape, self.mesh, self.rules)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def constrain(self, x, axes):
    return jax.lax.with_sharding_constraint(x, self.sharding(axes, x.shape))

  def constrain_cache(self, cache: dict) -> dict:
    return jax.tree.map(lambda c: self.constrain(c, model_lib.CACHE_AXES), cache)

  def batch_multiple(self) -> int:
    """Batch sizes must be multiples of this to split over the data axes."""
    sizes = []
    for name in ('act_batch', 'cache_batch'):
      axes = nn.logical_to_mesh_axes((name,), self.rules)[0]
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      sizes.append(math.prod(self.mesh.shape[a] for a in axes))
    return math.lcm(*sizes)


@dataclasses.dataclass(frozen=True)
class _Bucket:
  """Static shapes of one compiled program."""
  batch: int
  prompt_len: int
  cache_len: int
  max_new: int
  num_stop: int
  cache_dtype: str


def _round_up_pow2(n: int, minimum: int = _MIN_BUCKET) -> int:
  return max(minimum, 1 << (n - 1).bit_length())


# ----------------------------------------------------------------------------- model calls


def _strip_boxes(tree):
  """Plain leaves of a tree that may hold nn.LogicallyPartitioned boxes.

  Unlike `nn.unbox` this adds no sharding constraint, so it is safe under an active mesh.
  """
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def _is_final_norm(module: nn.Module, method_name: str) -> bool:
  return module.name == 'final_norm' and method_name == '__call__'


def _project(config: model_lib.ModelConfig, params, x: jax.Array) -> jax.Array:
  """The model's output projection of final-norm activations x [B, T, D] -> logits [B, T, V]."""
  dtype = jnp.dtype(config.dtype)
  if config.tie_embeddings:
    return jnp.einsum('BTD,VD->BTV', x.astype(dtype),
                      params['embedder']['embedding'].astype(dtype),
                      preferred_element_type=jnp.float32)
  return jnp.einsum('BTD,DV->BTV', x.astype(dtype), params['lm_head'].astype(dtype),
                    preferred_element_type=jnp.float32)


def prefill(config: model_lib.ModelConfig, params, tokens: jax.Array, lengths: jax.Array,
            cache: dict, offset=0) -> tuple[jax.Array, dict]:
  """Writes right-padded prompts tokens [B, T] into the cache; logits [B, V] after each prompt.

  Only the logits at each prompt's last token are computed (from the captured final-norm
  activations): the model's [B, T, V] logits are dead code that XLA drops, which matters for
  large vocabularies. `offset` (an int or traced scalar) is the position of tokens[:, 0]: a
  chunk of a longer prompt whose earlier chunks are already in the cache; `lengths` then
  count from the chunk's start.
  """
  positions = offset + jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                                        tokens.shape)
  (_, cache), captured = model_lib.Transformer(config).apply(
      {'params': params}, tokens, positions=positions, cache=cache,
      capture_intermediates=_is_final_norm)
  hidden = captured['intermediates']['final_norm']['__call__'][0]  # [B, T, D]
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
  logits = _project(config, params, last)[:, 0]
  return nn.with_logical_constraint(logits, ('act_batch', 'act_vocab')), cache


def decode_step(config: model_lib.ModelConfig, params, tokens: jax.Array,
                positions: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
  """Feeds one token per row, tokens [B] at positions [B]; returns logits [B, V] and the cache."""
  logits, cache = model_lib.Transformer(config).apply(
      {'params': params}, tokens[:, None], positions=positions[:, None], cache=cache)
  return logits[:, 0], cache


def _prompt_tokens_seen(tokens, lengths, vocab_size: int):
  """[B, V] bool: which ids occur in each (right-padded) prompt."""
  in_prompt = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
  ids = jnp.where(in_prompt, tokens, vocab_size)  # out of range: dropped by the scatter
  rows = jnp.arange(tokens.shape[0])[:, None]
  return jnp.zeros((tokens.shape[0], vocab_size), bool).at[rows, ids].set(True, mode='drop')


# ----------------------------------------------------------------------------- sampling loop


def _emit(state: DecodeState, logits: jax.Array, spec: sampling.SamplingSpec) -> DecodeState:
  """Chooses each active row's next token from logits [B, V] and records it."""
  batch = logits.shape[0]
  keys = jax.vmap(jax.random.fold_in)(state.keys, jnp.broadcast_to(state.step, (batch,)))
  tokens = sampling.select_tokens(logits, keys, spec, state.knobs, state.seen)
  active = ~state.done
  tokens = jnp.where(active, tokens, PAD_ID)
  seen = state.seen
  if seen is not None:
    seen = seen.at[jnp.arange(batch), tokens].max(active)
  stopped = jnp.any(tokens[:, None] == state.stop_ids[None, :], axis=-1)
  return state.replace(
      tokens=jax.lax.dynamic_update_slice(state.tokens, tokens[:, None], (0, state.step)),
      last=tokens, num_new=state.num_new + active, seen=seen, step=state.step + 1,
      done=state.done | stopped | (state.step + 1 >= state.max_new))


def _start(config, spec, layout: _Layout, bucket: _Bucket, params, prompts, lengths, valid,
           seed, knobs, stop_ids, max_new) -> DecodeState:
  """Prefills the prompts and emits the first new token of each."""
  batch = prompts.shape[0]
  cache = model_lib.init_cache(config, batch, bucket.cache_len, bucket.cache_dtype)
  logits, cache = prefill(config, params, prompts, lengths, layout.constrain_cache(cache))
  keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.arange(batch))
  seen = None
  if spec.repetition_penalty:
    seen = _prompt_tokens_seen(prompts, lengths, config.vocab_size)
  state = DecodeState(
      cache=layout.constrain_cache(cache),
      tokens=jnp.full((batch, bucket.max_new), PAD_ID, jnp.int32),
      last=jnp.zeros((batch,), jnp.int32), positions=lengths,
      num_new=jnp.zeros((batch,), jnp.int32), done=~valid, keys=keys, seen=seen,
      step=jnp.zeros((), jnp.int32), max_new=max_new, stop_ids=stop_ids, knobs=knobs)
  return _emit(state, logits, spec)


def _continue(config, spec, layout: _Layout, params, state: DecodeState,
              until) -> DecodeState:
  """Emits tokens until `until` were emitted in total or every row is done."""

  def body(state):
    logits, cache = decode_step(config, params, state.last, state.positions, state.cache)
    state = state.replace(cache=layout.constrain_cache(cache),
                          positions=state.positions + (~state.done))
    return _emit(state, logits, spec)

  return jax.lax.while_loop(lambda s: (s.step < until) & ~jnp.all(s.done), body, state)


def _run_beams(config, spec, layout: _Layout, bucket: _Bucket, num_beams: int, params, prompts,
               lengths, valid, seed, knobs, stop_ids, max_new):
  """Prefills the prompts and runs beam search; `seed` is unused (deterministic)."""
  del seed
  cache = model_lib.init_cache(config, prompts.shape[0], bucket.cache_len, bucket.cache_dtype)
  logits, cache = prefill(config, params, prompts, lengths, layout.constrain_cache(cache))
  seen = penalty = None
  if spec.repetition_penalty:
    seen = _prompt_tokens_seen(prompts, lengths, config.vocab_size)
    penalty = knobs['repetition_penalty']
  forward = functools.partial(decode_step, config, params)
  return beam_search.search(
      forward, logits, cache, lengths, valid, num_beams=num_beams, max_len=bucket.max_new,
      max_new=max_new, stop_ids=stop_ids, length_penalty=knobs['length_penalty'],
      early_stopping=knobs['early_stopping'], num_tokens=knobs['num_tokens'],
      seen=seen, repetition_penalty=penalty,
      constrain=layout.constrain_cache)


# ----------------------------------------------------------------------------- compiled programs


@functools.lru_cache(maxsize=8)
def _param_shardings(config: model_lib.ModelConfig, layout: _Layout):
  return sharding.tree_shardings(model_lib.abstract_params(config), layout.mesh, layout.rules)


def _input_shardings(config, layout: _Layout, bucket: _Bucket) -> tuple:
  """Shardings of (params, prompts, lengths, valid, seed, knobs, stop_ids, max_new)."""
  rows = layout.sharding(('act_batch',), (bucket.batch,))
  prompts = layout.sharding(('act_batch', None), (bucket.batch, bucket.prompt_len))
  return ((_param_shardings(config, layout), prompts, rows, rows) +
          (layout.replicated,) * 4)


@functools.lru_cache(maxsize=32)
def _beam_program(config, spec, layout: _Layout, bucket: _Bucket, num_beams: int):
  """inputs -> (tokens [B, M], lengths [B], scores [B]) of the best beam of each prompt."""
  run = functools.partial(_run_beams, config, spec, layout, bucket, num_beams)
  rows = layout.sharding(('act_batch',), (bucket.batch,))
  tokens = layout.sharding(('act_batch', None), (bucket.batch, bucket.max_new))
  return jax.jit(run, in_shardings=_input_shardings(config, layout, bucket),
                 out_shardings=(tokens, rows, rows))


@functools.lru_cache(maxsize=32)
def _sampling_programs(config, spec, layout: _Layout, bucket: _Bucket):
  """(start, resume) of one bucket, shared by `generate` and `stream`.

  start: inputs -> DecodeState, prefill and first token; resume: (params, state, until) ->
  DecodeState, the loop up to `until` tokens, updating the donated state in place.
  """
  start = functools.partial(_start, config, spec, layout, bucket)
  rows = jax.ShapeDtypeStruct((bucket.batch,), jnp.int32)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  abstract_inputs = (
      _strip_boxes(model_lib.abstract_params(config)),
      jax.ShapeDtypeStruct((bucket.batch, bucket.prompt_len), jnp.int32), rows,
      jax.ShapeDtypeStruct((bucket.batch,), bool), scalar,
      jax.tree.map(lambda x: jax.ShapeDtypeStruct((), x.dtype),
                   _knobs(sampling.GenerationOptions(1), 1)),
      jax.ShapeDtypeStruct((bucket.num_stop,), jnp.int32), scalar)

  def state_sharding(path, leaf):
    axes = _STATE_AXES.get(path[0].name)
    return layout.replicated if axes is None else layout.sharding(axes, leaf.shape)

  state = jax.tree_util.tree_map_with_path(state_sharding,
                                           jax.eval_shape(start, *abstract_inputs))
  inputs = _input_shardings(config, layout, bucket)
  resume = functools.partial(_continue, config, spec, layout)
  return (jax.jit(start, in_shardings=inputs, out_shardings=state),
          jax.jit(resume, in_shardings=(inputs[0], state, layout.replicated),
                  out_shardings=state, donate_argnums=1))


# ----------------------------------------------------------------------------- host side


@dataclasses.dataclass(frozen=True)
class _Job:
  """One generation request, checked and laid out as the compiled programs' inputs."""
  layout: _Layout
  bucket: _Bucket
  spec: sampling.SamplingSpec
  inputs: tuple  # (prompts, lengths, valid, seed, knobs, stop_ids, max_new) as numpy
  num_prompts: int
  stop_ids: tuple


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_prompts(config: model_lib.ModelConfig, prompts,
                   max_new_tokens: int) -> list[np.ndarray]:
  """The prompts as int32 arrays, or a ValueError naming the first bad prompt."""
  if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
    raise ValueError('prompts must be a non-empty list of prompts (token-id lists, or strings '
                     f'with tokenizer=...); got {type(prompts).__name__} {prompts!r:.80}')
  if _is_int(prompts[0]):
    raise ValueError('prompts must be a list of token-id lists, got a flat list of ints; wrap '
                     'a single prompt in a list: [prompt]')
  result = []
  for i, prompt in enumerate(prompts):
    ids = np.asarray(prompt)
    if ids.size == 0:
      raise ValueError(f'prompt {i} is empty; every prompt needs at least one token (e.g. BOS)')
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f'prompt {i} is not a list of token ids: {prompt!r:.80}')
    outside = (ids < 0) | (ids >= config.vocab_size)
    if outside.any():
      j = int(np.argmax(outside))
      raise ValueError(f'prompt {i} has token id {ids[j]} at position {j}, outside the '
                       f'vocabulary [0, {config.vocab_size})')
    if ids.size + max_new_tokens > config.max_seq_len:
      raise ValueError(
          f'prompt {i} has {ids.size} tokens; with max_new_tokens={max_new_tokens} it needs '
          f'{ids.size + max_new_tokens} positions, more than the model max_seq_len '
          f'{config.max_seq_len} (the cache length); shorten the prompt or max_new_tokens')
    result.append(ids.astype(np.int32))
  return result


def _check_stop_ids(eos_id, vocab_size: int) -> tuple[int, ...]:
  if eos_id is None:
    return ()
  ids = (eos_id,) if _is_int(eos_id) else tuple(eos_id)
  for token in ids:
    if not _is_int(token) or not 0 <= token < vocab_size:
      raise ValueError(f'eos_id {token!r} is not a token id in [0, {vocab_size})')
  return tuple(int(t) for t in ids)


def _make_layout(mesh: Optional[Mesh], rules) -> _Layout:
  if mesh is None:
    mesh = sharding.create_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = sharding.DEFAULT_RULES if rules is None else rules
  frozen = tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                 for name, axes in rules)
  return _Layout(mesh, frozen)


def _cache_dtype(config: model_lib.ModelConfig, layout: _Layout, cache_dtype) -> str:
  """bfloat16 on accelerators and the model dtype on CPU, unless one is asked for."""
  if cache_dtype is None or cache_dtype == '':
    on_cpu = layout.mesh.devices.flat[0].platform == 'cpu'
    return config.dtype if on_cpu else 'bfloat16'
  try:
    dtype = jnp.dtype(cache_dtype)
  except TypeError as e:
    raise ValueError(f'cache_dtype={cache_dtype!r} is not a dtype') from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'cache_dtype={cache_dtype!r}; expected a floating-point dtype')
  return dtype.name


def _knobs(options: sampling.GenerationOptions, num_tokens: int) -> dict:
  return dict(options.knobs(), num_tokens=np.int32(num_tokens))


def _plan(config, prompts, options: sampling.GenerationOptions, stop_ids: tuple, cache_dtype, mesh,
          rules, num_tokens: Optional[int] = None) -> _Job:
  """Checks a request and pads it to its shape bucket; ids >= num_tokens are never generated."""
  prompts = _check_prompts(config, prompts, options.max_new_tokens)
  layout = _make_layout(mesh, rules)
  multiple = layout.batch_multiple()
  batch = -(-(1 << (len(prompts) - 1).bit_length()) // multiple) * multiple
  prompt_len = min(_round_up_pow2(max(p.size for p in prompts)), config.max_seq_len)
  max_new = _round_up_pow2(options.max_new_tokens)
  # Beam search keeps (1 + #stop ids) * num_beams candidates, so it needs the exact count;
  # the sampling loop takes the ids padded with -1 (never a token) to a few sizes.
  num_stop = len(stop_ids) if options.num_beams > 1 else _round_up_pow2(len(stop_ids), 4)
  bucket = _Bucket(batch=batch, prompt_len=prompt_len,
                   cache_len=min(prompt_len + max_new, config.max_seq_len), max_new=max_new,
                   num_stop=num_stop, cache_dtype=_cache_dtype(config, layout, cache_dtype))
  tokens = np.full((batch, prompt_len), PAD_ID, np.int32)
  lengths = np.ones((batch,), np.int32)  # batch-padding rows: one PAD token, done from start
  for i, prompt in enumerate(prompts):
    tokens[i, :prompt.size] = prompt
    lengths[i] = prompt.size
  valid = np.arange(batch) < len(prompts)
  knobs = _knobs(options, config.vocab_size if num_tokens is None else num_tokens)
  inputs = (tokens, lengths, valid, np.int32(options.seed), knobs,
            np.asarray(stop_ids + (-1,) * (num_stop - len(stop_ids)), np.int32),
            np.int32(options.max_new_tokens))
  return _Job(layout, bucket, options.spec, inputs, len(prompts), stop_ids)


@functools.lru_cache(maxsize=8)
def _param_shapes(config: model_lib.ModelConfig) -> dict:
  return {jax.tree_util.keystr(path): leaf.shape for path, leaf in
          jax.tree_util.tree_flatten_with_path(
              _strip_boxes(model_lib.abstract_params(config)))[0]}


def _place_params(config: model_lib.ModelConfig, params, layout: _Layout,
                  run_config: model_lib.ModelConfig):
  """Checks the parameters against `config`, puts them on the mesh (a no-op when they already
  are there) and, when `run_config` unrolls the layers, unstacks them."""
  params = _strip_boxes(flax.core.unfreeze(params))
  expected = _param_shapes(config)
  given = {jax.tree_util.keystr(p): np.shape(x)
           for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  if given.keys() != expected.keys():
    raise ValueError(
        f'params do not match the model config (scan_layers={config.scan_layers}): missing '
        f'{sorted(expected.keys() - given.keys())[:4]}, unexpected '
        f'{sorted(given.keys() - expected.keys())[:4]}')
  for path, shape in given.items():
    if tuple(shape) != tuple(expected[path]):
      raise ValueError(f'parameter {path} has shape {tuple(shape)}; the model config expects '
                       f'{tuple(expected[path])}')
  if config.scan_layers and not run_config.scan_layers:
    if layout.mesh.devices.flat[0].platform == 'cpu':
      # Layer slices of host arrays are views, and CPU devices can use host memory as it is:
      # unstacking this way copies nothing.
      return jax.device_put(_unstack(jax.device_get(params), config.num_layers),
                            _param_shardings(run_config, layout))
    params = jax.device_put(params, _param_shardings(config, layout))
    return _unstack_program(config, layout)(params)
  return jax.device_put(params, _param_shardings(config, layout))


def _run_config(config: model_lib.ModelConfig, layout: _Layout,
                unroll_layers: Optional[bool]) -> model_lib.ModelConfig:
  """The config the programs run: layers unrolled on CPU unless told otherwise.

  XLA:CPU copies each layer's weights out of the stacked [L, ...] arrays at every step of a
  scanned decode loop, which costs as much memory traffic as the matmuls themselves;
  accelerators read the slices in place, and unrolling would double their weight memory.
  """
  if unroll_layers is None:
    unroll_layers = layout.mesh.devices.flat[0].platform == 'cpu'
  return config.replace(scan_layers=False) if unroll_layers else config


def _unstack(params: dict, num_layers: int) -> dict:
  """Stacked 'layers' params -> 'layers_0' ... 'layers_{L-1}'."""
  flat = {name: value for name, value in params.items() if name != 'layers'}
  for i in range(num_layers):
    flat[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], params['layers'])
  return flat


@functools.lru_cache(maxsize=8)
def _unstack_program(config: model_lib.ModelConfig, layout: _Layout):
  """`_unstack` as a program on the mesh, for accelerators."""
  return jax.jit(functools.partial(_unstack, num_layers=config.num_layers),
                 in_shardings=(_param_shardings(config, layout),),
                 out_shardings=_param_shardings(config.replace(scan_layers=False), layout))


def _plan_request(config, prompts, options: sampling.GenerationOptions, eos_id, tokenizer,
                  cache_dtype, mesh, rules) -> _Job:
  """`_plan` after encoding text prompts (BOS + ids; the tokenizer adds no special tokens).

  With a tokenizer, EOS is the default stop token and ids it cannot decode (a model's padded
  vocabulary) are never generated.
  """
  if tokenizer is None:
    return _plan(config, prompts, options, _check_stop_ids(eos_id, config.vocab_size),
                 cache_dtype, mesh, rules)
  if isinstance(prompts, str):
    raise ValueError('prompts must be a list of strings; wrap a single prompt in a list')
  prompts = [[tokenizer.bos_id] + tokenizer.encode(p) if isinstance(p, str) else p
             for p in prompts]
  eos_id = tokenizer.eos_id if eos_id is None else eos_id
  return _plan(config, prompts, options, _check_stop_ids(eos_id, config.vocab_size),
               cache_dtype, mesh, rules, min(tokenizer.vocab_size, config.vocab_size))


def _global_inputs(job: _Job, config: model_lib.ModelConfig) -> tuple:
  """The job's host inputs as global arrays when the mesh spans processes.

  jit refuses numpy inputs with non-trivial shardings there; every process holds the same
  prompts, so each one fills its own devices' shards from its copy.
  """
  if jax.process_count() == 1:
    return job.inputs
  shardings = _input_shardings(config, job.layout, job.bucket)[1:]
  return tuple(jax.tree.map(lambda x, s=s: _global_array(x, s), value)
               for value, s in zip(job.inputs, shardings))


def _global_array(value, sharding_: NamedSharding) -> jax.Array:
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding_, lambda index: value[index])


def _fetch(tree):
  """Host copies of (possibly process-spanning) arrays: every process gets all of them."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def _detokenize(tokenizer, ids: list, stop_ids: tuple) -> str:
  if ids and ids[-1] in stop_ids:
    ids = ids[:-1]
  return tokenizer.decode(ids)


def generate(config: model_lib.ModelConfig, params, prompts: Sequence, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, num_beams: int = 1,
             eos_id: Union[int, Sequence[int], None] = None, seed: int = 0,
             repetition_penalty: float = 1.0, length_penalty: float = 1.0,
             early_stopping: Union[bool, str] = False, cache_dtype: Any = None,
             mesh: Optional[Mesh] = None, rules=None, tokenizer=None,
             unroll_layers: Optional[bool] = None) -> list:
  """Continues each prompt by up to `max_new_tokens` tokens.

  Args:
    config: the model's ModelConfig.
    params: its (unboxed or boxed) parameter tree.
    prompts: token-id lists, or strings when `tokenizer` is given (BOS is prepended).
    max_new_tokens: tokens to generate at most per prompt.
    temperature: 0 for greedy decoding, else the sampling temperature.
    top_k: sample among the k most likely tokens (0 = off).
    top_p: sample from the smallest set of tokens with this much probability (1 = off).
    num_beams: > 1 runs beam search (greedy, transformers' semantics).
    eos_id: stop token id, or several (Llama 3); default: the tokenizer's EOS, else none.
    seed: sampling seed; a prompt's draws depend on it and on the prompt's index in the
      list, not on the batch bucket or the mesh.
    repetition_penalty: transformers' repetition penalty (1 = off).
    length_penalty: beam search: score = log-prob sum / length ** length_penalty.
    early_stopping: beam search: True, False or 'never', as in transformers.
    cache_dtype: KV cache dtype; default bfloat16 on accelerators, the model dtype on CPU.
    mesh: device mesh; default one device.
    rules: logical-axis rules; default `sharding.DEFAULT_RULES`.
    tokenizer: encodes string prompts and decodes the outputs; ids it cannot decode are
      never generated.
    unroll_layers: run scanned-layer params as unrolled layers (on accelerators a copy of the
      weights per call); default: on CPU only, where it makes decoding faster.

  Returns:
    For each prompt, its new token ids (the stop token included when emitted), or the new
    text (without the stop token) when `tokenizer` is given.
  """
  options = sampling.GenerationOptions(max_new_tokens, temperature, top_k, top_p,
                                       repetition_penalty, num_beams, length_penalty,
                                       early_stopping, seed)
  job = _plan_request(config, prompts, options, eos_id, tokenizer, cache_dtype, mesh, rules)
  run_config = _run_config(config, job.layout, unroll_layers)
  with sharding.activate(job.layout.mesh, job.layout.rules):
    params = _place_params(config, params, job.layout, run_config)
    if num_beams > 1:
      program = _beam_program(run_config, job.spec, job.layout, job.bucket, num_beams)
      tokens, lengths, _ = program(params, *_global_inputs(job, run_config))
    else:
      start, resume = _sampling_programs(run_config, job.spec, job.layout, job.bucket)
      inputs = _global_inputs(job, run_config)
      state = resume(params, start(params, *inputs), inputs[-1])
      tokens, lengths = state.tokens, state.num_new
  tokens, lengths = _fetch((tokens, lengths))
  outputs = [tokens[i, :lengths[i]].tolist() for i in range(job.num_prompts)]
  if tokenizer is None:
    return outputs
  return [_detokenize(tokenizer, ids, job.stop_ids) for ids in outputs]


def stream(config: model_lib.ModelConfig, params, prompts: Sequence, *, max_new_tokens: int,
           chunk_size: int = 8, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           eos_id: Union[int, Sequence[int], None] = None, seed: int = 0,
           repetition_penalty: float = 1.0, cache_dtype: Any = None,
           mesh: Optional[Mesh] = None, rules=None, tokenizer=None,
           unroll_layers: Optional[bool] = None) -> Iterator[list[list[int]]]:
  """Like `generate` (no beam search), yielding new token ids as they are produced.

  The first chunk holds each prompt's first token (right after prefill); later chunks up to
  `chunk_size` tokens each. Concatenated, the chunks equal `generate`'s output. A tokenizer
  encodes string prompts, as in `generate`; the chunks stay token ids, since a chunk boundary
  may split a character.

  Yields:
    For each prompt, the list of tokens it produced since the previous chunk.
  """
  if not _is_int(chunk_size) or chunk_size < 1:
    raise ValueError(f'chunk_size={chunk_size!r}; expected a positive integer')
  options = sampling.GenerationOptions(max_new_tokens, temperature, top_k, top_p,
                                       repetition_penalty, seed=seed)
  job = _plan_request(config, prompts, options, eos_id, tokenizer, cache_dtype, mesh, rules)
  run_config = _run_config(config, job.layout, unroll_layers)
  with sharding.activate(job.layout.mesh, job.layout.rules):
    params = _place_params(config, params, job.layout, run_config)
    start, resume = _sampling_programs(run_config, job.spec, job.layout, job.bucket)
    state = start(params, *_global_inputs(job, run_config))
  emitted = np.zeros((job.num_prompts,), np.int64)
  while True:
    step, tokens, num_new, done = _fetch((state.step, state.tokens, state.num_new, state.done))
    yield [tokens[i, emitted[i]:num_new[i]].tolist() for i in range(job.num_prompts)]
    emitted = num_new[:job.num_prompts]
    if done.all():
      return
    with sharding.activate(job.layout.mesh, job.layout.rules):
      until = np.int32(step + chunk_size)
      if jax.process_count() > 1:
        until = _global_array(until, job.layout.replicated)
      state = resume(params, state, until)
