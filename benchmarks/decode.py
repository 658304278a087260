"""Generation throughput of llm_jax.generate next to transformers' generate, same weights.

    python benchmarks/decode.py                                   # tiny and llama-150m, batch 1, 32
    python benchmarks/decode.py --presets=tiny --batch_sizes=1 --rounds=5

For each preset, random llm_jax weights are written with `save_hf` and loaded by
`transformers.LlamaForCausalLM`, so both sides run the same model in float32. Greedy decoding of
--max_new_tokens tokens after --prompt_len prompt tokens, no stop token. The two implementations
run interleaved, round after round, so load from other processes hits both alike, and torch
gets whichever of 1 thread or all cores is faster here (shown in the impl column). The table
shows medians over the rounds:
  tokens/s      batch * max_new_tokens / wall time of one generate call (prefill included);
  ms/step       decode time per token: (time(max_new_tokens) - time(1)) / (max_new_tokens - 1);
  % roofline    (accelerators) bytes read per step (weights + the whole KV cache) / ms/step,
                as a share of the chip's peak memory bandwidth.
"""

import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from absl import app
from absl import flags

from llm_jax.inference import decode
from llm_jax import model as model_lib
from llm_jax.convert import save_hf

_PRESETS = flags.DEFINE_list('presets', ['tiny', 'llama-150m'], 'Model presets to time.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '32'], 'Batch sizes to time.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 16, 'Prompt tokens per sequence.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 64, 'Generated tokens per sequence.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Timed rounds (median reported).')
_HF = flags.DEFINE_bool('hf', True, "Also time transformers' generate.")
_PEAK_GBS = flags.DEFINE_float('peak_bandwidth_gbs', 0.0, 'Peak memory bandwidth in GB/s for '
                               'the roofline column; 0 = from the device kind.')

# Peak HBM bandwidth (GB/s) by jax device_kind prefix.
_PEAK_BANDWIDTH = {'NVIDIA H200': 4800, 'NVIDIA H100': 3350, 'NVIDIA A100': 2039,
                   'NVIDIA L4': 300, 'TPU v4': 1228, 'TPU v5 lite': 819, 'TPU v5e': 819,
                   'TPU v5p': 2765, 'TPU v5': 2765, 'TPU v6 lite': 1640, 'TPU v6e': 1640}


def peak_bandwidth() -> float:
  """Bytes/s of the first device, or 0 when unknown (CPUs)."""
  if _PEAK_GBS.value:
    return _PEAK_GBS.value * 1e9
  kind = jax.devices()[0].device_kind
  return next((gbs * 1e9 for name, gbs in _PEAK_BANDWIDTH.items() if kind.startswith(name)), 0.0)


def random_params(config: model_lib.ModelConfig):
  init = jax.jit(lambda: model_lib.Transformer(config).init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  return jax.device_get(model_lib.unbox(init()))


def load_transformers(config, params, directory):
  save_hf(config, params, directory)
  model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  model.generation_config.eos_token_id = None  # always generate max_new_tokens
  model.generation_config.pad_token_id = 0
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  return model.to(device), device


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def time_llm_jax(config, params, prompts, max_new: int) -> float:
  def run():
    out = decode.generate(config, params, prompts, max_new_tokens=max_new)
    assert all(len(o) == max_new for o in out), 'generation stopped early'
  return timed(run)


def time_transformers(model, device, prompts, max_new: int) -> float:
  tokens = torch.tensor(prompts, device=device)

  def run():
    with torch.no_grad():
      out = model.generate(tokens, attention_mask=torch.ones_like(tokens),
                           max_new_tokens=max_new, do_sample=False)
    assert out.shape[1] == tokens.shape[1] + max_new, 'generation stopped early'
  return timed(run)


def fastest_torch_threads(model, device, prompts) -> int:
  """1 or all cores, whichever runs transformers faster here.

  On a loaded machine, torch's spinning OpenMP workers can make all-core runs many times
  slower than one thread; each side gets its best setting.
  """
  timings = {}
  for threads in sorted({1, os.cpu_count() or 1}):
    torch.set_num_threads(threads)
    time_transformers(model, device, prompts, 8)
    timings[threads] = min(time_transformers(model, device, prompts, 8) for _ in range(2))
  best = min(timings, key=timings.get)
  torch.set_num_threads(best)
  return best


def bytes_per_step(config, params, batch: int) -> int:
  """Weights read per decode step plus the whole KV cache attention reads."""
  weights = sum(x.nbytes for x in jax.tree.leaves(params))
  if not config.tie_embeddings:  # the embedding table is only gathered, a few rows
    weights -= params['embedder']['embedding'].nbytes
  prompt_len = max(8, 1 << (_PROMPT_LEN.value - 1).bit_length())
  max_new = max(8, 1 << (_MAX_NEW.value - 1).bit_length())
  cache_len = min(prompt_len + max_new, config.max_seq_len)
  itemsize = 4 if jax.devices()[0].platform == 'cpu' else 2  # decode's default cache dtype
  cache = 2 * config.num_layers * batch * cache_len * config.num_kv_heads * config.head_dim
  return weights + cache * itemsize


def measure(name: str, config, params, hf_model, device, batch: int) -> list[dict]:
  """Interleaved rounds of both implementations; one result row per implementation."""
  rng = np.random.RandomState(batch)
  prompts = rng.randint(3, config.vocab_size, (batch, _PROMPT_LEN.value)).tolist()
  impls = {'llm_jax': lambda n: time_llm_jax(config, params, prompts, n)}
  if hf_model is not None:
    threads = fastest_torch_threads(hf_model, device, prompts)
    impls[f'HF ({threads} thr)'] = lambda n: time_transformers(hf_model, device, prompts, n)
  for run in impls.values():  # compile / warm up both lengths
    run(_MAX_NEW.value)
    run(1)
  times = {impl: {'full': [], 'one': []} for impl in impls}
  for _ in range(_ROUNDS.value):
    for impl, run in impls.items():
      times[impl]['full'].append(run(_MAX_NEW.value))
      times[impl]['one'].append(run(1))
  rows = []
  for impl, t in times.items():
    full, one = statistics.median(t['full']), statistics.median(t['one'])
    step = max(full - one, 1e-9) / (_MAX_NEW.value - 1)
    rows.append(dict(model=name, batch=batch, impl=impl,
                     tokens_per_s=batch * _MAX_NEW.value / full, ms_per_step=step * 1e3,
                     step_s=step))
  return rows


def print_table(rows: list[dict], bandwidth: float, step_bytes: dict) -> None:
  print(f'\n{jax.devices()[0].device_kind}, prompt {_PROMPT_LEN.value} + '
        f'{_MAX_NEW.value} new tokens, greedy, float32, median of {_ROUNDS.value} rounds')
  header = f'{"model":<12}{"batch":>6}  {"impl":<13}{"tokens/s":>10}{"ms/step":>10}'
  header += f'{"vs HF":>8}' + (f'{"% roofline":>12}' if bandwidth else '')
  print(header)
  print('-' * len(header))
  for row in rows:
    hf = next((r for r in rows if r['impl'].startswith('HF') and r['model'] == row['model']
               and r['batch'] == row['batch']), None)
    speedup = f'{row["tokens_per_s"] / hf["tokens_per_s"]:.2f}x' if hf else ''
    line = (f'{row["model"]:<12}{row["batch"]:>6}  {row["impl"]:<13}'
            f'{row["tokens_per_s"]:>10.1f}{row["ms_per_step"]:>10.2f}{speedup:>8}')
    if bandwidth and row['impl'] == 'llm_jax':
      used = step_bytes[(row['model'], row['batch'])] / row['step_s'] / bandwidth
      line += f'{100 * used:>11.1f}%'
    print(line)


def main(argv):
  del argv
  rows, step_bytes = [], {}
  for name in _PRESETS.value:
    config = model_lib.get_preset(name)
    params = random_params(config)
    with tempfile.TemporaryDirectory() as directory:
      hf_model, device = load_transformers(config, params, directory) if _HF.value else (None,
                                                                                          None)
      for batch in (int(b) for b in _BATCH_SIZES.value):
        rows += measure(name, config, params, hf_model, device, batch)
        step_bytes[(name, batch)] = bytes_per_step(config, params, batch)
    del hf_model
  print_table(rows, peak_bandwidth(), step_bytes)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  app.run(main)
