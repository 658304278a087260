"""Fine-tuning throughput: LoRA and full fine-tuning in llm_jax next to transformers + peft LoRA.

    python benchmarks/finetune.py --preset=tiny --batch_size=8 --seq_len=256
    python benchmarks/finetune.py --preset=llama-150m --batch_size=4 --seq_len=256 --rank=16
    python benchmarks/finetune.py --hf_dir=~/.cache/llm_jax/models/SmolLM2-135M-Instruct \\
        --batch_size=4 --seq_len=128

All three train the same randomly initialised model on the same random batch: llm_jax's LoRA
step (`llm_jax.model.lora`: frozen base, adapters merged into the kernels inside the loss),
llm_jax's full train step (`llm_jax.training.steps`), and transformers' LlamaForCausalLM wrapped
by `peft.get_peft_model` with torch AdamW on the adapters. One step of each in turn, so that
noise from other processes hits all alike; medians after warm-up. Peak memory: for llm_jax the
compiled step's footprint (arguments + outputs + temporaries - donated), for torch the growth
of the process's peak RSS while it ran (CPU only, a rough figure).
"""

import json
import os
import resource
import statistics
import sys
import time

import jax
import numpy as np
from absl import app
from absl import flags

# configs/ lives in the checkout, not in the installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_jax import host_memory
from llm_jax import model as model_lib
from llm_jax import sharding
from llm_jax.convert import hf
from llm_jax.model import lora
from llm_jax.tools import flops
from llm_jax.training import optim
from llm_jax.training import steps as train_steps

_PRESET = flags.DEFINE_string('preset', 'tiny', 'Model preset (llm_jax.model.PRESETS).')
_HF_DIR = flags.DEFINE_string('hf_dir', '', 'Take the model shapes from this Hugging Face '
                              "directory's config.json instead of --preset (random weights "
                              'still: step times do not depend on them).')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Global batch size.')
_SEQ = flags.DEFINE_integer('seq_len', 256, 'Sequence length.')
_RANK = flags.DEFINE_integer('rank', 8, 'LoRA rank.')
_TARGETS = flags.DEFINE_list('targets', list(lora.TARGETS), 'LoRA target projections.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (median reported).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
_FULL = flags.DEFINE_bool('full', True, 'Also time llm_jax full fine-tuning.')
_TORCH = flags.DEFINE_bool('torch', True, 'Also time transformers + peft LoRA.')

_PEFT_MODULES = {'q': 'q_proj', 'k': 'k_proj', 'v': 'v_proj', 'o': 'o_proj',
                 'gate': 'gate_proj', 'up': 'up_proj', 'down': 'down_proj'}


def _random_batch(rng, vocab_size: int, batch_size: int, seq_len: int) -> dict:
  tokens = rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'positions': np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)),
          'segment_ids': np.ones((batch_size, seq_len), np.int32),
          'loss_mask': np.ones((batch_size, seq_len), np.float32)}


def _footprint(step, *args) -> int:
  analysis = step.lower(*args).compile().memory_analysis()
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes +
             analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


class JaxLoraStep:
  """llm_jax's LoRA train step: random base (not in the state), adapters and their AdamW."""

  def __init__(self, model_config, lora_config, optim_config, batch):
    self.mesh, self.rules = sharding.create_mesh((-1, 1, 1)), sharding.DEFAULT_RULES
    tx, schedule = optim.create_optimizer(optim_config, num_steps=1000)
    base_shardings = lora.base_shardings(model_config, self.mesh, self.rules)
    init = lambda key: model_lib.unbox(model_lib.Transformer(model_config).init(
        key, np.zeros((1, 8), np.int32))['params'])
    with sharding.activate(self.mesh, self.rules):
      self.base = jax.jit(init, out_shardings=base_shardings)(jax.random.key(0))
    self.state, shardings = lora.create_state(model_config, lora_config, tx, self.mesh,
                                              self.rules, seed=0)
    shape = batch['inputs'].shape
    self.step_fn = lora.jit_train_step(model_config, lora_config, tx, schedule, shardings,
                                       self.mesh, self.rules, shape)
    batch_shardings = train_steps.batch_shardings(self.mesh, self.rules, shape)
    self.batch = {k: jax.device_put(v, batch_shardings[k]) for k, v in batch.items()}
    with sharding.activate(self.mesh, self.rules):
      self.memory = _footprint(self.step_fn, self.state, self.base, self.batch)

  def __call__(self) -> float:
    start = time.perf_counter()
    with sharding.activate(self.mesh, self.rules):
      self.state, metrics = self.step_fn(self.state, self.base, self.batch)
    jax.block_until_ready(metrics['loss'])
    return time.perf_counter() - start


class JaxFullStep:
  """llm_jax's full fine-tuning step (every parameter and its AdamW moments in the state)."""

  def __init__(self, model_config, optim_config, batch):
    self.mesh, self.rules = sharding.create_mesh((-1, 1, 1)), sharding.DEFAULT_RULES
    tx, schedule = optim.create_optimizer(optim_config, num_steps=1000)
    self.state, shardings = train_steps.create_train_state(model_config, tx, self.mesh,
                                                           self.rules, 0)
    shape = batch['inputs'].shape
    self.step_fn = train_steps.jit_train_step(model_config, tx, schedule, shardings, self.mesh,
                                              self.rules, shape)
    batch_shardings = train_steps.batch_shardings(self.mesh, self.rules, shape)
    self.batch = {k: jax.device_put(v, batch_shardings[k]) for k, v in batch.items()}
    with sharding.activate(self.mesh, self.rules):
      self.memory = _footprint(self.step_fn, self.state, self.batch)

  def __call__(self) -> float:
    start = time.perf_counter()
    with sharding.activate(self.mesh, self.rules):
      self.state, metrics = self.step_fn(self.state, self.batch)
    jax.block_until_ready(metrics['loss'])
    return time.perf_counter() - start


class TorchPeftStep:
  """transformers' LlamaForCausalLM + peft LoRA, torch AdamW on the adapters, float32."""

  def __init__(self, cfg, lora_config, optim_config, batch):
    import peft  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    self.torch = torch
    rss_before = _peak_rss()
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={'rope_type': 'default', 'rope_theta': cfg.rope_theta})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config)
    self.model = peft.get_peft_model(model, peft.LoraConfig(
        r=lora_config.rank, lora_alpha=lora_config.alpha, lora_dropout=lora_config.dropout,
        target_modules=[_PEFT_MODULES[t] for t in lora_config.targets])).train()
    trainable = [p for p in self.model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(trainable, lr=optim_config.learning_rate,
                                 betas=(optim_config.b1, optim_config.b2), eps=optim_config.eps,
                                 weight_decay=optim_config.weight_decay)
    self.trainable, self.clip = trainable, optim_config.grad_clip_norm
    self.inputs = torch.from_numpy(np.asarray(batch['inputs'], np.int64))
    self.targets = torch.from_numpy(np.asarray(batch['targets'], np.int64))
    self.rss_before = rss_before

  def __call__(self) -> float:
    torch = self.torch
    start = time.perf_counter()
    logits = self.model(input_ids=self.inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             self.targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.trainable, self.clip)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _row(name, times, tokens, flops_per_token, peak, memory_text):
  median = statistics.median(times)
  tokens_per_sec = tokens / median
  mfu = flops.mfu(tokens_per_sec, flops_per_token, jax.device_count(), peak)
  mfu_text = '-' if mfu is None else f'{mfu:.1%}'
  print(f'| {name} | {median:.3f} | {min(times):.3f} | {tokens_per_sec:,.0f} | {mfu_text} | '
        f'{memory_text} |', flush=True)
  return tokens_per_sec


def main(argv):
  del argv
  if host_memory.runs_on_cpu_only():
    host_memory.retain_freed_memory()  # as llm_jax.main does; torch benefits too
  if _HF_DIR.value:
    with open(os.path.join(_HF_DIR.value, hf.CONFIG_FILE), encoding='utf-8') as f:
      model_config = hf.config_from_hf(json.load(f), scan_layers=False)
    name = os.path.basename(_HF_DIR.value.rstrip('/'))
  else:
    model_config, name = model_lib.get_preset(_PRESET.value, scan_layers=False), _PRESET.value
  lora_config = lora.LoraConfig(rank=_RANK.value, alpha=2.0 * _RANK.value,
                                targets=tuple(_TARGETS.value))
  optim_config = default.get_config().optim
  optim_config.schedule, optim_config.warmup_steps, optim_config.learning_rate = (
      'constant', 0, 1e-4)
  batch = _random_batch(np.random.default_rng(0), model_config.vocab_size, _BATCH.value,
                        _SEQ.value)
  device = jax.devices()[0]
  tokens = _BATCH.value * _SEQ.value
  # LoRA skips the base's weight gradients (about a third of the full step's matmuls), but this
  # figure counts the full step's FLOPs for both, as MFU figures of LoRA usually do.
  flops_per_token = flops.training_flops_per_token(model_config, _SEQ.value)
  print(f'{name}, batch {_BATCH.value} x {_SEQ.value}, LoRA rank {_RANK.value} on '
        f'{",".join(lora_config.targets)}; {jax.device_count()} x {device.device_kind}; median '
        f'of {_STEPS.value} steps after {_WARMUP.value} warm-up', flush=True)
  runners = {'llm_jax LoRA': JaxLoraStep(model_config, lora_config, optim_config, batch)}
  if _FULL.value:
    runners['llm_jax full fine-tuning'] = JaxFullStep(model_config, optim_config, batch)
  if _TORCH.value:
    runners['transformers + peft LoRA'] = TorchPeftStep(model_config, lora_config, optim_config,
                                                        batch)
  for runner in runners.values():
    for _ in range(_WARMUP.value + 1):
      runner()
  times = {name: [] for name in runners}
  for _ in range(_STEPS.value):
    for name, runner in runners.items():
      times[name].append(runner())
  print('| implementation | step s (median) | step s (min) | tokens/s | MFU | peak memory |')
  print('|---|---|---|---|---|---|')
  peak = flops.device_peak_flops(device)
  throughput = {}
  for name, runner in runners.items():
    if isinstance(runner, TorchPeftStep):
      memory = f'{(_peak_rss() - runner.rss_before) / 2 ** 20:,.0f} MiB (RSS growth)'
      peak_flops = None
    else:
      memory, peak_flops = f'{runner.memory / 2 ** 20:,.0f} MiB (compiled step)', peak
    throughput[name] = _row(name, times[name], tokens, flops_per_token, peak_flops, memory)
  if 'transformers + peft LoRA' in throughput:
    ratio = throughput['llm_jax LoRA'] / throughput['transformers + peft LoRA']
    print(f'llm_jax LoRA / transformers + peft LoRA throughput: {ratio:.2f}x', flush=True)


if __name__ == '__main__':
  app.run(main)
