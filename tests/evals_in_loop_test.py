"""In-loop evaluators chosen by name in config.evals."""

import math
import os

import ml_collections
import pytest
import torch
import transformers

from evals_lm_eval_test import make_tiny_hf_dir, write_jsonl
from llm_jax import sharding
from llm_jax.evals import in_loop
from llm_jax.evals import model_source

TEXTS = ['the quick brown fox jumps over the lazy dog.', 'rain falls on the green hills.']


def make_config(data_dir):
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict(dict(eval_batch_size=4))
  config.evals = ml_collections.ConfigDict()
  config.evals.ppl_held_out = ml_collections.ConfigDict(dict(
      kind='perplexity', path=os.path.join(data_dir, 'held_out.jsonl'), every_steps=5))
  config.evals.reviews = ml_collections.ConfigDict(dict(
      kind='classification', path=os.path.join(data_dir, 'reviews.jsonl'), every_steps=10,
      prompt='{text}:', labels=('bad', 'good')))
  return config


def test_due_evaluators_run_with_the_training_mesh(tmp_path):
  model = make_tiny_hf_dir(str(tmp_path))
  write_jsonl(tmp_path / 'held_out.jsonl', [{'text': t} for t in TEXTS])
  write_jsonl(tmp_path / 'reviews.jsonl', [{'text': 'the dog', 'label': 'bad'},
                                           {'text': 'the fox', 'label': 'good'}])
  config = make_config(str(tmp_path))
  model_config, params, tokenizer = model_source.load_model(hf_dir=str(tmp_path))
  mesh = sharding.create_mesh((4, 2, 1))

  def run(step, last=None):  # as the training loop calls it: inside the active mesh
    with sharding.activate(mesh, sharding.DEFAULT_RULES):
      return in_loop.run_in_loop_evals(config, model_config, params, tokenizer, mesh,
                                       sharding.DEFAULT_RULES, step, last)

  assert run(3) == {}
  at_5 = run(5)
  assert set(at_5) == {'ppl_held_out/perplexity', 'ppl_held_out/bits_per_byte',
                       'ppl_held_out/gzip_bits_per_byte', 'ppl_held_out/num_tokens',
                       'ppl_held_out/num_bytes'}
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  total, count = 0.0, 0
  for text in TEXTS:
    ids = hf_tokenizer(text)['input_ids']
    with torch.no_grad():
      logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    total += float(sum(logprobs[t - 1, ids[t]] for t in range(1, len(ids))))
    count += len(ids) - 1
  assert at_5['ppl_held_out/perplexity'] == pytest.approx(math.exp(-total / count), rel=1e-5)
  assert {'reviews/accuracy', 'reviews/macro_f1'} <= set(run(7, last=7))


def test_bad_evals_section_names_the_key():
  config = ml_collections.ConfigDict()
  config.evals = ml_collections.ConfigDict()
  config.evals.ppl = ml_collections.ConfigDict(dict(kind='perplexity', path='x.jsonl',
                                                    every_steps=0))
  with pytest.raises(ValueError, match='config.evals.ppl.every_steps=0'):
    in_loop.due_evaluators(config.evals, 10)
  config.evals.ppl.every_steps = 10
  config.evals.ppl.pth = 'typo'
  with pytest.raises(ValueError, match="unknown keys \\['pth'\\]"):
    in_loop.specs(config.evals)
