"""Tokenizers: a trained SentencePiece model, a Llama-2-style .model, a Hugging Face
tokenizer.json, and the vocabulary check."""

import io
import json
import pickle

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from llm_jax.data import tokenizer as tokenizer_lib

# Varied text: code, prose, indentation, digits; enough for a few hundred BPE merges.
_TEXTS = [
    'def add(a, b):\n    """Returns a + b."""\n    return a + b\n' * 3,
    'class Point:\n  def __init__(self, x, y):\n    self.x, self.y = x, y\n\n' * 2,
    'The quick brown fox jumps over the lazy dog 1234 times.\n' * 4,
    'for i in range(10):\n\tprint(i ** 2)  # squares\n' * 3,
] * 4


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('spm') / 'tokenizer.model')
  return tokenizer_lib.train_sentencepiece(_TEXTS, 400, path, num_threads=1), path


def test_trained_sentencepiece_round_trips_exactly(trained):
  tokenizer, _ = trained
  assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (
      400, 0, 1, 2)
  # Whitespace, tabs, newlines and characters never seen in training (byte fallback) survive.
  for text in ['  x  =\t1\n\n\nreturn  ', 'naïve café ünïcödé ✓ 𝔘', _TEXTS[0]]:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    np.testing.assert_array_equal(tokenizer.encode_array(text), ids)
  assert tokenizer.bos_id not in tokenizer.encode(_TEXTS[0])  # encode adds no specials
  # Learned merges compress the training text well below one token per character.
  assert len(tokenizer.encode(_TEXTS[0])) < len(_TEXTS[0]) / 2


def test_trained_sentencepiece_is_deterministic_saved_and_picklable(trained):
  tokenizer, path = trained
  again = tokenizer_lib.train_sentencepiece(_TEXTS, 400, num_threads=1)
  assert again.model_proto == tokenizer.model_proto
  loaded = tokenizer_lib.load_tokenizer(path)
  assert isinstance(loaded, tokenizer_lib.SentencePieceTokenizer)
  copy = pickle.loads(pickle.dumps(loaded))
  assert copy.encode(_TEXTS[2]) == tokenizer.encode(_TEXTS[2])


def test_small_vocabulary_spells_rare_characters_in_bytes():
  # 88 distinct characters would not fit 320 pieces next to 260 byte and special pieces.
  texts = _TEXTS * 3 + ['ÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏÐÑÒÓÔÕÖØÙÚÛÜÝÞßàáâãäåæç']
  tokenizer = tokenizer_lib.train_sentencepiece(texts, 320, num_threads=1)
  assert tokenizer.vocab_size == 320
  assert tokenizer.decode(tokenizer.encode(texts[-1])) == texts[-1]
  with pytest.raises(ValueError, match='more than 260 pieces'):
    tokenizer_lib.train_sentencepiece(texts, 260)


def test_llama2_style_sentencepiece_model(tmp_path):
  """Llama 2's tokenizer.model: unk 0, bos 1, eos 2, no pad piece, a dummy-prefix space."""
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_TEXTS), model_writer=writer, vocab_size=400, model_type='bpe',
      byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
  path = tmp_path / 'llama2.model'
  path.write_bytes(writer.getvalue())
  tokenizer = tokenizer_lib.load_tokenizer(str(path), 'sentencepiece')
  reference = spm.SentencePieceProcessor(model_file=str(path))
  assert tokenizer.pad_id == tokenizer.eos_id == 2  # no pad piece: EOS pads
  assert tokenizer.encode('hello world') == reference.encode('hello world')
  assert tokenizer.decode(tokenizer.encode('hello world')) == 'hello world'


def _hf_tokenizer_file(directory, special=('<|begin_of_text|>', '<|end_of_text|>')):
  """A byte-level BPE tokenizer.json like Llama 3's, trained here."""
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(special),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(_TEXTS, trainer)
  path = directory / 'tokenizer.json'
  tokenizer.save(str(path))
  return path


def test_huggingface_tokenizer_json(tmp_path):
  path = _hf_tokenizer_file(tmp_path)
  tokenizer = tokenizer_lib.load_tokenizer(str(path))
  reference = tokenizers.Tokenizer.from_file(str(path))
  assert isinstance(tokenizer, tokenizer_lib.HuggingFaceTokenizer)
  assert tokenizer.bos_id == reference.token_to_id('<|begin_of_text|>')
  assert tokenizer.eos_id == tokenizer.pad_id == reference.token_to_id('<|end_of_text|>')
  assert tokenizer.vocab_size == reference.get_vocab_size(with_added_tokens=True)
  text = 'def f(x):\n    return x  # ✓'
  ids = tokenizer.encode(text)
  assert ids == reference.encode(text).ids and tokenizer.bos_id not in ids
  assert tokenizer.decode([tokenizer.bos_id] + ids + [tokenizer.eos_id]) == text
  assert pickle.loads(pickle.dumps(tokenizer)).encode(text) == ids
  # A directory works too, and tokenizer_config.json names the special tokens when present.
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(
      {'bos_token': '<|end_of_text|>', 'eos_token': {'content': '<|begin_of_text|>'}}))
  swapped = tokenizer_lib.load_tokenizer(str(tmp_path))
  assert (swapped.bos_id, swapped.eos_id) == (tokenizer.eos_id, tokenizer.bos_id)


def test_huggingface_tokenizer_without_known_bos_is_an_error(tmp_path):
  path = _hf_tokenizer_file(tmp_path, special=('[X]',))
  with pytest.raises(ValueError, match=r'tokenizer\.json: cannot tell its BOS'):
    tokenizer_lib.load_tokenizer(str(path))


def test_tokenizer_config_naming_an_unknown_token_is_an_error(tmp_path):
  path = _hf_tokenizer_file(tmp_path)
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'bos_token': '<s>'}))
  with pytest.raises(ValueError, match="bos_token '<s>' of its tokenizer_config.json"):
    tokenizer_lib.load_tokenizer(str(path))


def test_missing_tokenizer_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='nothing.model'):
    tokenizer_lib.load_tokenizer(str(tmp_path / 'nothing.model'))
  with pytest.raises(FileNotFoundError, match='tokenizer.json'):
    tokenizer_lib.load_tokenizer(str(tmp_path), 'huggingface')


def test_vocabulary_larger_than_the_model_is_an_error(trained):
  tokenizer, _ = trained
  tokenizer_lib.check_vocab_fits(tokenizer, 400)
  with pytest.raises(ValueError, match=r'vocab_size 400 .*largest id 399.*model vocab_size 320'):
    tokenizer_lib.check_vocab_fits(tokenizer, 320)
