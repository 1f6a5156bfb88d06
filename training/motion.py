"""Fitting the motion head (M2Config.motion_width) of a trained model.

The head is an MLP over the present skeleton's shape features (`skeleton_features`): it
regresses each joint's displacement at t+1..t+6 in units of the skeleton's extent, and
generation centres the future's copy prior on the present moved by it (model.py). It is
fitted here, alone, on (skeleton, future skeletons) pairs of the training split; the loss is
the mean distance between predicted and true positions over the joints visible at both
times, the figure ADE averages. The transformer is not trained on it.
"""

from __future__ import annotations

import numpy as np
import torch

from m2core.modalities import FUTURE_FRAMES, NUM_JOINTS, POSE_BINS
from m2core.model import M2Model, skeleton_features
from training.data import Shards
from training.pose_context import fit_alone, require_arrays


def _batch(shards: Shards, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
    """-> skeleton features (B, 81), true displacements in extents (B, 6, 13, 2), and which
    joints are visible now and then (B, 6, 13)."""
    rows = np.sort(rows)  # memory-mapped arrays read faster in order
    now = torch.from_numpy(np.asarray(shards.arrays["coords"][rows], np.int64)).to(device)
    later = torch.from_numpy(np.asarray(shards.arrays["coords_next"][rows], np.int64)).to(device)
    pos = torch.arange(now.shape[1], device=device).expand_as(now)
    feats = skeleton_features(now, pos, now >= 0)
    now = now.view(-1, 1, NUM_JOINTS, 3)
    later = later.view(-1, FUTURE_FRAMES, NUM_JOINTS, 3)
    move = (
        (later[..., :2] - now[..., :2]).float()
        / POSE_BINS
        / feats[:, -1].exp()[:, None, None, None]
    )
    seen = lambda p: (p[..., :2] < POSE_BINS).all(-1) & (p[..., 2] == POSE_BINS + 1)  # noqa: E731
    return feats, move, seen(now) & seen(later)


def _all(shards: Shards, device: torch.device, chunk: int = 8192) -> tuple[torch.Tensor, ...]:
    """`_batch` of every sample of a split, read in order, chunk by chunk."""
    parts = [_batch(shards, np.arange(i, min(i + chunk, len(shards))), device)
             for i in range(0, len(shards), chunk)]  # fmt: skip
    return tuple(torch.cat(t) for t in zip(*parts, strict=True))


def _distance(net: torch.nn.Module, feats, move, seen) -> torch.Tensor:
    """Mean distance (in extents) between predicted and true future joints."""
    err = ((net(feats).view_as(move) - move).pow(2).sum(-1) + 1e-8).sqrt()
    return (err * seen).sum() / seen.sum().clamp(min=1)


def fit(
    model: M2Model,
    train: Shards,
    val: Shards | None,
    steps: int,
    seed: int = 0,
    batch_size: int = 256,
    lr: float = 1e-3,
    progress: bool = True,
) -> dict[str, float]:
    """Fit `model.motion` for `steps` AdamW steps -> {"train_distance", "val_distance",
    "val_zero_velocity"} (mean joint distances in skeleton extents; NaN without a val
    split). Only the motion head's weights change."""
    if model.motion is None:
        raise ValueError("fitting the motion head needs model.motion_width")
    require_arrays(train, ("coords", "coords_next"), "motion head")
    rng = np.random.default_rng([seed, 0x307])
    net = model.motion
    device = next(model.parameters()).device
    data = _all(train, device)  # ~4 KB per sample: random batches then cost no disk reads
    was_training = model.training
    net.train()

    def loss_at(step: int) -> torch.Tensor:
        rows = torch.from_numpy(rng.choice(len(train), min(batch_size, len(train)))).to(device)
        return _distance(net, *(t[rows] for t in data))

    desc = "motion head" if progress else None
    run = fit_alone(net.parameters(), loss_at, steps, lr, 0.01, warmup=200, desc=desc)
    out = {"train_distance": run, "val_distance": float("nan"),
           "val_zero_velocity": float("nan")}  # fmt: skip
    if val is not None and len(val):
        net.eval()
        feats, move, seen = _batch(
            val, rng.choice(len(val), min(4096, len(val)), replace=False), device
        )
        with torch.no_grad():
            out["val_distance"] = float(_distance(net, feats, move, seen))
            still = (move.pow(2).sum(-1) + 1e-8).sqrt()
            out["val_zero_velocity"] = float((still * seen).sum() / seen.sum().clamp(min=1))
    model.train(was_training)
    return out


def _option(bundle) -> dict:
    if not bundle.model.config.present_prior:
        raise ValueError("the checkpoint's model has no present prior (present_prior)")
    return {"motion_width": 1024}


def main(argv: list[str] | None = None) -> int:
    """`m2 fit-motion`: a serving checkpoint -> the same checkpoint with a motion head (the
    forecast from the skeleton's shape) fitted on a prepared data folder (the transformer's
    weights are unchanged)."""
    from training import refit

    return refit.main(
        argv,
        prog="m2 fit-motion",
        description=main.__doc__,
        part="motion",
        option=_option,
        fit=fit,
        steps=(12000, "AdamW steps (default 12000: ~5 min on 2 CPU cores)"),
        batch_size=256,
        summary=lambda got: (
            f"validation joint distance {got['val_distance']:.4f} extents, "
            f"zero velocity {got['val_zero_velocity']:.4f}"
        ),
    )
