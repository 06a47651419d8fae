"""Evaluation: perplexity (and, later, zero-shot tasks)."""

from duquant.eval.perplexity import perplexity

__all__ = ["perplexity"]
