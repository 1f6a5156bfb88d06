"""What the export step calibrates on validation frames and records in config.json.

The copy margin: six frames on, most of a frame's tokens are unchanged, so a next key frame
token the model is unsure of is best left as the present one. The margin is the log-
probability (nats) by which the model's token must beat the present token to replace it,
picked for the best token accuracy on validation frames from the frame alone (the first
MaskGIT pass of `tok_rgb_next` with the frame as the only input; generation's other inputs
are read from that same frame). A margin past every gap keeps the frame: copying. A margin
counts only where its gain over copying is more than sampling noise, since a gain of a few
tokens does not carry over to new frames (docs/model.md, run 8).
"""

from __future__ import annotations

import numpy as np
import torch

from m2core.adapters import Slots
from m2core.adapters.image import COPY
from m2core.chain import Chain
from m2core.generate import GenerationConfig
from m2core.model_v2 import M2ModelV2
from training.data.shards import Shards

MARGINS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)


@torch.no_grad()
def next_frame_gaps(
    model: M2ModelV2, shards: Shards, samples: int = 512, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> per token of `samples` evenly spaced rows: the model's log-p gap over the present
    token, whether its token is right, whether the present one is."""
    device = next(model.parameters()).device
    rows = np.unique(np.linspace(0, len(shards) - 1, min(samples, len(shards))).astype(int))
    gaps, best_ok, copy_ok = [], [], []
    for at in range(0, len(rows), batch_size):
        m = shards.modalities(rows[at : at + batch_size])
        rgb, truth = m["tok_rgb"].to(device), m["tok_rgb_next"].to(device)
        chain = Chain(model, GenerationConfig(), [])  # generation's own encoding and queries
        chain.known["tok_rgb"] = (rgb, torch.ones_like(rgb, dtype=torch.bool))
        ctx, cross = chain.encode()
        s = Slots.block(torch.full_like(truth, -1), chain.queries("tok_rgb_next")[0])
        h = model.decode(model.embed_queries("tok_rgb_next", s), model.context_kv(ctx), cross)
        best, gap = model.adapters["tok_rgb_next"].copy_gap(h.flatten(0, 1), s)
        gaps.append(gap.float().cpu().numpy())
        best_ok.append((best == truth.flatten()).cpu().numpy())
        copy_ok.append((rgb == truth).flatten().cpu().numpy())
    return np.concatenate(gaps), np.concatenate(best_ok), np.concatenate(copy_ok)


def beats_copying(changed: np.ndarray, best_ok: np.ndarray, copy_ok: np.ndarray) -> bool:
    """Whether the `changed` tokens gain over copying by more than noise: a sign test on the
    tokens where exactly one of the two is right (net wins > 2 standard deviations)."""
    wins = (best_ok & ~copy_ok & changed).sum()
    losses = (copy_ok & ~best_ok & changed).sum()
    return bool(wins - losses > 2.0 * np.sqrt(wins + losses))


def pick_margin(gaps: np.ndarray, best_ok: np.ndarray, copy_ok: np.ndarray) -> dict:
    """The margin with the best accuracy among those that beat copying by more than noise
    (ties: the larger, which changes fewer tokens); none: copying."""
    best_ok, copy_ok = best_ok.astype(bool), copy_ok.astype(bool)
    table = {m: float(np.where(gaps >= m, best_ok, copy_ok).mean()) for m in (*MARGINS, COPY)}
    found = [m for m in MARGINS if beats_copying(gaps >= m, best_ok, copy_ok)] + [COPY]
    margin = max(found, key=lambda m: (table[m], m))
    return {
        "copy_margin": margin,
        "accuracy": table[margin],
        "copying": float(copy_ok.mean()),
        "changed": float((gaps >= margin).mean()),
        "tokens": len(gaps),
        "by_margin": {str(m): round(a, 5) for m, a in table.items()},
    }


def calibrate_copy_margin(model: M2ModelV2, shards: Shards, samples: int = 512) -> dict:
    """Pick the margin on `shards` (a validation split) and set it on the model."""
    was_training = model.training
    model.eval()
    try:
        found = pick_margin(*next_frame_gaps(model, shards, samples))
    finally:
        model.train(was_training)
    model.set_copy_margin(found["copy_margin"])
    return found
