"""Captions: a token table, a head, 1D sin-cos positions; learned left to right. With
`caption_action`, every caption query also carries the sample's action (given, or read out
before the caption), so the caption can name the action the model read."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from m2core.adapters.base import Adapter, Slots
from m2core.blocks import sincos_1d
from m2core.modalities import Modality


class TextAdapter(Adapter):
    def __init__(
        self,
        mod: Modality,
        dim: int,
        caption_action: bool = False,
        action_classes: int = 0,
        **_: object,
    ):
        super().__init__(mod, dim)
        del self.mask  # a caption query always carries a token (teacher forcing), never the mask
        self.table = nn.Embedding(mod.vocab_size, dim)
        nn.init.normal_(self.table.weight, std=0.02)
        # Its own head, not the tied table: the table grows as an input embedding, and tied, its
        # gradient into the trunk outweighed every other modality's 20-50x (docs/model.md).
        self.head = nn.Linear(dim, mod.vocab_size, bias=False)
        nn.init.normal_(self.head.weight, std=0.02)
        self.register_buffer("pos_table", sincos_1d(mod.num_tokens, dim), persistent=False)
        self.action: nn.Embedding | None = None
        if caption_action:  # row 0: the action is unknown
            self.action = nn.Embedding(action_classes + 1, dim)
            nn.init.normal_(self.action.weight, std=0.02)

    def value(self, ids: Tensor) -> Tensor:
        return self.table(ids)

    def positions(self, pos: Tensor) -> Tensor:
        return self.pos_table[pos]

    def embed_query(self, s: Slots) -> Tensor:  # the previous token (bos at a span start)
        x = self.value(s.ids) + self.positions(s.pos)
        if self.action is None:
            return x
        known = s.action[s.row] + 1 if s.action is not None else torch.zeros_like(s.ids)
        return x + self.action(known.clamp(min=0))

    def logits(self, h: Tensor) -> Tensor:
        return self.head(h).float()
