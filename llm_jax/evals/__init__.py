"""Evaluation: scoring, task metrics and registry, in-loop evaluators, the lm-eval model class."""
