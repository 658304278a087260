"""Task metrics computed by the libraries the field reports them with.

Classification figures come from scikit-learn, ROUGE from Google's rouge-score, BLEU and chrF
from sacrebleu (its default 13a tokenisation and settings, i.e. what `sacrebleu REF -i HYP -m
bleu chrf` prints). Perplexity and bits per byte are sums of log-likelihoods over tokens and
UTF-8 bytes; multiple choice accuracy follows lm-evaluation-harness (acc_norm divides each
choice's log-likelihood by its length in bytes).
"""

import gzip
import math
from typing import Optional, Sequence

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer
from sklearn import metrics as sk_metrics

ROUGE_TYPES = ('rouge1', 'rouge2', 'rougeL')


def classification(predictions: Sequence[str], references: Sequence[str],
                   labels: Optional[Sequence[str]] = None) -> dict:
  """Accuracy, macro precision/recall/F1, per-class figures and the confusion matrix.

  Args:
    predictions: predicted labels; one outside `labels` (an unparsable generation) counts as
      wrong and belongs to no class.
    references: true labels.
    labels: the classes, in the order of the confusion matrix; default: sorted references.

  Returns:
    {'accuracy', 'macro_precision', 'macro_recall', 'macro_f1', 'per_class': {label:
    {'precision', 'recall', 'f1', 'support'}}, 'confusion_matrix': rows = true, columns =
    predicted, 'labels', 'num_examples'}.
  """
  if len(predictions) != len(references):
    raise ValueError(f'{len(predictions)} predictions for {len(references)} references')
  if not references:
    raise ValueError('no examples to score')
  labels = sorted(set(references)) if labels is None else list(labels)
  precision, recall, f1, support = sk_metrics.precision_recall_fscore_support(
      references, predictions, labels=labels, average=None, zero_division=0)
  macro = sk_metrics.precision_recall_fscore_support(
      references, predictions, labels=labels, average='macro', zero_division=0)
  return {
      'accuracy': float(sk_metrics.accuracy_score(references, predictions)),
      'macro_precision': float(macro[0]),
      'macro_recall': float(macro[1]),
      'macro_f1': float(macro[2]),
      'per_class': {label: {'precision': float(p), 'recall': float(r), 'f1': float(f),
                            'support': int(s)}
                    for label, p, r, f, s in zip(labels, precision, recall, f1, support)},
      'confusion_matrix': sk_metrics.confusion_matrix(references, predictions,
                                                      labels=labels).tolist(),
      'labels': labels,
      'num_examples': len(references),
  }


def rouge(predictions: Sequence[str], references: Sequence[str],
          use_stemmer: bool = True) -> dict:
  """Mean ROUGE-1/2/L F-measure (x100) over examples, with rouge-score's tokenizer."""
  if len(predictions) != len(references) or not references:
    raise ValueError(f'{len(predictions)} predictions for {len(references)} references')
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
  scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
  return {name: 100.0 * float(np.mean([s[name].fmeasure for s in scores]))
          for name in ROUGE_TYPES}


def bleu_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
  """Corpus BLEU and chrF with sacrebleu's defaults (one reference per hypothesis)."""
  if len(hypotheses) != len(references) or not references:
    raise ValueError(f'{len(hypotheses)} hypotheses for {len(references)} references')
  return {'bleu': float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score),
          'chrf': float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)}


def multiple_choice(choice_logprobs: Sequence[Sequence[float]],
                    choices: Sequence[Sequence[str]], gold: Sequence[int]) -> dict:
  """acc (argmax log-likelihood) and acc_norm (argmax log-likelihood per byte), as lm-eval."""
  correct, correct_norm = [], []
  for logprobs, texts, answer in zip(choice_logprobs, choices, gold):
    per_byte = [lp / max(len(t.encode('utf-8')), 1) for lp, t in zip(logprobs, texts)]
    correct.append(int(np.argmax(logprobs)) == answer)
    correct_norm.append(int(np.argmax(per_byte)) == answer)
  return {'acc': float(np.mean(correct)), 'acc_norm': float(np.mean(correct_norm)),
          'num_examples': len(gold)}


def language_modelling(total_logprob: float, num_tokens: int, texts: Sequence[str]) -> dict:
  """Per-token perplexity and bits per byte of texts, next to gzip's bits per byte."""
  data = '\n'.join(texts).encode('utf-8')
  num_bytes = sum(len(t.encode('utf-8')) for t in texts)
  if num_tokens == 0 or num_bytes == 0:
    raise ValueError('the text source is empty')
  return {'perplexity': math.exp(-total_logprob / num_tokens),
          'bits_per_byte': -total_logprob / math.log(2) / num_bytes,
          'gzip_bits_per_byte': 8.0 * len(gzip.compress(data, compresslevel=9)) / len(data),
          'num_tokens': num_tokens, 'num_bytes': num_bytes}
