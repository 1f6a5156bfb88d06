"""Evaluation: `m2 eval`, `m2 eval-tokenizer`, the metrics, rollout GIFs, `m2 contact-sheet`."""
