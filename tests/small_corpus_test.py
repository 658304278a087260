"""A small text collection: a validation split of several pieces, the tokenizer's true text size
in the log, a warning when the run would read the corpus many times over, and the checkpoint of
lowest evaluation loss kept besides the last."""

import logging

import numpy as np
import pytest

from configs import default
from llm_jax import model as model_lib
from llm_jax.data import pipeline
from llm_jax.data import sources
from llm_jax.training import checkpoint

VOCAB = 320


@pytest.fixture(scope='module')
def small_corpus(tmp_path_factory):
  """One ~110 KB .txt file, as a user's first own corpus often is."""
  tmp_path = tmp_path_factory.mktemp('small')
  lines = [f'Line {i}: the {["quick", "slow", "red"][i % 3]} fox saw {i * 7 % 101} hens.\n'
           for i in range(2400)]
  path = tmp_path / 'book.txt'
  path.write_text(''.join(lines))
  config = default.get_config().data
  config.update(dataset='text_files', text_glob=str(path), tfds_data_dir=str(tmp_path / 'tfds'),
                seq_len=64, global_batch_size=8, eval_batch_size=8,
                tokenizer_train_bytes=4_000_000)
  return config, path.stat().st_size, tmp_path


def _texts(config, split):
  source = sources.open_split(config, split)
  return [sources.document_text(source[i], 'text') for i in range(len(source))]


def test_validation_is_several_small_pieces_of_a_small_file(small_corpus):
  config, size, _ = small_corpus
  validation, train = _texts(config, 'validation'), _texts(config, 'train')
  assert len(validation) >= 2
  assert sum(map(len, validation)) < 0.1 * size  # most of the text is left for training
  assert sum(map(len, validation + train)) == size


def test_tokenizer_log_gives_the_text_it_really_read(small_corpus, caplog):
  config, _, tmp_path = small_corpus
  train_bytes = sum(len(t.encode('utf-8')) for t in _texts(config, 'train'))
  with caplog.at_level(logging.INFO, logger='absl'):
    pipeline.get_tokenizer(config, str(tmp_path / 'work_log'), VOCAB)
  message = next(r.getMessage() for r in caplog.records if 'SentencePiece' in r.getMessage())
  assert f'on {train_bytes} bytes' in message and 'the whole train split' in message
  assert '4000000' not in message


def test_warns_when_the_run_reads_the_corpus_many_times(small_corpus, caplog):
  config, _, tmp_path = small_corpus
  tokenizer = pipeline.get_tokenizer(config, str(tmp_path / 'work_epochs'), VOCAB)
  # Every document with its BOS and EOS, counted here with the tokenizer alone.
  corpus_tokens = sum(len(tokenizer.encode(t)) + 2 for t in _texts(config, 'train'))
  tokens_per_step = 8 * 64
  with caplog.at_level(logging.WARNING):
    few = pipeline.corpus_epochs(config, tokenizer, num_steps=2)
  assert few == pytest.approx(2 * tokens_per_step / corpus_tokens)
  assert not [r for r in caplog.records if 'corpus is small' in r.getMessage()]
  steps = 3 * corpus_tokens // tokens_per_step + 1
  with caplog.at_level(logging.WARNING):
    many = pipeline.corpus_epochs(config, tokenizer, num_steps=steps)
  assert many == pytest.approx(steps * tokens_per_step / corpus_tokens) and many > 3
  warning, = [r.getMessage() for r in caplog.records if 'corpus is small' in r.getMessage()]
  assert 'corpus is small' in warning and f'{many:.1f} times' in warning
  assert f'{corpus_tokens:,} tokens' in warning  # all documents sampled: exact, not "about"


def test_keep_best_keeps_the_lowest_eval_loss_besides_the_last(tmp_path):
  model_config = model_lib.get_preset('tiny')
  directory = str(tmp_path / 'checkpoints')
  losses = {1: 3.0, 2: 1.0, 3: None, 4: 2.0, 5: None}  # None: saved between evaluations
  manager = checkpoint.create_manager(directory, keep=1, keep_best=1, async_save=False)
  for step, loss in losses.items():
    checkpoint.save(manager, step, model_config, {'w': np.full(3, step, np.float32)},
                    metrics=None if loss is None else {'eval_loss': loss})
  assert manager.all_steps() == [2, 5]  # the best evaluated one, and the last
  manager.close()
  # A restarted run still knows which one is best (the metrics are stored with the steps).
  manager = checkpoint.create_manager(directory, keep=1, keep_best=1, async_save=False)
  checkpoint.save(manager, 6, model_config, {'w': np.zeros(3, np.float32)},
                  metrics={'eval_loss': 4.0})
  assert manager.all_steps() == [2, 6] and manager.best_step() == 2
  manager.close()
