"""Evaluation, one job per module: `suites` (what each suite runs), `harness` (lm-eval's HFLM + simple_evaluate,
checks, output folders), `leaderboard` (Open LLM Leaderboard v2 normalisation), `identity` (which model a result
belongs to), `compare` (tables), `perplexity` and `model_card`; the commands are in `hf_sparse_ift.cli.evaluate`."""
