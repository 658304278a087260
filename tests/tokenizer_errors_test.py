"""A tokenizer file that fails to parse is named in a one-line error."""

import json
import re

import pytest
import tokenizers
from tokenizers import models

from llm_jax.data import tokenizer as tokenizer_lib


def _tiny_tokenizer_json() -> str:
  vocab = {'<s>': 0, '</s>': 1, 'a': 2, 'b': 3}
  return tokenizers.Tokenizer(models.WordLevel(vocab, unk_token='a')).to_str()


def test_corrupt_sentencepiece_model_names_its_path(tmp_path):
  path = tmp_path / 'tokenizer.model'
  path.write_bytes(b'\x0a\xff\x01 this is not a serialised SentencePiece model')
  expected = re.escape(f'SentencePiece model {path} cannot be parsed')
  with pytest.raises(ValueError, match=expected) as info:
    tokenizer_lib.load_tokenizer(str(path), 'sentencepiece')
  assert '\n' not in str(info.value)


@pytest.mark.parametrize('text', ['{"version": "1.0", "model": ', '{"model": {"type": "Nope"}}',
                                  'not json at all'])
def test_corrupt_tokenizer_json_names_its_path(tmp_path, text):
  path = tmp_path / 'tokenizer.json'
  path.write_text(text)
  expected = re.escape(f'tokenizer file {path} cannot be parsed')
  with pytest.raises(ValueError, match=expected) as info:
    tokenizer_lib.load_tokenizer(str(path))
  assert '\n' not in str(info.value)


def test_corrupt_tokenizer_config_names_its_path(tmp_path):
  (tmp_path / 'tokenizer.json').write_text(_tiny_tokenizer_json())
  (tmp_path / 'tokenizer_config.json').write_text('{"bos_token": "<s>",')
  with pytest.raises(ValueError, match=re.escape(
      f'{tmp_path / "tokenizer_config.json"} cannot be parsed')):
    tokenizer_lib.load_tokenizer(str(tmp_path))


def test_valid_tokenizer_json_still_loads(tmp_path):
  (tmp_path / 'tokenizer.json').write_text(_tiny_tokenizer_json())
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'bos_token': '<s>',
                                                               'eos_token': '</s>'}))
  tokenizer = tokenizer_lib.load_tokenizer(str(tmp_path))
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.encode('b')) == (0, 1, [3])
