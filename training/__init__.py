"""training: `train.py` (config, checkpoints, losses), `m2 export`, the m2 CLI; synth/, data/, tokenizer/, eval/."""
