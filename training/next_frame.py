"""Fitting the next-frame head (M2Config.next_frame_levels) of a trained model.

The head maps the present frame's tokens and heat maps of the skeleton now and at t+6 to
the next key frame's FSQ code digits (model.py, `NextFrameHead`). It is fitted here, alone,
on the training split: the loss is the cross-entropy of the true next key frame's digits.
The skeleton at t+6 is the motion head's forecast from the present skeleton (the present
itself without a motion head), as generation gives it the forecast it just made. With a
pose reader, a share of each batch (`read_share`, default half) has the skeleton the reader
reads from the frame and the forecast from it, as `/predict` makes them: on the demo, a head
fitted on true skeletons only was 0.07 points below copying the frame from read ones.

Most tokens do not change six frames on (87% on the demo's clips), and where the figure
moves a changed token is rarely guessed exactly, so the most likely digits alone are worse
than copying the frame. Generation keeps the present token unless the head's guess beats
it by a margin; the fit picks that margin on validation frames (the most accurate of
`MARGINS`, with copying everything as the fallback), or takes `--margin`. A read skeleton
is rougher than a given one, so it gets its own margin (`margin_read`), picked the same way
on the skeletons the reader reads from those frames.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from m2core.modalities import FUTURE_FRAMES, NUM_JOINTS, POSE_BINS
from m2core.model import M2Model, pose_points
from training.data.shards import Shards
from training.pose_context import fit_alone, read_share_or_default, require_arrays

MARGINS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)  # nats, tried on validation frames
DEFAULT_MARGIN = 1.0  # without a val split (the demo's choice)


@torch.no_grad()
def forecast(model: M2Model, coords: torch.Tensor) -> torch.Tensor:
    """(B, 39) pose ids now -> (B, 39) the motion head's skeleton at t+6 (x / y moved by its
    displacement, flags kept); the present itself without a motion head."""
    if model.motion is None:
        return coords
    B = coords.shape[0]
    pos = torch.arange(coords.shape[1], device=coords.device).expand_as(coords)
    move = model.motion_bins(coords, pos, torch.ones_like(coords, dtype=torch.bool))
    last = move.view(B, FUTURE_FRAMES, NUM_JOINTS, 3)[:, -1, :, :2].nan_to_num(0.0)
    joints = coords.view(B, NUM_JOINTS, 3).clone()
    xy = joints[..., :2]
    placed = (xy >= 0) & (xy < POSE_BINS)
    moved = (xy + last.round().long()).clamp(0, POSE_BINS - 1)
    joints[..., :2] = torch.where(placed, moved, xy)
    return joints.view_as(coords)


def _inputs(
    model: M2Model, arrays, rows: np.ndarray, device: torch.device, read: bool = False
) -> tuple[torch.Tensor, ...]:
    """-> frame tokens (B, 256), joints now (xy, visible), at t+6 (xy, visible), and the
    next key frame's tokens (B, 256). With `read`, the skeleton now is the one the pose
    reader reads from the frame, and t+6 the forecast from it (as generation makes them
    from the frame alone)."""
    take = lambda k: torch.from_numpy(np.asarray(arrays[k][rows], np.int64)).to(device)  # noqa: E731
    rgb, now, nxt = take("tok_rgb"), take("coords"), take("tok_rgb_next")
    if read:
        with torch.no_grad():
            now = model.read_pose(rgb, now)
    return (rgb, *pose_points(now), *pose_points(forecast(model, now)), nxt)


def _accuracy(pred: torch.Tensor, truth: torch.Tensor) -> float:
    return float((pred == truth).float().mean())


def _validate(head, parts: list[tuple[torch.Tensor, ...]], margin: float | None, key: str):
    """Score the head on validation batches (`_inputs` tuples) -> (the margin: `margin`, or
    the most accurate of `MARGINS`, inf when none beats copying; the figures under `key`)."""
    with torch.no_grad():
        lp = torch.cat([head.log_probs(*given) for *given, _ in parts])
    rgb, nxt = torch.cat([p[0] for p in parts]), torch.cat([p[-1] for p in parts])
    at = lambda m: head.decide(lp, rgb, m)  # noqa: E731
    copy = _accuracy(rgb, nxt)
    if margin is None:
        best, m = max((_accuracy(at(m), nxt), m) for m in MARGINS)  # ties: the larger margin
        margin = m if best > copy else math.inf
    pred = at(margin)
    return margin, {f"{key}_token_accuracy": _accuracy(pred, nxt), f"{key}_copy_accuracy": copy,
                    f"{key}_best_digits_accuracy": _accuracy(at(-math.inf), nxt),
                    f"{key}_changed": float((pred != rgb).float().mean())}  # fmt: skip


def fit(
    model: M2Model,
    train: Shards,
    val: Shards | None,
    steps: int,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-3,
    progress: bool = True,
    margin: float | None = None,
    read_share: float | None = None,
) -> dict[str, float]:
    """Fit `model.next_frame` for `steps` AdamW steps and set its margins -> {"train_loss"
    (running mean of the digits' cross-entropy), "margin" (None: copy every token), and on
    up to 2,048 validation frames (NaN without a val split) "val_token_accuracy" (at that
    margin), "val_copy_accuracy" (copying the present frame), "val_best_digits_accuracy"
    (no margin) and "val_changed" (the share of tokens changed)}; with a pose reader also
    "margin_read" and the same figures as "val_read_*", from the skeleton it reads.
    `margin`: use this one (for both) instead of picking them on the validation frames.
    `read_share`: the share of each batch whose skeleton (and forecast) is the one the
    pose reader reads from the frame (None: 0.5 with a pose reader, else 0). Only the
    head's weights (and margins) change."""
    if model.next_frame is None:
        raise ValueError("fitting the next-frame head needs model.next_frame_levels")
    if margin is not None and not (margin >= 0):
        raise ValueError(f"margin must be >= 0, got {margin}")
    reader = model.pose_reader is not None
    read_share = read_share_or_default(read_share, reader)
    require_arrays(train, ("tok_rgb", "coords", "tok_rgb_next"), "next-frame head")
    rng = np.random.default_rng([seed, 0x6E46])
    head = model.next_frame
    device = next(model.parameters()).device
    # ~1.1 KB per sample in memory: random batches then cost no disk reads
    arrays = {k: np.asarray(train.arrays[k]) for k in ("tok_rgb", "coords", "tok_rgb_next")}
    was_training = model.training
    model.eval()  # the pose reader and motion head work as in generation
    head.train()
    batch = min(batch_size, len(train))
    n_read = round(batch * read_share)  # rows of each batch from the read skeletons

    def loss_at(step: int) -> torch.Tensor:
        rows = np.sort(rng.choice(len(train), batch))
        parts = [_inputs(model, arrays, rows[:n_read], device, read=True)] if n_read else []
        if n_read < batch:
            parts.append(_inputs(model, arrays, rows[n_read:], device))
        *given, nxt = (torch.cat(t) for t in zip(*parts, strict=True))
        lp = head.log_probs(*given)  # (B, digits, levels, N)
        return -lp.gather(2, head.digits_of(nxt)[:, :, None]).mean()

    desc = "next-frame head" if progress else None
    run = fit_alone(head.parameters(), loss_at, steps, lr, 0.01, warmup=100, desc=desc)
    head.eval()
    nan = float("nan")
    out = {"train_loss": run, "read_share": read_share, "val_token_accuracy": nan,
           "val_copy_accuracy": nan, "val_best_digits_accuracy": nan, "val_changed": nan}  # fmt: skip
    chosen = {"margin": DEFAULT_MARGIN if margin is None else margin}
    if reader:
        chosen["margin_read"] = chosen["margin"]
    if val is not None and len(val) and "tok_rgb_next" in val.arrays:
        rows = np.sort(rng.choice(len(val), min(2048, len(val)), replace=False))
        for key, read in [("margin", False)] + ([("margin_read", True)] if reader else []):
            parts = [_inputs(model, val.arrays, rows[i : i + 256], device, read)
                     for i in range(0, len(rows), 256)]  # fmt: skip
            chosen[key], got = _validate(head, parts, margin, "val_read" if read else "val")
            out.update(got)
    with torch.no_grad():
        for key, value in chosen.items():
            getattr(head, key).fill_(value)
    for key, value in chosen.items():
        out[key] = value if math.isfinite(value) else None  # None: copy every token
    model.train(was_training)
    return out


def _option(bundle) -> dict:
    from training.image_context import image_levels

    return {"next_frame_levels": image_levels(bundle)}


def main(argv: list[str] | None = None) -> int:
    """`m2 fit-next-frame`: a serving checkpoint -> the same checkpoint with a next-frame
    head (the next key frame from the frame and the forecast) fitted on a prepared data
    folder (the transformer's weights are unchanged)."""
    from training import refit

    return refit.main(
        argv,
        prog="m2 fit-next-frame",
        description=main.__doc__,
        part="next_frame",
        option=_option,
        fit=fit,
        steps=(8000, "AdamW steps (default 8000: ~16 min on 2 CPU cores)"),
        batch_size=64,
        summary=_summary,
        options={
            "--margin": dict(
                type=float, default=None, dest="margin",
                help="change a token only where the head's guess beats the present one by more "
                "than this many nats (default: the most accurate on validation frames)",
            ),
            **refit.READ_SHARE_OPTION,
        },
    )  # fmt: skip


def _summary(got: dict[str, float]) -> str:
    out = []
    for key, what in (("val", ""), ("val_read", "from the read skeleton: ")):
        if f"{key}_token_accuracy" not in got:
            continue
        m = got["margin_read" if key == "val_read" else "margin"]
        m = "none (copies the frame)" if m is None else f"{m:g} nats"
        out.append(f"{what}margin {m}; validation token accuracy "
                   f"{got[f'{key}_token_accuracy']:.4f}, copying the frame "
                   f"{got[f'{key}_copy_accuracy']:.4f}, {got[f'{key}_changed']:.2%} of tokens changed")  # fmt: skip
    return "; ".join(out)
