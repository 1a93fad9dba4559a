"""Evaluation: lm-eval suites, the harness, comparison tables, perplexity and model cards."""
