"""Ahead-of-time compilation of the train and decode steps for a TPU topology, on any host.

    python -m llm_jax.aot --config=configs/default.py --topology=v5e:2x2
    python -m llm_jax.aot --config=configs/llama3_8b.py --topology=v5p-128 \\
        --config.mesh.shape='(1,-1,1)' --config.data.global_batch_size=256

The TPU compiler from libtpu builds the real programs (same jit, shardings and rules as
llm_jax.train) for compile-only devices of the named topology, so a config's per-chip memory and
FLOPs are known before any TPU is reserved. Exits non-zero when a step does not fit in HBM.
Needs libtpu (`pip install 'libtpu==0.0.42.*'`, the version jax[tpu]==0.10.2 pins), not a TPU.

Topologies: '<generation>:<chip grid>' as the TPU runtime names them ('v5e:2x4', 'v5p:4x4x4',
'v6e:4x4'), Cloud TPU slice names ('v5litepod-8', 'v5e-8', 'v5p-128', 'v6e-16', 'v4-32'; for
v4/v5p the number counts TensorCores, two per chip), or 'local' for this host's own devices.
"""

import dataclasses
import functools
import os
import re
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from llm_jax.inference import decode
from llm_jax.inference import slots
from llm_jax.tools import flops
from llm_jax.tools import memory
from llm_jax import model as model_lib
from llm_jax.training import builder
from llm_jax import sharding

_2D_GRIDS = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16',
             256: '16x16'}
_3D_GRIDS = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8',
             256: '4x8x8', 512: '8x8x8', 1024: '8x8x16', 2048: '8x16x16', 4096: '16x16x16'}
# Cloud TPU slice prefix -> (runtime generation name, TensorCores per chip counted in the name).
_SLICE_NAMES = {'v5litepod': ('v5e', 1), 'v5e': ('v5e', 1), 'v6e': ('v6e', 1), 'v5p': ('v5p', 2),
                'v4': ('v4', 2)}


def topology_name(name: str) -> str:
  """Canonical runtime topology name: 'v5e-8' -> 'v5e:2x4', 'v5p-128' -> 'v5p:4x4x4'."""
  if re.fullmatch(r'[a-z0-9]+:[0-9x]+', name):
    return name
  match = re.fullmatch(r'([a-z0-9]+)-(\d+)', name)
  if not match or match.group(1) not in _SLICE_NAMES:
    raise ValueError(f'--topology={name!r}: expected e.g. v5e:2x2, v5e-8, v5p-128, v6e-16, v4-32 '
                     f'or local')
  generation, cores_per_chip = _SLICE_NAMES[match.group(1)]
  chips = int(match.group(2)) // cores_per_chip
  grids = _3D_GRIDS if generation in ('v4', 'v5p') else _2D_GRIDS
  if chips not in grids:
    raise ValueError(f'--topology={name!r}: {chips} chips is not a {generation} slice size; '
                     f'expected one of {sorted(grids)} chips')
  return f'{generation}:{grids[chips]}'


def topology_devices(name: str, num_slices: int = 1) -> list:
  """Compile-only devices of a TPU topology (needs libtpu), or this host's devices for 'local'."""
  if name == 'local':
    return jax.devices()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # libtpu locks /tmp/libtpu_lockfile so that one process owns the chips; compiling touches no
  # chip, so several compiling processes (parallel tests, sweeps) may share it.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    topology = topologies.get_topology_desc(topology_name(name), 'tpu', num_slices=num_slices)
  except RuntimeError as error:
    hint = (" Install libtpu: pip install 'libtpu==0.0.42.*'" if 'not installed' in str(error)
            else '')
    raise RuntimeError(f'cannot build TPU topology {name!r}: {error}{hint}') from error
  return list(topology.devices)


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """Per-device memory (bytes) and FLOPs of one compiled step."""
  name: str
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  code: int
  flops: float  # XLA's count for one device; a scanned (while-loop) body is counted once
  model_flops: float  # flops.py's count for one device
  hbm: Optional[int]
  compile_seconds: float
  out_of_memory: str = ''  # the compiler's message when it refused the program for HBM
  scanned_layers: bool = False

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries

  @property
  def fits(self) -> bool:
    return not self.out_of_memory and (self.hbm is None or self.total <= self.hbm)

  def __str__(self) -> str:
    fmt = memory.format_bytes
    if self.out_of_memory:
      return f'{self.name}: the compiler ran out of HBM: {self.out_of_memory}'
    line = (f'{self.name}: arguments {fmt(self.arguments)}, outputs {fmt(self.outputs)}, '
            f'aliased {fmt(self.aliased)}, temporaries {fmt(self.temporaries)}; total '
            f'{fmt(self.total)}')
    if self.hbm:
      line += f' of {fmt(self.hbm)} HBM ({self.total / self.hbm:.0%})'
    line += (f'; per device {self.model_flops:.3g} model FLOPs, {self.flops:.3g} by XLA\'s '
             'cost analysis')
    if self.scanned_layers:
      line += ' (which counts the scanned layer once)'
    return line + f'; compiled in {self.compile_seconds:.0f} s'


def _report(name: str, lowered, model_flops: float, hbm: Optional[int]) -> CompileReport:
  start = time.time()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as error:
    # The TPU compiler refuses programs whose temporaries alone exceed HBM.
    if 'RESOURCE_EXHAUSTED' not in str(error):
      raise
    message = str(error).split('RESOURCE_EXHAUSTED:', 1)[1].strip().splitlines()[0]
    return CompileReport(name, 0, 0, 0, 0, 0, 0.0, model_flops, hbm, time.time() - start,
                         out_of_memory=message)
  seconds = time.time() - start
  stats = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return CompileReport(name, stats.argument_size_in_bytes, stats.output_size_in_bytes,
                       stats.alias_size_in_bytes, stats.temp_size_in_bytes,
                       stats.generated_code_size_in_bytes, float(cost.get('flops', 0.0)),
                       model_flops, hbm, seconds)


def lower_train_step(config: ml_collections.ConfigDict, devices):
  """The lowered train step a run of `config` trains with, on abstract sharded inputs."""
  program = builder.build(config, devices)
  with sharding.activate(program.mesh, program.rules):
    return program.train_step.lower(program.abstract_sharded_state(), program.abstract_batch())


def lower_decode_step(model_config: model_lib.ModelConfig, mesh, rules, batch_size: int,
                      cache_len: int):
  """llm_jax.decode's one-token step with a [L, B, cache_len, K, H] cache (donated), lowered."""
  abstract_params = model_lib.abstract_params(model_config)
  param_shardings = sharding.tree_shardings(abstract_params, mesh, rules)
  cache = jax.eval_shape(lambda: model_lib.init_cache(model_config, batch_size, cache_len))
  cache_sharding = sharding.logical_sharding(model_lib.CACHE_AXES, cache['k'].shape, mesh, rules)
  cache = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=cache_sharding)
           for k, v in cache.items()}
  token_sharding = sharding.logical_sharding(('act_batch',), (batch_size,), mesh, rules)
  token = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=token_sharding)
  logits_sharding = sharding.logical_sharding(('act_batch', 'act_vocab'),
                                              (batch_size, model_config.vocab_size), mesh, rules)
  step = jax.jit(functools.partial(decode.decode_step, model_config),
                 out_shardings=(logits_sharding, {'k': cache_sharding, 'v': cache_sharding}),
                 donate_argnums=3)
  with sharding.activate(mesh, rules):
    return step.lower(builder.with_shardings(abstract_params, param_shardings), token, token, cache)


def lower_prefill_step(model_config: model_lib.ModelConfig, mesh, rules, num_slots: int,
                       cache_len: int, chunk: int):
  """The serving engine's prefill-and-insert step (`inference.slots.prefill_chunk`): `chunk`
  prompt tokens written into one slot of a [L, num_slots, cache_len, K, H] cache (donated),
  lowered."""
  layout = decode._Layout(mesh, rules)  # pylint: disable=protected-access
  abstract_params = model_lib.abstract_params(model_config)
  param_shardings = sharding.tree_shardings(abstract_params, mesh, rules)
  shape = (model_config.num_layers, num_slots, cache_len, model_config.num_kv_heads,
           model_config.head_dim)
  cache = jax.ShapeDtypeStruct(shape, jnp.dtype(model_config.dtype),
                               sharding=layout.sharding(model_lib.CACHE_AXES, shape))
  seen_shape = (num_slots, model_config.vocab_size)
  state = {'cache': {'k': cache, 'v': cache},
           'seen': jax.ShapeDtypeStruct(seen_shape, bool, sharding=layout.sharding(
               ('cache_batch', None), seen_shape))}
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=layout.replicated)
  knobs = {name: jax.ShapeDtypeStruct((1,), dtype, sharding=layout.replicated)
           for name, dtype in slots.KNOBS}
  tokens = jax.ShapeDtypeStruct((chunk,), jnp.int32, sharding=layout.replicated)
  step = jax.jit(functools.partial(slots.prefill_chunk, model_config, layout),
                 out_shardings=(jax.tree.map(lambda x: x.sharding, state), layout.replicated),
                 donate_argnums=1)
  with sharding.activate(mesh, rules):
    return step.lower(builder.with_shardings(abstract_params, param_shardings), state, scalar,
                      tokens, scalar, scalar, knobs, scalar)


def compile_steps(config: ml_collections.ConfigDict, devices, decode_batch_size: int = 0,
                  decode_cache_len: int = 0, steps=('train', 'decode'),
                  prefill_chunk: int = 256) -> list[CompileReport]:
  """Compiles the train, decode and/or prefill step of `config` for `devices`; one report per
  step. 'prefill' is the serving engine's chunked prefill into one of `decode_batch_size`
  slots, `prefill_chunk` prompt tokens per call."""
  model_config = model_lib.from_config_dict(config.model)
  rules = tuple(tuple(rule) for rule in config.mesh.rules)
  mesh = sharding.create_mesh(config.mesh.shape, config.mesh.axes, config.mesh.num_slices,
                              devices=devices)
  hbm = memory.device_hbm_bytes(devices[0])
  num_devices = len(devices)
  reports = []
  if 'train' in steps:
    tokens = config.data.global_batch_size * config.data.seq_len
    model_flops = flops.training_flops_per_token(model_config, config.data.seq_len) * tokens
    lowered = lower_train_step(config, devices)
    reports.append(_report('train step', lowered, model_flops / num_devices, hbm))
  if 'decode' in steps:
    batch = decode_batch_size or config.data.global_batch_size
    cache_len = decode_cache_len or config.data.seq_len
    model_flops = flops.forward_flops_per_token(model_config, cache_len) * batch
    lowered = lower_decode_step(model_config, mesh, rules, batch, cache_len)
    reports.append(_report(f'decode step (batch {batch}, cache {cache_len})', lowered,
                           model_flops / num_devices, hbm))
  if 'prefill' in steps:
    batch = decode_batch_size or config.data.global_batch_size
    cache_len = decode_cache_len or config.data.seq_len
    chunk = min(prefill_chunk, cache_len)
    model_flops = flops.forward_flops_per_token(model_config, cache_len) * chunk
    lowered = lower_prefill_step(model_config, mesh, rules, batch, cache_len, chunk)
    reports.append(_report(f'prefill+insert step ({chunk} tokens into 1 of {batch} slots, '
                           f'cache {cache_len})', lowered, model_flops / num_devices, hbm))
  return [dataclasses.replace(r, scanned_layers=model_config.scan_layers) for r in reports]


def check_fits(reports: list[CompileReport]) -> None:
  """Exits with a message naming every step that needs more memory than a chip has."""
  too_big = [r for r in reports if not r.fits]
  if too_big:
    sys.exit('does not fit: ' + '; '.join(
        f'{r.name}: {r.out_of_memory}' if r.out_of_memory else
        f'{r.name} needs {memory.format_bytes(r.total)} per chip, the chip has '
        f'{memory.format_bytes(r.hbm)}' for r in too_big))
