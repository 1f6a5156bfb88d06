"""What every adapter shares: the slot view of a batch and the encoder context it reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2core.modalities import Modality


@dataclass
class Slots:
    """The filled slots of one modality, flattened over the batch, in (sample, slot) order."""

    ids: Tensor  # (n,) token ids; for queries -1 = the mask token, else a revealed token
    pos: Tensor  # (n,) position inside the modality
    row: Tensor  # (n,) sample index
    batch: int  # B
    present: Tensor | None = None  # (n,) the present token at this position, -1 = none
    present_pose: Tensor | None = None  # (B, 39) each sample's present skeleton, -1 = unknown
    action: Tensor | None = None  # (B,) each sample's action id, -1 = unknown

    @classmethod
    def block(
        cls, ids: Tensor, present: Tensor | None = None, present_pose: Tensor | None = None,
        action: Tensor | None = None,
    ) -> Slots:  # fmt: skip
        """Every position of a full (B, n) block of one modality (`present` also (B, n))."""
        B, n = ids.shape
        pos = torch.arange(n, device=ids.device).repeat(B)
        row = torch.arange(B, device=ids.device).repeat_interleave(n)
        flat = None if present is None else present.flatten()
        return cls(ids.flatten(), pos, row, B, flat, present_pose, action)


@dataclass
class Inputs:
    """The encoder side of a batch, for adapters that read it (spatial pose read-out)."""

    context: Tensor  # (B, N, D) encoder output with input positions added back
    mod: Tensor  # (B, N) modality index of each input slot
    pos: Tensor  # (B, N)
    valid: Tensor  # (B, N) bool
    embedded: Tensor | None = None  # (B, N, D) each slot's input embedding, before the encoder


class Adapter(nn.Module):
    """Base: a learned mask token and the modality entry."""

    def __init__(self, mod: Modality, dim: int, **_: object):
        super().__init__()
        self.modality = mod
        self.dim = dim
        self.mask = nn.Parameter(torch.randn(dim) * 0.02)

    def positions(self, pos: Tensor) -> Tensor:  # (n,) -> (n, D)
        raise NotImplementedError

    def value(self, ids: Tensor) -> Tensor:  # (n,) -> (n, D): a token's own embedding
        raise NotImplementedError

    def embed_input(self, s: Slots, ctx: Inputs | None = None) -> Tensor:
        return self.value(s.ids) + self.positions(s.pos)

    def embed_query(self, s: Slots) -> Tensor:
        shown = s.ids >= 0
        tok = torch.where(shown[:, None], self.value(s.ids.clamp(min=0)), self.mask)
        return tok + self.positions(s.pos)

    def whole_loss(
        self, batch: dict[str, Tensor], action: Tensor | None = None
    ) -> tuple[Tensor, Tensor] | None:
        """A loss over every sample's whole modality, beside the drawn target slots' (none
        here; the future skeleton's motion path has one); `action`, each sample's given
        action or -1."""
        return None

    # A token classified over one vocabulary (text, label); image and pose override these.
    def logits(self, h: Tensor) -> Tensor:  # (n, D) -> (n, V)
        raise NotImplementedError

    def loss(
        self, h: Tensor, s: Slots, labels: Tensor, ctx: Inputs | None = None
    ) -> tuple[Tensor, Tensor]:
        keep = labels >= 0
        ce = F.cross_entropy(self.logits(h), labels.clamp(min=0), reduction="none")
        return (ce * keep).sum(), keep.sum()

    def readout(self, h: Tensor, s: Slots, ctx: Inputs | None = None, temperature: float = 0.0,
                gens: list[torch.Generator] | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
        conf, ids = self.logits(h).softmax(-1).max(-1)
        return ids, conf
