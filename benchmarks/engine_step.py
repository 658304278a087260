"""The serving engine's decode step with a float32 and a bfloat16 KV cache, side by side.

    python benchmarks/engine_step.py            # SmolLM2 from benchmarks/smollm2.py
    python benchmarks/engine_step.py --hf_dir=DIR --windows=64,256 --rounds=5

One compiled `decode_slots` program per cache dtype and window, all --slots slots live at
position window - 40 (as in a serving run whose longest sequence fills most of the window).
The dtypes run interleaved, round after round, so load from other processes hits both alike;
the table shows the median milliseconds of a step over the rounds (each round times --steps
steps back to back, which is how the engine launches them).
"""

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

import llm_jax
from llm_jax import sharding
from llm_jax.inference import engine as engine_lib
from llm_jax.inference import slots as slots_lib

_HF_DIR = flags.DEFINE_string(
    'hf_dir', os.path.expanduser('~/.cache/llm_jax/models/SmolLM2-135M-Instruct'),
    'Hugging Face Llama directory (benchmarks/smollm2.py builds the default).')
_SLOTS = flags.DEFINE_integer('slots', 32, 'Decode slots, all live.')
_MAX_LEN = flags.DEFINE_integer('max_len', 1024, 'Cache positions per slot.')
_WINDOWS = flags.DEFINE_list('windows', ['256'], 'Attention windows to time.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Interleaved rounds per setting.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Steps timed per round.')

DTYPES = ('float32', 'bfloat16')


def _greedy_knobs(slots: int) -> dict:
  knobs = {name: np.zeros((slots,), dtype) for name, dtype in slots_lib.KNOBS}
  knobs['repetition_penalty'][:] = 1.0
  return knobs


class _Stepper:
  """One engine's decode program for a window, run on its own state."""

  def __init__(self, engine: engine_lib.Engine, window: int):
    self.engine, self.step = engine, engine._steps[window, engine.num_slots]  # pylint: disable=protected-access
    slots = engine.num_slots
    self.args = (jnp.zeros((slots,), jnp.int32), np.zeros((slots,), np.int32),
                 np.zeros((slots,), bool), np.full((slots,), window - 40, np.int32),
                 np.ones((slots,), bool),
                 _greedy_knobs(slots), np.zeros((slots,), np.int32),
                 np.int32(engine.config.vocab_size))

  def run(self, steps: int) -> float:
    """Milliseconds per step over `steps` steps."""
    engine = self.engine
    start = time.perf_counter()
    for _ in range(steps):
      engine._state, drawn = self.step(engine._params, engine._state, *self.args)  # pylint: disable=protected-access
    jax.block_until_ready(drawn)
    return (time.perf_counter() - start) / steps * 1e3


def main(argv):
  del argv
  config, params = llm_jax.load_hf(_HF_DIR.value)
  engines = {dtype: engine_lib.Engine(config, params, num_slots=_SLOTS.value,
                                      max_len=_MAX_LEN.value, cache_dtype=dtype)
             for dtype in DTYPES}
  print(f'| window | {" | ".join(f"{d} cache (ms/step)" for d in DTYPES)} | ratio |')
  print('|---|' + '---|' * (len(DTYPES) + 1))
  for window in (int(w) for w in _WINDOWS.value):
    steppers = {d: _Stepper(e, window) for d, e in engines.items()}
    times = {d: [] for d in DTYPES}
    with sharding.activate(engines['float32'].layout.mesh, engines['float32'].layout.rules):
      for stepper in steppers.values():
        stepper.run(2)  # compiles
      for _ in range(_ROUNDS.value):
        for dtype, stepper in steppers.items():
          times[dtype].append(stepper.run(_STEPS.value))
    medians = {d: statistics.median(t) for d, t in times.items()}
    cells = ' | '.join(f'{medians[d]:.1f}' for d in DTYPES)
    print(f'| {window} | {cells} | {medians["bfloat16"] / medians["float32"]:.2f}x |',
          flush=True)


if __name__ == '__main__':
  app.run(main)
