"""LoRA against peft: logits of a random-weight Llama with random adapters, and the sharded
train step (same result on a (2, 2, 2) mesh as on one device, optimizer state of adapters only).
"""

import collections
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import tokenizers
import torch
import transformers
from jax.sharding import Mesh

from configs import lora as lora_config_file
from llm_jax import model as model_lib
from llm_jax import sharding
from llm_jax.config_sections import default_config
from llm_jax.convert import hf
from llm_jax.convert import peft as peft_convert
from llm_jax.model import lora
from llm_jax.training import loop
from llm_jax.training import optim

MODULES = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']


def make_peft_model(directory, targets=MODULES, rank=4, alpha=8.0):
  """A random tiny Llama saved to directory/base, and a peft model with random A and B."""
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      rms_norm_eps=1e-5))
  model.save_pretrained(str(directory / 'base'))
  peft_model = peft.get_peft_model(model, peft.LoraConfig(
      r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0))
  with torch.no_grad():
    for name, parameter in peft_model.named_parameters():
      if 'lora_' in name:
        parameter.normal_(0.0, 0.3)
  peft_model.eval()
  peft_model.save_pretrained(str(directory / 'adapter'))
  return peft_model


def peft_logits(peft_model, tokens):
  with torch.no_grad():
    return peft_model(torch.tensor(np.asarray(tokens))).logits.numpy()


@pytest.mark.parametrize('scan_layers', [True, False])
def test_logits_match_peft(tmp_path, scan_layers):
  targets = MODULES if scan_layers else ['q_proj', 'o_proj', 'down_proj']
  peft_model = make_peft_model(tmp_path, targets)
  tokens = np.random.default_rng(0).integers(0, 128, (2, 12))
  config, base = hf.load_hf(str(tmp_path / 'base'), scan_layers=scan_layers)
  lora_config, adapters = peft_convert.load_adapter(str(tmp_path / 'adapter'), config)
  assert lora_config.rank == 4 and lora_config.alpha == 8.0
  assert len(lora_config.targets) == len(targets)
  ours = jax.jit(lora.apply, static_argnums=(0, 1))(config, lora_config, base, adapters,
                                                     tokens)
  reference = peft_logits(peft_model, tokens)
  np.testing.assert_allclose(np.asarray(ours), reference, atol=1e-4)
  # The adapters matter: the base alone is far from peft's logits.
  base_only = model_lib.Transformer(config).apply({'params': base}, tokens)
  assert np.abs(np.asarray(base_only) - reference).max() > 1e-2


def _one_device_mesh():
  return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)


def _train_once(mesh, config, lora_config, base, adapters, batch):
  rules = sharding.DEFAULT_RULES
  optim_config = default_config().optim
  optim_config.learning_rate, optim_config.warmup_steps = 1e-2, 0
  tx, schedule = optim.create_optimizer(optim_config, num_steps=10)
  state, shardings = lora.create_state(config, lora_config, tx, mesh, rules, seed=0)
  state = state.replace(params=jax.device_put(adapters, shardings.params))
  base = jax.device_put(base, lora.base_shardings(config, mesh, rules))
  step = lora.jit_train_step(config, lora_config, tx, schedule, shardings, mesh, rules,
                             batch['inputs'].shape)
  with sharding.activate(mesh, rules):
    state, metrics = step(state, base, batch)
  return jax.device_get(state), jax.device_get(metrics)


def test_sharded_train_step_equals_one_device(tmp_path):
  make_peft_model(tmp_path)
  config, base = hf.load_hf(str(tmp_path / 'base'))
  lora_config, adapters = peft_convert.load_adapter(str(tmp_path / 'adapter'), config)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 128, (4, 17)).astype(np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'positions': np.tile(np.arange(16, dtype=np.int32), (4, 1)),
           'segment_ids': np.ones((4, 16), np.int32), 'loss_mask': np.ones((4, 16), np.float32)}
  mesh = sharding.create_mesh([2, 2, 2])
  sharded, sharded_metrics = _train_once(mesh, config, lora_config, base, adapters, batch)
  single, single_metrics = _train_once(_one_device_mesh(), config, lora_config, base, adapters,
                                       batch)
  np.testing.assert_allclose(sharded_metrics['loss'], single_metrics['loss'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), sharded.params,
               single.params)
  # The adapters moved; the optimizer state holds two moments per adapter and nothing else.
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), sharded.params, adapters)
  assert min(jax.tree.leaves(moved)) > 0
  adapter_shapes = collections.Counter(x.shape for x in jax.tree.leaves(adapters))
  moment_shapes = collections.Counter(x.shape for x in jax.tree.leaves(sharded.opt_state)
                                      if np.ndim(x))
  assert moment_shapes == adapter_shapes + adapter_shapes
  assert sum(x.size for x in jax.tree.leaves(sharded.opt_state)) < sum(
      np.size(x) for x in jax.tree.leaves(base))


def test_bad_lora_configs_are_named():
  with pytest.raises(ValueError, match='lora.targets'):
    lora.LoraConfig(rank=4, alpha=8, targets=('q', 'qkv'))
  with pytest.raises(ValueError, match='lora.rank'):
    lora.LoraConfig(rank=0, alpha=8)


def test_lora_run_trains_adapters_from_an_hf_directory(tmp_path):
  """configs/lora.py on a Hugging Face directory: SFT data, adapters-only checkpoints."""
  make_peft_model(tmp_path)  # writes tmp_path/base
  hf_dir = tmp_path / 'base'
  words = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(['<s>', '</s>', '[INST]', '[/INST]', 'hi', 'yes', 'no'])},
      unk_token='hi'))
  words.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=words, bos_token='<s>', eos_token='</s>',
      additional_special_tokens=['[INST]', '[/INST]'],
      chat_template=("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                     "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}"
                     "{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
  ).save_pretrained(str(hf_dir))
  data = tmp_path / 'train.jsonl'
  data.write_text(''.join(json.dumps({'prompt': 'hi ' * (i % 5 + 1), 'completion': 'yes no'})
                          + '\n' for i in range(80)))
  config = lora_config_file.get_config(f'hf_dir={hf_dir},rank=4')
  config.data.sft_files = str(data)
  config.data.seq_len, config.data.global_batch_size, config.data.eval_batch_size = 32, 8, 8
  config.data.sft_eval_every = 3
  config.train.num_steps, config.eval.num_batches = 2, 1
  config.mesh.shape = (1, -1, 1)
  summary = loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['step'] == 2 and np.isfinite(summary['eval_loss'])
  step_dir = tmp_path / 'run' / 'checkpoints' / '2'
  assert {'adapters', 'opt_state', 'lora_config'} <= set(os.listdir(step_dir))
  assert 'params' not in os.listdir(step_dir)  # never the base or a merged model
