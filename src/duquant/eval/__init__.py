"""Evaluation: perplexity, C4, lm-eval's zero-shot tasks, and the registry of the evaluations
`duquant run` and `duquant compare` offer (`duquant.eval.registry`)."""

from duquant.eval.perplexity import perplexity

__all__ = ["perplexity"]
