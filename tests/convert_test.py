"""Hugging Face interop: logits parity with transformers' PyTorch Llama, exact round trips, errors.

The reference is `transformers.LlamaForCausalLM` with random weights, saved with
`save_pretrained` into a temporary directory and read back with `llm_jax.load_hf`.
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors import numpy as safetensors_numpy

from llm_jax import model as model_lib
from llm_jax.convert import config_from_hf, config_to_hf, load_hf, safetensors_io, save_hf
from llm_jax.model import Transformer

VOCAB, LENGTH = 256, 24
LLAMA3_ROPE = {'rope_type': 'llama3', 'rope_theta': 50000.0, 'factor': 8.0,
               'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
               # With head_dim 16 the wavelengths 6.3, 24 and >= 94 fall in the kept, blended
               # and slowed bands (bounds 32 / 4 = 8 and 32 / 1 = 32).
               'original_max_position_embeddings': 32}
VARIANTS = {
    'mha': dict(num_key_value_heads=4),
    'gqa': dict(num_key_value_heads=2),
    'mqa': dict(num_key_value_heads=1),
    'tied': dict(num_key_value_heads=2, tie_word_embeddings=True),
    'llama3_rope': dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE),
    'linear_rope': dict(num_key_value_heads=2,
                        rope_parameters={'rope_type': 'linear', 'rope_theta': 10000.0,
                                         'factor': 4.0}),
}


def make_hf_model(directory, dtype=torch.float32, seed=0, **overrides):
  """Random-weight transformers Llama saved to `directory`; returns the torch model."""
  values = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5,
                # Weights large enough that attention is sharp and logits are O(1): a mapping
                # mistake (rope, head order, a swapped norm) then moves the logits visibly.
                initializer_range=0.2)
  values.update(overrides)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**values)).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith('norm.weight'):
        param.copy_(1.0 + 0.3 * torch.randn_like(param))
  model = model.to(dtype)
  model.save_pretrained(directory)
  return model


def hf_logits(model, tokens, attention_mask=None):
  with torch.no_grad():
    mask = None if attention_mask is None else torch.tensor(attention_mask)
    return model(torch.tensor(tokens), attention_mask=mask).logits.float().numpy()


def random_tokens(batch, length, seed=0):
  return np.random.RandomState(seed).randint(0, VOCAB, (batch, length)).astype(np.int32)


@pytest.fixture(scope='module')
def gqa_checkpoint(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('gqa'))
  return make_hf_model(directory), directory


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
  model = make_hf_model(tmp_path, **VARIANTS[variant])
  config, params = load_hf(str(tmp_path))
  tokens = random_tokens(2, LENGTH)
  logits = Transformer(config).apply({'params': params}, tokens)
  assert logits.dtype == np.float32
  np.testing.assert_allclose(logits, hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_right_padded_batch_matches_transformers_on_real_tokens(gqa_checkpoint):
  model, directory = gqa_checkpoint
  config, params = load_hf(directory)
  lengths = [LENGTH, 9, 15]
  tokens = random_tokens(3, LENGTH)
  mask = (np.arange(LENGTH)[None] < np.array(lengths)[:, None]).astype(np.int64)
  tokens = np.where(mask, tokens, 0)
  logits = np.asarray(Transformer(config).apply({'params': params}, tokens))
  expected = hf_logits(model, tokens, attention_mask=mask)
  for row, length in enumerate(lengths):
    np.testing.assert_allclose(logits[row, :length], expected[row, :length], atol=1e-4, rtol=0)


def test_packed_segments_match_each_document_alone(gqa_checkpoint):
  model, directory = gqa_checkpoint
  config, params = load_hf(directory)
  lengths = [7, 11, 6]
  documents = [random_tokens(1, n, seed=i)[0] for i, n in enumerate(lengths)]
  tokens = np.concatenate(documents)[None]
  segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
  positions = np.concatenate([np.arange(n) for n in lengths])[None]
  logits = np.asarray(Transformer(config).apply(
      {'params': params}, tokens, positions=positions, segment_ids=segment_ids))
  start = 0
  for document in documents:
    expected = hf_logits(model, document[None])[0]
    np.testing.assert_allclose(logits[0, start:start + len(document)], expected, atol=1e-4,
                               rtol=0)
    start += len(document)


def test_unscanned_layout_gives_the_same_logits(gqa_checkpoint):
  _, directory = gqa_checkpoint
  config, params = load_hf(directory)
  flat_config, flat_params = load_hf(directory, scan_layers=False)
  assert 'layers_1' in flat_params and 'layers' not in flat_params
  np.testing.assert_array_equal(flat_params['layers_1']['mlp']['down_proj'],
                                params['layers']['mlp']['down_proj'][1])
  tokens = random_tokens(2, LENGTH)
  np.testing.assert_allclose(Transformer(flat_config).apply({'params': flat_params}, tokens),
                             Transformer(config).apply({'params': params}, tokens),
                             rtol=1e-5, atol=1e-4)  # scan vs unrolled: float reassociation only


def read_directory(directory):
  """All tensors of a safetensors checkpoint directory as numpy arrays (bfloat16 included)."""
  return {name: np.array(info.read()) for name, info in
          safetensors_io.index_directory(directory).items()}


def assert_same_tensors(actual_dir, expected_dir):
  actual, expected = read_directory(actual_dir), read_directory(expected_dir)
  assert sorted(actual) == sorted(expected)
  for name, value in expected.items():
    assert actual[name].dtype == value.dtype, name
    np.testing.assert_array_equal(actual[name].view(np.uint8), value.view(np.uint8), err_msg=name)


ARCHITECTURE_FIELDS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
                       'num_attention_heads', 'num_key_value_heads', 'head_dim',
                       'max_position_embeddings', 'rms_norm_eps', 'rope_parameters',
                       'tie_word_embeddings', 'hidden_act', 'model_type', 'architectures')


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_round_trip_is_bitwise_identical(tmp_path, dtype):
  source, target = str(tmp_path / 'hf'), str(tmp_path / 'back')
  make_hf_model(source, dtype=dtype, rope_parameters=LLAMA3_ROPE)
  config, params = load_hf(source)
  assert config.param_dtype == str(dtype).removeprefix('torch.')
  save_hf(config, params, target)
  assert_same_tensors(target, source)
  with open(os.path.join(source, 'config.json')) as f:
    expected = json.load(f)
  with open(os.path.join(target, 'config.json')) as f:
    actual = json.load(f)
  assert {k: actual[k] for k in ARCHITECTURE_FIELDS} == {k: expected[k] for k in
                                                         ARCHITECTURE_FIELDS}
  assert actual['dtype'] == expected['dtype']


def test_sharded_save_round_trips_and_loads_in_transformers(tmp_path, gqa_checkpoint):
  model, directory = gqa_checkpoint
  config, params = load_hf(directory, scan_layers=False)
  target = str(tmp_path / 'sharded')
  save_hf(config, params, target, max_shard_bytes=60_000)
  files = sorted(os.listdir(target))
  assert 'model.safetensors.index.json' in files and 'model.safetensors' not in files
  assert sum(name.endswith('.safetensors') for name in files) > 2
  assert_same_tensors(target, directory)
  reloaded = transformers.LlamaForCausalLM.from_pretrained(target).eval()
  tokens = random_tokens(1, LENGTH)
  np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(model, tokens))
  _, params_again = load_hf(target)
  np.testing.assert_array_equal(params_again['layers']['attention']['q_proj'][0],
                                params['layers_0']['attention']['q_proj'])


def test_save_accepts_boxed_jax_params_and_refuses_to_overwrite(tmp_path):
  config = model_lib.get_preset('tiny', num_layers=2, vocab_size=128)
  rng = np.random.RandomState(0)
  boxed = {'params': jax.tree.map(
      lambda box: box.replace_boxed(jax.numpy.asarray(rng.standard_normal(box.value.shape),
                                                      np.float32)),
      model_lib.abstract_params(config), is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))}
  save_hf(config, boxed, str(tmp_path))
  loaded_config, loaded = load_hf(str(tmp_path))
  assert loaded_config == config
  np.testing.assert_array_equal(loaded['layers']['attention']['o_proj'],
                                boxed['params']['layers']['attention']['o_proj'].value)
  with pytest.raises(FileExistsError, match='overwrite'):
    save_hf(config, boxed, str(tmp_path))


def test_save_rejects_params_that_do_not_fit_the_config(tmp_path, gqa_checkpoint):
  _, directory = gqa_checkpoint
  config, params = load_hf(directory)
  with pytest.raises(ValueError, match='lm_head'):  # Would be dropped silently when tied.
    save_hf(config.replace(tie_embeddings=True), params, str(tmp_path / 'tied'))
  with pytest.raises(ValueError, match=r'layers/mlp/gate_proj\[0\].*\[64, 96\]'):
    save_hf(config.replace(mlp_dim=128), params, str(tmp_path / 'wider'))


def corrupt(directory, edit_tensors=None, edit_config=None):
  """Rewrites a single-file checkpoint with edited tensors and/or config."""
  path = os.path.join(directory, 'model.safetensors')
  if edit_tensors:
    tensors = {name: np.array(value) for name, value in read_directory(directory).items()}
    edit_tensors(tensors)
    safetensors_numpy.save_file(tensors, path, metadata={'format': 'pt'})
  if edit_config:
    with open(os.path.join(directory, 'config.json')) as f:
      config = json.load(f)
    edit_config(config)
    with open(os.path.join(directory, 'config.json'), 'w') as f:
      json.dump(config, f)


BAD_INPUTS = {
    'missing_tensor': (dict(edit_tensors=lambda t: t.pop('model.layers.1.mlp.up_proj.weight')),
                       'model.layers.1.mlp.up_proj.weight'),
    'extra_tensor': (dict(edit_tensors=lambda t: t.update({'model.layers.2.mlp.up_proj.weight':
                                                            np.zeros((96, 64), np.float32)})),
                     'model.layers.2.mlp.up_proj.weight'),
    'wrong_shape': (dict(edit_tensors=lambda t: t.update({
        'model.layers.0.self_attn.k_proj.weight': np.zeros((64, 64), np.float32)})),
                    r"model.layers.0.self_attn.k_proj.weight.*\[64, 64\].*\[32, 64\]"),
    'int8_tensor': (dict(edit_tensors=lambda t: t.update({
        'model.norm.weight': np.ones(64, np.int8)})), 'model.norm.weight.*I8'),
    'model_type': (dict(edit_config=lambda c: c.update(model_type='mistral')), 'model_type'),
    'architecture': (dict(edit_config=lambda c: c.update(architectures=['LlamaModel'])),
                     'architectures'),
    'attention_bias': (dict(edit_config=lambda c: c.update(attention_bias=True)),
                       'attention_bias'),
    'hidden_act': (dict(edit_config=lambda c: c.update(hidden_act='gelu')), 'hidden_act'),
    'rope_type': (dict(edit_config=lambda c: c.update(rope_parameters={
        'rope_type': 'yarn', 'factor': 4.0, 'rope_theta': 10000.0})), 'yarn'),
    'pretraining_tp': (dict(edit_config=lambda c: c.update(pretraining_tp=2)), 'pretraining_tp'),
    'mixed_dtypes': (dict(edit_tensors=lambda t: t.update({
        'model.norm.weight': t['model.norm.weight'].astype(np.float16)})), 'mixed dtypes'),
    'tied_head_differs': (dict(edit_config=lambda c: c.update(tie_word_embeddings=True)),
                          'lm_head.weight differs'),
}


@pytest.mark.parametrize('case', sorted(BAD_INPUTS))
def test_bad_checkpoints_raise_errors_naming_the_problem(tmp_path, gqa_checkpoint, case):
  _, source = gqa_checkpoint
  directory = str(tmp_path / case)
  os.makedirs(directory)
  for name in ('model.safetensors', 'config.json'):
    with open(os.path.join(source, name), 'rb') as f, open(os.path.join(directory, name),
                                                            'wb') as g:
      g.write(f.read())
  edits, message = BAD_INPUTS[case]
  corrupt(directory, **edits)
  with pytest.raises(ValueError, match=message):
    load_hf(directory)


def test_tied_checkpoint_may_store_an_identical_head(tmp_path, gqa_checkpoint):
  _, source = gqa_checkpoint
  tensors = read_directory(source)
  tensors['lm_head.weight'] = tensors['model.embed_tokens.weight']
  safetensors_numpy.save_file(tensors, str(tmp_path / 'model.safetensors'))
  with open(os.path.join(source, 'config.json')) as f:
    config = dict(json.load(f), tie_word_embeddings=True)
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(config, f)
  loaded_config, params = load_hf(str(tmp_path))
  assert loaded_config.tie_embeddings and 'lm_head' not in params


def test_missing_files_raise_file_not_found(tmp_path, gqa_checkpoint):
  with pytest.raises(FileNotFoundError, match='config.json'):
    load_hf(str(tmp_path))
  _, source = gqa_checkpoint
  with open(os.path.join(source, 'config.json')) as f, open(tmp_path / 'config.json', 'w') as g:
    g.write(f.read())
  with pytest.raises(FileNotFoundError, match='model.safetensors'):
    load_hf(str(tmp_path))


def test_transformers4_style_config_is_read():
  """Older config.json files keep rope_theta at the top and name the scaling `type`."""
  config = config_from_hf({
      'model_type': 'llama', 'architectures': ['LlamaForCausalLM'], 'vocab_size': 100,
      'hidden_size': 64, 'intermediate_size': 128, 'num_hidden_layers': 2,
      'num_attention_heads': 8, 'rope_theta': 123.0, 'torch_dtype': 'bfloat16',
      'rope_scaling': {'type': 'linear', 'factor': 2.0}})
  assert (config.num_kv_heads, config.head_dim, config.rope_theta) == (8, 8, 123.0)
  assert (config.rope_scaling.rope_type, config.rope_scaling.factor) == ('linear', 2.0)
  assert config.param_dtype == 'bfloat16'
  assert config_from_hf(config_to_hf(config)) == config


def test_bfloat16_cast_on_load_is_close_to_float32(tmp_path, gqa_checkpoint):
  model, directory = gqa_checkpoint
  config, params = load_hf(directory, param_dtype='bfloat16')
  assert params['layers']['mlp']['up_proj'].dtype == ml_dtypes.bfloat16
  assert (config.dtype, config.param_dtype) == ('bfloat16', 'bfloat16')
  tokens = random_tokens(2, LENGTH)
  logits = np.asarray(Transformer(config).apply({'params': params}, tokens))
  expected = hf_logits(model, tokens)
  assert logits.dtype == np.float32
  # bfloat16 keeps ~3 significant digits; the logits are O(1).
  assert np.abs(logits - expected).max() < 0.15 * np.abs(expected).max()
  assert np.abs(logits - expected).max() > 0  # Really computed in bfloat16.


def test_bfloat16_checkpoint_casts_to_float16(tmp_path, gqa_checkpoint):
  _, source = gqa_checkpoint
  tensors = {name: value.astype(ml_dtypes.bfloat16)
             for name, value in read_directory(source).items()}
  # Older conversions keep a rotary buffer, often in another dtype; it is ignored.
  tensors['model.layers.0.self_attn.rotary_emb.inv_freq'] = np.ones(8, np.float32)
  safetensors_numpy.save_file(tensors, str(tmp_path / 'model.safetensors'))
  with open(os.path.join(source, 'config.json')) as f, open(tmp_path / 'config.json', 'w') as g:
    g.write(f.read())
  assert load_hf(str(tmp_path))[0].param_dtype == 'bfloat16'
  config, params = load_hf(str(tmp_path), param_dtype='float16')
  assert config.param_dtype == 'float16'
  up = tensors['model.layers.1.mlp.up_proj.weight']
  np.testing.assert_array_equal(params['layers']['mlp']['up_proj'][1], up.astype(np.float16).T)


def test_safetensors_scalar_is_read(tmp_path):
  path = str(tmp_path / 'scalar.safetensors')
  safetensors_numpy.save_file({'s': np.array(3.5, np.float32)}, path)
  assert float(safetensors_io.read_header(path)['s'].read()) == 3.5


def test_orbax_to_hf_names_a_missing_checkpoint(tmp_path):
  from llm_jax.convert import __main__ as cli  # pylint: disable=g-import-not-at-top
  with pytest.raises(FileNotFoundError, match='does not exist'):
    cli.orbax_to_hf(str(tmp_path / 'absent'), str(tmp_path / 'out'))
  with pytest.raises(FileNotFoundError, match='no complete checkpoint'):
    cli.orbax_to_hf(str(tmp_path), str(tmp_path / 'out'))


def test_convert_cli_round_trip(tmp_path, gqa_checkpoint):
  _, source = gqa_checkpoint
  orbax_dir, back = str(tmp_path / 'orbax'), str(tmp_path / 'back')
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='',
             PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  for args in (['hf-to-orbax', f'--hf_dir={source}', f'--out={orbax_dir}'],
               ['orbax-to-hf', f'--checkpoint={orbax_dir}', f'--out={back}',
                f'--base_hf_dir={source}']):
    result = subprocess.run([sys.executable, '-m', 'llm_jax.convert'] + args, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
  assert_same_tensors(back, source)
  with open(os.path.join(back, 'config.json')) as f:
    assert json.load(f)['eos_token_id'] == 2
  assert os.path.exists(os.path.join(back, 'generation_config.json'))
