"""Evaluation: `runner.run_eval` answers held-out records with a trained model, `metrics` scores the
answers, `cli` is `vllama-eval`."""
