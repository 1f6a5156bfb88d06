"""Fitting the motion head (M2Config.motion_width) of a trained model.

The head is an MLP over the present skeleton's shape features (`skeleton_features`): it
regresses each joint's displacement at t+1..t+6 in units of the skeleton's extent, and
generation centres the future's copy prior on the present moved by it (model.py). It is
fitted here, alone, on (skeleton, future skeletons) pairs of the training split; the loss is
the mean distance between predicted and true positions over the joints visible at both
times, the figure ADE averages. The transformer is not trained on it.

`/predict` has no true skeleton: it forecasts from the skeleton the pose reader read from the
frame, which is off by more than the motion itself (on the demo's validation frames, holding
the read skeleton still is 0.100 skeleton extents from the future, the true one 0.043). A head
fitted on true skeletons only forecasts from a read one no better than holding it still.
With a pose reader in the checkpoint, a share of each batch (`read_share`, default half) is
therefore the skeleton the reader reads from the training frame (with the true visibility),
and the target the true future: the head learns to forecast from what it will be given.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from m2core.modalities import FUTURE_FRAMES, NUM_JOINTS, POSE_BINS
from m2core.model import M2Model, skeleton_features
from training.data.shards import Shards
from training.pose_context import fit_alone, read_share_or_default, require_arrays


def _batch(
    shards: Shards, rows: np.ndarray, device: torch.device, reader: M2Model | None = None
) -> tuple[torch.Tensor, ...]:
    """-> skeleton features (B, 81), true displacements in extents (B, 6, 13, 2), and which
    joints are visible now and then (B, 6, 13). With `reader`, the skeleton now is the one
    its pose reader reads from the frame (x / y; the flags are the true ones)."""
    rows = np.sort(rows)  # memory-mapped arrays read faster in order
    now = torch.from_numpy(np.asarray(shards.arrays["coords"][rows], np.int64)).to(device)
    later = torch.from_numpy(np.asarray(shards.arrays["coords_next"][rows], np.int64)).to(device)
    if reader is not None:
        rgb = torch.from_numpy(np.asarray(shards.arrays["tok_rgb"][rows], np.int64)).to(device)
        with torch.no_grad():
            now = reader.read_pose(rgb, now)
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


def _all(
    shards: Shards,
    device: torch.device,
    reader: M2Model | None = None,
    chunk: int = 8192,
    desc: str | None = None,
) -> tuple[torch.Tensor, ...]:
    """`_batch` of every sample of a split, read in order, chunk by chunk (a progress bar
    with `desc`)."""
    starts = range(0, len(shards), chunk)
    parts = [_batch(shards, np.arange(i, min(i + chunk, len(shards))), device, reader)
             for i in tqdm(starts, desc=desc, unit="chunk", disable=desc is None)]  # fmt: skip
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
    read_share: float | None = None,
) -> dict[str, float]:
    """Fit `model.motion` for `steps` AdamW steps -> {"train_distance", "val_distance",
    "val_zero_velocity", "read_share"} (mean joint distances in skeleton extents; NaN
    without a val split), and with a pose reader "val_read_distance" and
    "val_read_zero_velocity": the same from the skeleton it reads. `read_share`: the share
    of each batch forecast from the read skeleton (None: 0.5 with a pose reader, else 0).
    Only the motion head's weights change."""
    if model.motion is None:
        raise ValueError("fitting the motion head needs model.motion_width")
    reader = model if model.pose_reader is not None else None
    read_share = read_share_or_default(read_share, reader is not None)
    require_arrays(train, ("coords", "coords_next", "tok_rgb"), "motion head")
    rng = np.random.default_rng([seed, 0x307])
    net = model.motion
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # the reader reads as it will in generation
    data = _all(train, device)  # ~4 KB per sample: random batches then cost no disk reads
    desc = "reading the training skeletons from their frames" if progress else None
    read = _all(train, device, reader, desc=desc) if read_share > 0 else None
    batch = min(batch_size, len(train))
    n_read = round(batch * read_share)  # rows of each batch from the read skeletons
    net.train()

    def loss_at(step: int) -> torch.Tensor:
        rows = torch.from_numpy(rng.choice(len(train), batch)).to(device)
        parts = [t[rows[n_read:]] for t in data]
        if read is not None:
            parts = [torch.cat([a, b[rows[:n_read]]]) for a, b in zip(parts, read, strict=True)]
        return _distance(net, *parts)

    desc = "motion head" if progress else None
    run = fit_alone(net.parameters(), loss_at, steps, lr, 0.01, warmup=200, desc=desc)
    out = {"train_distance": run, "val_distance": float("nan"),
           "val_zero_velocity": float("nan"), "read_share": read_share}  # fmt: skip
    if val is not None and len(val):
        net.eval()
        pick = rng.choice(len(val), min(4096, len(val)), replace=False)
        for key, who in [("val", None)] + ([("val_read", reader)] if reader else []):
            feats, move, seen = _batch(val, pick, device, who)
            with torch.no_grad():
                out[f"{key}_distance"] = float(_distance(net, feats, move, seen))
                still = (move.pow(2).sum(-1) + 1e-8).sqrt()
                out[f"{key}_zero_velocity"] = float((still * seen).sum() / seen.sum().clamp(min=1))
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
        summary=_summary,
        options=refit.READ_SHARE_OPTION,
    )  # fmt: skip


def _summary(got: dict[str, float]) -> str:
    out = (f"validation joint distance {got['val_distance']:.4f} extents, "
           f"zero velocity {got['val_zero_velocity']:.4f}")  # fmt: skip
    if "val_read_distance" in got:
        out += (f"; from the read skeleton {got['val_read_distance']:.4f}, holding it still "
                f"{got['val_read_zero_velocity']:.4f}")  # fmt: skip
    return out
