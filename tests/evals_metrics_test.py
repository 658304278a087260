"""Task metrics against scikit-learn, rouge-score and sacrebleu's own command line."""

import json
import math
import subprocess

import numpy as np
import pytest
from rouge_score import rouge_scorer
from sklearn import metrics as sk_metrics

from llm_jax.evals import metrics

REFERENCES = ['spam', 'ham', 'ham', 'spam', 'ham', 'spam', 'ham', 'ham']
# 'maybe' is an unparsable generation: wrong, and in no class.
PREDICTIONS = ['spam', 'ham', 'spam', 'spam', 'ham', 'ham', 'maybe', 'ham']

HYPOTHESES = ['the cat is on the mat .', 'Das Haus ist klein und alt.',
              'a quick brown fox jumped over the dogs', 'nothing in common here']
TARGETS = ['the cat sat on the mat.', 'Das Haus ist alt und klein.',
           'the quick brown fox jumps over the lazy dog', 'completely different words']


def test_classification_matches_scikit_learn_report():
  ours = metrics.classification(PREDICTIONS, REFERENCES, labels=['ham', 'spam'])
  report = sk_metrics.classification_report(REFERENCES, PREDICTIONS, labels=['ham', 'spam'],
                                            output_dict=True, zero_division=0)
  assert ours['accuracy'] == pytest.approx(5 / 8)  # counted by hand: 'maybe' is wrong
  for label in ('ham', 'spam'):
    for ours_key, theirs_key in (('precision', 'precision'), ('recall', 'recall'),
                                 ('f1', 'f1-score'), ('support', 'support')):
      assert ours['per_class'][label][ours_key] == pytest.approx(report[label][theirs_key])
  assert ours['macro_precision'] == pytest.approx(report['macro avg']['precision'])
  assert ours['macro_recall'] == pytest.approx(report['macro avg']['recall'])
  assert ours['macro_f1'] == pytest.approx(report['macro avg']['f1-score'])
  # rows = truth (ham, spam), columns = prediction; the 'maybe' row is in neither column.
  assert ours['confusion_matrix'] == [[3, 1], [1, 2]]


def test_classification_rejects_mismatched_lengths():
  with pytest.raises(ValueError, match='3 predictions for 2 references'):
    metrics.classification(['a', 'b', 'c'], ['a', 'b'])


def test_rouge_equals_rouge_score_means():
  ours = metrics.rouge(HYPOTHESES, TARGETS)
  scorer = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'], use_stemmer=True)
  scores = [scorer.score(t, h) for h, t in zip(HYPOTHESES, TARGETS)]
  for name in ('rouge1', 'rouge2', 'rougeL'):
    assert ours[name] == pytest.approx(100 * np.mean([s[name].fmeasure for s in scores]))
  assert 0 < ours['rouge2'] < ours['rouge1'] < 100


def test_bleu_and_chrf_equal_the_sacrebleu_command_line(tmp_path):
  (tmp_path / 'ref.txt').write_text('\n'.join(TARGETS) + '\n', encoding='utf-8')
  (tmp_path / 'hyp.txt').write_text('\n'.join(HYPOTHESES) + '\n', encoding='utf-8')
  result = subprocess.run(
      ['sacrebleu', str(tmp_path / 'ref.txt'), '-i', str(tmp_path / 'hyp.txt'), '-m', 'bleu',
       'chrf', '-b', '-w', '4'], capture_output=True, text=True, check=True, timeout=60)
  bleu, chrf = json.loads(result.stdout)
  ours = metrics.bleu_chrf(HYPOTHESES, TARGETS)
  assert ours['bleu'] == pytest.approx(bleu, abs=6e-5)
  assert ours['chrf'] == pytest.approx(chrf, abs=6e-5)
  assert 0 < ours['bleu'] < 100


def test_multiple_choice_length_normalisation_can_change_the_answer():
  # Choice 0 has the highest total log-likelihood; per byte, the long choice 1 wins.
  result = metrics.multiple_choice([[-2.0, -3.0]], [['ab', 'abcdefghij']], [1])
  assert result['acc'] == 0.0 and result['acc_norm'] == 1.0


def test_language_modelling_figures():
  texts = ['hello world', 'héllo']  # 11 + 6 UTF-8 bytes
  result = metrics.language_modelling(-10.0, 5, texts)
  assert result['perplexity'] == pytest.approx(math.exp(2.0))
  assert result['bits_per_byte'] == pytest.approx(10.0 / math.log(2) / 17)
  assert result['num_bytes'] == 17
