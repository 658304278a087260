"""The public input pipeline: tokenizer training, resumable training batches, per-process shards,
evaluation batches that score exactly their texts, and global batches on a mesh."""

import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import default
from llm_jax import sharding
from llm_jax.data import pipeline
from llm_jax.data import tokenizer as tokenizer_lib

_WORDS = ('alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud '
          'forest engine packet vector matrix kernel def return class import yield').split()
VOCAB = 400


def _corpus_config(tmp_path, **overrides):
  """text_files over a JSONL file of 300 numbered documents of 0 to ~60 words."""
  rng = np.random.default_rng(0)
  lines = []
  for i in range(300):
    words = rng.choice(_WORDS, rng.integers(0, 60))
    lines.append(json.dumps({'text': f'doc {i}: ' + ' '.join(words)}))
  path = tmp_path / 'corpus.jsonl'
  path.write_text('\n'.join(lines))
  config = default.get_config().data
  config.update(dataset='text_files', text_glob=str(path), tfds_data_dir=str(tmp_path / 'tfds'),
                seq_len=32, global_batch_size=4, eval_batch_size=4)
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp('corpus')
  config = _corpus_config(tmp_path)
  tokenizer = pipeline.get_tokenizer(config, str(tmp_path / 'work'), VOCAB)
  return config, tokenizer, tmp_path


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_same(batches, others):
  assert len(batches) == len(others)
  for batch, other in zip(batches, others):
    assert batch.keys() == other.keys()
    for key in batch:
      np.testing.assert_array_equal(batch[key], other[key], err_msg=key)


def test_get_tokenizer_trains_once_then_reuses_and_checks_the_vocabulary(corpus, monkeypatch):
  config, tokenizer, tmp_path = corpus
  workdir = str(tmp_path / 'work')
  assert (tmp_path / 'work' / 'tokenizer.model').exists()
  assert tokenizer.vocab_size == VOCAB
  monkeypatch.setattr(tokenizer_lib, 'train_sentencepiece', lambda *a, **k: pytest.fail('again'))
  assert pipeline.get_tokenizer(config, workdir, VOCAB).model_proto == tokenizer.model_proto
  with pytest.raises(ValueError, match=rf'vocab_size {VOCAB} .* model vocab_size 300'):
    pipeline.get_tokenizer(config, workdir, 300)
  config = config.copy_and_resolve_references()
  config.update(tokenizer='sentencepiece', tokenizer_path=workdir + '/tokenizer.model')
  assert pipeline.get_tokenizer(config, '', VOCAB).model_proto == tokenizer.model_proto
  config.tokenizer = 'bpe'
  with pytest.raises(ValueError, match="config.data.tokenizer='bpe'"):
    pipeline.get_tokenizer(config, '', VOCAB)


@pytest.mark.parametrize('packing', [True, False])
def test_resumed_iterator_repeats_the_batch_sequence(corpus, packing):
  config, tokenizer, _ = corpus
  config = config.copy_and_resolve_references()
  config.packing = packing
  iterator = pipeline.make_train_iterator(config, tokenizer, seed=3)
  first = _take(iterator, 5)
  assert {k: (v.shape, v.dtype) for k, v in first[0].items()} == {
      'inputs': ((4, 32), np.int32), 'targets': ((4, 32), np.int32),
      'positions': ((4, 32), np.int32), 'segment_ids': ((4, 32), np.int32),
      'loss_mask': ((4, 32), np.float32)}
  state = json.loads(json.dumps(iterator.get_state()))  # JSON-serialisable
  expected = _take(iterator, 6)
  iterator.close()
  resumed = pipeline.make_train_iterator(config, tokenizer, seed=3)
  resumed.set_state(state)
  _assert_same(_take(resumed, 6), expected)
  resumed.close()
  fresh = pipeline.make_train_iterator(config, tokenizer, seed=3)
  _assert_same(_take(fresh, 5), first)  # same seed, same sequence
  fresh.close()


def test_worker_processes_give_resumable_batches(corpus):
  config, tokenizer, _ = corpus
  config = config.copy_and_resolve_references()
  config.num_workers = 1
  iterator = pipeline.make_train_iterator(config, tokenizer, seed=0)
  _take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = _take(iterator, 4)
  iterator.close()
  resumed = pipeline.make_train_iterator(config, tokenizer, seed=0)
  resumed.set_state(state)
  _assert_same(_take(resumed, 4), expected)
  resumed.close()


def test_global_batches_do_not_depend_on_the_device_count(corpus):
  config, tokenizer, _ = corpus
  config = config.copy_and_resolve_references()
  config.global_batch_size = 8
  iterator = pipeline.make_train_iterator(config, tokenizer, seed=0)
  _take(iterator, 2)
  state = iterator.get_state()
  batch = next(iterator)
  iterator.close()
  rules = sharding.DEFAULT_RULES
  for devices in (jax.devices(), jax.devices()[:2]):  # a run restarted on fewer devices
    resumed = pipeline.make_train_iterator(config, tokenizer, seed=0)
    resumed.set_state(state)
    mesh = sharding.create_mesh((-1, 1, 1), devices=devices)
    arrays = pipeline.to_global_batch(next(resumed), mesh, rules)
    resumed.close()
    for key, value in arrays.items():
      assert value.sharding.spec[0] == ('data', 'fsdp')
      assert len(value.addressable_shards) == len(devices)
      np.testing.assert_array_equal(np.asarray(value), batch[key])
  mesh = sharding.create_mesh((-1, 1, 1))
  with pytest.raises(ValueError, match='global batch of 6 rows .*8 devices'):
    pipeline.to_global_batch({k: v[:6] for k, v in batch.items()}, mesh, rules)


def _documents_in_order(batches):
  """With packing=False and short documents, row r of batch i is document i * rows + r."""
  order = []
  for batch in batches:
    for row, segments in zip(batch['inputs'], batch['segment_ids']):
      order.append(tuple(row[segments == 1].tolist()))
  return order


def _train_documents(config, tokenizer):
  source = pipeline.sources.open_split(config, 'train')
  return [tuple(pipeline.tokenize_document(tokenizer, text).tolist())
          for text in (pipeline.sources.document_text(source[i], 'text')
                       for i in range(len(source)))]


def test_processes_read_disjoint_shards_covering_the_split(corpus):
  config, tokenizer, _ = corpus
  config = config.copy_and_resolve_references()
  config.update(packing=False, seq_len=128)  # one whole document per row
  documents = _train_documents(config, tokenizer)
  batches_in_an_epoch = len(documents) // config.global_batch_size
  seen = []
  for process_index in (0, 1):
    iterator = pipeline.make_train_iterator(config, tokenizer, seed=0,
                                            process_index=process_index, process_count=2)
    batches = _take(iterator, batches_in_an_epoch)
    iterator.close()
    assert batches[0]['inputs'].shape == (2, 128)
    seen.append(set(_documents_in_order(batches)))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] <= set(documents)
  assert len(seen[0] | seen[1]) == batches_in_an_epoch * config.global_batch_size


def test_the_global_batch_does_not_depend_on_the_number_of_processes(corpus):
  config, tokenizer, _ = corpus
  one = pipeline.make_train_iterator(config, tokenizer, seed=0)
  expected = _take(one, 3)
  one.close()
  per_process = []
  for process_index in (0, 1):
    iterator = pipeline.make_train_iterator(config, tokenizer, seed=0,
                                            process_index=process_index, process_count=2)
    per_process.append(_take(iterator, 3))
    iterator.close()
  for step in range(3):
    for key in expected[step]:
      np.testing.assert_array_equal(
          np.concatenate([per_process[0][step][key], per_process[1][step][key]]),
          expected[step][key])


def test_epochs_repeat_reshuffled_and_the_seed_sets_the_order(corpus):
  config, tokenizer, _ = corpus
  config = config.copy_and_resolve_references()
  config.update(packing=False, seq_len=128)
  documents = _train_documents(config, tokenizer)
  count = len(documents)

  def order(seed, shuffle_seed=0):
    config.shuffle_seed = shuffle_seed
    iterator = pipeline.make_train_iterator(config, tokenizer, seed=seed)
    result = _documents_in_order(_take(iterator, count // 2 + 1))  # two epochs, 4 rows each
    iterator.close()
    return result[:count], result[count:2 * count]

  first, second = order(0)
  assert sorted(first) == sorted(documents) and first != documents
  assert sorted(second) == sorted(documents) and second != first  # reshuffled each epoch
  assert order(0)[0] == first
  assert order(1)[0] != first and order(0, shuffle_seed=1)[0] != first


def _scored_pairs(batches):
  pairs = []
  for batch in batches:
    mask = batch['loss_mask'].astype(bool)
    pairs += list(zip(batch['inputs'][mask].tolist(), batch['targets'][mask].tolist()))
  return pairs


@pytest.mark.parametrize('packing, num_batches', [(True, 0), (True, 2), (False, 0), (False, 3)])
def test_eval_batches_score_exactly_their_texts(corpus, packing, num_batches):
  config, tokenizer, _ = corpus
  config = config.copy_and_resolve_references()
  config.update(packing=packing, seq_len=16)
  batches, texts = pipeline.make_eval_batches(config, tokenizer, num_batches=num_batches)
  assert texts and all(text.startswith('doc ') for text in texts)
  if num_batches:
    assert len(batches) <= num_batches
  else:  # the whole split
    source = pipeline.sources.open_split(config, 'validation')
    assert len(texts) == len(source)
  expected = []
  for text in texts:
    tokens = pipeline.tokenize_document(tokenizer, text).tolist()
    expected += list(zip(tokens[:-1], tokens[1:]))
  assert _scored_pairs(batches) == expected
  # Two processes: each holds its half of every global batch, and both report the same texts.
  halves = [pipeline.make_eval_batches(config, tokenizer, num_batches=num_batches,
                                       process_index=p, process_count=2) for p in (0, 1)]
  assert halves[0][1] == halves[1][1] == texts
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(halves[0][0],
                                                                        halves[1][0])]
  _assert_same(joined, batches)


def test_batch_sizes_must_divide_over_processes(corpus):
  config, tokenizer, _ = corpus
  with pytest.raises(ValueError, match='global_batch_size=4 must be a positive multiple of the 3'):
    pipeline.make_train_iterator(config, tokenizer, seed=0, process_count=3)


def test_tfds_catalogue_dataset_end_to_end(tmp_path, corpus):
  _, tokenizer, _ = corpus
  config = _corpus_config(tmp_path, dataset='tfds', tfds_name='lm1b', eval_split='test')
  with tfds.testing.mock_data(num_examples=20):
    iterator = pipeline.make_train_iterator(config, tokenizer, seed=0)
    batch = next(iterator)
    iterator.close()
    batches, texts = pipeline.make_eval_batches(config, tokenizer, num_batches=0)
  assert batch['inputs'].shape == (4, 32) and batch['loss_mask'].sum() > 0
  assert len(texts) == 20
  assert sum(b['loss_mask'].sum() for b in batches) == sum(
      len(tokenizer.encode(t)) + 1 for t in texts)


def test_default_config_on_the_stdlib_corpus(tmp_path):
  """The default run's data: the stdlib corpus, a trained tokenizer of the model's vocabulary."""
  config = default.get_config()
  data = config.data
  data.update(tfds_data_dir=str(tmp_path / 'tfds'), tokenizer_train_bytes=1_000_000)
  tokenizer = pipeline.get_tokenizer(data, str(tmp_path / 'work'), config.model.vocab_size)
  assert tokenizer.vocab_size == config.model.vocab_size
  iterator = pipeline.make_train_iterator(data, tokenizer, seed=config.seed)
  batch = next(iterator)
  iterator.close()
  assert batch['inputs'].shape == (data.global_batch_size, data.seq_len)
  assert batch['loss_mask'].mean() > 0.95  # packed: almost no padding
  batches, texts = pipeline.make_eval_batches(data, tokenizer, num_batches=2)
  assert 1 <= len(batches) <= 2 and texts
  assert 'import' in ''.join(texts) or 'def ' in ''.join(texts)
