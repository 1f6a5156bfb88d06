"""A label (the clip's `action`): one token, one row per class, one class head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2core.adapters.base import Adapter, Inputs, Slots
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

    def loss(
        self, h: Tensor, s: Slots, labels: Tensor, ctx: Inputs | None = None
    ) -> tuple[Tensor, Tensor]:
        keep = labels >= 0
        ce = F.cross_entropy(self.logits(h), labels.clamp(min=0), reduction="none")
        return (ce * keep).sum(), keep.sum()

    def readout(
        self,
        h: Tensor,
        s: Slots,
        ctx: Inputs | None = None,
        temperature: float = 0.0,
        gens: list[torch.Generator] | None = None,
    ) -> tuple[Tensor, Tensor]:
        conf, ids = self.logits(h).softmax(-1).max(-1)
        return ids, conf
