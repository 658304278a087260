"""A from-scratch run's export carries its tokenizer: `python -m llm_jax.convert orbax-to-hf` on a
training workdir writes what `transformers.AutoTokenizer` loads, encoding as the run did."""

import os

import transformers

from llm_jax.convert import __main__ as cli
from llm_jax.data import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, 'tests', 'testdata', 'pre_layout_run')


def test_export_of_a_trained_tokenizer_loads_in_transformers(tmp_path):
  out = str(tmp_path / 'hf')
  cli.orbax_to_hf(RUN, out)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  ours = tokenizer_lib.load_tokenizer(os.path.join(RUN, 'tokenizer.model'))
  text = 'def main(argv):\n    return 0  # done'
  assert hf_tokenizer(text)['input_ids'] == [ours.bos_id] + ours.encode(text)
  assert transformers.AutoConfig.from_pretrained(out).vocab_size == 320
