"""Shared pytest setup: CPU only, a few threads, deterministic torch."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

# Small ops on a shared 2-core machine run far faster on one thread than on two threads
# fighting other processes (measured: the overfit test 4.5 s vs 28 s).
torch.set_num_threads(1)
