"""The image tokenizer's training (`m2 train-tokenizer`): its loop, checkpoints and frames."""
