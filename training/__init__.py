"""training: synthetic data, dataset readers, prepare, training, evaluation, the m2 CLI."""
