"""lm-eval task configs that read duquant's local (offline) copies of the zero-shot data sets."""
