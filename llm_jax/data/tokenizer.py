"""Tokenizers behind one small interface: SentencePiece models, Hugging Face tokenizer.json files,
and training a SentencePiece BPE model on a corpus.

Every tokenizer has `encode(str) -> list[int]`, `decode(list[int]) -> str` and the attributes
`bos_id`, `eos_id`, `pad_id`, `vocab_size`. `encode` adds no special tokens: the input pipeline
adds BOS/EOS itself. `encode_ordinary` also never turns special-token text (`<|eot_id|>`) inside
the string into its control id, for untrusted text such as chat messages; `special_tokens()` maps
each special token's text to its id. Tokenizers pickle (grain worker processes receive a copy). Paths may be
anything etils.epath opens (local, or gs:// where a GCS backend is installed).
"""

import collections
import json
import os
from typing import Iterable, Iterator, Optional, Protocol, Sequence

from absl import logging
from etils import epath
import numpy as np
import sentencepiece as spm
import tokenizers

from llm_jax import cloud_paths

# A SentencePiece training "sentence" is a chunk of whole lines of about this many characters:
# long enough that pieces can span a newline (':\n', '\n\n'), short enough for the trainer.
_SPM_CHUNK_CHARS = 2048
_SPM_CHARACTER_COVERAGE = 0.9995  # rarer characters are spelled in UTF-8 bytes
_SPM_RESERVED_PIECES = 260  # 256 byte pieces, pad, bos, eos, unk
# Special token names looked up in a tokenizer.json when no tokenizer_config.json says which
# tokens are BOS/EOS/PAD (Llama 3, Llama 2 HF, GPT-2 style, Gemma style).
_BOS_NAMES = ('<|begin_of_text|>', '<s>', '<bos>', '<|startoftext|>')
_EOS_NAMES = ('<|end_of_text|>', '</s>', '<eos>', '<|endoftext|>')
_PAD_NAMES = ('<pad>', '<|pad|>', '[PAD]', '<|finetune_right_pad_id|>')


class Tokenizer(Protocol):
  """What the input pipeline, evaluation and sampling need from a tokenizer."""
  bos_id: int
  eos_id: int
  pad_id: int
  vocab_size: int

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


class SentencePieceTokenizer:
  """A SentencePiece model (a Llama 2 `tokenizer.model` or one trained by `train_sentencepiece`).

  `pad_id` is the model's pad piece, or EOS when it has none (Llama 2): padded positions are
  masked out of attention and loss, so any valid id serves.
  """

  def __init__(self, model_proto: bytes, path: str = '<in memory>'):
    self.path = path
    self._model_proto = model_proto
    try:
      self._processor = spm.SentencePieceProcessor(model_proto=model_proto)
    except RuntimeError as e:
      raise ValueError(f'SentencePiece model {path} cannot be parsed (is it a SentencePiece '
                       f'.model file?): {str(e).strip()}') from e
    self.vocab_size = self._processor.vocab_size()
    self.bos_id = self._processor.bos_id()
    self.eos_id = self._processor.eos_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise ValueError(f'SentencePiece model {path} has no BOS or EOS piece '
                       f'(bos_id={self.bos_id}, eos_id={self.eos_id})')
    pad_id = self._processor.pad_id()
    self.pad_id = pad_id if pad_id >= 0 else self.eos_id

  @classmethod
  def from_file(cls, path: str) -> 'SentencePieceTokenizer':
    """Loads a `.model` file from any path etils.epath opens."""
    return cls(epath.Path(path).read_bytes(), path)

  @property
  def model_proto(self) -> bytes:
    """The serialised model, as written to `tokenizer.model`."""
    return self._model_proto

  def encode(self, text: str) -> list[int]:
    return self._processor.encode(text)

  def encode_ordinary(self, text: str) -> list[int]:
    # SentencePiece never parses control pieces (<s>, </s>) out of text.
    return self._processor.encode(text)

  def special_tokens(self) -> dict[str, int]:
    """The text of each control and unknown piece (<s>, </s>, <unk>...) -> its id."""
    processor = self._processor
    return {processor.id_to_piece(i): i for i in range(self.vocab_size)
            if processor.is_control(i) or processor.is_unknown(i)}

  def encode_array(self, text: str) -> np.ndarray:
    """Like `encode`, as an int32 array without the list round trip (for the input pipeline)."""
    return self._processor.encode_as_numpy(text).astype(np.int32, copy=False)

  def decode(self, ids: Sequence[int]) -> str:
    return self._processor.decode([int(i) for i in ids])

  def __getstate__(self):
    return {'model_proto': self._model_proto, 'path': self.path}

  def __setstate__(self, state):
    self.__init__(state['model_proto'], state['path'])

  def __repr__(self):
    return f'SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})'


class HuggingFaceTokenizer:
  """A Hugging Face `tokenizers` tokenizer.json (Llama 3). Decoding drops special tokens."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, bos_id: int, eos_id: int, pad_id: int,
               path: str = '<in memory>'):
    self.path = path
    self._tokenizer = tokenizer
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    # A copy that reads special-token text as ordinary text (tokenizers' encode_special_tokens).
    self._ordinary = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    self._ordinary.encode_special_tokens = True

  @classmethod
  def from_file(cls, path: str) -> 'HuggingFaceTokenizer':
    """Loads `path` (a tokenizer.json or a directory holding one).

    BOS/EOS/PAD come from a tokenizer_config.json next to it when present, else from the
    well-known special token names; PAD falls back to EOS.
    """
    file = epath.Path(path)
    if file.is_dir():
      file = file / 'tokenizer.json'
    if not file.exists():
      raise FileNotFoundError(f'tokenizer file {file} does not exist')
    path = os.fspath(file)
    tokenizer = _parse_tokenizer_json(file)
    named = _special_tokens_from_config(file.parent / 'tokenizer_config.json')
    ids = {}
    for role, names in (('bos', _BOS_NAMES), ('eos', _EOS_NAMES), ('pad', _PAD_NAMES)):
      candidates = (named[role],) if named.get(role) else names
      ids[role] = next((tokenizer.token_to_id(n) for n in candidates
                        if tokenizer.token_to_id(n) is not None), None)
    for role in ('bos', 'eos'):
      if ids[role] is None and named.get(role):
        raise ValueError(f'tokenizer {path}: the {role}_token {named[role]!r} of its '
                         'tokenizer_config.json is not in its vocabulary')
      if ids[role] is None:
        raise ValueError(f'tokenizer {path}: cannot tell its {role.upper()} token; add a '
                         f'tokenizer_config.json with "{role}_token" next to it')
    pad_id = ids['pad'] if ids['pad'] is not None else ids['eos']
    return cls(tokenizer, ids['bos'], ids['eos'], pad_id, path)

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode_ordinary(self, text: str) -> list[int]:
    return self._ordinary.encode(text, add_special_tokens=False).ids

  def to_json(self) -> str:
    """The tokenizer.json text."""
    return self._tokenizer.to_str()

  def special_tokens(self) -> dict[str, int]:
    """The text of each special added token -> its id."""
    return {token.content: i for i, token in self._tokenizer.get_added_tokens_decoder().items()
            if token.special}

  def added_token_strip(self) -> dict[str, tuple[bool, bool]]:
    """(lstrip, rstrip) of each special added token: whether it absorbs nearby whitespace."""
    return {token.content: (token.lstrip, token.rstrip)
            for token in self._tokenizer.get_added_tokens_decoder().values() if token.special}

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self.encode(text), np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def __getstate__(self):
    # tokenizers' pickling drops the encode_special_tokens flag of the ordinary copy.
    return {'json': self._tokenizer.to_str(), 'ids': (self.bos_id, self.eos_id, self.pad_id),
            'path': self.path}

  def __setstate__(self, state):
    self.__init__(tokenizers.Tokenizer.from_str(state['json']), *state['ids'], state['path'])

  def __repr__(self):
    return f'HuggingFaceTokenizer({self.path!r}, vocab_size={self.vocab_size})'


def _parse_tokenizer_json(file: epath.Path) -> tokenizers.Tokenizer:
  """Parses a tokenizer.json, naming the file when it is not one."""
  try:
    return tokenizers.Tokenizer.from_str(file.read_text())
  # `tokenizers` raises a bare Exception for malformed JSON or an unknown model layout.
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'tokenizer file {file} cannot be parsed as a Hugging Face tokenizer.json: '
                     f'{e}') from e


def _special_tokens_from_config(config_path: epath.Path) -> dict:
  if not config_path.exists():
    return {}
  try:
    config = json.loads(config_path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f'{config_path} cannot be parsed as JSON: {e}') from e
  result = {}
  for role in ('bos', 'eos', 'pad'):
    value = config.get(f'{role}_token')
    result[role] = value.get('content') if isinstance(value, dict) else value
  return result


def load_tokenizer(path: str, kind: str = 'auto') -> Tokenizer:
  """Loads a tokenizer file.

  Args:
    path: a SentencePiece `.model` file, or a Hugging Face `tokenizer.json` (or its directory).
    kind: 'sentencepiece', 'huggingface', or 'auto' (from the file name).

  Returns:
    The tokenizer.
  """
  if not path:
    raise ValueError('tokenizer path is empty; set config.data.tokenizer_path')
  if kind == 'auto':
    kind = ('huggingface' if path.endswith('.json') or epath.Path(path).is_dir()
            else 'sentencepiece')
  if kind == 'sentencepiece':
    if not epath.Path(path).exists():
      raise FileNotFoundError(f'SentencePiece model {path} does not exist')
    return SentencePieceTokenizer.from_file(path)
  if kind == 'huggingface':
    return HuggingFaceTokenizer.from_file(path)
  raise ValueError(f'unknown tokenizer kind {kind!r}; expected sentencepiece, huggingface '
                   'or auto')


def check_vocab_fits(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """Raises if some token id of `tokenizer` has no row in the model's embedding table."""
  if tokenizer.vocab_size > model_vocab_size:
    raise ValueError(
        f'tokenizer {getattr(tokenizer, "path", tokenizer)} has vocab_size '
        f'{tokenizer.vocab_size} (largest id {tokenizer.vocab_size - 1}), which does not fit the '
        f'model vocab_size {model_vocab_size}; use a model with vocab_size >= '
        f'{tokenizer.vocab_size} (--config.model.vocab_size) or a smaller tokenizer')


def _sentences(texts: Iterable[str]) -> Iterator[str]:
  """Cuts documents into chunks of whole lines, each at most _SPM_CHUNK_CHARS characters."""
  for text in texts:
    chunk = ''
    for line in text.splitlines(keepends=True):
      while len(line) > _SPM_CHUNK_CHARS:
        if chunk:
          yield chunk
          chunk = ''
        yield line[:_SPM_CHUNK_CHARS]
        line = line[_SPM_CHUNK_CHARS:]
      if chunk and len(chunk) + len(line) > _SPM_CHUNK_CHARS:
        yield chunk
        chunk = ''
      chunk += line
    if chunk:
      yield chunk


def train_sentencepiece(texts: Iterable[str], vocab_size: int, path: Optional[str] = None,
                        num_threads: Optional[int] = None) -> SentencePieceTokenizer:
  """Trains a byte-fallback BPE SentencePiece model; writes it to `path` when given.

  Text is kept exactly (identity normalisation, whitespace and newlines preserved, no dummy
  prefix), so `decode(encode(text)) == text`. Ids: pad 0, bos 1, eos 2, unk 3. The same texts
  give the same model (no sentence sampling), so several hosts training it agree.

  Args:
    texts: training documents.
    vocab_size: the number of pieces, including 256 byte pieces and 4 special ones.
    path: where to write the `.model` file (atomically), or None.
    num_threads: trainer threads (default: all cores).

  Returns:
    The trained tokenizer.
  """
  if vocab_size <= _SPM_RESERVED_PIECES:
    raise ValueError(f'a byte-fallback SentencePiece vocabulary needs more than '
                     f'{_SPM_RESERVED_PIECES} pieces (256 bytes + 4 special); got {vocab_size}')
  sentences = list(_sentences(texts))
  writer = _BytesWriter()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=writer, vocab_size=vocab_size,
        model_type='bpe', byte_fallback=True,
        character_coverage=_character_coverage(sentences, vocab_size),
        normalization_rule_name='identity', remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, input_sentence_size=0,
        shuffle_input_sentence=False, max_sentence_length=4 * _SPM_CHUNK_CHARS,
        num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f'training a SentencePiece model with vocab_size={vocab_size} failed '
                     f'(the vocabulary must hold 260 byte and special pieces plus the '
                     f'characters, and the text must allow enough merges): {e}') from e
  tokenizer = SentencePieceTokenizer(writer.data, path or '<in memory>')
  if path:
    file = epath.Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    cloud_paths.write_atomically(file, writer.data)  # readers never see a partly written model
    logging.info('Trained a SentencePiece model with %d pieces: %s', vocab_size, path)
  return tokenizer


def _character_coverage(sentences: Sequence[str], vocab_size: int) -> float:
  """A coverage that leaves characters at most half of the learned (non-byte) pieces.

  SentencePiece makes a piece of each of the most frequent characters up to this fraction of
  all characters; the rest are spelled in bytes. A small vocabulary (a test's 320) would
  otherwise be filled by characters alone and fail to train.
  """
  counts = collections.Counter()
  for sentence in sentences:
    counts.update(sentence)
  most_characters = max(1, (vocab_size - _SPM_RESERVED_PIECES) // 2)
  if len(counts) <= most_characters:
    return _SPM_CHARACTER_COVERAGE
  frequencies = sorted(counts.values(), reverse=True)
  covered = sum(frequencies[:most_characters]) / sum(frequencies)
  # SentencePiece stops adding characters once the coverage reached is >= the target (the
  # margin keeps float rounding from admitting one more) and accepts no target below 0.98.
  return min(_SPM_CHARACTER_COVERAGE, max(0.98, covered - 1e-6))


class _BytesWriter:
  """The file-like object SentencePieceTrainer writes the serialised model into."""

  def __init__(self):
    self.data = b''

  def write(self, data: bytes) -> None:
    self.data += data
