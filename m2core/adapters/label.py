"""A label (the clip's `action`): one token, one row per class, one class head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from m2core.adapters.base import Adapter
from m2core.modalities import Modality


class LabelAdapter(Adapter):
    def __init__(self, mod: Modality, dim: int, **_: object):
        super().__init__(mod, dim)
        self.table = nn.Embedding(mod.vocab_size, dim)
        nn.init.normal_(self.table.weight, std=0.02)
        self.head = nn.Linear(dim, mod.vocab_size)
        nn.init.normal_(self.head.weight, std=0.02)  # as the other heads

    def value(self, ids: Tensor) -> Tensor:
        return self.table(ids)

    def positions(self, pos: Tensor) -> Tensor:
        return torch.zeros(len(pos), self.dim, device=pos.device, dtype=self.table.weight.dtype)

    def logits(self, h: Tensor) -> Tensor:
        return self.head(h).float()
