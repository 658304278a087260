"""Training throughput: tokens/s, step time, MFU and peak memory of llm_jax's real train step.

    python benchmarks/train.py --preset=tiny --batch_size=16 --seq_len=256
    python benchmarks/train.py --preset=llama-150m --batch_size=4 --seq_len=256 --steps=5

Times llm_jax.train_steps' jitted step (the one llm_jax.train runs) after warm-up and reports
medians. On a CPU it also times transformers' PyTorch LlamaForCausalLM with the same shapes and
optimizer (AdamW, same betas/eps/weight decay, clipping 1.0, float32), one step of each in
turn so that noise from other processes hits both alike, and prints the throughput ratio.
MFU uses llm_jax.flops (prints '-' where the device's peak is unknown, e.g. CPU). Peak memory
is the device's peak_bytes_in_use on accelerators, the process's peak RSS on a CPU.
"""

import os
import resource
import sys
import statistics
import time

import jax
import numpy as np
from absl import app
from absl import flags

# configs/ lives in the checkout, not in the installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_jax.tools import flops
from llm_jax import host_memory
from llm_jax import model as model_lib
from llm_jax.training import builder
from llm_jax import sharding
from llm_jax.training import steps as train_steps

_PRESET = flags.DEFINE_string('preset', 'tiny', 'Model preset (llm_jax.model.PRESETS).')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Global batch size.')
_SEQ = flags.DEFINE_integer('seq_len', 256, 'Sequence length.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (median reported).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'Model dtype (float32, bfloat16).')
_REMAT = flags.DEFINE_string('remat', 'none', 'Remat policy (llm_jax.model.REMAT_POLICIES).')
_KERNEL = flags.DEFINE_string('attention_kernel', None, 'Attention kernel (llm_jax.layers.'
                              'attention_kernels.KERNELS); default: configs/default.py\'s.')
_SCAN = flags.DEFINE_bool('scan_layers', False, 'Scan over layers (configs/default.py leaves '
                          'them unrolled for CPUs; accelerator configs scan).')
_TORCH = flags.DEFINE_bool('torch', None, 'Also time PyTorch; default: on a CPU only.')


def _random_batch(rng, vocab_size: int, batch_size: int, seq_len: int) -> dict:
  tokens = rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'positions': np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)),
          'segment_ids': np.ones((batch_size, seq_len), np.int32),
          'loss_mask': np.ones((batch_size, seq_len), np.float32)}


class JaxStep:
  """The train state and jitted step a run of `config` trains with (llm_jax.training.builder)."""

  def __init__(self, config, model_config, batch):
    program = builder.build(config, model_config=model_config)
    self.mesh, self.rules = program.mesh, program.rules
    self.state, self.step_fn = program.init_state(config.seed), program.train_step
    shardings = train_steps.batch_shardings(self.mesh, self.rules, batch['inputs'].shape)
    self.batch = {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}

  def __call__(self) -> float:
    start = time.perf_counter()
    with sharding.activate(self.mesh, self.rules):
      self.state, metrics = self.step_fn(self.state, self.batch)
    jax.block_until_ready(metrics['loss'])
    return time.perf_counter() - start


class TorchStep:
  """transformers' LlamaForCausalLM with torch AdamW, float32, the same shapes."""

  def __init__(self, cfg: model_lib.ModelConfig, optim_config, batch):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    self.torch = torch
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={'rope_type': 'default', 'rope_theta': cfg.rope_theta})
    torch.manual_seed(0)
    self.model = transformers.LlamaForCausalLM(hf_config).train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=optim_config.learning_rate,
                                 betas=(optim_config.b1, optim_config.b2), eps=optim_config.eps,
                                 weight_decay=optim_config.weight_decay)
    self.clip = optim_config.grad_clip_norm
    self.inputs = torch.from_numpy(np.asarray(batch['inputs'], np.int64))
    self.targets = torch.from_numpy(np.asarray(batch['targets'], np.int64))

  def __call__(self) -> float:
    torch = self.torch
    start = time.perf_counter()
    logits = self.model(input_ids=self.inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             self.targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _peak_memory_bytes() -> int:
  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform != 'cpu' else None
  if stats and 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use'])
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _row(name, times, tokens, flops_per_token, peak, memory_bytes, memory_note=''):
  median = statistics.median(times)
  tokens_per_sec = tokens / median
  mfu = flops.mfu(tokens_per_sec, flops_per_token, jax.device_count(), peak)
  mfu_text = '-' if mfu is None else f'{mfu:.1%}'
  print(f'| {name} | {median:.3f} | {min(times):.3f} | {tokens_per_sec:,.0f} | {mfu_text} | '
        f'{memory_bytes / 2 ** 20:,.0f} MiB{memory_note} |', flush=True)
  return tokens_per_sec


def main(argv):
  del argv
  if host_memory.runs_on_cpu_only():
    # As llm_jax.main does; it applies to the whole process, so PyTorch's step benefits too.
    host_memory.retain_freed_memory()
  kernel = _KERNEL.value or default.get_config().model.attention_kernel
  model_config = model_lib.get_preset(_PRESET.value, dtype=_DTYPE.value,
                                      remat_policy=_REMAT.value, attention_kernel=kernel,
                                      scan_layers=_SCAN.value)
  config = default.get_config()
  config.optim.schedule, config.optim.warmup_steps, config.optim.learning_rate = (
      'constant', 0, 3e-4)
  config.train.num_steps = 1000
  config.data.global_batch_size, config.data.seq_len = _BATCH.value, _SEQ.value
  config.data.eval_batch_size = _BATCH.value
  optim_config = config.optim
  batch = _random_batch(np.random.default_rng(0), model_config.vocab_size, _BATCH.value,
                        _SEQ.value)
  device = jax.devices()[0]
  run_torch = device.platform == 'cpu' if _TORCH.value is None else _TORCH.value
  tokens = _BATCH.value * _SEQ.value
  flops_per_token = flops.training_flops_per_token(model_config, _SEQ.value)
  print(f'{_PRESET.value}, batch {_BATCH.value} x {_SEQ.value}, {model_config.dtype}, remat '
        f'{model_config.remat_policy}, attention {model_config.attention_kernel}, scan_layers '
        f'{model_config.scan_layers}; '
        f'{jax.device_count()} x {device.device_kind}; {flops_per_token / 1e6:.1f} MFLOP/token; '
        f'median of {_STEPS.value} steps after {_WARMUP.value} warm-up', flush=True)

  jax_step = JaxStep(config, model_config, batch)
  start = time.perf_counter()
  jax_step()
  print(f'jax: first step (compilation) {time.perf_counter() - start:.1f} s', flush=True)
  for _ in range(_WARMUP.value):
    jax_step()
  jax_memory = _peak_memory_bytes()
  torch_step = None
  if run_torch:
    torch_step = TorchStep(model_config, optim_config, batch)
    for _ in range(_WARMUP.value + 1):
      torch_step()
  jax_times, torch_times = [], []
  for _ in range(_STEPS.value):
    jax_times.append(jax_step())
    if torch_step is not None:
      torch_times.append(torch_step())

  print('| implementation | step s (median) | step s (min) | tokens/s | MFU | peak memory |')
  print('|---|---|---|---|---|---|')
  peak = flops.device_peak_flops(device)
  note = ' (RSS)' if device.platform == 'cpu' else ''
  jax_tps = _row('llm_jax', jax_times, tokens, flops_per_token, peak, jax_memory, note)
  if torch_step is not None:
    both = _peak_memory_bytes()
    torch_tps = _row('transformers (torch)', torch_times, tokens, flops_per_token, None,
                     both - jax_memory, ' (RSS growth)')
    print(f'llm_jax / torch throughput: {jax_tps / torch_tps:.2f}x', flush=True)


if __name__ == '__main__':
  app.run(main)
