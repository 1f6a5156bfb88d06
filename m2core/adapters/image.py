"""Image tokens: in as their FSQ code values through a small conv stem, out as code digits.

A learned row per token id memorised each clip's look; the code values (the tokenizer's
implicit codebook, where neighbouring codes look alike) generalise, and a 3x3 conv stem
over the grid lets a token see its neighbours before the trunk does (docs/model.md).
The head scores each FSQ digit separately, so a 64,000-code tokenizer costs 38 output
rows, not 64,000. A future frame's digits get a learned bonus on the present token's
digits: the model starts from copying the frame and learns what changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2core.adapters.base import Adapter, Inputs, Slots
from m2core.blocks import sincos_2d
from m2core.modalities import IMAGE_GRID, Modality

# a copy margin past any gap (at most 69 nats, probabilities being floored at 1e-30): the
# present token is always kept
COPY = 1e4


def gelu(x: Tensor) -> Tensor:
    """GELU with its input floored at -6 (where it is -6e-9): a trained stem's units far below
    that have subnormal slopes, on which CPU convolutions run ~20x slower (docs/model.md)."""
    return F.gelu(x.clamp(min=-6.0))


class FlooredGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return gelu(x)


class ConvUnit(nn.Module):
    """x + conv(gelu(x)): a residual 3x3 layer, so a deep stem trains from PyTorch's init."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(gelu(x))


class ImageAdapter(Adapter):
    def __init__(
        self,
        mod: Modality,
        dim: int,
        image_levels: tuple[int, ...] = (),
        present: Modality | None = None,
        stem_layers: int = 2,
        **_: object,
    ):
        super().__init__(mod, dim)
        levels = tuple(int(v) for v in image_levels)
        if not levels or torch.tensor(levels).prod().item() != mod.vocab_size:
            raise ValueError(
                f"image levels {levels} do not multiply to the vocabulary {mod.vocab_size}"
            )
        self.levels = levels
        basis = torch.cumprod(torch.tensor([1, *levels[:-1]]), 0)
        self.register_buffer("basis", basis, persistent=False)
        self.register_buffer("level_t", torch.tensor(levels), persistent=False)
        self.register_buffer(
            "digit_start", torch.tensor([0, *levels[:-1]]).cumsum(0), persistent=False
        )
        self.register_buffer("pos_table", sincos_2d(IMAGE_GRID, IMAGE_GRID, dim), persistent=False)
        k = len(levels)
        self.code_in = nn.Linear(k, dim)
        width = 64
        self.stem = (
            nn.Sequential(  # only a modality that can be an input has one
                nn.Conv2d(k + 1, width, 3, padding=1),
                *(ConvUnit(width) for _ in range(stem_layers - 2)),
                FlooredGELU(),
                nn.Conv2d(width, dim, 3, padding=1),
            )
            if mod.can_input
            else None
        )
        self.head = nn.Linear(dim, sum(levels))
        self.has_present = present is not None
        if self.has_present:
            self.copy_gain = nn.Parameter(torch.full((k,), 3.0))
        # nats by which a token must beat the present one to replace it; 0 = the most likely
        # token. The export step picks it on validation frames (training/calibrate.py).
        self.copy_margin = 0.0

    @property
    def copies(self) -> bool:
        """Whether the read-out is the present token wherever there is one, whatever the state."""
        return self.has_present and self.copy_margin >= COPY

    # --- values ----------------------------------------------------------------------
    def digits(self, ids: Tensor) -> Tensor:  # (n,) -> (n, k) ints in [0, level)
        return (ids[:, None] // self.basis) % self.level_t

    def codes(self, ids: Tensor) -> Tensor:  # (n,) -> (n, k) in [-1, 1]
        half = (self.level_t - 1) / 2
        return (self.digits(ids) - half) / half

    def value(self, ids: Tensor) -> Tensor:
        return self.code_in(self.codes(ids))

    def positions(self, pos: Tensor) -> Tensor:
        return self.pos_table[pos]

    def embed_input(self, s: Slots, ctx: Inputs | None = None) -> Tensor:
        # the stem sees the shown tokens of each sample's grid (absent cells are zero, with
        # a presence channel), then each slot takes its own cell
        k, G = len(self.levels), IMAGE_GRID
        w = self.code_in.weight
        grid = torch.zeros(s.batch, G * G, k + 1, dtype=w.dtype, device=w.device)
        grid[s.row, s.pos] = torch.cat([self.codes(s.ids), torch.ones_like(s.pos)[:, None]], 1).to(
            grid.dtype
        )
        feat = self.stem(grid.transpose(1, 2).reshape(s.batch, k + 1, G, G))
        local = feat.flatten(2).transpose(1, 2)[s.row, s.pos]
        return self.value(s.ids) + local + self.positions(s.pos)

    def embed_query(self, s: Slots) -> Tensor:
        x = super().embed_query(s)
        if self.has_present and s.present is not None:
            has = (s.present >= 0)[:, None]
            x = x + torch.where(has, self.value(s.present.clamp(min=0)), 0.0)
        return x

    # --- outputs ---------------------------------------------------------------------
    def digit_logits(self, h: Tensor, present: Tensor | None) -> list[Tensor]:
        """(n, D) -> one (n, levels_d) logit tensor per digit, with the copy bonus."""
        out = self.head(h).float().split(self.levels, dim=1)
        if not (self.has_present and present is not None):
            return list(out)
        has = present >= 0
        d = self.digits(present.clamp(min=0))
        return [
            o + F.one_hot(d[:, i], o.shape[1]) * (self.copy_gain[i] * has)[:, None]
            for i, o in enumerate(out)
        ]

    def loss(
        self, h: Tensor, s: Slots, labels: Tensor, ctx: Inputs | None = None
    ) -> tuple[Tensor, Tensor]:
        keep = labels >= 0
        y = self.digits(labels.clamp(min=0))
        lp = self.digit_logits(h, s.present)
        ce = sum(F.cross_entropy(o, y[:, i], reduction="none") for i, o in enumerate(lp))
        return (ce * keep).sum(), keep.sum()

    def _choose(
        self,
        h: Tensor,
        s: Slots,
        temperature: float = 0.0,
        gens: list[torch.Generator] | None = None,
        with_present: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """-> (chosen ids, their probability, the present token's probability or None)."""
        ids = torch.zeros(len(h), dtype=torch.long, device=h.device)
        conf = torch.ones(len(h), device=h.device)
        now = self.digits(s.present.clamp(min=0)) if with_present else None
        keep = torch.ones_like(conf) if with_present else None
        for i, o in enumerate(self.digit_logits(h, s.present)):
            p = o.softmax(-1)
            if temperature > 0 and gens is not None:
                u = torch.stack([torch.rand((), generator=gens[r]) for r in s.row.tolist()]).to(
                    h.device
                )
                pt = (o / temperature).softmax(-1)
                d = (
                    torch.searchsorted(pt.cumsum(-1), u[:, None])
                    .squeeze(1)
                    .clamp(max=o.shape[1] - 1)
                )
            else:
                d = p.argmax(-1)
            ids += d * self.basis[i]
            conf *= p.gather(1, d[:, None]).squeeze(1)
            if keep is not None:
                keep *= p.gather(1, now[:, i, None]).squeeze(1)
        return ids, conf, keep

    @staticmethod
    def _gap(conf: Tensor, keep: Tensor, present: Tensor) -> Tensor:
        """log p of the chosen token minus the present one's; inf where there is none."""
        gap = conf.clamp(min=1e-30).log() - keep.clamp(min=1e-30).log()
        return torch.where(present >= 0, gap, float("inf"))

    def copy_gap(self, h: Tensor, s: Slots) -> tuple[Tensor, Tensor]:
        """-> (the most likely token, its gap over the present token) per slot: what the
        copy margin is calibrated on, computed as the greedy read-out computes it."""
        ids, conf, keep = self._choose(h, s, with_present=True)
        return ids, self._gap(conf, keep, s.present)

    def readout(
        self,
        h: Tensor,
        s: Slots,
        ctx: Inputs | None = None,
        temperature: float = 0.0,
        gens: list[torch.Generator] | None = None,
    ) -> tuple[Tensor, Tensor]:
        margin = self.copy_margin > 0 and s.present is not None
        ids, conf, keep = self._choose(h, s, temperature, gens, with_present=margin)
        if keep is not None:
            stay = self._gap(conf, keep, s.present) < self.copy_margin
            ids, conf = torch.where(stay, s.present, ids), torch.where(stay, keep, conf)
        return ids, conf
