"""Shared pytest setup: CPU only, a few threads, deterministic torch."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

torch.set_num_threads(1)  # shared 2-core CI machines: oversubscription is 10x slower
