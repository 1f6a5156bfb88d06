"""Frames for the image tokenizer: clip split, letterboxed frame loading, and evaluation.

Frames come from a Penn-Action-layout folder (synthetic or real) through
`training.data.penn_action`; each is letterboxed to 256x256 with `m2core.geometry.letterbox`.
The held-out split is by clip, never by frame: clips whose label says `train = -1`, or,
when every clip is marked for training, the last `val_fraction` of the clips.

Each frame comes with its limb band: the pixels within `BAND_PX` of the labelled
shoulder-elbow-wrist and hip-knee-ankle segments (both ends visible). Training weights
the loss there; evaluation reports PSNR over the band beside the whole frame, since a thin
forearm is a few hundred pixels and barely moves a whole-frame average.

Evaluation reports the tokenizer's PSNR next to two plain baselines measured on the same
frames, and the share of the codebook the held-out frames use:

- block mean: each 16x16 patch replaced by its mean colour;
- nearest: nearest-neighbour down-sampling to 16x16 (the pixel nearest each patch's
  centre, torch's "nearest-exact") and nearest up-sampling back to 256x256.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from m2core.geometry import letterbox
from m2core.modalities import FRAME_SIZE, IMAGE_GRID
from m2core.tokenizers.image import ImageTokenizer, psnr
from training.data.penn_action import Clip, iter_clips

log = logging.getLogger(__name__)

FrameRef = tuple[Clip, int]  # (clip, 0-based frame index)

BAND_PX = 5.0  # limb band half-width in frame pixels
# shoulder-elbow, elbow-wrist, hip-knee, knee-ankle on each side (Penn Action joint order)
LIMB_SEGMENTS: tuple[tuple[int, int], ...] = (
    (1, 3), (3, 5), (2, 4), (4, 6), (7, 9), (9, 11), (8, 10), (10, 12),
)  # fmt: skip


def split_clips(root: str | Path, val_fraction: float) -> tuple[list[Clip], list[Clip]]:
    """(training clips, held-out clips), split by clip, never by frame."""
    root = Path(root)
    clips = list(iter_clips(root))
    if len(clips) < 2:
        raise ValueError(f"{root}: need at least 2 clips to hold some out, found {len(clips)}")
    train = [c for c in clips if c.train]
    held = [c for c in clips if not c.train]
    if not held or not train:  # the labels mark no split: hold out the last clips
        n_val = min(max(1, math.ceil(val_fraction * len(clips))), len(clips) - 1)
        train, held = clips[:-n_val], clips[-n_val:]
    return train, held


def frame_refs(clips: Sequence[Clip]) -> list[FrameRef]:
    return [(c, i) for c in clips for i in range(c.nframes)]


def spread_index(n: int, limit: int) -> list[int]:
    """At most `limit` indices, evenly spaced over range(n) (deterministic)."""
    if limit <= 0 or n <= limit:
        return list(range(n))
    return np.linspace(0, n - 1, limit).round().astype(int).tolist()


def spread(refs: Sequence[FrameRef], limit: int) -> list[FrameRef]:
    """At most `limit` refs, evenly spaced over `refs`."""
    return [refs[i] for i in spread_index(len(refs), limit)]


def limb_band(xy: np.ndarray, visible: np.ndarray, size: int = FRAME_SIZE) -> np.ndarray:
    """bool (size, size): pixels whose centre lies within BAND_PX of a visible limb segment.

    `xy` (13, 2) in frame pixels (continuous: pixel i spans [i, i+1)), `visible` (13,).
    """
    centres = np.arange(size, dtype=np.float32) + 0.5
    px, py = np.meshgrid(centres, centres)  # (size, size) each: x varies along columns
    band = np.zeros((size, size), dtype=bool)
    for a, b in LIMB_SEGMENTS:
        if not (visible[a] and visible[b]):
            continue
        (ax, ay), (bx, by) = xy[a], xy[b]
        dx, dy = bx - ax, by - ay
        t = ((px - ax) * dx + (py - ay) * dy) / max(dx * dx + dy * dy, 1e-9)
        t = np.clip(t, 0.0, 1.0)
        band |= (px - ax - t * dx) ** 2 + (py - ay - t * dy) ** 2 <= BAND_PX**2
    return band


def load_frames(
    refs: Sequence[FrameRef], desc: str = "frames", bands: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Letterboxed uint8 frames (N, 256, 256, 3) for `refs`, decoded on a few threads;
    with `bands`, also each frame's limb band, bool (N, 256, 256)."""

    def one(ref: FrameRef) -> tuple[np.ndarray, np.ndarray | None]:
        clip, i = ref
        frame, lb = letterbox(clip.frame(i), FRAME_SIZE)
        if not bands:
            return frame, None
        xy = lb.to_frame(np.stack([clip.x[i], clip.y[i]], axis=1)) * FRAME_SIZE
        return frame, limb_band(xy, clip.visibility[i])

    out = torch.empty((len(refs), FRAME_SIZE, FRAME_SIZE, 3), dtype=torch.uint8)
    masks = torch.zeros((len(refs), FRAME_SIZE, FRAME_SIZE), dtype=torch.bool)
    with ThreadPoolExecutor(max_workers=4) as pool:
        frames = pool.map(one, refs)
        for k, (arr, band) in enumerate(tqdm(frames, total=len(refs), desc=desc, leave=False)):
            out[k] = torch.from_numpy(arr)
            if band is not None:
                masks[k] = torch.from_numpy(band)
    return (out, masks) if bands else out


# --- Baselines ------------------------------------------------------------------------------


def block_mean(images: torch.Tensor, grid: int = IMAGE_GRID) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> each (H/grid)x(W/grid) patch replaced by its mean colour."""
    x = images.permute(0, 3, 1, 2).float()
    small = F.adaptive_avg_pool2d(x, grid)
    up = F.interpolate(small, size=x.shape[-2:], mode="nearest")
    return up.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def nearest_resample(images: torch.Tensor, grid: int = IMAGE_GRID) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> nearest down-sampling to grid x grid, then nearest up-sampling."""
    x = images.permute(0, 3, 1, 2)
    small = F.interpolate(x.float(), size=(grid, grid), mode="nearest-exact")
    up = F.interpolate(small, size=x.shape[-2:], mode="nearest")
    return up.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# --- Evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def reconstruct(tokenizer: ImageTokenizer, images: torch.Tensor, batch_size: int = 32):
    """(reconstructions uint8 (N, 256, 256, 3) on CPU, ids (N, 16, 16) on CPU)."""
    recons, ids = [], []
    for start in range(0, len(images), batch_size):
        chunk = tokenizer.encode(images[start : start + batch_size])
        ids.append(chunk.cpu())
        recons.append(tokenizer.decode(chunk).cpu())
    return torch.cat(recons), torch.cat(ids)


def band_psnr(a: torch.Tensor, b: torch.Tensor, band: torch.Tensor) -> np.ndarray:
    """PSNR (dB) over each image's band pixels, uint8 (N, H, W, 3) x2 and bool (N, H, W);
    NaN for an image with an empty band."""
    sq = (a.double() - b.double()).square().mean(-1)  # (N, H, W)
    n = band.flatten(1).sum(1)
    mse = (sq * band).flatten(1).sum(1) / n.clamp_min(1)
    out = 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))
    return torch.where(n > 0, out.clamp_max(100.0), torch.nan).numpy()


def evaluate(
    tokenizer: ImageTokenizer,
    images: torch.Tensor,
    baselines: bool = True,
    bands: torch.Tensor | None = None,
) -> dict[str, float | int]:
    """Held-out metrics: mean per-image PSNR (dB) of the tokenizer and the baselines (over the
    whole frame and, given `bands`, over the limb band), codebook usage."""
    recon, ids = reconstruct(tokenizer, images)
    used = int(torch.unique(ids).numel())
    counts = torch.bincount(ids.flatten(), minlength=tokenizer.vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    result: dict[str, float | int] = {
        "frames": len(images),
        "psnr": float(psnr(recon, images).mean()),
        "ids_used": used,
        "vocab_size": tokenizer.vocab_size,
        "codebook_usage": used / tokenizer.vocab_size,
        "perplexity": float(torch.exp(-(p * p.log()).sum())),
    }
    if bands is not None:
        result["psnr_limb_band"] = float(np.nanmean(band_psnr(recon, images, bands)))
    if baselines:
        blocks = block_mean(images)
        result["psnr_block_mean"] = float(psnr(blocks, images).mean())
        result["psnr_nearest"] = float(psnr(nearest_resample(images), images).mean())
        if bands is not None:
            result["psnr_limb_band_block_mean"] = float(
                np.nanmean(band_psnr(blocks, images, bands))
            )
    return result
