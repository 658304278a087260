"""PEFT interop: adapters trained here load in peft with the same logits, PEFT directories
import, merged exports equal the unmerged model, and every export carries a tokenizer that
transformers loads (SentencePiece included)."""

import json

import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import tokenizers
import torch
import transformers
from jax.sharding import Mesh
from tokenizers import decoders, models, pre_tokenizers, trainers

from llm_jax import sharding
from llm_jax.config_sections import default_config
from llm_jax.convert import hf
from llm_jax.convert import peft as peft_convert
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.model import lora
from llm_jax.training import optim

# One compilation serves every logits comparison (same shapes).
APPLY = jax.jit(lora.apply, static_argnums=(0, 1))
TEXTS = ['the quick brown fox jumps over the lazy dog', 'hello there, how are you?',
         'def main(x):\n  return  x + 1\n']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A random tiny HF Llama with a tokenizer, and adapters after two llm_jax LoRA steps."""
  directory = tmp_path_factory.mktemp('base')
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(
          str(directory))
  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(TEXTS * 10, trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<s>', '</s>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  bpe.save(str(directory / 'tokenizer.json'))
  config, base = hf.load_hf(str(directory))
  lora_config = lora.LoraConfig(rank=4, alpha=16.0, targets=('q', 'v', 'o', 'up', 'down'))
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
  rules = sharding.DEFAULT_RULES
  optim_config = default_config().optim
  optim_config.learning_rate, optim_config.warmup_steps = 3e-2, 0
  tx, schedule = optim.create_optimizer(optim_config, num_steps=10)
  state, shardings = lora.create_state(config, lora_config, tx, mesh, rules, seed=0)
  tokens = np.random.default_rng(0).integers(0, 300, (2, 17)).astype(np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'positions': np.tile(np.arange(16, dtype=np.int32), (2, 1)),
           'segment_ids': np.ones((2, 16), np.int32), 'loss_mask': np.ones((2, 16), np.float32)}
  step = lora.jit_train_step(config, lora_config, tx, schedule, shardings, mesh, rules, (2, 16))
  with sharding.activate(mesh, rules):
    for _ in range(2):
      state, _ = step(state, base, batch)
  adapters = jax.device_get(state.params)
  assert all(np.abs(b).max() > 0 for b in jax.tree.leaves(adapters))  # B has left zero
  return directory, config, base, lora_config, adapters


def test_exported_adapters_load_in_peft(trained, tmp_path):
  directory, config, base, lora_config, adapters = trained
  peft_convert.save_adapter(str(tmp_path), config, lora_config, adapters, str(directory))
  saved = json.loads((tmp_path / 'adapter_config.json').read_text())
  assert (saved['r'], saved['lora_alpha']) == (4, 16.0)
  assert all(k.startswith('base_model.model.model.layers.')
             for k in safetensors.numpy.load_file(str(tmp_path / 'adapter_model.safetensors')))
  model = peft.PeftModel.from_pretrained(
      transformers.LlamaForCausalLM.from_pretrained(str(directory)), str(tmp_path)).eval()
  tokens = np.random.default_rng(1).integers(0, 300, (2, 10))
  with torch.no_grad():
    reference = model(torch.tensor(tokens)).logits.numpy()
  ours = APPLY(config, lora_config, base, adapters, tokens)
  np.testing.assert_allclose(np.asarray(ours), reference, atol=1e-4)
  # And back: the PEFT directory imports to the same adapters.
  imported_config, imported = peft_convert.load_adapter(str(tmp_path), config)
  assert imported_config == lora_config
  jax.tree.map(np.testing.assert_array_equal, imported, adapters)


def test_merged_export_equals_unmerged_and_carries_the_tokenizer(trained, tmp_path):
  directory, config, base, lora_config, adapters = trained
  tokenizer = tokenizer_lib.load_tokenizer(str(directory / 'tokenizer.json'))
  peft_convert.save_merged(str(tmp_path), config, lora_config, base, adapters, tokenizer)
  merged = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
  tokens = np.random.default_rng(2).integers(0, 300, (2, 10))
  with torch.no_grad():
    reference = merged(torch.tensor(tokens)).logits.numpy()
  ours = APPLY(config, lora_config, base, adapters, tokens)
  np.testing.assert_allclose(np.asarray(ours), reference, atol=1e-4)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  for text in TEXTS:
    assert hf_tokenizer(text, add_special_tokens=False)['input_ids'] == tokenizer.encode(text)
  assert hf_tokenizer.eos_token == '</s>'


def test_sentencepiece_export_loads_in_transformers(tmp_path):
  corpus = [open(__file__, encoding='utf-8').read()] * 3
  tokenizer = tokenizer_lib.train_sentencepiece(corpus, 320, num_threads=1)
  hf.save_tokenizer(tokenizer, str(tmp_path))
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  for text in TEXTS + [' leading space', 'tabs\tand \u00fcn\u00efcode \u2713']:
    ids = hf_tokenizer(text, add_special_tokens=False)['input_ids']
    assert ids == tokenizer.encode(text)
    assert hf_tokenizer.decode(ids) == text
  assert hf_tokenizer(TEXTS[0])['input_ids'][0] == tokenizer.bos_id


def test_adapters_without_the_peft_prefix_are_refused(trained, tmp_path):
  directory, config, _, lora_config, adapters = trained
  peft_convert.save_adapter(str(tmp_path), config, lora_config, adapters)
  weights = tmp_path / 'adapter_model.safetensors'
  tensors = safetensors.numpy.load_file(str(weights))
  safetensors.numpy.save_file({k.replace('base_model.model.', ''): v for k, v in tensors.items()},
                              str(weights))
  with pytest.raises(ValueError, match="lack the 'base_model.model.' prefix"):
    peft_convert.load_adapter(str(tmp_path), config)
