"""Beam search against transformers' `generate(num_beams=4, do_sample=False)` on the same weights.

Each prompt goes to transformers alone (no padding involved on the reference side) while
llm_jax decodes them as one padded batch. The stop tokens are chosen among tokens the beams
actually produce, so hypotheses finish at different lengths and the length penalty and the
early-stopping rule decide which one wins.
"""

import numpy as np
import pytest
import torch
import transformers

from llm_jax.inference import decode
from llm_jax.convert import load_hf

NUM_BEAMS, MAX_NEW = 4, 8


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('hf_llama_beams'))
  torch.manual_seed(1)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      initializer_range=0.2)).eval()
  model.save_pretrained(directory)
  config, params = load_hf(directory)
  return model, config, params


def hf_beam_search(model, prompt, eos_ids, **kwargs):
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                         max_new_tokens=MAX_NEW, do_sample=False, num_beams=NUM_BEAMS,
                         eos_token_id=eos_ids, pad_token_id=0, **kwargs)
  return out[0, len(prompt):].tolist()


PROMPTS = [np.random.RandomState(i).randint(0, 256, n).tolist()
           for i, n in enumerate((6, 11, 3))]


def pick_stop_ids(model, count, **kwargs):
  """Stop tokens the beams really emit partway, chosen so some hypothesis ends early."""
  probes = [hf_beam_search(model, p, [255], **kwargs) for p in PROMPTS]
  candidates = list(dict.fromkeys(probe[i] for i in range(1, MAX_NEW - 1) for probe in probes))
  for i, first in enumerate(candidates):
    eos_ids = [first] + candidates[i + 1:i + count]
    expected = [hf_beam_search(model, p, eos_ids, **kwargs) for p in PROMPTS]
    if any(len(e) < MAX_NEW for e in expected):
      return eos_ids, expected
  pytest.fail(f'no stop token among {candidates} ends a hypothesis early')


@pytest.mark.parametrize('length_penalty, early_stopping, num_stop', [
    (1.0, False, 1),  # transformers' defaults
    (0.5, True, 2),
    (0.0, 'never', 1),  # canonical beam search
])
def test_beam_search_matches_transformers(checkpoint, length_penalty, early_stopping,
                                          num_stop):
  model, config, params = checkpoint
  kwargs = dict(length_penalty=length_penalty, early_stopping=early_stopping)
  eos_ids, expected = pick_stop_ids(model, num_stop, **kwargs)
  ours = decode.generate(config, params, PROMPTS, max_new_tokens=MAX_NEW, num_beams=NUM_BEAMS,
                         eos_id=eos_ids, **kwargs)
  assert ours == expected
