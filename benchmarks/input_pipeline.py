"""Input pipeline throughput against the training step's, on the same config.

    python benchmarks/input_pipeline.py                       # default config: tiny, stdlib
    python benchmarks/input_pipeline.py --num_workers=0,2 --batches=400
    python benchmarks/input_pipeline.py --config.data.seq_len=512 --config.model.preset=...

Builds (or reuses) the dataset and tokenizer, then times `make_train_iterator` alone (tokens/s
over --batches batches after the first, which includes start-up), for each --num_workers value,
and llm_jax.train_steps' jitted train step on the global batch from `to_global_batch` (median
of --steps steps after warm-up). Prints one table; the pipeline should outpace the step by
10x or more so that training never waits for data.
"""

import statistics
import tempfile
import time

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from llm_jax import sharding
from llm_jax.data import pipeline
from llm_jax.training import builder

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/default.py', 'Training config.')
_WORKDIR = flags.DEFINE_string('workdir', '', 'Where the tokenizer is trained/kept; '
                               "'' = a temporary directory.")
_BATCHES = flags.DEFINE_integer('batches', 300, 'Timed pipeline batches.')
_NUM_WORKERS = flags.DEFINE_list('num_workers', ['0'], 'config.data.num_workers values to time.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed train steps (median reported).')


def time_pipeline(data_config, tokenizer, num_workers: int, batches: int) -> tuple[float, float]:
  """(seconds to the first batch, tokens/s over the next `batches`)."""
  data_config = data_config.copy_and_resolve_references()
  data_config.num_workers = num_workers
  start = time.perf_counter()
  iterator = pipeline.make_train_iterator(data_config, tokenizer, seed=0)
  next(iterator)
  first = time.perf_counter() - start
  start = time.perf_counter()
  tokens = 0
  for _ in range(batches):
    tokens += next(iterator)['inputs'].size
  elapsed = time.perf_counter() - start
  iterator.close()
  return first, tokens / elapsed


def time_train_step(config, tokenizer, steps: int) -> float:
  """Tokens/s of llm_jax's jitted train step on real batches (all local devices)."""
  program = builder.build(config)
  mesh, rules = program.mesh, program.rules
  state, step_fn = program.init_state(config.seed), program.train_step
  shape = program.batch_shape
  iterator = pipeline.make_train_iterator(config.data, tokenizer, seed=config.seed)
  batches = [next(iterator) for _ in range(4)]
  iterator.close()
  times = []
  with sharding.activate(mesh, rules):
    for i in range(steps + 2):  # two untimed: compilation, then warm-up
      batch = pipeline.to_global_batch(batches[i % len(batches)], mesh, rules)
      start = time.perf_counter()
      state, metrics = step_fn(state, batch)
      jax.block_until_ready(metrics)
      if i >= 2:
        times.append(time.perf_counter() - start)
  return shape[0] * shape[1] / statistics.median(times)


def main(argv):
  del argv
  config = _CONFIG.value
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix='input_pipeline_')
  start = time.perf_counter()
  tokenizer = pipeline.get_tokenizer(config.data, workdir, config.model.vocab_size)
  setup = time.perf_counter() - start
  rows = []
  for workers in _NUM_WORKERS.value:
    first, rate = time_pipeline(config.data, tokenizer, int(workers), _BATCHES.value)
    rows.append((f'pipeline, num_workers={workers}', rate, f'first batch {first:.2f} s'))
  step_rate = time_train_step(config, tokenizer, _STEPS.value)
  rows.append((f'train step ({config.model.preset}, {jax.device_count()} '
               f'{jax.devices()[0].platform})', step_rate, ''))
  data = config.data
  print(f'\ndataset={data.dataset} seq_len={data.seq_len} global_batch={data.global_batch_size}'
        f' packing={data.packing}; dataset + tokenizer ready in {setup:.1f} s '
        f'({tokenizer!r})')
  print(f'{"":44} {"tokens/s":>12} {"x train":>9}  note')
  for name, rate, note in rows:
    print(f'{name:44} {rate:12,.0f} {rate / step_rate:9.1f}  {note}')


if __name__ == '__main__':
  app.run(main)
