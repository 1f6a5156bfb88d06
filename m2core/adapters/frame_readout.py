"""The skeleton now read from the frame: each x / y query's soft-argmax over the image cells.

A mixin of the pose adapter, which owns the weights it reads: `query_key` and `cell_key`
(the query's scores over the encoder's image cells) and, with `read_heat`, `heat` (a map
per joint over the cells' input embeddings, added to those scores).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from m2core.adapters.base import Inputs, Slots
from m2core.modalities import IMAGE_GRID, NUM_JOINTS, TOKENS_PER_POSE


class FrameReadout:
    query_key: nn.Linear
    cell_key: nn.Linear
    heat: nn.Linear | None
    image_index: int = 0  # set by the model: the registry index of the present frame

    def spatial(
        self, h: Tensor, s: Slots, ctx: Inputs, att: tuple | None = None
    ) -> tuple[Tensor, Tensor]:
        """Soft-argmax of each query over its sample's image cells -> (expected x or y by
        the slot's component, whether the sample has any image cell)."""
        w, line, mask = att if att is not None else self.attend(h, s, ctx)
        return (w * (line + 0.5) / IMAGE_GRID).sum(-1), mask.any(-1)

    def attend(self, h: Tensor, s: Slots, ctx: Inputs) -> tuple[Tensor, Tensor, Tensor]:
        """-> (each query's attention over the context (n, N), 0 off its sample's image
        cells; each cell's column (x query) or row (y query) (n, N); which are image cells)."""
        is_img = ctx.valid & (ctx.mod == self.image_index)
        B, N, _ = ctx.context.shape
        keys = self.cell_key(ctx.context)  # (B, N, 64)
        q = self.query_key(h)  # (n, 64)
        scores = (q @ keys.reshape(B * N, -1).T).view(len(h), B, N)
        scores = scores[torch.arange(len(h), device=h.device), s.row] / 8.0  # (n, N)
        if self.heat is not None and ctx.embedded is not None:
            heat = self.heat(ctx.embedded).float()  # (B, N, joints)
            scores = scores + heat[s.row, :, (s.pos % TOKENS_PER_POSE) // 3]
        mask = is_img[s.row]
        w = scores.float().masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
        cell = ctx.pos[s.row]
        line = torch.where((s.pos % 3 == 0)[:, None], cell % IMAGE_GRID, cell // IMAGE_GRID)
        return w, line, mask

    @staticmethod
    def line_ce(att: tuple[Tensor, Tensor, Tensor], y: Tensor) -> Tensor:
        """(n,) cross-entropy of `attend`'s attention summed per cell column / row against
        value y (frame units) split between its two nearest cell centres; 0 without image
        cells."""
        w, line, mask = att
        p = torch.zeros(len(w), IMAGE_GRID, device=w.device).scatter_add_(
            1, line.clamp(0, IMAGE_GRID - 1), w
        )
        return torch.where(mask.any(-1), FrameReadout.split_ce(p, y), 0.0)

    @staticmethod
    def split_ce(p: Tensor, y: Tensor) -> Tensor:
        """(n,) cross-entropy of (n, IMAGE_GRID) probabilities over cell lines against value y
        (frame units) split between its two nearest cell centres."""
        at = (y * IMAGE_GRID - 0.5).clamp(0, IMAGE_GRID - 1)
        lo = at.floor().long()
        hi = (lo + 1).clamp(max=IMAGE_GRID - 1)
        frac = (at - lo)[:, None]
        target = (
            torch.zeros_like(p)
            .scatter_add_(1, lo[:, None], 1 - frac)
            .scatter_add_(1, hi[:, None], frac)
        )
        return -(target * p.clamp(min=1e-6).log()).sum(-1)

    def heat_read(self, embedded: Tensor) -> tuple[Tensor, Tensor]:
        """Whole frames' input embeddings (R, G*G, D) -> each joint's expected cell centre
        under its heat map alone (R, 13, 2) in frame units, and the map summed per cell
        column (x) and row (y) (R, 13, 2, G)."""
        R, G = len(embedded), IMAGE_GRID
        p = self.heat(embedded).float().transpose(1, 2).softmax(-1).view(R, NUM_JOINTS, G, G)
        centre = (torch.arange(G, device=p.device) + 0.5) / G
        lines = torch.stack([p.sum(2), p.sum(3)], 2)
        return (lines * centre).sum(-1), lines
